"""E2VPT's pruning and rewinding (official ChengHan111/E2VPT ``tune_vtab_PruningRewind_CVK.py``,
``src/engine/trainer.py``: ``calculate_importance``, ``determine_mask_sequence``, ``what_tokens_to_mask``,
``what_tokens_pieces_to_mask``; ``find_best_MtMtp``).

1. Before pruning: E2VPT with a token mask (p) and a piece mask (p x 16) on its visual prompts, both starting
   at 1 and trained with the prompts (officially too: their names contain "prompt"), on ``train800``.
2. Importance: at the trained weights, in eval mode, fp32, over the training images in batches of the
   recipe's size without augmentation: the mean over batches of d(mean cross-entropy)/d(mask), signed
   (``NORMALIZE_SCORES_BY_TOKEN False``). The official loop also calls its optimizer, whose learning rate
   is still 0 there (warm-up step 0 of a scheduler never stepped), so the weights do not move: here no step.
3. Levels: the token counts and piece counts of the official ``determine_mask_sequence`` (10 %...90 %,
   at least 1 token and 4 pieces kept); the lowest-importance tokens (pieces of every token) are masked.
4. Rewind: every (token count, piece count) pair retrained from scratch with the masks fixed, on
   ``train800``, scored by its last-epoch ``val200`` top-1: the first stage of ``petl-bench tune``, whose grid
   runs the most-masked pair first, so a tie goes to more masked tokens (``find_best_MtMtp``), then to more
   masked pieces (officially: the order of ``glob``). The chosen pair is retrained on ``train800val200``
   and tested with every seed (``tune``'s stage 2; the official 5 seeds).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F

from . import records, search
from .atomic import write_atomic
from .checkpoints import load_trainable
from .config import Recipe
from .methods.e2vpt import (
    E2VPT,
    IMPORTANCE_KIND,
    MIN_PIECES,
    MIN_TOKENS,
    PERCENTS,
    PIECES,
    E2VPTConfig,
    MaskedPromptedBlocks,
    PromptMasks,
    check_pieces,
    mask_levels,
)  # fmt: skip
from .runner import plain_training_images, prepare

log = logging.getLogger(__name__)


@dataclass
class PruneSettings:
    """What defines an importance measurement: the model's sizes, the pieces and levels, and the recipe of
    the training before pruning (the official: the lr/wd chosen on val200, then used by every rewind)."""

    tokens: int = 10
    kv_tokens: int = 5
    pieces: int = PIECES
    min_tokens: int = MIN_TOKENS
    min_pieces: int = MIN_PIECES
    percents: tuple[int, ...] = PERCENTS
    recipe: Recipe = field(default_factory=Recipe)

    def request(self) -> dict:
        """The pruning settings that do not depend on the task (the sizes and the recipe are recorded apart)."""
        return {"pieces": self.pieces, "min_tokens": self.min_tokens, "min_pieces": self.min_pieces,
                "percents": list(self.percents)}  # fmt: skip

    def levels(self) -> tuple[list[int], list[int]]:
        """The token counts and the piece counts the rewind grid crosses."""
        return (mask_levels(self.tokens, self.min_tokens, self.percents),
                mask_levels(self.pieces, self.min_pieces, self.percents))  # fmt: skip


class _MaskedE2VPT(E2VPT):
    """E2VPT whose masks train (not registered: the pruning stage's own)."""

    name = "e2vpt_before_pruning"

    def __init__(self, pieces: int = PIECES):
        self.pieces = pieces

    def check_config(self, config):
        pass  # its masks are its own, not read from a file

    def check_pair(self, info, config):
        check_pieces(info, self.pieces)

    def masks(self, config):
        return PromptMasks(torch.ones(config.tokens), torch.ones(config.tokens, self.pieces), trained=True)


def mask_importance(model, batches) -> tuple[list[float], list[list[float]]]:
    """The mean over ``batches`` of d(mean cross-entropy)/d(token mask) and d(...)/d(piece mask), signed."""
    masks = next(m.masks for m in model.modules() if isinstance(m, MaskedPromptedBlocks))
    token, piece, count = torch.zeros_like(masks.token), torch.zeros_like(masks.piece), 0
    model.eval()
    for images, labels in batches:
        loss = F.cross_entropy(model(images), labels)
        token_grad, piece_grad = torch.autograd.grad(loss, [masks.token, masks.piece])
        token, piece, count = token + token_grad, piece + piece_grad, count + 1
    return (token / count).tolist(), (piece / count).tolist()


def run_importance(task, *, backbone: str, pretrained: str, data_root: Path | None, output: Path, seed: int,
                   settings: PruneSettings, device: torch.device, image_size: int | None = None,
                   progress=None) -> Path:  # fmt: skip
    """Train E2VPT with its masks on train800 and write the masks' importance; returns the importance file
    (reused when it exists; the training resumes after a crash)."""
    folder = search.search_folder(output, "e2vpt", task.name, backbone, seed, settings, pretrained)
    importance_file = folder / "importance.json"
    if importance_file.is_file():
        log.info("E2VPT importance already measured: %s", importance_file)
        return importance_file
    recipe = dataclasses.replace(settings.recipe, image_size=image_size or settings.recipe.image_size)
    data = task.splits(data_root, "tune")
    config = E2VPTConfig(tokens=settings.tokens, kv_tokens=settings.kv_tokens)
    prepared = prepare(
        _MaskedE2VPT(settings.pieces), config, backbone, pretrained, recipe, data, seed, device, progress
    )
    folder.mkdir(parents=True, exist_ok=True)  # after every check: a refused command writes nothing
    about = {"task": task.name, "backbone": backbone, "seed": seed}
    if (folder / "before_pruning.safetensors").is_file():
        load_trainable(prepared.model, folder / "before_pruning.safetensors")
    else:
        search.train_supernet(prepared, recipe, folder, about, device, label="E2VPT before pruning",
                              progress=progress, stem="before_pruning")  # fmt: skip
    images = plain_training_images(prepared, data)
    batches = (
        (prepared.normalizer(x.to(device, non_blocking=True)), y.to(device))
        for x, y in images.batches(recipe.batch_size)
    )
    token, piece = mask_importance(prepared.model, batches)
    token_levels, piece_levels = settings.levels()
    result = {
        "kind": IMPORTANCE_KIND, **about, "pretrained": pretrained, "settings": settings.request(),
        "tokens": settings.tokens,
        "kv_tokens": settings.kv_tokens, "token_importance": token, "piece_importance": piece,
        "token_levels": token_levels, "piece_levels": piece_levels, "train_images": len(images),
        "recipe": dataclasses.asdict(recipe), "finished_at": records.now(),
    }  # fmt: skip
    write_atomic(importance_file, json.dumps(result, indent=1))
    return importance_file


def rewind_grid(found: dict, lr: float, weight_decay: float) -> list[str]:
    """``petl-bench tune`` ``--grid`` items of the rewind stage: every pair of levels, the most masked first
    (tune's ties go to the first in grid order), the sizes and the recipe of the importance fixed."""

    def values(levels):
        return ",".join(str(level) for level in sorted(levels, reverse=True))

    return [
        f"e2vpt.prune_tokens={values(found['token_levels'])}", f"e2vpt.prune_pieces={values(found['piece_levels'])}",
        f"e2vpt.tokens={found['tokens']}", f"e2vpt.kv_tokens={found['kv_tokens']}", f"recipe.lr={lr}",
        f"recipe.weight_decay={weight_decay}",
    ]  # fmt: skip
