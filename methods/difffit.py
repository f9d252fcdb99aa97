"""DiffFit (Xie et al., 2023) on a ViT, as PETL_Vision's ``--difffit`` (no official vision code exists).

Each residual sub-block output is scaled per channel, ``x + gamma1 * DP(attn(norm1 x))`` and
``x + gamma2 * DP(mlp(norm2 x))``, gamma initialised to 1 (the identity at init); gamma, every bias and
every LayerNorm weight train: 140,544 parameters on ViT-B/16. Drop-path multiplies each sample by a
scalar, so the scale can sit inside it, after the block's own LayerScale (``ls1``/``ls2``). gamma folds
into the last Linear of its branch (``attn.proj``, ``mlp.fc2``): ``W' = diag(gamma) W``, ``b' = gamma * b``
(a backbone LayerScale is also per-channel, so the two commute). Source: OSU-MLB/PETL_Vision,
model/block.py (``BlockPETL.forward``), experiment/build_model.py.
"""

from __future__ import annotations

import torch
from torch import nn

from petl_bench.backbones import VIT
from petl_bench.model import Method
from petl_bench.registry import register_method

from .baselines import bias_parameters, layer_norm_parameters
from .building_blocks import cast_together, cast_wired, scale_outputs_


class ScaledOutput(nn.Module):
    """``layer_scale(x) * gamma`` with gamma initialised to 1."""

    def __init__(self, layer_scale: nn.Module, width: int):
        super().__init__()
        self.layer_scale = layer_scale
        self.gamma = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer_scale(x)  # gamma in the activation's dtype: no promotion of bf16 activations to fp32
        return y * cast_wired(self, "gamma", y.dtype)


# (LayerScale attribute, the Linear whose output it scales) of each sub-block of a timm ViT block
SUB_BLOCKS = (("ls1", "attn.proj"), ("ls2", "mlp.fc2"))


@register_method
class DiffFit(Method):
    """gamma after each sub-block (init 1), plus every bias and every LayerNorm weight."""

    name = "difffit"
    identity_at_init = True
    published_as = ("DiffFit",)
    citation = "Xie et al., DiffFit, ICCV 2023; the ViT version of PETL_Vision (Mai et al., 2024)"
    trains = "a per-channel scale on each sub-block output, every bias and every LayerNorm weight"
    kinds = (VIT,)
    merges = True

    def attach(self, model, info, config):
        params = bias_parameters(model)
        params += [p for p in layer_norm_parameters(model) if not any(p is q for q in params)]
        scaled_outputs = []
        for path, width in zip(info.block_paths, info.widths):
            block = model.get_submodule(path)
            for attribute, _ in SUB_BLOCKS:
                scaled = ScaledOutput(getattr(block, attribute), width)
                setattr(block, attribute, scaled)
                params.append(scaled.gamma)
                scaled_outputs.append(scaled)
        cast_together(model, scaled_outputs, ("gamma",))
        return params

    @torch.no_grad()
    def merge(self, model):
        for path in model.info.block_paths:
            block = model.backbone.get_submodule(path)
            for attribute, target in SUB_BLOCKS:
                scaled = getattr(block, attribute)
                scale_outputs_(block.get_submodule(target), scaled.gamma)
                setattr(block, attribute, scaled.layer_scale)
