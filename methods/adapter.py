"""Adapter as in the Convpass table: NOAH's sequential bottleneck after the MLP (Pfeiffer placement).

Effective init (``init="official"``, the default): NOAH's ``VisionTransformer.__init__`` builds the
adapters and then runs timm's ``init_weights`` (``self.apply(_init_vit_weights)``), which sets every
``nn.Linear`` (the adapter's down and up projections included) to trunc_normal(std 0.02) with zero
bias before the pretrained weights load; the classifier is NOAH's ``reset_classifier``:
trunc_normal(0.02), zero bias. ``init="module"`` keeps AdapterSuper's own init (xavier_uniform
weights, biases N(0, 1e-6)). Source: ZhangYuanhan-AI/NOAH, model/supernet_vision_transformer_timm.py
and model/module/adapter_super.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from petl_bench.model import Method, vit_linear_init_
from petl_bench.registry import register_method

from .building_blocks import Bottleneck, QuickGELU, Tap, adapt_blocks, check_init, xavier_init_


def noah_adapter(width: int, dim: int, dropout: float, kind: type[Bottleneck] = Bottleneck) -> Bottleneck:
    """NOAH's AdapterSuper: QuickGELU, xavier_uniform weights (the up-projection is NOT zero), biases N(0, 1e-6)."""
    return xavier_init_(kind(width, dim, QuickGELU(), dropout))


@dataclass
class AdapterConfig:
    dim: int = 8
    dropout: float = 0.1
    init: str = "official"  # "official": what NOAH's runs trained from (trunc_normal 0.02); "module": xavier


@register_method
class Adapter(Method):
    """``h = DP(MLP(LN2 x)); x = x + h + up(dropout(QuickGELU(down(h))))``, one adapter per block, no scale."""

    name = "adapter"
    identity_at_init = False
    citation = "Houlsby et al. 2019 / Pfeiffer et al. 2021; the NOAH implementation (Zhang et al. 2022) used in the Convpass table"
    trains = "1 bottleneck adapter per block after the MLP (2hd + h + d parameters each)"
    Config = AdapterConfig
    head_init = "trunc_normal"

    def check_config(self, config):
        check_init(self.name, config.init)

    def attach(self, model, info, config):
        adapters = [noah_adapter(width, config.dim, config.dropout) for width in info.widths]
        if config.init == "official":
            vit_linear_init_(adapters)
        return adapt_blocks(model, info, lambda i: (None, adapters[i]), Tap.OUTPUT, drop_path_side=False)
