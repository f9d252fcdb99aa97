"""A method in one file: Partial-k, the last k transformer blocks train (plus the classifier).

petl-bench params --plugin examples/partial_tuning.py --methods partial_tuning,linear
petl-bench run --plugin examples/partial_tuning.py --methods partial_tuning,linear --suite demo
"""

from dataclasses import dataclass

import petl_bench as pb


@dataclass
class PartialConfig:
    blocks: int = 1  # k: how many of the last blocks train
    final_norm: bool = True  # also train the norm before the classifier


@pb.register_method
class PartialTuning(pb.Method):
    """Partial-k (the baseline of VPT's Table 1): the last k blocks and the final norm train."""

    name = "partial_tuning"
    citation = "example plugin (Partial-k, Jia et al., VPT, ECCV 2022)"
    trains = "every tensor of the last k blocks and the final norm"
    kinds = ("vit",)
    Config = PartialConfig

    def attach(self, model, info, config):
        blocks = [model.get_submodule(path) for path in info.block_paths[-config.blocks :]]
        norm = [model.norm] if config.final_norm else []
        return [p for module in blocks + norm for p in module.parameters()]
