"""RepAdapter (Luo et al., 2023): the ``repblock`` and ``repattn`` variants of the official luogen1996/RepAdapter code.

A linear adapter ``R(z) = z + s * (B dropout(A z + a) + b)`` before attention and before the MLP, after
their LayerNorms: ``x + DP(attn(R(norm1 x)))``, ``x + DP(mlp(R(norm2 x)))``. ``A`` is a dense 1x1 conv
(d -> h, xavier_uniform, zero bias), ``B`` a grouped 1x1 conv (h -> d, 2 groups, zero weight and bias),
so the model starts as the backbone; no activation; ``s`` fixed per task. In timm the LayerNorm output
feeds only ``qkv`` (and ``fc1``), so the adapter wraps their input, which keeps fused attention. Being
linear, it folds into the following Linear (``W' = W M``, ``b' = b + W c`` with ``R(z) = M z + c``),
as the official ``set_RepWeight``. Parameters keep the official conv shapes (``conv_A``, ``conv_B``).
``repadapter_attn`` (``repattn``) adapts only the attention input. Source: luogen1996/RepAdapter,
repadapter.py, configs/{repblock,repattn}/<task>.yaml.

Equal in distribution, not in draws: the blocks use timm's ``drop_path1`` / ``drop_path2`` where the
official block uses ``drop_path1`` for both (the same rate), and dropout acts in the token layout
rather than the transposed conv layout (the same i.i.d. masks over other memory orders).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from petl_bench.backbones import SWIN, VIT
from petl_bench.errors import UserError
from petl_bench.model import Method
from petl_bench.registry import register_method

from .building_blocks import AdaptedInput, task_table


class RepAdapter(nn.Module):
    """``z + s * (B dropout(A z + a) + b)`` on the last dimension; B has ``groups`` diagonal blocks."""

    def __init__(self, width: int, dim: int, groups: int, scale: float, dropout: float):
        super().__init__()
        self.conv_A = nn.Conv1d(width, dim, 1)
        self.conv_B = nn.Conv1d(dim, width, 1, groups=groups)
        self.dropout = nn.Dropout(dropout)
        self.groups = groups
        self.scale = scale
        nn.init.xavier_uniform_(self.conv_A.weight)
        for tensor in (self.conv_A.bias, self.conv_B.weight, self.conv_B.bias):
            nn.init.zeros_(tensor)

    def dense_b(self) -> torch.Tensor:
        """B as a dense ``width x dim`` matrix (block diagonal)."""
        weight = self.conv_B.weight.squeeze(-1)  # width x dim/groups
        return torch.block_diag(*weight.chunk(self.groups, dim=0))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        hidden = self.dropout(F.linear(z, self.conv_A.weight.squeeze(-1), self.conv_A.bias))
        # the grouped 1x1 conv as one product with its block-diagonal matrix (dim is small): one kernel where
        # a grouped einsum expands into permutes, a batched product and copies; the same sums (plus zeros)
        up = F.linear(hidden, self.dense_b(), self.conv_B.bias)
        return z + up * self.scale

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, c)`` with ``R(z) = M z + c`` in eval mode."""
        b = self.dense_b()
        a = self.conv_A.weight.squeeze(-1)
        identity = torch.eye(b.shape[0], dtype=b.dtype, device=b.device)
        return identity + self.scale * b @ a, self.scale * (b @ self.conv_A.bias + self.conv_B.bias)


@dataclass
class RepAdapterConfig:
    dim: int = 8  # h, the official --dim default
    groups: int = 2
    scale: float = 1.0
    dropout: float = 0.1


@register_method
class RepAdapterMethod(Method):
    """RepAdapter (repblock): a linear, re-parameterisable adapter before attention and before the MLP."""

    name = "repadapter"
    identity_at_init = True
    published_as = ("RepAdapter",)
    citation = "Luo et al., Towards Efficient Visual Adaption via Structural Re-parameterization (RepAdapter), 2023"
    trains = "2 linear adapters per block before qkv and fc1 (dh + h + dh/g + d parameters each)"
    kinds = (VIT, SWIN)
    Config = RepAdapterConfig
    task_defaults = task_table("repadapter")
    search_space = {"scale": (0.1, 0.5, 1, 5, 10)}  # the official scripts/search_repblock.sh
    merges = True
    targets = ("attn.qkv", "mlp.fc1")  # the Linears whose input is adapted, in every block

    def check_config(self, config):
        if config.dim % config.groups:  # dim, groups >= 1: the common bounds
            raise UserError(f"repadapter.dim ({config.dim}) must be a positive multiple of groups ({config.groups})")

    def attach(self, model, info, config):
        params = []
        for path, width in zip(info.block_paths, info.widths):
            if width % config.groups:
                raise UserError(f"repadapter.groups ({config.groups}) must divide the width {width}")
            for target in (f"{path}.{name}" for name in self.targets):
                adapter = RepAdapter(width, config.dim, config.groups, config.scale, config.dropout)
                model.set_submodule(target, AdaptedInput(model.get_submodule(target), adapter))
                params += list(adapter.parameters())
        return params

    def merge(self, model):
        for path in model.info.block_paths:
            for target in (f"{path}.{name}" for name in self.targets):
                model.backbone.set_submodule(target, model.backbone.get_submodule(target).folded())


@register_method
class RepAdapterAttn(RepAdapterMethod):
    """RepAdapter (repattn): the adapter before attention only; the MLP is unchanged."""

    name = "repadapter_attn"
    published_as = ("RepAdapter_attn",)
    trains = "1 linear adapter per block before qkv (dh + h + dh/g + d parameters)"
    task_defaults = task_table("repadapter_attn")
    targets = ("attn.qkv",)
