"""Houlsby and Pfeiffer adapters as re-evaluated by PETL_Vision (OSU-MLB/PETL_Vision ``model/adapter.py``,
``model/block.py``, ``model/utils.py``; configs ``rand_h_adapter`` and ``lora_p_adapter``).

The adapter is ``A(t) = s * (W_u dropout(ReLU(W_d t + b_d)) + b_u)`` (dropout 0.1), placed "sequential
after" a sub-block: ``h = DP(branch(norm x))``, then ``x + DP(h + A(h))``: the sub-block's drop-path
acts a second time on the adapted output, as in the code (in eval mode it is ``x + h + A(h)``). On
a backbone with LayerScale the code would apply ``ls`` a second time too; here it is applied once.

* Houlsby (``rand_h_adapter``): after the attention and after the MLP. ``24 (1537 h + 768)`` parameters
  on ViT-B/16.
* Pfeiffer (``lora_p_adapter``): after the MLP only. ``12 (1537 h + 768)``. ``adapter_init=xavier`` is
  ``rand_p_adapter``.

Effective init (``init="official"``, the default): the adapter applies its declared ``adapter_init``
(``xavier``: xavier_uniform weights, biases N(0, 1e-6); ``lora_xavier``: down xavier_uniform, up and
biases zero), but ``VisionTransformerPETL.__init__`` then ends with timm's ``init_weights``, which
re-initialises every ``nn.Linear``, the adapter's two projections included: trunc_normal(0.02), zero
bias. So the official runs start from that, and neither adapter is the identity at init. ``init="module"``
keeps the declared ``adapter_init`` (under which Pfeiffer's ``lora_xavier`` is the identity at init).

ReLU makes them non-linear: they do not fold into the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from petl_bench.backbones import CLIP, SWIN, VIT
from petl_bench.errors import UserError
from petl_bench.model import Method, vit_linear_init_
from petl_bench.registry import register_method

from .building_blocks import Bottleneck, Tap, adapt_blocks, check_init, xavier_init_

ADAPTER_INITS = ("xavier", "lora_xavier")
CITATION = "Mai et al., Lessons and Insights from a Unifying Study of PEFT in Visual Recognition (PETL_Vision), 2024"


@dataclass
class SequentialAdapterConfig:
    dim: int = 8  # h, the README example
    scale: float = 1.0  # s, the README example
    dropout: float = 0.1
    init: str = "official"  # "official": PETL_Vision's runs (trunc_normal 0.02, zero bias); "module": adapter_init
    adapter_init: str = "xavier"  # the declared init: "xavier" (random) or "lora_xavier" (zero up-projection)


@dataclass
class PfeifferConfig(SequentialAdapterConfig):
    adapter_init: str = "lora_xavier"


@register_method
class HoulsbyAdapter(Method):
    """Houlsby placement: a ReLU adapter after the attention and one after the MLP of every block."""

    name = "houlsby_adapter"
    identity_at_init = False
    published_as = ("Houlsby adapter",)
    citation = f"Houlsby et al., ICML 2019; {CITATION}"
    trains = "2 ReLU bottleneck adapters per block, after attention and after the MLP (2hd + h + d each)"
    kinds = (VIT, SWIN, CLIP)
    Config = SequentialAdapterConfig
    search_space = {"dim": (4, 8, 16, 32), "scale": (0.01, 0.1, 1, 10)}
    after_attention = True

    def check_config(self, config):
        check_init(self.name, config.init)
        if config.adapter_init not in ADAPTER_INITS:
            raise UserError(
                f"{self.name}.adapter_init is {config.adapter_init!r}; choose from: {', '.join(ADAPTER_INITS)}"
            )

    def attach(self, model, info, config):

        def adapter(width: int) -> Bottleneck:
            module = xavier_init_(
                Bottleneck(width, config.dim, nn.ReLU(), config.dropout), zero_up=config.adapter_init == "lora_xavier"
            )
            if config.init == "official":  # timm's init_weights, run after the adapters are built
                vit_linear_init_([module])
            return module

        return adapt_blocks(
            model,
            info,
            lambda i: (adapter(info.widths[i]) if self.after_attention else None, adapter(info.widths[i])),
            Tap.OUTPUT,
            drop_path_side=False,
            drop_path_sum=True,
            scale=config.scale,
        )


@register_method
class PfeifferAdapter(HoulsbyAdapter):
    """Pfeiffer placement: one ReLU adapter after the MLP of every block (the identity at init only under
    ``init=module``)."""

    name = "pfeiffer_adapter"
    published_as = ("Pfeiffer adapter",)
    citation = f"Pfeiffer et al., EACL 2021; {CITATION}"
    trains = "1 ReLU bottleneck adapter per block, after the MLP (2hd + h + d parameters)"
    Config = PfeifferConfig
    search_space = {"dim": (4, 8, 16, 32, 64), "scale": (0.01, 0.1, 1, 10)}
    after_attention = False

    def is_identity_at_init(self, config) -> bool:
        return config.init == "module"  # the declared zero up-projection; PETL_Vision's re-init is not
