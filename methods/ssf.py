"""SSF: Scale and Shift deep Features (Lian et al., NeurIPS 2022), as the official dongzelian/SSF code.

A per-channel affine ``gamma * t + beta`` after the patch-embedding convolution, after every ``norm1``,
``qkv``, ``proj``, ``norm2``, ``fc1`` (before GELU) and ``fc2``, and after the final norm: 8 sites,
205,824 parameters on ViT-B/16. Init gamma ~ N(1, 0.02), beta ~ N(0, 0.02) (``init_ssf_scale_shift``):
not the identity at init. The classifier starts as the official runs' does: ``init_weights`` re-initialises
it to trunc_normal(0.02) with zero bias (the 21k checkpoint's head is copied only when its shape matches,
never for VTAB). The patch-embedding affine acts on patch tokens only (the cls token and the
position embedding are added afterwards), as in the official code.

Every affine folds into the module it follows (a conv, Linear or LayerNorm: ``W' = diag(gamma) W``,
``b' = gamma * b + beta``), so the merged model is a plain timm ViT. The official recipe differs from
the Convpass recipe (per-task lr and drop-path, AugReg weights, no weight decay on 1-D tensors:
``--set recipe.weight_decay_scope=skip_1d``); here SSF runs under the harness's shared recipe.
Source: dongzelian/SSF, models/vision_transformer.py, optim_factory.py.
"""

from __future__ import annotations

import torch
from torch import nn

from petl_bench.backbones import VIT
from petl_bench.model import Method
from petl_bench.registry import register_method

from .building_blocks import cast_together, cast_wired, scale_outputs_


class ScaleShift(nn.Module):
    """``module(x) * ssf_scale + ssf_shift`` on the channel dimension (last, or 1 for a conv's NCHW output)."""

    def __init__(self, module: nn.Module, channels: int, channel_dim: int = -1):
        super().__init__()
        self.module = module
        self.channel_dim = channel_dim
        self.ssf_scale = nn.Parameter(torch.empty(channels).normal_(1.0, 0.02))
        self.ssf_shift = nn.Parameter(torch.empty(channels).normal_(0.0, 0.02))

    def _shaped(self, tensor: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if self.channel_dim == -1:
            return tensor
        return tensor.view(-1, *([1] * (output.ndim - self.channel_dim - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.module(x)  # scale and shift in y's dtype: under bf16 autocast no promotion of y to fp32
        scale, shift = (cast_wired(self, name, y.dtype) for name in ("ssf_scale", "ssf_shift"))
        return y * self._shaped(scale, y) + self._shaped(shift, y)

    def folded(self) -> nn.Module:
        """The wrapped conv / Linear / LayerNorm with the affine folded into its weight and bias."""
        return scale_outputs_(self.module, self.ssf_scale, self.ssf_shift)


def ssf_sites(model: nn.Module, info) -> list[tuple[str, int]]:
    """(module path, channel dim) of every site, input to output."""
    sites = [("patch_embed.proj", 1)]
    for path in info.block_paths:
        sites += [(f"{path}.{name}", -1) for name in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")]
    sites += [(name, -1) for name in ("norm", "fc_norm") if isinstance(getattr(model, name, None), nn.LayerNorm)]
    return sites


def output_channels(module: nn.Module) -> int:
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    return module.weight.shape[0]


@register_method
class SSF(Method):
    """Scale and shift after the patch embedding, norm1, qkv, proj, norm2, fc1, fc2 and the final norm."""

    name = "ssf"
    identity_at_init = False
    published_as = ("SSF",)
    citation = "Lian et al., Scaling & Shifting Your Features (SSF), NeurIPS 2022"
    trains = "a per-channel scale and shift after 6 operations per block, the patch embedding and the final norm"
    kinds = (VIT,)
    merges = True
    head_init = "trunc_normal"

    def attach(self, model, info, config):
        params, lowered = [], []
        for path, channel_dim in ssf_sites(model, info):
            module = model.get_submodule(path)
            wrapped = ScaleShift(module, output_channels(module), channel_dim)
            model.set_submodule(path, wrapped)
            params += [wrapped.ssf_scale, wrapped.ssf_shift]
            if isinstance(module, (nn.Linear, nn.Conv2d)):  # outputs in the compute dtype under autocast
                lowered.append(wrapped)
        cast_together(model, lowered, ("ssf_scale", "ssf_shift"))
        return params

    def merge(self, model):
        for path, module in list(model.backbone.named_modules()):
            if isinstance(module, ScaleShift):
                model.backbone.set_submodule(path, module.folded())
