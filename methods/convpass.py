"""Convpass and Convpass-attn (Jie & Deng 2022): convolutional bypasses parallel to MHSA and MLP."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from petl_bench.backbones import CLIP, SWIN, VIT
from petl_bench.model import Method
from petl_bench.registry import register_method

from .building_blocks import QuickGELU, Tap, adapt_blocks, cast_call, task_table

CITATION = "Jie & Deng, Convolutional Bypasses Are Better Vision Transformer Adapters, arXiv:2207.07039"


class ConvBypass(nn.Module):
    """down (width -> dim) -> QuickGELU -> 3x3 conv on the patch grid -> QuickGELU -> dropout -> up.

    Token input ``(B, prefix + rows * cols, width)``: patch tokens are convolved as an image; each
    prefix token (cls, registers) goes through the same conv as a 1x1 image, so only the centre tap
    acts on it. NHWC input ``(B, rows, cols, width)`` (Swin) is convolved directly.

    One convolution does both (the official code runs one per prefix token and a ``cat``): the prefix
    tokens are laid out below the patch grid, each alone in its own row behind a row of zeros, so its
    3x3 neighbourhood is zeros as in a padded 1x1 image (the same sums: the extra terms are exact zeros);
    one ``index_select`` puts the outputs back in token order.
    """

    def __init__(
        self,
        width: int,
        dim: int,
        grid: tuple[int, int] | None,
        num_prefix_tokens: int,
        xavier_init: bool,
        dropout: float,
    ):
        super().__init__()
        self.grid = grid  # None: NHWC input
        self.num_prefix_tokens = num_prefix_tokens
        self.adapter_down = nn.Linear(width, dim)
        self.adapter_conv = nn.Conv2d(dim, dim, 3, 1, 1)
        self.adapter_up = nn.Linear(dim, width)
        self.act = QuickGELU()
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.adapter_down.weight)
        nn.init.zeros_(self.adapter_down.bias)
        if xavier_init:
            nn.init.xavier_uniform_(self.adapter_conv.weight)
        else:
            nn.init.zeros_(self.adapter_conv.weight)
            with torch.no_grad():
                self.adapter_conv.weight[:, :, 1, 1] += torch.eye(dim)
        nn.init.zeros_(self.adapter_conv.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        if grid is not None:
            rows, cols = grid
            cells = rows * cols
            slots = [cells + (2 * index + 1) * cols for index in range(num_prefix_tokens)]
            order = torch.tensor(slots + list(range(cells)))  # image cell of each output token
            self.register_buffer("token_order", order, persistent=False)

    def _conv_channels_last(self, images: torch.Tensor) -> torch.Tensor:
        return cast_call(self.adapter_conv, images.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def _conv_tokens(self, a: torch.Tensor) -> torch.Tensor:
        batch, _, dim = a.shape
        rows, cols = self.grid
        prefix = self.num_prefix_tokens
        tokens, patches = a.split([prefix, rows * cols], dim=1)
        zeros = a.new_zeros(()).expand(batch, cols, dim)
        pieces = [patches]
        for token in tokens.split(1, dim=1) if prefix else ():  # a zero row, then the token alone in its row
            pieces += [zeros, token, zeros[:, 1:]]
        image = torch.cat(pieces, dim=1).view(batch, rows + 2 * prefix, cols, dim)
        out = self._conv_channels_last(image).flatten(1, 2)
        return out.index_select(1, self.token_order)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(cast_call(self.adapter_down, x))
        a = self._conv_channels_last(a) if self.grid is None else self._conv_tokens(a)
        return cast_call(self.adapter_up, self.dropout(self.act(a)))


@dataclass
class ConvpassConfig:
    dim: int = 8  # bottleneck width h
    scale: float = 1.0  # s, searched per task in {0.01, 0.1, 1, 10, 100}
    xavier_init: bool = False  # conv init: xavier_uniform, or identity at the centre tap
    dropout: float = 0.1


@register_method
class Convpass(Method):
    """Convpass: a convolutional bypass parallel to MHSA and one parallel to the MLP in every block.

    ``x = x + DP(MHSA(LN1 x)) + s * DP(CP(LN1 x))``; ``x = x + DP(MLP(LN2 x)) + s * DP(CP(LN2 x))``.
    """

    name = "convpass"
    identity_at_init = True
    citation = CITATION
    trains = "2 conv bypasses per block ((2h+1)d + 9h^2 + 2h parameters each)"
    kinds = (VIT, SWIN, CLIP)
    Config = ConvpassConfig
    task_defaults = task_table("convpass")
    search_space = {"scale": (0.01, 0.1, 1, 10, 100), "xavier_init": (True, False)}  # the paper's own search
    bypass_mlp = True

    def attach(self, model, info, config):
        def bypass(index: int) -> ConvBypass:
            grid = None if info.kind == SWIN else info.grids[index]
            return ConvBypass(
                info.widths[index], config.dim, grid, info.num_prefix_tokens, config.xavier_init, config.dropout
            )

        return adapt_blocks(
            model,
            info,
            lambda i: (bypass(i), bypass(i) if self.bypass_mlp else None),
            Tap.NORM,
            drop_path_side=True,
            scale=config.scale,
        )


@dataclass
class ConvpassAttnConfig(ConvpassConfig):
    xavier_init: bool = True  # the official Convpass-attn configs use xavier conv init on every task


@register_method
class ConvpassAttn(Convpass):
    """Convpass-attn: only the bypass parallel to MHSA; the MLP sub-block is unchanged."""

    name = "convpass_attn"
    trains = "1 conv bypass per block, parallel to MHSA"
    Config = ConvpassAttnConfig
    task_defaults = task_table("convpass_attn")
    search_space = {"scale": (0.01, 0.1, 1, 10, 100)}
    bypass_mlp = False
