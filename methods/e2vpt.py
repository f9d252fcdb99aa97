"""E2VPT, key-value and visual prompts (Han et al., ICCV 2023; official ChengHan111/E2VPT,
src/models/vit_prompt/vit_prompt_VK.py, src/models/vit_backbones/vit_changeVK.py, command.txt).

Visual prompts as VPT-deep: p tokens after the cls token, replaced before every block (uniform within
``sqrt(6 / (3 p^2 + d))``, dropout 0.1 drawn per image). Key-value prompts: per block one tensor ``Phi``
(heads x m x head_dim), the same tensor put in front of the keys and of the values of every head after
their projections (not through them); the queries are unchanged, so the sequence keeps its length.
``Phi`` starts ``kaiming_uniform(a=0, fan_in, leaky_relu)`` on the 3-D tensor (fan-in m x head_dim). The
encoder stays in eval mode while training. ``9,216 (p + m)`` parameters on ViT-B/16; per-task (p, m) from
the official commands (``e2vpt.tasks.json``: a 19-task mean of 137,755).

Not implemented: the pruning and rewinding stages (token and piece masks by the gradient importance, a
retraining per pruning level; which level the paper's table reports is not stated): this is the unpruned
model of the official "origin" runs, whose published rows print beside it as what they are.
Official recipe differences (not applied: every method runs the shared recipe): the VPT protocol (SGD, a
grid on val200, five seeds, batch 64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from petl_bench.backbones import VIT
from petl_bench.errors import UserError
from petl_bench.model import Method
from petl_bench.registry import register_method

from .building_blocks import PromptedBlocks, prompt_init_bound, task_table, train_prompt_dropouts


class KeyValuePromptAttention(nn.Module):
    """timm's ``Attention.forward`` with ``m`` learned keys and values in front of each head's (``kv_prompt``,
    one tensor for both, as the official ``SHARE_PARAM_KV``); tests hold it to the official equation."""

    def __init__(self, attn: nn.Module, tokens: int):
        super().__init__()
        if getattr(attn, "gate", None) is not None:
            raise UserError("e2vpt supports timm's plain ViT attention (no gated attention)")
        self.attn = attn
        self.kv_prompt = nn.Parameter(torch.empty(attn.num_heads, tokens, attn.head_dim))
        nn.init.kaiming_uniform_(self.kv_prompt, a=0, mode="fan_in", nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise UserError("e2vpt's key-value prompts do not take an attention mask")
        attn, (batch, length, _) = self.attn, x.shape
        qkv = attn.qkv(x).reshape(batch, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        prompt = self.kv_prompt.to(k.dtype).expand(batch, -1, -1, -1)
        k, v = torch.cat([prompt, k], dim=2), torch.cat([prompt, v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if self.training else 0.0)
        out = attn.norm(out.transpose(1, 2).reshape(batch, length, -1))
        return attn.proj_drop(attn.proj(out))


@dataclass
class E2VPTConfig:
    tokens: int = 10  # p, visual prompts per block
    kv_tokens: int = 5  # m, key-value prompts per block
    dropout: float = 0.1  # on the visual prompts


@register_method
class E2VPT(Method):
    """E2VPT (unpruned): VPT-deep visual prompts and per-block key-value prompts in every head."""

    name = "e2vpt"
    identity_at_init = False
    published_as = ("E2VPT",)
    citation = "Han et al., E2VPT: An Effective and Efficient Approach for Visual Prompt Tuning, ICCV 2023"
    trains = "p visual prompts and m key-value prompts per block ((p + m) d per block)"
    kinds = (VIT,)
    Config = E2VPTConfig
    task_defaults = task_table("e2vpt")
    search_space = {"tokens": (1, 5, 10, 50), "kv_tokens": (1, 5, 10)}
    bounds = {"kv_tokens": (1, 1000, False)}
    frozen_encoder_eval = True
    merge_note = "its prompts are extra tokens, keys and values"

    def attach(self, model, info, config):
        bound = prompt_init_bound(info)
        blocks = model.get_submodule(info.blocks_path)
        prompts = {
            i: nn.Parameter(torch.empty(1, config.tokens, info.widths[i]).uniform_(-bound, bound))
            for i in range(len(blocks))
        }
        kv = []
        for block in blocks:
            block.attn = KeyValuePromptAttention(block.attn, config.kv_tokens)
            kv.append(block.attn.kv_prompt)
        model.set_submodule(
            info.blocks_path, PromptedBlocks(blocks, prompts, insert_at=info.num_prefix_tokens, dropout=config.dropout)
        )
        return [*prompts.values(), *kv]

    def set_train_mode(self, model, mode):
        """The encoder is in eval mode while training; the visual prompts' dropout is not."""
        train_prompt_dropouts(model, mode)
