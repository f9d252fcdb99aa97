"""LoRA on the attention's fused qkv projection (Hu et al. 2022).

``variant="qkv"`` (default) is NOAH's LoRA, which produced the Convpass table's numbers: one shared
down matrix A and one up matrix B onto all of q, k and v, input dropout, no scaling.
``variant="qv"`` is the q/v-only LoRA the Convpass paper's text describes (the authors' later code):
separate q and v branches, dropout after the down projection, scale s. Parameter counts are equal.

Effective init (``init="official"``, the default, for the ``qkv`` variant): NOAH builds LoRA's A and B
as ``nn.Linear`` inside its ViT and then runs timm's ``init_weights`` (``self.apply(_init_vit_weights)``),
which overwrites both with trunc_normal(std 0.02): in the runs behind the table B is **not** zero and
LoRA does not start as the identity. The classifier is NOAH's ``reset_classifier``: trunc_normal(0.02),
zero bias. ``init="module"`` is the module-level init users expect (A kaiming_uniform(a=sqrt(5)), B
zero: the identity at init); the ``qv`` variant always uses it. Source: ZhangYuanhan-AI/NOAH,
model/supernet_vision_transformer_timm.py (``Attention.__init__``, ``init_weights``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from petl_bench.backbones import SWIN, VIT
from petl_bench.errors import UserError
from petl_bench.model import Method, vit_linear_init_
from petl_bench.registry import register_method

from .building_blocks import check_init


def low_rank(width: int, rank: int, out_features: int, dropout: float, dropout_first: bool) -> nn.Sequential:
    """Bias-free ``up(down(x))`` with dropout on the input or between the two; down keeps PyTorch's
    kaiming_uniform(a=sqrt(5)) init and up is zero, so the update is exactly zero at init."""
    down = nn.Linear(width, rank, bias=False)
    nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
    up = nn.Linear(rank, out_features, bias=False)
    nn.init.zeros_(up.weight)
    order = ("dropout", "down", "up") if dropout_first else ("down", "dropout", "up")
    layers = {"dropout": nn.Dropout(dropout), "down": down, "up": up}
    return nn.Sequential(OrderedDict((name, layers[name]) for name in order))


class FusedQKVLoRA(nn.Module):
    """``qkv(x) + B A dropout(x)`` with ``B: rank -> 3 * width`` (NOAH)."""

    def __init__(self, qkv: nn.Linear, rank: int, dropout: float):
        super().__init__()
        self.qkv = qkv
        self.lora = low_rank(qkv.in_features, rank, qkv.out_features, dropout, dropout_first=True)

    def delta_parameters(self) -> list[nn.Parameter]:
        return list(self.lora.parameters())

    def delta_weight(self) -> torch.Tensor:
        """The update as a weight: ``B A`` (dropout is the identity in eval mode)."""
        return self.lora.up.weight @ self.lora.down.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qkv(x) + self.lora(x)


def used_weight(linear: nn.Module) -> torch.Tensor:
    """The weight a Linear computes with (a quantised layer's de-quantised weight)."""
    effective = getattr(linear, "effective_weight", None)
    return effective() if effective is not None else linear.weight


class QVLoRA(nn.Module):
    """``qkv(x) + s * [up_q(dropout(down_q x)), 0, up_v(dropout(down_v x))]``; ``branch()`` makes each
    ``down -> dropout -> up`` (by default :func:`low_rank`)."""

    def __init__(self, qkv: nn.Linear, rank: int, dropout: float, scale: float, branch=None):
        super().__init__()
        self.qkv = qkv
        width = qkv.out_features // 3
        branch = branch or (lambda: low_rank(qkv.in_features, rank, width, dropout, dropout_first=False))
        self.lora_q = branch()
        self.lora_v = branch()
        self.scale = scale

    def delta_parameters(self) -> list[nn.Parameter]:
        return [*self.lora_q.parameters(), *self.lora_v.parameters()]

    def delta_weight(self) -> torch.Tensor:
        """``s [B_q A_q; 0; B_v A_v]`` (dropout is the identity in eval mode)."""
        delta_q = used_weight(self.lora_q.up) @ used_weight(self.lora_q.down)
        delta_v = used_weight(self.lora_v.up) @ used_weight(self.lora_v.down)
        return self.scale * torch.cat([delta_q, torch.zeros_like(delta_q), delta_v])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta_q = self.lora_q(x)
        delta = torch.cat([delta_q, torch.zeros_like(delta_q), self.lora_v(x)], dim=-1)
        return self.qkv(x) + self.scale * delta


@dataclass
class LoRAConfig:
    rank: int = 8
    dropout: float = 0.1
    variant: str = "qkv"  # "qkv" (NOAH, the table's numbers) or "qv" (the paper text)
    scale: float = 1.0  # used by the "qv" variant only; NOAH's LoRA has no scaling
    init: str = "official"  # "official": NOAH's runs (A, B trunc_normal 0.02); "module": zero B (identity)


@register_method
class LoRA(Method):
    """Low-rank updates of the fused qkv projection in every block."""

    name = "lora"
    citation = "Hu et al., LoRA, ICLR 2022; NOAH variant (Zhang et al. 2022) as in the Convpass table"
    trains = "rank-r update of every qkv projection (r * (d + 3d) parameters per block)"
    kinds = (VIT, SWIN)
    Config = LoRAConfig
    head_init = "trunc_normal"

    def is_identity_at_init(self, config) -> bool:
        """NOAH's init (A and B trunc_normal) is not the identity; zero B (``init=module``, or the paper's
        ``qv`` variant) is."""
        return config.init == "module" or config.variant == "qv"

    def check_config(self, config):
        check_init(self.name, config.init)
        if config.variant not in ("qkv", "qv"):
            raise UserError(f"lora.variant must be 'qkv' or 'qv', not {config.variant!r}")

    merges = True

    @torch.no_grad()
    def merge(self, model):
        """``W_qkv += delta`` in every block, and the wrapper replaced by the plain qkv Linear."""
        for path in model.info.block_paths:
            attention = model.backbone.get_submodule(path).attn
            wrapped = attention.qkv
            wrapped.qkv.weight += wrapped.delta_weight().to(wrapped.qkv.weight.dtype)
            attention.qkv = wrapped.qkv

    def attach(self, model, info, config):
        params: list[nn.Parameter] = []
        for path in info.block_paths:
            attention = model.get_submodule(path).attn
            if config.variant == "qkv":
                wrapped = FusedQKVLoRA(attention.qkv, config.rank, config.dropout)
            else:
                wrapped = QVLoRA(attention.qkv, config.rank, config.dropout, config.scale)
            if config.init == "official" and config.variant == "qkv":
                vit_linear_init_([wrapped.lora])
            attention.qkv = wrapped
            params += wrapped.delta_parameters()
        return params
