"""Mona, the multi-cognitive visual adapter (Yin et al., CVPR 2025; official Leiyi-Hu/mona 5deeac9,
Swin-Transformer-Classification/mmcls/models/backbones/swin_transformer_mona.py; Swin only).

Two modules per block, on the residual stream after each residual add (``my_module_1`` after attention,
``my_module_2`` after the MLP): ``x + W_2 Dropout(GELU(Op(W_1 (gamma * LN(x) + gamma_x * x))))`` with a
64-wide bottleneck and ``Op(h) = g + PW(g)``, ``g = (DW3(h) + DW5(h) + DW7(h)) / 3 + h`` (depthwise 3x3, 5x5, 7x7
and a 1x1 conv over the token grid, all with bias). ``gamma`` starts at 1e-6 and ``gamma_x`` at 1; the
Linears trunc_normal(0.02) with zero bias (the official ``init_weights`` runs before the checkpoint loads);
the convs PyTorch's default. Not the identity at init. 111,872 parameters per module at width 768.

On Swin the modules run on the NHWC token grid as in the official code. On a ViT (no official code: the
choice is this harness's, recorded here) the convolutions run on the patch tokens' grid only; the cls and
register tokens skip them and still get the scaled LayerNorm, ``W_1``, GELU and ``W_2``.
Official recipe differences (not applied: every method runs the shared recipe): Swin-L classification
configs only (AdamW 1.5625e-5, weight decay 0.05, fp16); there is no official VTAB-1K configuration.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import trunc_normal_
from torch import nn
from torch.nn import functional as F

from petl_bench.backbones import SWIN, VIT
from petl_bench.model import Method
from petl_bench.registry import register_method

from .building_blocks import residuals


class MonaOp(nn.Module):
    """The official multi-scale depthwise convolutions and the 1x1 projector, each with a skip (NCHW)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.conv2 = nn.Conv2d(channels, channels, 5, padding=2, groups=channels)
        self.conv3 = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.projector = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (self.conv1(x) + self.conv2(x) + self.conv3(x)) / 3.0 + x
        return x + self.projector(x)


class Mona(nn.Module):
    """One Mona module. ``grid`` None: NHWC input (Swin); else tokens with ``prefix`` tokens before the grid."""

    def __init__(self, width: int, hidden: int, dropout: float, grid: tuple[int, int] | None, prefix: int):
        super().__init__()
        self.project1, self.project2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        for linear in (self.project1, self.project2):
            trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
        self.dropout = nn.Dropout(dropout)
        self.adapter_conv = MonaOp(hidden)
        self.norm = nn.LayerNorm(width)
        self.gamma = nn.Parameter(torch.full((width,), 1e-6))
        self.gammax = nn.Parameter(torch.ones(width))
        self.grid, self.prefix = grid, prefix

    def _convolve(self, h: torch.Tensor) -> torch.Tensor:
        if self.grid is None:
            return self.adapter_conv(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        rows, cols = self.grid
        tokens, patches = h.split([self.prefix, rows * cols], dim=1)
        image = patches.reshape(len(h), rows, cols, -1).permute(0, 3, 1, 2)
        patches = self.adapter_conv(image).permute(0, 2, 3, 1).reshape(len(h), rows * cols, -1)
        return torch.cat([tokens, patches], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.project1(self.norm(x) * self.gamma + x * self.gammax)
        return x + self.project2(self.dropout(F.gelu(self._convolve(h))))


class MonaBlock(nn.Module):
    """A timm ViT or Swin block with Mona after each of its residual adds."""

    def __init__(self, block: nn.Module, kind: str, first: Mona, second: Mona):
        super().__init__()
        self.block, self.kind = block, kind
        self.my_module_1, self.my_module_2 = first, second

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        attn, mlp = residuals(self.block, self.kind, kwargs)
        x = self.my_module_1(x + attn.drop_path(attn.branch(attn.norm(x))))
        return self.my_module_2(x + mlp.drop_path(mlp.branch(mlp.norm(x))))


@dataclass
class MonaConfig:
    dim: int = 64  # the bottleneck (hard-coded 64 in the official module)
    dropout: float = 0.1


@register_method
class MonaMethod(Method):
    """Mona: a multi-scale convolutional adapter after each residual add of every block."""

    name = "mona"
    identity_at_init = False  # gamma 1e-6 and trunc_normal projections: a small change from the start
    citation = (
        "Yin et al., 5%>100%: Breaking Performance Shackles of Full Fine-Tuning on Visual Recognition Tasks, CVPR 2025"
    )
    trains = "two Mona modules per block (LN, two scalings, d->64->d projections, 3/5/7 depthwise and 1x1 convs)"
    kinds = (SWIN, VIT)
    Config = MonaConfig
    search_space = {"dim": (32, 64, 128)}
    # The official lr is 1.5625e-5: 24 modules on the residual stream diverge at the shared 1e-3 on a DINOv2
    # stream (demo_digits: 9.5% at 1e-3, 48.5% at 1e-4).
    recipe_grid = {"lr": (1e-5, 1e-4, 1e-3), "weight_decay": (1e-4, 1e-3)}
    merge_note = "it has a LayerNorm, GELU and convolutions"

    def attach(self, model, info, config):
        params = []
        for index, path in enumerate(info.block_paths):
            grid = None if info.kind == SWIN else info.grids[index]
            modules = [Mona(info.widths[index], config.dim, config.dropout, grid, info.num_prefix_tokens)
                       for _ in range(2)]  # fmt: skip
            model.set_submodule(path, MonaBlock(model.get_submodule(path), info.kind, *modules))
            params += [p for module in modules for p in module.parameters()]
        return params
