"""The reference points every table needs: full finetuning, linear probing, BitFit.

Their numbers in the Convpass table come from VPT's code (KMnP/vpt) and VPT's recipe (SGD, per-task
learning rate), with VPT's ``MLP`` head (src/models/mlp.py: weight kaiming_normal(fan_out, a=0), bias
-log(99)). Here they run the Convpass recipe, so their classifier keeps PyTorch's default, as every
method the Convpass code trains; ``--set recipe.head_init=vpt`` gives VPT's head (see ``vpt.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from petl_bench.backbones import CLIP, CONVNEXT, OTHER, SWIN, VIT
from petl_bench.model import Method
from petl_bench.registry import register_method

ALL_KINDS = (VIT, SWIN, CONVNEXT, CLIP, OTHER)


class TrainsOwnTensors(Method):
    """A method that trains only tensors the backbone already has (all, the biases, or only the
    classifier): there is nothing to fold, so its trained model is already the merged one."""

    merges = True

    def merge(self, model):
        pass


@register_method
class FullFinetune(TrainsOwnTensors):
    """Full finetuning: every backbone parameter trains (VPT paper protocol in the Convpass table)."""

    name = "full"
    identity_at_init = True
    citation = "full finetuning; numbers in the Convpass table from Jia et al., VPT, ECCV 2022"
    trains = "every backbone parameter"
    kinds = ALL_KINDS
    recipe_grid = {"lr": (1e-5, 1e-4), "weight_decay": (1e-4, 1e-3)}  # a PETL learning rate breaks it

    def attach(self, model, info, config):
        return list(model.parameters())


@register_method
class LinearProbe(TrainsOwnTensors):
    """Linear probing: only the classifier trains, on the frozen encoder in eval mode (as VPT's code,
    the source of the paper's linear numbers). Features are then deterministic, so the runner trains
    the classifier on features computed once when nothing is augmented."""

    name = "linear"
    identity_at_init = True
    citation = "linear probing; numbers in the Convpass table from Jia et al., VPT, ECCV 2022"
    trains = "nothing but the classifier"
    kinds = ALL_KINDS
    frozen_encoder_eval = True
    recipe_grid = {"lr": (1e-3, 1e-2, 1e-1), "weight_decay": (1e-4, 1e-3)}

    def attach(self, model, info, config):
        return []


@register_method
class ZeroShot(Method):
    """No training at all: evaluates the classifier as built. With a CLIP backbone and the classifier from
    class-name prompts (``recipe.head_init=text``, the dg suite's default) this is zero-shot CLIP."""

    name = "zero_shot"
    citation = "Radford et al., CLIP, ICML 2021 (zero-shot classification)"
    trains = "nothing, not even the classifier"
    kinds = (CLIP,)
    trains_head = False
    recipe_grid = {}  # nothing trains: nothing to tune

    def attach(self, model, info, config):
        return []


def bias_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every bias of every layer, found by module attribute: Linear, conv and norm biases, and the
    packed input-projection bias of ``nn.MultiheadAttention``."""
    found: list[nn.Parameter] = []
    for module in model.modules():
        for attribute in ("bias", "in_proj_bias"):
            value = getattr(module, attribute, None)
            if isinstance(value, nn.Parameter) and not any(value is p for p in found):
                found.append(value)
    return found


def layer_norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weight and bias of every LayerNorm, found by module type (timm's ConvNeXt LayerNorm2d included)."""
    return [p for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters(recurse=False)]


@dataclass
class BitFitConfig:
    encoder_eval: bool = True  # VPT's tinytl-bias: the encoder is in eval mode while its biases train


@register_method
class BitFit(TrainsOwnTensors):
    """BitFit: only the biases train, LayerNorm and patch-embedding biases included.

    As the code behind the Convpass table's row (VPT's ``tinytl-bias`` transfer type): the encoder is
    frozen-marked and switched to eval mode on every training forward, so no drop-path and no dropout
    act while the biases train (``encoder_eval=True``, the default; ``false`` trains with them)."""

    name = "bitfit"
    identity_at_init = True
    citation = "Ben Zaken et al., BitFit, ACL 2022 (VPT's 'Bias' / TinyTL-bias baseline)"
    trains = "all bias terms (attention, MLP, LayerNorm, patch embedding)"
    kinds = ALL_KINDS
    Config = BitFitConfig

    def encoder_eval(self, config: BitFitConfig) -> bool:
        return config.encoder_eval

    def attach(self, model, info, config):
        return bias_parameters(model)


@register_method
class LayerNormTuning(TrainsOwnTensors):
    """LayerNorm tuning: the weight and bias of every LayerNorm train (norm1, norm2 of every block and the
    final norm on a ViT: 38,400 parameters on ViT-B/16); nothing is added. As PETL_Vision's ``--ln``
    (OSU-MLB/PETL_Vision experiment/build_model.py), selected by module type rather than by name."""

    name = "ln_tune"
    identity_at_init = True
    published_as = ("LayerNorm tuning",)
    citation = "LayerNorm tuning as re-evaluated in PETL_Vision (Mai et al., 2024)"
    trains = "the weight and bias of every LayerNorm"
    kinds = (VIT, SWIN, CONVNEXT, CLIP)

    def attach(self, model, info, config):
        return layer_norm_parameters(model)
