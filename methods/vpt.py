"""Visual Prompt Tuning (Jia et al. 2022): learnable tokens after the cls token, shallow or deep.

Effective init, as VPT's code (KMnP/vpt): prompts uniform(-b, b) with b = sqrt(6 / (3 * patch^2 + d))
(src/models/vit_prompt/vit.py); nothing re-initialises them later. Prompt dropout is drawn per image
(the prompts are expanded over the batch, then dropped), and the frozen encoder is in eval mode while
training. The classifier keeps PyTorch's default here: VPT's own head (an ``MLP`` without hidden layer,
src/models/mlp.py: weight kaiming_normal(fan_out, a=0), bias -log(99)) belongs to VPT's recipe (SGD with
a per-task learning rate up to 50), which the published numbers come from and this harness does not
run; under the Convpass recipe (AdamW 1e-3) its std sqrt(2 / classes) stalls short runs (linear probing,
2 classes, 5 epochs: 49% vs 86%). ``--set recipe.head_init=vpt`` gives it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from petl_bench.model import Method
from petl_bench.registry import register_method

from .building_blocks import PromptedBlocks, prompt_init_bound, task_table, train_prompt_dropouts

CITATION = "Jia et al., Visual Prompt Tuning, ECCV 2022"


@dataclass
class VPTConfig:
    tokens: int = 10  # prompt length l
    dropout: float = 0.0  # prompt dropout


@dataclass
class VPTDeepConfig(VPTConfig):
    dropout: float = 0.1


@register_method
class VPTShallow(Method):
    """``[cls, dropout(P), patches]`` into block 0 only; the frozen encoder stays in eval mode."""

    name = "vpt_shallow"
    identity_at_init = False
    citation = CITATION
    trains = "l prompt tokens before block 0 (l * d parameters)"
    Config = VPTConfig
    search_space = {"tokens": (1, 5, 10, 50, 100, 200)}
    deep = False
    frozen_encoder_eval = True

    def attach(self, model, info, config):
        bound = prompt_init_bound(info)
        layers = range(len(info.block_paths)) if self.deep else range(1)
        prompts = {
            i: nn.Parameter(torch.empty(1, config.tokens, info.widths[i]).uniform_(-bound, bound)) for i in layers
        }
        blocks = model.get_submodule(info.blocks_path)
        model.set_submodule(
            info.blocks_path, PromptedBlocks(blocks, prompts, insert_at=info.num_prefix_tokens, dropout=config.dropout)
        )
        return list(prompts.values())

    def set_train_mode(self, model, mode):
        """The encoder is in eval mode while training (no drop-path or dropout); the prompt dropout is not."""
        train_prompt_dropouts(model, mode)


@register_method
class VPTDeep(VPTShallow):
    """Every block gets fresh prompts that replace the previous block's prompt outputs."""

    name = "vpt_deep"
    identity_at_init = False
    trains = "l prompt tokens per block (depth * l * d parameters)"
    Config = VPTDeepConfig
    task_defaults = task_table("vpt_deep")
    deep = True
