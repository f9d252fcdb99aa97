"""Adapter as in the Convpass table: NOAH's sequential bottleneck after the MLP (Pfeiffer placement)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from petl_bench.model import Method
from petl_bench.registry import register_method

from .building_blocks import Bottleneck, QuickGELU, Tap, adapt_blocks


def noah_adapter(width: int, dim: int, dropout: float, kind: type[Bottleneck] = Bottleneck) -> Bottleneck:
    """NOAH's AdapterSuper: QuickGELU, xavier_uniform weights (the up-projection is NOT zero), biases N(0, 1e-6)."""
    module = kind(width, dim, QuickGELU(), dropout)
    for linear in (module.down, module.up):
        nn.init.xavier_uniform_(linear.weight)
        nn.init.normal_(linear.bias, std=1e-6)
    return module


@dataclass
class AdapterConfig:
    dim: int = 8
    dropout: float = 0.1


@register_method
class Adapter(Method):
    """``h = DP(MLP(LN2 x)); x = x + h + up(dropout(QuickGELU(down(h))))``, one adapter per block, no scale."""

    name = "adapter"
    citation = "Houlsby et al. 2019 / Pfeiffer et al. 2021; the NOAH implementation (Zhang et al. 2022) used in the Convpass table"
    trains = "1 bottleneck adapter per block after the MLP (2hd + h + d parameters each)"
    Config = AdapterConfig

    def attach(self, model, info, config):
        return adapt_blocks(
            model,
            info,
            lambda i: (None, noah_adapter(info.widths[i], config.dim, config.dropout)),
            Tap.OUTPUT,
            drop_path_side=False,
        )
