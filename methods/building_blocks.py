"""Modules and block surgery shared by the methods.

Methods never fork timm or open_clip classes: they wrap a block in :class:`AdaptedBlock` (side
branches on its two residual sub-blocks), wrap a block sequence in :class:`PromptedBlocks` (prompt
tokens), or wrap a single ``nn.Linear`` (LoRA). The wrapped module keeps its own forward code.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from petl_bench.backbones import CLIP, SWIN, VIT, BackboneInfo


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the activation of CLIP, Convpass and NOAH's adapter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Bottleneck(nn.Module):
    """down (width -> dim) -> activation -> dropout -> up (dim -> width); ``linear(in, out)`` makes the
    two projections (``nn.Linear`` with bias by default)."""

    def __init__(
        self,
        width: int,
        dim: int,
        activation: nn.Module,
        dropout: float,
        linear: Callable[[int, int], nn.Module] = nn.Linear,
    ):
        super().__init__()
        self.down = linear(width, dim)
        self.act = activation
        self.dropout = nn.Dropout(dropout)
        self.up = linear(dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast_call(self.up, self.dropout(self.act(cast_call(self.down, x))))


@torch.no_grad()
def xavier_init_(module: Bottleneck, zero_up: bool = False) -> Bottleneck:
    """xavier_uniform weights and N(0, 1e-6) biases (NOAH's AdapterSuper; PETL_Vision's ``xavier``), or with
    ``zero_up`` the up-projection and both biases zero (PETL_Vision's ``lora_xavier``: the identity at init)."""
    for linear in (module.down, module.up):
        nn.init.xavier_uniform_(linear.weight)
        nn.init.normal_(linear.bias, std=1e-6)
    if zero_up:
        for tensor in (module.down.bias, module.up.weight, module.up.bias):
            nn.init.zeros_(tensor)
    return module


@torch.no_grad()
def scale_outputs_(module: nn.Module, scale: torch.Tensor, shift: torch.Tensor | None = None) -> nn.Module:
    """Fold ``y -> scale * y + shift`` (per output channel) into a conv, Linear or LayerNorm: ``W' = diag(scale) W``,
    ``b' = scale * b + shift`` (a bias is created for a shift when the module has none)."""
    scale = scale.to(module.weight.dtype)
    module.weight.mul_(scale.view(-1, *([1] * (module.weight.ndim - 1))))
    if shift is not None and module.bias is None:
        module.bias = nn.Parameter(torch.zeros_like(scale), requires_grad=False)
    if module.bias is not None:
        module.bias.mul_(scale)
        if shift is not None:
            module.bias.add_(shift.to(module.bias.dtype))
    return module


class CastTogether:
    """Small trained tensors used in the compute dtype (bf16 under autocast), cast together once per forward
    pass of ``backbone``: one ``cat`` and one cast for all of them, and one of each for their gradients, instead
    of a cast per tensor and use (two kernels per tensor and step on a GPU whose host launches bound the step).
    The values and gradients are bitwise those of casting each. The tensors are named by (module, attribute),
    read at each pass (a parameter swapped in, as ``torch.func.functional_call`` does, is the one cast).
    :meth:`cast` gives tensor ``index`` in a dtype; the cast copies live for one forward pass (cleared by the
    backbone's hooks)."""

    def __init__(self, backbone: nn.Module, owners: list[tuple[nn.Module, str]]):
        self.owners = owners
        self.cast_copies: tuple[torch.dtype, tuple[torch.Tensor, ...]] | None = None
        backbone.register_forward_pre_hook(self.clear)
        backbone.register_forward_hook(self.clear)

    def cast(self, index: int, dtype: torch.dtype) -> torch.Tensor:
        module, name = self.owners[index]
        tensor = getattr(module, name)
        if dtype == tensor.dtype:
            return tensor
        if self.cast_copies is None or self.cast_copies[0] != dtype:
            tensors = [getattr(owner, attribute) for owner, attribute in self.owners]
            flat = torch.cat([t.reshape(-1) for t in tensors]).to(dtype)
            self.cast_copies = (dtype, flat.split([t.numel() for t in tensors]))
        return self.cast_copies[1][index].view(tensor.shape)

    def clear(self, *hook_arguments) -> None:
        self.cast_copies = None


def cast_together(backbone: nn.Module, modules: list[nn.Module], names: tuple[str, ...]) -> None:
    """Wire the tensors ``names`` of each of ``modules`` (those that are not None) to one :class:`CastTogether`
    on ``backbone``; the modules read them through :func:`cast_wired` (or :func:`cast_call`)."""
    owners: list[tuple[nn.Module, str]] = []
    indices = []
    for module in modules:
        present = [name for name in names if getattr(module, name) is not None]
        indices.append({name: len(owners) + offset for offset, name in enumerate(present)})
        owners += [(module, name) for name in present]
    together = CastTogether(backbone, owners)
    for module, index in zip(modules, indices):
        module.__dict__["together"] = (together, index)


def cast_wired(module: nn.Module, name: str, dtype: torch.dtype) -> torch.Tensor:
    """``module``'s tensor ``name`` in ``dtype``: from the :class:`CastTogether` it is wired to
    (:func:`cast_together`), or cast alone when it is not."""
    together = module.__dict__.get("together")
    if together is None:
        return getattr(module, name).to(dtype)
    cache, index = together
    return cache.cast(index[name], dtype)


def cast_call(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for an ``nn.Linear`` or ``nn.Conv2d``; under autocast, when wired by :func:`cast_together`,
    with its weight and bias cast once per pass with the others: the values autocast would cast at this use."""
    if layer.__dict__.get("together") is None or not torch.is_autocast_enabled(x.device.type):
        return layer(x)
    dtype = torch.get_autocast_dtype(x.device.type)
    weight = cast_wired(layer, "weight", dtype)
    bias = cast_wired(layer, "bias", dtype) if layer.bias is not None else None
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, weight, bias)
    return F.linear(x, weight, bias)


@dataclass(frozen=True)
class Residual:
    """One pre-norm residual sub-block of a transformer block: ``x + drop_path(branch(norm(x)))``."""

    norm: nn.Module
    branch: Callable[[torch.Tensor], torch.Tensor]
    drop_path: nn.Module


def residuals(block: nn.Module, kind: str, kwargs: dict) -> tuple[Residual, Residual]:
    """The attention and MLP sub-blocks of a timm ViT / timm Swin / open_clip block, as its forward runs them.

    timm's Swin block flattens the tokens between the two sub-blocks; LayerNorm, the MLP and
    drop-path act per token / per sample, so running both sub-blocks on the NHWC tensor is the same.
    """
    if kind == VIT:
        return (
            Residual(block.norm1, lambda y: block.ls1(block.attn(y, **kwargs)), block.drop_path1),
            Residual(block.norm2, lambda y: block.ls2(block.mlp(y)), block.drop_path2),
        )
    if kind == SWIN:
        return (
            Residual(block.norm1, block._attn, block.drop_path1),
            Residual(block.norm2, block.mlp, block.drop_path2),
        )
    if kind == CLIP:
        return (
            Residual(block.ln_1, lambda y: block.ls_1(block.attention(y, **kwargs)), nn.Identity()),
            Residual(block.ln_2, lambda y: block.ls_2(block.mlp(y)), nn.Identity()),
        )
    raise ValueError(f"no residual view for block kind '{kind}'")


class Tap(enum.Enum):
    """Where a side branch reads a residual sub-block."""

    INPUT = "input"  # the residual stream entering the sub-block (AdaptFormer)
    NORM = "norm"  # the sub-block's LayerNorm output, shared with attention / MLP (Convpass)
    OUTPUT = "output"  # the drop-pathed sub-block output (NOAH's sequential adapter)


class AdaptedBlock(nn.Module):
    """A transformer block whose residual sub-blocks get side branches.

    Each sub-block computes ``h = drop_path(branch(norm(x)))`` and returns ``x + h + scale * z`` with
    ``z = side(t)`` (or ``drop_path(side(t))`` when ``drop_path_side``), where ``t`` is chosen by ``tap``;
    with ``drop_path_sum`` it returns ``x + drop_path(h + scale * z)`` instead (PETL_Vision's sequential
    adapters drop-path the adapted output a second time).
    Sub-blocks without a side branch run unchanged. Side branches are named ``adapter_attn`` and
    ``adapter_mlp``, as in the official Convpass code, so its checkpoints load by name.
    """

    def __init__(
        self,
        block: nn.Module,
        kind: str,
        tap: Tap,
        *,
        drop_path_side: bool,
        scale: float = 1.0,
        attn: nn.Module | None = None,
        mlp: nn.Module | None = None,
        drop_path_sum: bool = False,
    ):
        super().__init__()
        self.block = block
        self.kind = kind
        self.tap = tap
        self.drop_path_side = drop_path_side
        self.drop_path_sum = drop_path_sum
        self.scale = scale
        self.register_module("adapter_attn", attn)
        self.register_module("adapter_mlp", mlp)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        for residual, side in zip(residuals(self.block, self.kind, kwargs), (self.adapter_attn, self.adapter_mlp)):
            y = residual.norm(x)
            h = residual.drop_path(residual.branch(y))
            if side is None:
                x = x + h
                continue
            z = side({Tap.INPUT: x, Tap.NORM: y, Tap.OUTPUT: h}[self.tap])
            if self.drop_path_side:
                z = residual.drop_path(z)
            if self.drop_path_sum:
                x = x + residual.drop_path(h + z * self.scale)
            else:
                x = x + h + z * self.scale
        return x


def adapt_blocks(
    model: nn.Module,
    info: BackboneInfo,
    make_sides: Callable[[int], tuple[nn.Module | None, nn.Module | None]],
    tap: Tap,
    *,
    drop_path_side: bool,
    scale: float = 1.0,
    drop_path_sum: bool = False,
) -> list[nn.Parameter]:
    """Wrap every block of ``model`` in an :class:`AdaptedBlock`; ``make_sides(i)`` -> (attn side, mlp side)."""
    params: list[nn.Parameter] = []
    sides: list[nn.Module] = []
    for index, path in enumerate(info.block_paths):
        attn, mlp = make_sides(index)
        sides += [side for side in (attn, mlp) if side is not None]
        wrapped = AdaptedBlock(
            model.get_submodule(path),
            info.kind,
            tap,
            drop_path_side=drop_path_side,
            scale=scale,
            attn=attn,
            mlp=mlp,
            drop_path_sum=drop_path_sum,
        )
        model.set_submodule(path, wrapped)
        params += [p for side in (attn, mlp) if side is not None for p in side.parameters()]
    layers = [m for side in sides for m in side.modules() if type(m) in (nn.Linear, nn.Conv2d)]
    cast_together(model, layers, ("weight", "bias"))  # plain trained layers, which the sides call with cast_call
    return params


class PromptedBlocks(nn.Module):
    """Runs a block sequence with learnable prompt tokens spliced into the token sequence.

    Before block ``i`` that has prompts, the prompt slots of the previous block (if any) are replaced
    by ``dropout(prompts[i])``, expanded over the batch first so each image gets its own dropout mask
    (VPT's and NOAH's code); blocks without prompts carry the previous prompt outputs along. Prompts
    sit after the ``insert_at`` prefix tokens (VPT) or, with ``insert_at=None``, at the end of the
    sequence (NOAH). The final prompt outputs are removed, so the norm, pooling and classifier see the
    original token layout and can never pool over prompts.
    """

    def __init__(self, blocks: nn.Module, prompts: dict[int, nn.Parameter], insert_at: int | None, dropout: float):
        super().__init__()
        self.blocks = blocks
        self.prompts = nn.ParameterDict({str(i): p for i, p in prompts.items()})
        self.insert_at = insert_at
        self.dropout = nn.Dropout(dropout)
        self.lengths: dict[int, int] = {}  # block -> prompt tokens in use (the first ones); default all

    def prompt(self, index: int) -> torch.Tensor | None:
        """Block ``index``'s prompt tokens in use, or None."""
        if str(index) not in self.prompts:
            return None
        length = self.lengths.get(index, self.prompts[str(index)].shape[1])
        return self.prompts[str(index)][:, :length] if length else None

    def _splice(self, x: torch.Tensor, current: int, prompt: torch.Tensor | None) -> torch.Tensor:
        """Replace ``current`` prompt tokens by ``prompt`` (None: remove them)."""
        parts = []
        if prompt is not None:
            parts.append(self.dropout(prompt.expand(x.shape[0], -1, -1)))  # a mask per image, as VPT and NOAH
        if self.insert_at is None:
            return torch.cat([x[:, : x.shape[1] - current], *parts], dim=1)
        start = self.insert_at
        return torch.cat([x[:, :start], *parts, x[:, start + current :]], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        current = 0
        for index, block in enumerate(self.blocks):
            prompt = self.prompt(index)
            if prompt is not None:
                x = self._splice(x, current, prompt)
                current = prompt.shape[1]
            x = block(x)
        return self._splice(x, current, None) if current else x


def train_prompt_dropouts(model: nn.Module, mode: bool) -> None:
    """The prompt dropout of every :class:`PromptedBlocks` follows ``mode`` while the frozen encoder around it
    stays in eval mode (VPT's and E2VPT's training)."""
    for module in model.modules():
        if isinstance(module, PromptedBlocks):
            module.dropout.train(mode)


INIT_CHOICES = ("official", "module")


def check_init(method: str, init: str) -> None:
    if init not in INIT_CHOICES:
        from petl_bench.errors import UserError

        raise UserError(f"{method}.init is {init!r}; choose from: {', '.join(INIT_CHOICES)}")


def prompt_init_bound(info: BackboneInfo) -> float:
    """VPT's uniform init bound sqrt(6 / (3 * patch_h * patch_w + width)) (0.0625 for ViT-B/16)."""
    return math.sqrt(6.0 / (3 * info.patch_size[0] * info.patch_size[1] + info.widths[0]))


def task_table(method: str) -> dict[str, dict]:
    """A method's per-task defaults, from ``<method>.tasks.json`` beside the methods (keys starting with
    ``_`` are notes, such as the ``_source`` of the values)."""
    import json
    from importlib.resources import files

    data = json.loads((files("petl_bench.methods") / f"{method}.tasks.json").read_text(encoding="utf-8"))
    return {task: values for task, values in data.items() if not task.startswith("_")}


class AdaptedInput(nn.Module):
    """``linear(adapter(x))`` for a linear adapter (``affine()`` -> ``(M, c)`` with ``adapter(z) = M z + c``), which
    folds into the Linear exactly: ``W' = W M``, ``b' = b + W c`` (RepAdapter, ARC)."""

    def __init__(self, linear: nn.Linear, adapter: nn.Module):
        super().__init__()
        self.linear = linear
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.adapter(x))

    @torch.no_grad()
    def folded(self) -> nn.Linear:
        m, c = (t.to(self.linear.weight.dtype) for t in self.adapter.affine())
        weight = self.linear.weight.clone()
        self.linear.weight.copy_(weight @ m)
        if self.linear.bias is None:
            self.linear.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype), requires_grad=False)
        self.linear.bias += weight @ c
        return self.linear
