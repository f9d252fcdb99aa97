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

Per-task T from the official demo script (``vqt.tasks.json``). The T = 1 tasks' compression
(``head2toe_sparsity_train.py``, ``h2t_sparsity_trainer.py``, ``run_vqt_vtab_sparsity.sh``) is three runs per
seed, ``petl-bench vqt compress``: a plain run; a run that ``start``s from its query tokens with a new
classifier and the loss term ``group_lasso * sum_f ||W_head[:, f]||_2`` (1e-4); a run that starts from the
first run's query tokens again with a classifier on the ``keep`` (0.7) share of the features whose columns
in the second run's classifier (``select``) have the largest L2 norm (``torch.topk`` order), both at half
the learning rate.
Official recipe differences (not applied: every method runs the shared recipe): the VPT protocol (Adam with
L2 weight decay, batch 128, a grid on val200, five seeds), an ImageNet-1k supervised ViT-B in the demo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from petl_bench.backbones import VIT
from petl_bench.checkpoints import read_safetensors
from petl_bench.data import file_digest
from petl_bench.errors import UserError
from petl_bench.model import Method
from petl_bench.records import CHECKPOINT
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
    """VQT's classifier: a Linear on the concatenated, per-sample normalised cls token and query outputs (with
    ``kept``, on those features only, in that order: the official ``feats[:, feat_select_ids]``)."""

    def __init__(self, width: int, blocks: int, tokens: int, sequence: int, classes: int, kept=None):
        super().__init__(width * (1 + blocks * tokens) if kept is None else len(kept), classes)
        self.blocks, self.sequence = blocks, sequence
        self.register_buffer("kept", kept, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = F.normalize(x[:, 0], dim=-1)
        queries = F.normalize(x[:, self.sequence :].reshape(len(x), self.blocks, -1), dim=-1)
        features = torch.cat([cls, queries.flatten(1)], dim=1)
        return super().forward(features if self.kept is None else features[:, self.kept])


def run_checkpoint(folder: str) -> Path:
    """A finished run's checkpoint: in its folder, or the file itself."""
    return Path(folder) / CHECKPOINT if Path(folder).is_dir() else Path(folder)


def run_tensors(folder: str, what: str) -> dict[str, torch.Tensor]:
    """The trained tensors of a finished run (its folder, or its checkpoint file)."""
    path = run_checkpoint(folder)
    if not path.is_file():
        raise UserError(f"vqt.{what}: no finished run's checkpoint at {folder}")
    return read_safetensors(path)


def run_digest(folder: str) -> str | None:
    path = run_checkpoint(folder)
    return file_digest(path) if path.is_file() else None


def kept_features(folder: str, keep: float) -> torch.Tensor:
    """The ``int(features * keep)`` features whose columns in ``folder``'s classifier have the largest L2 norm,
    in ``torch.topk`` order (the official ``featselect``)."""
    weight = next(t for name, t in run_tensors(folder, "select").items() if name.endswith("head.weight"))
    scores = weight.float().norm(p=2, dim=0)
    return torch.topk(scores, k=int(len(scores) * keep)).indices


@dataclass
class VQTConfig:
    tokens: int = 1  # T per block (per task: vqt.tasks.json)
    dropout: float = 0.1
    start: str = ""  # a finished vqt run whose query tokens this run starts from (a new classifier)
    group_lasso: float = 0.0  # + group_lasso * sum_f ||W_head[:, f]||_2 in the loss (the compression stage)
    keep: float = 1.0  # the share of the classifier's features kept, chosen by `select`
    select: str = ""  # a finished vqt run whose classifier's column L2 norms choose the kept features


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
    bounds = {"group_lasso": (0.0, None, False), "keep": (0.0, 1.0, False)}
    extra_loss = True  # the compression stage's group lasso (none by default: the plain cross-entropy)

    def check_config(self, config):
        if (config.keep < 1.0) != bool(config.select):
            raise UserError("vqt.keep < 1 and vqt.select go together: the run whose classifier chooses the features")
        if config.keep <= 0.0:
            raise UserError(f"vqt.keep must be in (0, 1], got {config.keep}")
        for what in ("start", "select"):
            if getattr(config, what):
                run_tensors(getattr(config, what), what)

    def config_identity(self, config):
        identity = super().config_identity(config)
        for what in ("start", "select"):  # the run's checkpoint content, not its folder name
            if getattr(config, what):
                identity[what] = {"checkpoint_sha256": run_digest(getattr(config, what))}
        return identity

    def row_settings(self, identity, task):
        """The runs a compressed run starts from differ by task and seed: the row says only that it has them."""
        return {k: (bool(v) if k in ("start", "select") else v) for k, v in identity.items()}

    def training_loss(self, model, images, labels, criterion, compute):
        with compute():
            logits = model(images)
        loss = criterion(logits, labels)
        if model.config.group_lasso:
            loss = loss + model.config.group_lasso * model.head.weight.float().norm(p=2, dim=0).sum()
        return loss

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
        kept = kept_features(config.select, config.keep) if config.select else None
        model.head = QueryHead(width, depth, config.tokens, sequence, classes, kept)
        if config.start:
            self.start_queries(queries, config.start)
        return [queries.query_prompt_embeddings]

    @staticmethod
    def start_queries(queries: QueryBlocks, folder: str) -> None:
        """The query tokens of a finished run (its classifier is not taken: the official pops it)."""
        found = [t for name, t in run_tensors(folder, "start").items() if name.endswith("query_prompt_embeddings")]
        if len(found) != 1 or found[0].shape != queries.query_prompt_embeddings.shape:
            raise UserError(f"vqt.start: {folder} holds no query tokens of shape "
                            f"{tuple(queries.query_prompt_embeddings.shape)}")  # fmt: skip
        with torch.no_grad():
            queries.query_prompt_embeddings.copy_(found[0])

    def set_train_mode(self, model, mode):
        """The encoder stays in eval mode while training (its train() override); the query dropout does not."""
        for module in model.modules():
            if isinstance(module, QueryBlocks):
                module.prompt_dropout.train(mode)
