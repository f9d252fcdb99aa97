"""SCT, Salient Channel Tuning (Zhao et al., IJCV 2023; official showlab/SCT, mode ``sct_attn``).

Once per task, before training, a selection stage picks K salient channels per block from the training
images only: the frozen model (eval mode, no drop-path, no augmentation, fp32) runs over them; for block i
the residual stream after its attention sub-block (the official hook: the input of ``norm2``), patch tokens
only, gives per class c and channel the L2 norm over the class's images and tokens jointly; the channel's
score is the mean over the classes present, and the K highest-scoring channels are kept, in ascending
index order (the official ``np.argwhere(score > sorted[767 - K])``, the same set unless two scores tie
at the threshold).

Training then adds, after each attention sub-block, ``x[..., S_i] += W_i x[..., S_i] + b_i`` on the residual
stream itself (all tokens, skip path included), ``W_i`` a K x K Linear (``adapt_linear``, trunc_normal
std 0.02, bias 0: not the identity at init). ``12 (K^2 + K)`` parameters: K = 96, 111,744. The selected
indices are buffers saved with the checkpoint. It does not fold into a plain ViT (it changes the skip path).

Official recipe differences (not applied: every method runs the shared recipe): per-task lr and weight
decay, label smoothing and RandAugment per task, fp32, the maximum of 10 test evaluations reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import trunc_normal_
from torch import nn

from petl_bench.backbones import VIT
from petl_bench.errors import UserError
from petl_bench.model import Method
from petl_bench.registry import register_method

from .building_blocks import residuals


class ChannelMap(nn.Module):
    """``x[..., S] += W x[..., S] + b`` (the official ``ChannelAdapter``, its Linear named ``adapt_linear``).
    ``channels`` (S) holds the first K channels until a selection stage sets it; ``recording`` switches the
    map off (the stream passes unchanged) while the selection stage reads the frozen model's stream."""

    def __init__(self, channels: int):
        super().__init__()
        self.adapt_linear = nn.Linear(channels, channels)
        trunc_normal_(self.adapt_linear.weight, std=0.02)
        nn.init.zeros_(self.adapt_linear.bias)
        self.register_buffer("channels", torch.arange(channels))
        self.recording = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recording:
            return x
        update = self.adapt_linear(x.index_select(-1, self.channels))
        return x.index_add(-1, self.channels, update.to(x.dtype))


class SCTBlock(nn.Module):
    """A timm ViT block with the channel map between its attention and MLP sub-blocks."""

    def __init__(self, block: nn.Module, channels: int):
        super().__init__()
        self.block = block
        self.sct_attn = ChannelMap(channels)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        attn, mlp = residuals(self.block, VIT, kwargs)
        x = self.sct_attn(x + attn.drop_path(attn.branch(attn.norm(x))))
        return x + mlp.drop_path(mlp.branch(mlp.norm(x)))


class ChannelScores:
    """Per block, per class: the sum of squares of each channel over the class's patch tokens, read by a
    forward hook on each channel map (which passes the frozen stream unchanged while recording)."""

    def __init__(self, maps: list[ChannelMap], prefix: int, classes: int, width: int):
        self.prefix, self.labels = prefix, None
        self.sums = [torch.zeros(classes, width, device=m.channels.device) for m in maps]
        self.seen = torch.zeros(classes, dtype=torch.bool, device=maps[0].channels.device)
        self.hooks = [m.register_forward_hook(self._hook(index)) for index, m in enumerate(maps)]

    def _hook(self, index: int):
        def record(module, inputs, output):
            squares = inputs[0][:, self.prefix :].float().square().sum(1)  # (batch, width)
            self.sums[index].index_add_(0, self.labels, squares)

        return record

    def add_batch(self, labels: torch.Tensor) -> None:
        self.labels = labels
        self.seen[labels] = True

    def top(self, channels: int) -> list[torch.Tensor]:
        """Each block's K highest-scoring channels (mean over the classes seen of the per-class L2 norm)."""
        for hook in self.hooks:
            hook.remove()
        return [s[self.seen].sqrt().mean(0).topk(channels).indices.sort().values for s in self.sums]


@dataclass
class SCTConfig:
    channels: int = 96  # K, the official topN (every VTAB-1K task)


@register_method
class SCT(Method):
    """SCT: a K x K map on K salient channels of the residual stream after each attention sub-block."""

    name = "sct"
    identity_at_init = False  # adapt_linear starts trunc_normal(0.02)
    published_as = ("SCT",)
    citation = "Zhao et al., SCT: A Simple Baseline for Parameter-Efficient Fine-Tuning via Salient Channels, IJCV 2023"
    trains = "a K x K map on K salient channels per block, chosen from the training images (K^2 + K per block)"
    kinds = (VIT,)
    Config = SCTConfig
    search_space = {"channels": (32, 64, 96, 128)}
    selects = True
    merge_note = "its maps act on the residual stream itself (skip path included)"

    def check_config(self, config):
        if config.channels < 1:
            raise UserError(f"{self.name}.channels must be at least 1, not {config.channels}")

    def check_pair(self, info, config):
        if config.channels > min(info.widths):
            raise UserError(f"{self.name}.channels ({config.channels}) exceeds the width {min(info.widths)}")

    def attach(self, model, info, config):
        params = []
        for path in info.block_paths:
            wrapped = SCTBlock(model.get_submodule(path), config.channels)
            model.set_submodule(path, wrapped)
            params += list(wrapped.sct_attn.parameters())
        return params

    def select(self, model, batches) -> None:
        maps = [m for m in model.modules() if isinstance(m, ChannelMap)]
        width = model.info.widths[0]
        scores = ChannelScores(maps, model.info.num_prefix_tokens, model.head.out_features, width)
        for m in maps:
            m.recording = True
        try:
            for images, labels in batches:
                scores.add_batch(labels)
                model(images)
        finally:
            for m in maps:
                m.recording = False
        for m, chosen in zip(maps, scores.top(model.config.channels)):
            m.channels.copy_(chosen)

    def selected_state(self, model) -> dict[str, torch.Tensor]:
        return {name: buffer for name, buffer in model.backbone.named_buffers() if name.endswith("sct_attn.channels")}
