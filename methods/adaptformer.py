"""AdaptFormer (Chen et al. 2022): a scaled bottleneck parallel to the MLP, fed the residual stream."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from petl_bench.model import Method
from petl_bench.registry import register_method

from .building_blocks import Bottleneck, Tap, adapt_blocks


@dataclass
class AdaptFormerConfig:
    dim: int = 8  # the Convpass comparison's bottleneck (the official default is 64)
    scale: float = 0.1  # official value; the Convpass authors searched s per task (values unpublished)
    dropout: float = 0.1


def adaptformer_bottleneck(width: int, dim: int, dropout: float) -> Bottleneck:
    """ReLU bottleneck with the official 'lora' init: down keeps PyTorch's kaiming_uniform(a=sqrt(5)),
    up and both biases are zero, so the branch outputs exactly zero at init."""
    module = Bottleneck(width, dim, nn.ReLU(), dropout)
    nn.init.zeros_(module.down.bias)
    nn.init.zeros_(module.up.weight)
    nn.init.zeros_(module.up.bias)
    return module


@register_method
class AdaptFormer(Method):
    """``x = x + DP(MLP(LN2 x)) + s * up(dropout(ReLU(down(x))))``: un-normalised input, no drop-path."""

    name = "adaptformer"
    identity_at_init = True
    citation = "Chen et al., AdaptFormer, NeurIPS 2022"
    trains = "1 parallel bottleneck per block beside the MLP (2hd + h + d parameters each)"
    Config = AdaptFormerConfig
    search_space = {"scale": (0.01, 0.1, 1, 10)}

    def attach(self, model, info, config):
        return adapt_blocks(
            model,
            info,
            lambda i: (None, adaptformer_bottleneck(info.widths[i], config.dim, config.dropout)),
            Tap.INPUT,
            drop_path_side=False,
            scale=config.scale,
        )
