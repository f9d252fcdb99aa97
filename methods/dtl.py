"""DTL and DTL+, Disentangled Transfer Learning (Fu, Zhu, Wu, AAAI 2024): the official heekhero/DTL compact
side network.

Every block i reads ``u_i = B_i A_i x_i`` (rank r = 2, bias-free) from its input ``x_i``; the running sum
``S_i = sum_{j<=i} u_j`` is added back after each of the last ``M`` blocks (6 of 12) through ``g``:
``x_{i+1} = Block_i(x_i) + g(S_i)``, with ``g(S) = S * sigmoid(beta S)`` (swish, beta = 100). DTL+ adds one
depthwise k x k convolution (bias-free, 'same' padding) over the patch grid inside ``g``, shared by the six
injection points; the prefix (cls) tokens skip it. ``A`` is PyTorch's Linear init, ``B`` zero, so the stream
equals the frozen model's at init; the classifier, however, reads DTL's own head: the mean of the patch tokens,
then the backbone's final LayerNorm (not the cls token), so the logits differ from the frozen model's.
Counts: ``12 * 2 * 768 * r`` (r = 2: 36,864); DTL+ adds ``768 k^2`` (k = 3: 43,776), k per task
(``dtl_plus.tasks.json``). Source: heekhero/DTL bf6c51e, models/vision_transformer.py,
train_scripts/vit/vtab/<task>/train_dtl{,+}.sh.

Official recipe differences (not applied: every method runs the shared recipe): per-task lr and drop-path,
batch 32, weight decay 0.05 except biases, 100 epochs plus 10 at 1e-8 with a 10-epoch warm-up, inputs
normalised with mean = std = 0.5, the last epoch of one seed reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from petl_bench.backbones import VIT
from petl_bench.errors import UserError
from petl_bench.model import Method
from petl_bench.registry import register_method

from .building_blocks import task_table


class DTLBlocks(nn.Module):
    """The block sequence with DTL's compact side network (names as the official ``lora_A``/``lora_B``/
    ``lora_fusion``)."""

    def __init__(self, blocks: nn.Module, width: int, config: "DTLConfig", grid: tuple[int, int], prefix: int):
        super().__init__()
        self.blocks = blocks
        depth = len(blocks)
        self.lora_A = nn.ModuleList(nn.Linear(width, config.rank, bias=False) for _ in range(depth))
        self.lora_B = nn.ModuleList(nn.Linear(config.rank, width, bias=False) for _ in range(depth))
        for up in self.lora_B:
            nn.init.zeros_(up.weight)
        self.lora_fusion = (
            nn.Conv2d(width, width, config.kernel, padding="same", groups=width, bias=False) if config.kernel else None
        )
        injections = config.injections or depth // 2
        self.inject_from, self.beta, self.grid, self.prefix = depth - injections, config.beta, grid, prefix

    def fuse(self, summed: torch.Tensor) -> torch.Tensor:
        """``g(S)``: swish, and for DTL+ the depthwise conv over the patch grid (prefix tokens pass)."""
        out = summed * torch.sigmoid(self.beta * summed)
        if self.lora_fusion is None:
            return out
        head, patches = out[:, : self.prefix], out[:, self.prefix :]
        grid = patches.transpose(1, 2).reshape(out.shape[0], out.shape[2], *self.grid)
        conv = self.lora_fusion(grid).flatten(2).transpose(1, 2)
        return torch.cat([head, conv], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        summed = None
        for index, block in enumerate(self.blocks):
            update = self.lora_B[index](self.lora_A[index](x))
            summed = update if summed is None else summed + update
            x = block(x)
            if index >= self.inject_from:
                x = x + self.fuse(summed)
        return x


@dataclass
class DTLConfig:
    rank: int = 2
    beta: float = 100.0
    injections: int = 0  # M, the blocks the side network feeds (the last ones); 0: half of them (ViT-B: 6, the paper's)
    kernel: int = 0  # DTL+: the depthwise conv's size (0: DTL, no conv)


@dataclass
class DTLPlusConfig(DTLConfig):
    kernel: int = 3


@register_method
class DTL(Method):
    """DTL: a compact side network of rank-2 maps, summed and fed back into the last blocks."""

    name = "dtl"
    identity_at_init = False  # the stream is the backbone's at init, but the head pools patch tokens
    published_as = ("DTL",)
    citation = "Fu, Zhu & Wu, DTL: Disentangled Transfer Learning for Visual Recognition, AAAI 2024"
    trains = "a rank-r map per block, summed and added after the last M blocks through a swish (2dr per block)"
    kinds = (VIT,)
    Config = DTLConfig
    search_space = {"rank": (1, 2, 4, 8)}
    bounds = {"rank": (1, None, False), "injections": (0, None, False), "kernel": (0, None, False)}

    def check_config(self, config):
        if config.kernel and config.kernel < 2:
            raise UserError(f"{self.name}.kernel must be 0 (no conv) or at least 2, not {config.kernel}")

    def check_pair(self, info, config):
        if config.injections > len(info.block_paths):
            raise UserError(f"{self.name}.injections ({config.injections}) exceeds the {len(info.block_paths)} blocks")

    def attach(self, model, info, config):
        blocks = model.get_submodule(info.blocks_path)
        side = DTLBlocks(blocks, info.widths[0], config, info.grids[0], info.num_prefix_tokens)
        model.set_submodule(info.blocks_path, side)
        # DTL's head: the mean of the patch tokens, then the final LayerNorm (timm: pool "avg", norm after it)
        model.global_pool, model.fc_norm, model.norm = "avg", model.norm, nn.Identity()
        return [p for name, p in side.named_parameters() if name.startswith("lora_")]


@register_method
class DTLPlus(DTL):
    """DTL+: DTL with a depthwise conv over the patch grid, shared by the injection points (k per task)."""

    name = "dtl_plus"
    published_as = ("DTL+",)
    trains = "DTL's rank-r maps and one depthwise k x k conv over the patch grid (2dr per block + d k^2)"
    Config = DTLPlusConfig
    task_defaults = task_table("dtl_plus")
    search_space = {"kernel": (3, 4, 5)}
