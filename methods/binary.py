"""Binary adapters (Jie, Xu & Deng, "Revisiting the Parameter Efficiency of Adapters from the Perspective
of Precision Redundancy", ICCV 2023): Bi-AdaptFormer and Bi-LoRA, as JieShibo/PETL-ViT ``binary_adapter/``.

The adapter matrices are trained quantisation-aware (``QLinear``, bias-free): the latent weight ``W`` is
standardised with its own mean and (unbiased) std, which stay in the graph, ``Z = (W - mu) / (sigma + 1e-5)``;
``Q(Z)`` rounds to the nearest of ``2^bits`` codes from the normal quantile construction (1 bit: +-0.6745)
with a straight-through gradient; the layer computes with ``Q(Z) sigma + mu``. The stored checkpoint
keeps the codes packed (``bits`` per weight) plus mu and sigma as fp32 per matrix, then the fp32 head:
``checkpoint_bytes`` reports that size (455,440 bytes for Bi-LoRA, d = 32, on ViT-B/16 with 100 classes).
Down projections keep PyTorch's init; up projections are trunc_normal(std 0.001, cut at +-0.002), so
neither method is the identity at init. ``bits=32`` trains plain bias-free Linears (up zero).

* ``bi_adaptformer``: ``x + DP(mlp(norm2 x)) + s * up(dropout(ReLU(down(x))))`` (AdaptFormer's placement).
* ``bi_lora``: ``qkv(x) + s * [up_q(dropout(down_q x)); 0; up_v(dropout(down_v x))]``; folds into ``qkv``
  with the de-quantised weights (losing the 1-bit storage).

``bihead=true`` replaces the classifier by a 1-bit ``QLinear`` without bias (the official ``-bihead``
methods); it is then packed too. The official runs feed un-normalised inputs (ToTensor only).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from petl_bench.backbones import VIT
from petl_bench.errors import UserError
from petl_bench.model import Method
from petl_bench.registry import register_method

from .building_blocks import Bottleneck, Tap, adapt_blocks, task_table
from .lora import LoRA, QVLoRA

BITS = (1, 2, 4, 8, 32)
CITATION = "Jie, Xu & Deng, Revisiting the Parameter Efficiency of Adapters from the Perspective of Precision Redundancy, ICCV 2023"


def normal_codes(bits: int, iterations: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, thresholds) of the ``bits``-bit quantiser: each code is the N(0, 1) quantile at the probability
    mid-point of its cell, each threshold the mid-point of two codes, iterated to a fixed point."""
    values = torch.zeros(2**bits, dtype=torch.float64)
    thresholds = torch.zeros(2**bits - 1, dtype=torch.float64)
    for _ in range(iterations):
        thresholds = (values[1:] + values[:-1]) / 2
        bounds = torch.cat(
            [torch.zeros(1, dtype=torch.float64), torch.special.ndtr(thresholds), torch.ones(1, dtype=torch.float64)]
        )
        values = torch.special.ndtri((bounds[1:] + bounds[:-1]) / 2)
    return values.float(), thresholds.float()


class QLinear(nn.Linear):
    """A bias-free Linear computing with its quantised weight; the gradient passes straight through."""

    def __init__(self, in_features: int, out_features: int, bits: int):
        super().__init__(in_features, out_features, bias=False)
        self.bits = bits
        codes, thresholds = normal_codes(bits)
        self.register_buffer("thresholds", thresholds, persistent=False)
        self.register_buffer("half_steps", (codes[1:] - codes[:-1]) / 2, persistent=False)

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """The nearest code of every entry (a sum of signed half-steps, as the official quantiser)."""
        return (torch.sign(z.unsqueeze(-1) - self.thresholds) * self.half_steps).sum(-1)

    def effective_weight(self) -> torch.Tensor:
        w = self.weight
        mean, std = w.mean(), w.std()
        z = (w - mean) / (std + 1e-5)
        quantized = self.quantize(z).detach() + z - z.detach()
        return quantized * std + mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight())

    def stored_bytes(self) -> int:
        return self.weight.numel() * self.bits // 8 + 8  # packed codes, then fp32 mean and std


def stacked_effective_weights(layers: list[QLinear]) -> list[torch.Tensor]:
    """Every layer's ``effective_weight()`` (same bits and size) from one pass over the stacked latent weights:
    one quantiser's kernels for all of them instead of one set per matrix (the same values)."""
    stacked = torch.stack([layer.weight.reshape(-1) for layer in layers])
    mean, std = stacked.mean(-1, keepdim=True), stacked.std(-1, keepdim=True)
    z = (stacked - mean) / (std + 1e-5)
    quantized = layers[0].quantize(z).detach() + z - z.detach()
    rows = (quantized * std + mean).unbind(0)
    return [row.view_as(layer.weight) for row, layer in zip(rows, layers)]


class StackedQVLoRA(QVLoRA):
    """Bi-LoRA's q and v branches with their four quantised matrices de-quantised together
    (:func:`stacked_effective_weights`); names, parameters and values are :class:`QVLoRA`'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, v = self.lora_q, self.lora_v
        down_q, up_q, down_v, up_v = stacked_effective_weights([q.down, q.up, v.down, v.up])
        delta_q = F.linear(q.dropout(F.linear(x, down_q)), up_q)
        delta_v = F.linear(v.dropout(F.linear(x, down_v)), up_v)
        return self.qkv(x) + self.scale * torch.cat([delta_q, torch.zeros_like(delta_q), delta_v], dim=-1)


class StackedBottleneck(Bottleneck):
    """Bi-AdaptFormer's bottleneck with its two quantised matrices de-quantised together (the same values)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = stacked_effective_weights([self.down, self.up])
        return F.linear(self.dropout(self.act(F.linear(x, down))), up)


def projection(bits: int):
    """``make(in, out)``: a quantised Linear, or a plain bias-free one at 32 bits."""
    if bits == 32:
        return lambda fan_in, fan_out: nn.Linear(fan_in, fan_out, bias=False)
    return lambda fan_in, fan_out: QLinear(fan_in, fan_out, bits)


@torch.no_grad()
def init_up(linear: nn.Linear, bits: int) -> nn.Linear:
    if bits == 32:
        nn.init.zeros_(linear.weight)
    else:
        nn.init.trunc_normal_(linear.weight, std=0.001, a=-0.002, b=0.002)
    return linear


def quantized_low_rank(width: int, dim: int, dropout: float, bits: int) -> nn.Sequential:
    """``down -> dropout -> up`` of quantised Linears (LoRA's branch, bias-free)."""
    make = projection(bits)
    layers = [("down", make(width, dim)), ("dropout", nn.Dropout(dropout)), ("up", init_up(make(dim, width), bits))]
    return nn.Sequential(OrderedDict(layers))


@dataclass
class BinaryConfig:
    dim: int = 32
    bits: int = 1
    scale: float = 1.0
    dropout: float = 0.1
    bihead: bool = False  # Bi-Head: a 1-bit, bias-free classifier (the official '-bihead' methods)


class BinaryMethod(Method):
    """What both binary adapters share: config, checks and the packed checkpoint size."""

    citation = CITATION
    kinds = (VIT,)
    Config = BinaryConfig
    search_space = {"scale": (0.01, 0.1, 1, 10, 100)}

    def check_config(self, config):
        if config.bits not in BITS:
            raise UserError(f"{self.name}.bits is {config.bits}; choose from: {', '.join(map(str, BITS))}")

    def stored_bytes(self, model) -> int | None:
        """The official ``.bin``: every quantised matrix packed (Bi-Head's classifier too), then the fp32
        head (weight, bias) unless it is a Bi-Head."""
        layers = [m for m in model.backbone.modules() if isinstance(m, QLinear)]
        if not layers:
            return None
        head = 0 if isinstance(model.head, QLinear) else 4 * sum(p.numel() for p in model.head.parameters())
        return sum(layer.stored_bytes() for layer in layers) + head

    def binary_head(self, model, info, config) -> None:
        """Bi-Head: the classifier becomes ``QLinear(width -> classes, 1 bit)`` with PyTorch's init, no bias."""
        if config.bihead:
            head = model.get_submodule(info.head_path)
            model.set_submodule(info.head_path, QLinear(head.in_features, head.out_features, bits=1))


@register_method
class BiAdaptFormer(BinaryMethod):
    """A 1-bit AdaptFormer: a quantised ReLU bottleneck beside the MLP, fed the residual stream."""

    name = "bi_adaptformer"
    identity_at_init = False
    published_as = ("Bi-AdaptFormer",)
    trains = "1 quantised bias-free bottleneck beside each MLP (2hd latent weights, stored at `bits` each)"
    task_defaults = task_table("bi_adaptformer")

    def attach(self, model, info, config):

        def adapter(width: int) -> Bottleneck:
            kind = Bottleneck if config.bits == 32 else StackedBottleneck
            module = kind(width, config.dim, nn.ReLU(), config.dropout, linear=projection(config.bits))
            init_up(module.up, config.bits)
            return module

        self.binary_head(model, info, config)
        return adapt_blocks(
            model, info, lambda i: (None, adapter(info.widths[i])), Tap.INPUT, drop_path_side=False, scale=config.scale
        )


@register_method
class BiLoRA(BinaryMethod):
    """A 1-bit LoRA on the query and value projections."""

    name = "bi_lora"
    identity_at_init = False
    published_as = ("Bi-LoRA",)
    trains = "quantised rank-d updates of q and v in every block (4hd latent weights, stored at `bits` each)"
    task_defaults = task_table("bi_lora")
    merges = True

    @torch.no_grad()
    def merge(self, model):
        """``W_q``, ``W_v`` += the de-quantised updates; a Bi-Head becomes a plain bias-free Linear."""
        LoRA.merge(self, model)
        head = model.head
        if isinstance(head, QLinear):
            plain = nn.Linear(head.in_features, head.out_features, bias=False).to(head.weight.device)
            plain.weight.copy_(head.effective_weight())
            model.backbone.set_submodule(model.info.head_path, plain)

    def attach(self, model, info, config):
        self.binary_head(model, info, config)
        params: list[nn.Parameter] = []
        for path in info.block_paths:
            attention = model.get_submodule(path).attn
            width = attention.qkv.in_features
            branch = functools.partial(quantized_low_rank, width, config.dim, config.dropout, config.bits)
            kind = QVLoRA if config.bits == 32 else StackedQVLoRA
            wrapped = kind(attention.qkv, config.dim, config.dropout, config.scale, branch=branch)
            attention.qkv = wrapped
            params += wrapped.delta_parameters()
        return params
