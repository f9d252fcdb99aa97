"""VQT, Visual Query Tuning (Tu, Mai & Chao, CVPR 2023; official andytu28/VQT,
src/models/vit_backbones/h2t_vit.py, src/models/build_h2t_model.py, run_demo_exp.sh).

Each block i gets T learnable query tokens ``Q_i`` (``query_prompt_embeddings``, L x T x d, uniform within
``sqrt(6 / (3 p^2 + d))``, dropout 0.1 in training) in front of its input: the block runs on ``[Q_i; X_i]``
with keys and values from the original tokens only (here: timm's own block with an attention mask that lets
every token attend to ``X_i`` alone), so ``X_{i+1}`` is the frozen model's and the block's query outputs
``O_i`` are kept. The classifier reads ``[n(LN(X_L)[cls]), n(vec O_1), ..., n(vec O_L)]`` (``n``: per-sample
L2 normalisation; the ``O_i`` skip the final LayerNorm), a Linear of ``d (1 + L T)`` inputs with VPT's init
(kaiming_normal fan-out, bias -log(99)). The encoder stays in eval mode while training; the query dropout
does not. Query tokens ``L d T`` (ViT-B/16: T = 1, 9,216), plus a classifier of ``(d (1 + L T) + 1) C``
(T = 1, C = 100: 998,500, against the usual 76,900) that ``params`` counts with the head.

Per-task T from the official demo script (``vqt.tasks.json``). Not applied: the T = 1 tasks' compression
(head2toe_sparsity_train.py: train with a group-lasso term ``1e-4 sum_f ||W_head[:, f]||``, keep the 70% of
the features whose classifier columns have the largest L2 norm, retrain the classifier on them).
Official recipe differences (not applied: every method runs the shared recipe): the VPT protocol (Adam with
L2 weight decay, batch 128, a grid on val200, five seeds), an ImageNet-1k supervised ViT-B in the demo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from petl_bench.backbones import VIT
from petl_bench.errors import UserError
from petl_bench.model import Method
from petl_bench.registry import register_method

from .building_blocks import task_table


class QueryBlocks(nn.Module):
    """The block sequence with T query tokens per block; returns ``[X_L; O_1; ...; O_L]``."""

    def __init__(self, blocks: nn.Module, tokens: int, width: int, patch: int, sequence: int, dropout: float):
        super().__init__()
        self.blocks = blocks
        self.query_prompt_embeddings = nn.Parameter(torch.zeros(len(blocks), tokens, width))
        bound = math.sqrt(6.0 / (3 * patch * patch + width))
        nn.init.uniform_(self.query_prompt_embeddings, -bound, bound)
        self.prompt_dropout = nn.Dropout(dropout)
        keys = torch.arange(tokens + sequence) >= tokens  # every row attends to the original tokens only
        self.register_buffer("attn_mask", keys.expand(tokens + sequence, -1).clone(), persistent=False)
        self.tokens = tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for index, block in enumerate(self.blocks):
            queries = self.prompt_dropout(self.query_prompt_embeddings[index].expand(len(x), -1, -1))
            x = block(torch.cat([queries, x], dim=1), attn_mask=self.attn_mask)
            outputs.append(x[:, : self.tokens])
            x = x[:, self.tokens :]
        return torch.cat([x, *outputs], dim=1)


class TokensNorm(nn.Module):
    """The final LayerNorm on the first ``count`` tokens (the backbone's); the query outputs pass unchanged."""

    def __init__(self, norm: nn.Module, count: int):
        super().__init__()
        self.norm, self.count = norm, count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, queries = x.split([self.count, x.shape[1] - self.count], dim=1)
        return torch.cat([self.norm(tokens), queries], dim=1)


class QueryHead(nn.Linear):
    """VQT's classifier: a Linear on the concatenated, per-sample normalised cls token and query outputs."""

    def __init__(self, width: int, blocks: int, tokens: int, sequence: int, classes: int):
        super().__init__(width * (1 + blocks * tokens), classes)
        self.blocks, self.sequence = blocks, sequence

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = F.normalize(x[:, 0], dim=-1)
        queries = F.normalize(x[:, self.sequence :].reshape(len(x), self.blocks, -1), dim=-1)
        return super().forward(torch.cat([cls, queries.flatten(1)], dim=1))


@dataclass
class VQTConfig:
    tokens: int = 1  # T per block (per task: vqt.tasks.json)
    dropout: float = 0.1


@register_method
class VQT(Method):
    """VQT: T query tokens per block read the frozen features; a classifier on all of them."""

    name = "vqt"
    identity_at_init = False  # the classifier reads the query outputs too
    published_as = ("VQT",)
    citation = "Tu, Mai & Chao, Visual Query Tuning: Towards Effective Usage of Intermediate Representations, CVPR 2023"
    trains = "T query tokens per block (L d T), and a classifier of d (1 + L T) inputs"
    kinds = (VIT,)
    Config = VQTConfig
    task_defaults = task_table("vqt")
    search_space = {"tokens": (1, 10, 20)}
    frozen_encoder_eval = True
    head_init = "vpt"
    # The official grid is VPT's, lr 0.025-0.5 (Adam) for a classifier on L2-normalised features; the shared
    # 1e-3 barely moves it (demo_digits: 26.0% at 1e-3, 66.5% at 1e-2).
    recipe_grid = {"lr": (1e-3, 1e-2, 1e-1), "weight_decay": (1e-4, 1e-3)}
    merge_note = "its queries are extra tokens and its classifier is wider"

    def attach(self, model, info, config):
        if info.num_prefix_tokens < 1 or getattr(model, "global_pool", "token") != "token":
            raise UserError(f"method '{self.name}' needs a ViT with a class token read by the classifier")
        blocks = model.get_submodule(info.blocks_path)
        rows, cols = info.grids[0]
        sequence = info.num_prefix_tokens + rows * cols
        width, depth, classes = info.widths[0], len(blocks), model.head.out_features
        queries = QueryBlocks(blocks, config.tokens, width, info.patch_size[0], sequence, config.dropout)
        model.set_submodule(info.blocks_path, queries)
        model.norm = TokensNorm(model.norm, sequence)
        model.global_pool = ""  # the classifier reads every token
        model.head = QueryHead(width, depth, config.tokens, sequence, classes)
        return [queries.query_prompt_embeddings]

    def set_train_mode(self, model, mode):
        """The encoder stays in eval mode while training (its train() override); the query dropout does not."""
        for module in model.modules():
            if isinstance(module, QueryBlocks):
                module.prompt_dropout.train(mode)
