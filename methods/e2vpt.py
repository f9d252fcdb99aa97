"""E2VPT, key-value and visual prompts (Han et al., ICCV 2023; official ChengHan111/E2VPT,
src/models/vit_prompt/vit_prompt_VK.py, src/models/vit_backbones/vit_changeVK.py, command.txt).

Visual prompts as VPT-deep: p tokens after the cls token, replaced before every block (uniform within
``sqrt(6 / (3 p^2 + d))``, dropout 0.1 drawn per image). Key-value prompts: per block one tensor ``Phi``
(heads x m x head_dim), the same tensor put in front of the keys and of the values of every head after
their projections (not through them); the queries are unchanged, so the sequence keeps its length.
``Phi`` starts ``kaiming_uniform(a=0, fan_in, leaky_relu)`` on the 3-D tensor (fan-in m x head_dim). The
encoder stays in eval mode while training. ``9,216 (p + m)`` parameters on ViT-B/16; per-task (p, m) from
the official commands (``e2vpt.tasks.json``: a 19-task mean of 137,755).

Pruning and rewinding (official ``tune_vtab_PruningRewind_CVK.py``, ``Trainer.calculate_importance``,
``MASK_CLS_TOKEN``): a token mask (p) and a piece mask (p x 16) multiply every block's visual prompts; piece
``k`` of a prompt is the channels ``c`` with ``c mod 16 == k`` (the official ``mask.repeat((1, d / 16))``:
interleaved, not 16 contiguous runs). ``petl-bench e2vpt prune`` trains the model with both masks trained
(as officially, their names contain "prompt"), writes the masks' mean training-set gradients (the
``importance`` file), then retrains from scratch ("rewinds") with the ``prune_tokens`` lowest-importance
tokens and, in every token, the ``prune_pieces`` lowest pieces set to zero (:mod:`petl_bench.e2vpt_prune`).
A masked token stays in the sequence as a zero vector, as in the official code. Without an importance file
(and with ``prune_tokens = prune_pieces = 0``) this is the unpruned model of the official "origin" runs.
Official recipe differences (not applied: every method runs the shared recipe): the VPT protocol (SGD, a
grid on val200, five seeds, batch 64).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from petl_bench.backbones import VIT
from petl_bench.errors import UserError
from petl_bench.model import Method
from petl_bench.registry import register_method

from .building_blocks import PromptedBlocks, prompt_init_bound, task_table, train_prompt_dropouts

PIECES = 16  # official CLS_TOKEN_P_PIECES_NUM
MIN_TOKENS, MIN_PIECES = 1, 4  # official MIN_NUMBER_CLS_TOKEN, MIN_NUMBER_CLS_TOKEN_PIECE
PERCENTS = (10, 20, 30, 40, 50, 60, 70, 80, 90)  # official CLS_TOKEN_MASK_PERCENT, CLS_TOKEN_PIECE_MASK_PERCENT
IMPORTANCE_KIND = "e2vpt-importance"
# What an importance file was asked for (the rest is what it found on its task): a report row's key.
IMPORTANCE_REQUEST = ("kind", "backbone", "pretrained", "seed", "settings", "recipe")


def mask_levels(total: int, minimum: int, percents=PERCENTS) -> list[int]:
    """How many of ``total`` tokens (or pieces) each pruning level masks: the official
    ``determine_mask_sequence`` (``int(total * percent / 100)``, at most ``total - minimum``; it stops at the
    first level capped) as the distinct counts its rewind runs use (``mask_tokens/<count>_...json``)."""
    counts = []
    for percent in percents:
        count = int(total * percent / 100)
        if minimum > 0 and count > total - minimum:
            counts.append(total - minimum)
            break
        counts.append(count)
    return sorted(set(counts))


def lowest(scores: list[float], count: int) -> list[int]:
    """The ``count`` indices of the lowest (signed) scores, ties to the lower index (the official stable
    ``sorted`` by score, ascending: ``MASK_RESERVE False``)."""
    return sorted(sorted(range(len(scores)), key=lambda i: scores[i])[:count])


def check_pieces(info, pieces: int) -> None:
    """A prompt of width d is cut into ``pieces`` interleaved pieces: d must divide."""
    if any(width % pieces for width in info.widths):
        raise UserError(f"E2VPT's {pieces} pieces per prompt need a width divisible by {pieces}")


def read_importance(source: str) -> dict:
    """An importance file of ``petl-bench e2vpt prune`` (checked: a UserError names what is wrong)."""
    path = Path(source)
    if not path.is_file():
        raise UserError(f"E2VPT importance file not found: {source} (petl-bench e2vpt prune writes one)")
    try:
        found = json.loads(path.read_text())
        tokens, pieces = found["token_importance"], found["piece_importance"]
        if found.get("kind") != IMPORTANCE_KIND or len(pieces) != len(tokens) or len({len(p) for p in pieces}) != 1:
            raise ValueError("not an importance file of petl-bench e2vpt prune")
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"E2VPT importance file {source} is malformed: {error}") from None
    return found


class PromptMasks(nn.Module):
    """The official token mask (p) and piece mask (p x pieces) on the visual prompts: fixed 0/1 buffers in a
    pruned run, trained parameters (starting at 1) in the stage that measures their importance."""

    def __init__(self, token: torch.Tensor, piece: torch.Tensor, trained: bool = False):
        super().__init__()
        if trained:
            self.token, self.piece = nn.Parameter(token), nn.Parameter(piece)
        else:
            self.register_buffer("token", token, persistent=False)
            self.register_buffer("piece", piece, persistent=False)

    def forward(self, prompt: torch.Tensor) -> torch.Tensor:
        """``prompt`` (1, p, d) times the piece mask repeated along the channels and the token mask."""
        repeats = prompt.shape[-1] // self.piece.shape[1]
        return prompt * (self.piece.repeat(1, repeats) * self.token[:, None]).to(prompt.dtype)


class MaskedPromptedBlocks(PromptedBlocks):
    """VPT-deep prompts, each block's multiplied by the same masks (the official shallow and deep prompts)."""

    def __init__(self, blocks, prompts, insert_at, dropout, masks: PromptMasks):
        super().__init__(blocks, prompts, insert_at, dropout)
        self.masks = masks

    def prompt(self, index: int) -> torch.Tensor | None:
        prompt = super().prompt(index)
        return None if prompt is None else self.masks(prompt)


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
    importance: str = ""  # the masks' importance (petl-bench e2vpt prune); with the two counts below
    prune_tokens: int = 0  # visual prompt tokens masked (the lowest importance)
    prune_pieces: int = 0  # pieces masked in every token (the lowest importance per token)


@register_method
class E2VPT(Method):
    """E2VPT: VPT-deep visual prompts and per-block key-value prompts in every head; pruned (token and piece
    masks on the visual prompts) when given the masks' importance and the counts to mask."""

    name = "e2vpt"
    identity_at_init = False
    published_as = ("E2VPT",)
    citation = "Han et al., E2VPT: An Effective and Efficient Approach for Visual Prompt Tuning, ICCV 2023"
    trains = "p visual prompts and m key-value prompts per block ((p + m) d per block)"
    kinds = (VIT,)
    Config = E2VPTConfig
    task_defaults = task_table("e2vpt")
    search_space = {"tokens": (1, 5, 10, 50), "kv_tokens": (1, 5, 10)}
    bounds = {"kv_tokens": (1, 1000, False), "prune_tokens": (0, None, False), "prune_pieces": (0, None, False)}
    frozen_encoder_eval = True
    merge_note = "its prompts are extra tokens, keys and values"

    def check_config(self, config):
        if not config.importance:
            if config.prune_tokens or config.prune_pieces:
                raise UserError("e2vpt.prune_tokens and e2vpt.prune_pieces need the masks' importance: "
                                "--set e2vpt.importance=FILE (petl-bench e2vpt prune writes one)")  # fmt: skip
            return
        found = read_importance(config.importance)
        tokens, pieces = len(found["token_importance"]), len(found["piece_importance"][0])
        if tokens != config.tokens:
            raise UserError(f"the E2VPT importance in {config.importance} is of {tokens} visual prompt tokens; "
                            f"this run has e2vpt.tokens={config.tokens}")  # fmt: skip
        if config.prune_tokens >= tokens or config.prune_pieces >= pieces:
            raise UserError(f"E2VPT can mask at most {tokens - 1} of its {tokens} tokens and {pieces - 1} of its "
                            f"{pieces} pieces per token; got prune_tokens={config.prune_tokens}, "
                            f"prune_pieces={config.prune_pieces}")  # fmt: skip

    def check_pair(self, info, config):
        if config.importance:
            check_pieces(info, len(read_importance(config.importance)["piece_importance"][0]))

    def config_identity(self, config):
        identity = super().config_identity(config)
        if config.importance and Path(config.importance).is_file():  # the file's content, not its name
            identity["importance"] = json.loads(Path(config.importance).read_text())
        return identity

    def masks(self, config) -> PromptMasks | None:
        """The pruned run's fixed masks (None without an importance file): the ``prune_tokens`` tokens of
        lowest importance, and in every token the ``prune_pieces`` pieces of lowest importance, set to 0."""
        if not config.importance:
            return None
        found = read_importance(config.importance)
        token = torch.ones(config.tokens)
        token[lowest(found["token_importance"], config.prune_tokens)] = 0.0
        piece = torch.ones(config.tokens, len(found["piece_importance"][0]))
        for row, scores in enumerate(found["piece_importance"]):
            piece[row, lowest(scores, config.prune_pieces)] = 0.0
        return PromptMasks(token, piece)

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
        masks = self.masks(config)
        if masks is None:
            wrapped = PromptedBlocks(blocks, prompts, insert_at=info.num_prefix_tokens, dropout=config.dropout)
        else:
            wrapped = MaskedPromptedBlocks(blocks, prompts, info.num_prefix_tokens, config.dropout, masks)
        model.set_submodule(info.blocks_path, wrapped)
        return [*prompts.values(), *kv, *(masks.parameters() if masks is not None else ())]

    def row_settings(self, identity, task):
        """A row per importance request (backbone, weights, seed, recipe, pruning settings), not per task."""
        importance = identity.get("importance")
        if isinstance(importance, dict):
            identity = {**identity, "importance": {k: importance.get(k) for k in IMPORTANCE_REQUEST}}
        return identity

    def pruned_entries(self, model):
        """The prompt entries a fixed mask sets to zero in every block (the official pruned parameters)."""
        blocks = next((m for m in model.modules() if isinstance(m, MaskedPromptedBlocks)), None)
        if blocks is None or isinstance(blocks.masks.token, nn.Parameter):
            return 0
        zero = 0
        for prompt in blocks.prompts.values():
            zero += int((blocks.masks(torch.ones_like(prompt)) == 0).sum())
        return zero

    def set_train_mode(self, model, mode):
        """The encoder is in eval mode while training; the visual prompts' dropout is not."""
        train_prompt_dropouts(model, mode)
