"""What training produces and what lets it resume: the per-epoch log, the result of a fit, and the saved
training state (trained tensors, optimizer, every random stream) that continues a run exactly as if it
had never stopped. The state holds tensors and plain values only: it loads with ``weights_only=True``."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .atomic import atomic_path

log = logging.getLogger(__name__)


@dataclass
class EpochLog:
    epoch: int
    lr: float
    loss: float
    images_per_s: float
    seconds: float
    top1: float | None = None  # test/val top-1 when this epoch was evaluated


@dataclass
class FitResult:
    top1: float | None  # accuracy of the final model on the evaluation split (percent)
    epochs: list[EpochLog] = field(default_factory=list)
    train_images_per_s: float = 0.0
    eval_images_per_s: float = 0.0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    # epoch -> which evaluation images were classified correctly (bool, the split's order); not resumed
    outcomes: dict[int, torch.Tensor] = field(default_factory=dict)

    def outcomes_of(self, epoch: int | None = None) -> torch.Tensor | None:
        """The per-image outcomes of ``epoch``'s evaluation (default: the last one), None when not kept."""
        if epoch is None:
            return self.outcomes[max(self.outcomes)] if self.outcomes else None
        return self.outcomes.get(epoch)

    @property
    def curve(self) -> list[dict]:
        return [{"epoch": e.epoch, "top1": e.top1} for e in self.epochs if e.top1 is not None]


RESUME_FORMAT = "petl-bench-resume/2"


def _numpy_state() -> dict:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
            "has_gauss": int(has_gauss), "cached": float(cached)}  # fmt: skip


def _set_numpy_state(state: dict) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["kind"], keys, state["position"], state["has_gauss"], state["cached"]))


def save_state(path: Path, epoch: int, model: nn.Module, optimizer, order: torch.Generator, result: FitResult) -> None:
    """Everything needed to continue training after ``epoch`` exactly as if never interrupted, as
    tensors and plain values only: the file loads with ``torch.load(weights_only=True)``, which runs
    no code whatever the file holds."""
    version, mt_state, gauss = random.getstate()
    state = {
        "format": RESUME_FORMAT,
        "epoch": epoch,
        "params": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "order": order.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python_rng": [version, torch.tensor(mt_state, dtype=torch.int64), gauss],
        "numpy_rng": _numpy_state(),
        "result": {k: v for k, v in dataclasses.asdict(result).items() if k != "outcomes"},
    }
    with atomic_path(path) as temporary:
        torch.save(state, temporary)


def _snapshot(model: nn.Module, optimizer, order: torch.Generator) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "order": order.get_state(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
    }


def _apply_state(state: dict, model: nn.Module, optimizer, order: torch.Generator, result: FitResult) -> int:
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise ValueError(f"not a {RESUME_FORMAT} training state")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = state["params"]
    if set(params) != set(saved) or any(params[n].shape != saved[n].shape for n in params):
        raise ValueError("it was written by a different model")
    epoch = state["epoch"]
    if not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"bad epoch {epoch!r}")
    epochs = [EpochLog(**entry) for entry in state["result"]["epochs"]]
    with torch.no_grad():
        for name, parameter in params.items():
            parameter.copy_(saved[name])
    optimizer.load_state_dict(state["optimizer"])
    order.set_state(state["order"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    version, mt_state, gauss = state["python_rng"]
    random.setstate((version, tuple(int(v) for v in mt_state.tolist()), gauss))
    _set_numpy_state(state["numpy_rng"])
    result.epochs = epochs
    result.train_seconds = float(state["result"]["train_seconds"])
    result.eval_seconds = float(state["result"]["eval_seconds"])
    result.eval_images_per_s = float(state["result"]["eval_images_per_s"])
    return epoch + 1


def restore_state(path: Path, model: nn.Module, optimizer, order: torch.Generator, result: FitResult) -> int:
    """Continue from a state written by :func:`save_state`; returns the first epoch still to train.

    The file is loaded with ``weights_only=True``: a crafted pickle is refused, never run. A file that
    cannot be used (crafted, garbage, truncated, another model's) is moved aside with a warning and
    the run starts afresh, exactly as a run that never had one."""
    before = _snapshot(model, optimizer, order)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return _apply_state(state, model, optimizer, order, result)
    except Exception as error:  # noqa: BLE001 - any unusable file: start afresh
        rejected = path.with_name(path.name + ".rejected")
        os.replace(path, rejected)
        log.warning("discarded the saved training state %s (%s: %s); moved to %s, the run starts afresh",
                    path, type(error).__name__, str(error)[:200], rejected.name)  # fmt: skip
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name in before["params"]:
                    parameter.copy_(before["params"][name])
        optimizer.load_state_dict(before["optimizer"])
        order.set_state(before["order"])
        torch.set_rng_state(before["torch_rng"])
        random.setstate(before["python_rng"])
        np.random.set_state(before["numpy_rng"])
        result.epochs, result.train_seconds, result.eval_seconds, result.eval_images_per_s = [], 0.0, 0.0, 0.0
        return 0
