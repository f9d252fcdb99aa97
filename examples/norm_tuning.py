"""A method in one file: train every LayerNorm's scale and shift (plus the classifier).

petl-bench params --plugin examples/norm_tuning.py --methods norm_tuning
petl-bench run --plugin examples/norm_tuning.py --methods norm_tuning,linear --suite demo
"""

from dataclasses import dataclass

from torch import nn

import petl_bench as pb


@dataclass
class NormTuningConfig:
    include_final_norm: bool = True  # also train the norm before the classifier


@pb.register_method
class NormTuning(pb.Method):
    """LayerNorm tuning: only the affine parameters of the LayerNorms train."""

    name = "norm_tuning"
    citation = "example plugin (LayerNorm tuning)"
    trains = "every LayerNorm weight and bias"
    kinds = ("vit", "swin", "clip")
    Config = NormTuningConfig

    def attach(self, model, info, config):
        norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
        if not config.include_final_norm:
            norms = norms[:-1]
        return [p for norm in norms for p in norm.parameters()]
