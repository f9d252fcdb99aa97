"""The one training loop and the one evaluation loop.

The default :class:`Recipe` is the Convpass paper's VTAB-1K recipe: AdamW (lr 1e-3, weight decay
1e-4 on every trainable tensor), batch 64 with drop_last, 100 epochs, cosine schedule with a warm-up
of 10% of the epochs (10 at 100) from 1e-6 and minimum 1e-5 stepped once per epoch, drop-path 0.1,
cross-entropy, no augmentation. fp32 on CPU, bf16 autocast on CUDA.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .atomic import atomic_path
from .config import Recipe, check_bounds  # noqa: F401 - Recipe re-exported: its old home
from .data import Normalizer, TensorDataset
from .errors import UserError

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (a run's backbone, method and head init)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss: the run fails (a record at chance would be a made-up number)."""


def scheduled_lr(recipe: Recipe, t: int) -> float:
    """timm ``CosineLRScheduler(t_initial=epochs, warmup_t, warmup_lr_init, lr_min)`` at step ``t``:
    linear warm-up, then cosine on the raw step count (no warm-up offset)."""
    if t < recipe.warmup:
        return recipe.warmup_lr + t * (recipe.lr - recipe.warmup_lr) / recipe.warmup
    if t >= recipe.epochs:
        return recipe.min_lr
    return recipe.min_lr + 0.5 * (recipe.lr - recipe.min_lr) * (1 + math.cos(math.pi * t / recipe.epochs))


def lr_at_epoch(recipe: Recipe, epoch: int) -> float:
    """The learning rate epoch ``epoch`` trains with in the official code, which calls
    ``scheduler.step(epoch)`` after each epoch: epochs 0 and 1 run at lr(0), epoch e at lr(e - 1)."""
    return scheduled_lr(recipe, max(epoch - 1, 0))


def parameter_groups(model: nn.Module, scope: str) -> list[dict]:
    """Trainable parameters, with weight decay on all of them (``all``) or not on 1-D ones (``skip_1d``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if scope == "all":
        return [{"params": params}]
    if scope == "skip_1d":
        return [
            {"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]
    raise UserError(f"unknown weight_decay_scope '{scope}'; choose all or skip_1d")


def adamw(groups: list[dict], recipe: Recipe, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one launch for every tensor, no host read per tensor as the foreach
    implementation does): the same update within float rounding (tests hold it to 1e-6 after 10 steps)."""
    return torch.optim.AdamW(
        groups, lr=recipe.lr, weight_decay=recipe.weight_decay, fused=device.type in ("cuda", "cpu")
    )


def precision_of(device: torch.device, precision: str = "auto") -> str:
    """The precision a run computes in: ``auto`` is bf16 autocast on CUDA and fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


@contextlib.contextmanager
def frozen_weights_in(model: nn.Module, dtype: torch.dtype | None):
    """Frozen Linear and conv weights (and biases) held in ``dtype`` for the duration, then put back:
    under autocast to ``dtype`` each would otherwise be cast again at every use, every step (the largest
    share of a frozen backbone's kernels). Bitwise the same as autocast's own cast. A method whose code
    reads frozen weights outside the layers themselves declares ``reads_frozen_weights`` and is left alone."""
    method = getattr(model, "method", None)
    if dtype is None or getattr(method, "reads_frozen_weights", False):
        yield
        return
    kept = []
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            for tensor in (module.weight, module.bias):
                if tensor is not None and not tensor.requires_grad and tensor.dtype == torch.float32:
                    kept.append((tensor, tensor.data))
                    tensor.data = tensor.data.to(dtype)
    try:
        yield
    finally:
        for tensor, data in kept:
            tensor.data = data


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast (``precision`` bf16, the default on CUDA) or plain fp32."""
    if precision_of(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: max allocated since the last reset; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


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

    @property
    def curve(self) -> list[dict]:
        return [{"epoch": e.epoch, "top1": e.top1} for e in self.epochs if e.top1 is not None]


@torch.no_grad()
def _evaluate(model, data, normalizer, device, batch_size, classes, precision) -> tuple[float, float]:
    model.eval()
    subset = torch.tensor(classes, device=device) if classes is not None else None
    correct, start = 0, time.perf_counter()
    for images, labels in data.batches(batch_size):
        with autocast(device, precision):
            logits = model(normalizer(images.to(device, non_blocking=True)))
        predictions = logits.argmax(-1) if subset is None else subset[logits[:, subset].argmax(-1)]
        correct += int((predictions == labels.to(device)).sum())
    seconds = time.perf_counter() - start
    return 100.0 * correct / len(data), len(data) / max(seconds, 1e-9)


def evaluate(
    model: nn.Module,
    data: TensorDataset,
    normalizer: Normalizer,
    device: torch.device,
    batch_size: int = 0,
    classes: tuple[int, ...] | None = None,
    precision: str = "auto",
) -> tuple[float, float]:
    """(top-1 in percent, images/s) of ``model`` on ``data``; with ``classes``, the prediction is the
    best of those logits only (ImageNet-A/-R evaluated on their 200 classes). ``batch_size`` 0 takes
    batches as large as memory allows."""
    batch = batch_size or (1024 if device.type == "cuda" else 256)
    while True:
        try:
            return _evaluate(model, data, normalizer, device, batch, classes, precision)
        except torch.cuda.OutOfMemoryError:
            if batch_size or batch == 1:
                raise
            torch.cuda.empty_cache()
            batch //= 2


@torch.no_grad()
def extract_features(
    features: Callable[[torch.Tensor], torch.Tensor],
    data: TensorDataset,
    normalizer: Normalizer,
    device: torch.device,
    batch_size: int = 0,
    progress=None,
    label: str = "features",
    precision: str = "auto",
) -> TensorDataset:
    """What the classifier reads, for every image, computed once: exact for a frozen encoder in eval
    mode without augmentation (linear probing)."""
    batch = batch_size or (1024 if device.type == "cuda" else 256)
    bar = progress.add_task(f"{label} ({len(data)} images)", total=len(data)) if progress else None
    chunks = []
    for images, _ in data.batches(batch):
        with autocast(device, precision):
            chunks.append(features(normalizer(images.to(device, non_blocking=True))).float())
        if progress:
            progress.update(bar, advance=len(images))
    if progress:
        progress.remove_task(bar)
    return TensorDataset(torch.cat(chunks), data.labels.to(device))


def forward_flops(model: nn.Module, image_size: tuple[int, int], device: torch.device) -> int:
    """FLOPs of one forward pass on one image (torch.utils.flop_counter: matmuls, convolutions, attention).
    Runs with autograd on: the counter's module tracker needs it for parameters used directly."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, *image_size, device=device))
    model.train(was_training)
    return int(counter.get_total_flops())


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy on class indices (with label smoothing) or on soft targets (mixup, already smoothed)."""
    if targets.is_floating_point():
        return nn.functional.cross_entropy(logits, targets)
    return nn.functional.cross_entropy(logits, targets, label_smoothing=label_smoothing)


RESUME_FORMAT = "petl-bench-resume/2"


def _numpy_state() -> dict:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
            "has_gauss": int(has_gauss), "cached": float(cached)}  # fmt: skip


def _set_numpy_state(state: dict) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["kind"], keys, state["position"], state["has_gauss"], state["cached"]))


def _save_state(path: Path, epoch: int, model: nn.Module, optimizer, order: torch.Generator, result: FitResult) -> None:
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
        "result": dataclasses.asdict(result),
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


def _restore_state(path: Path, model: nn.Module, optimizer, order: torch.Generator, result: FitResult) -> int:
    """Continue from a state written by :func:`_save_state`; returns the first epoch still to train.

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


def execution_of(device: torch.device, execution: str = "auto") -> str:
    """How the training step runs: ``compiled`` (torch.compile of forward, loss and backward; CUDA graphs on
    CUDA) or ``eager``; ``auto`` is compiled on CUDA, where the host's kernel launches bound a PETL step,
    and eager elsewhere."""
    if execution == "auto":
        return "compiled" if device.type == "cuda" else "eager"
    return execution


def train_step(model, normalizer, optimizer, recipe: Recipe, device, backend: str | None = None):
    """One training step as a function of a batch: forward under autocast, the fp32 loss, backward, AdamW.
    The loss is returned on the device (no read). Compiled, the forward, loss and backward are one graph
    without breaks (``fullgraph``) at static shapes (a last partial batch gets its own graph), replayed
    through CUDA graphs on CUDA; the fused optimizer stays one launch outside it. ``backend`` (tests:
    ``aot_eager``) overrides torch.compile's default."""

    def loss_of(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with autocast(device, recipe.precision):
            logits = model(normalizer(images))
        return classification_loss(logits.float(), labels, recipe.label_smoothing)

    if execution_of(device, recipe.execution) == "compiled":
        options = {"backend": backend} if backend else {"mode": "reduce-overhead" if device.type == "cuda" else None}
        loss_of = torch.compile(loss_of, fullgraph=True, dynamic=False, **options)

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = loss_of(images.to(device, non_blocking=True), labels.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def _train_epoch(model, train, step, order, recipe: Recipe, device, epoch: int, before_step):
    """One epoch of training steps: (the sum of the step losses, seconds). The loss is read once, at the end."""
    model.train()
    start, total_loss = time.perf_counter(), torch.zeros((), device=device)
    for index, (images, labels) in enumerate(
        train.batches(recipe.batch_size, shuffle=True, generator=order, drop_last=recipe.drop_last)
    ):
        if before_step:
            before_step(epoch, index)
        total_loss += step(images, labels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return float(total_loss), time.perf_counter() - start


def fit(
    model: nn.Module,
    train,
    evaluation: TensorDataset | None,
    normalizer: Normalizer,
    recipe: Recipe,
    *,
    device: torch.device,
    seed: int,
    evaluate_periodically: bool = False,
    before_step: Callable[[int, int], None] | None = None,
    on_epoch: Callable[[EpochLog], None] | None = None,
    resume: Path | None = None,
    checkpoint_seconds: float = 60.0,
    backend: str | None = None,
) -> FitResult:
    """Train ``model``'s trainable parameters, then evaluate the final model once (if ``evaluation``).

    ``train`` is a :class:`TensorDataset` (cached uint8 images) or an :class:`AugmentedStream`.

    With ``evaluate_periodically`` (the paper protocol) the evaluation split is also scored after
    every ``recipe.eval_every``-th epoch, as the official code did. With ``resume``, the training
    state is saved there at most every ``checkpoint_seconds`` and training continues from it when
    the file exists, so an interrupted run ends exactly as an uninterrupted one.
    """
    result = FitResult(top1=None)
    if not any(p.requires_grad for p in model.parameters()):  # nothing to train (zero-shot): evaluate only
        if evaluation is not None:
            start = time.perf_counter()
            result.top1, result.eval_images_per_s = evaluate(
                model, evaluation, normalizer, device, recipe.eval_batch_size, precision=recipe.precision
            )
            result.eval_seconds = time.perf_counter() - start
        return result
    steps_per_epoch = len(train) // recipe.batch_size if recipe.drop_last else math.ceil(len(train) / recipe.batch_size)
    images_per_epoch = steps_per_epoch * recipe.batch_size if recipe.drop_last else len(train)
    if steps_per_epoch == 0:
        raise UserError(f"{len(train)} training images are fewer than one batch of {recipe.batch_size}")
    optimizer = adamw(parameter_groups(model, recipe.weight_decay_scope), recipe, device)
    order = torch.Generator().manual_seed(seed)
    first_epoch = 0
    if resume is not None and resume.is_file():
        first_epoch = _restore_state(resume, model, optimizer, order, result)
        for entry in result.epochs:
            if on_epoch:
                on_epoch(entry)
    last_save = time.monotonic()
    compute = torch.bfloat16 if precision_of(device, recipe.precision) == "bf16" else None
    step = train_step(model, normalizer, optimizer, recipe, device, backend)
    with frozen_weights_in(model, compute):  # the frozen weights cast once, not at every use of every step
        for epoch in range(first_epoch, recipe.epochs):
            lr = lr_at_epoch(recipe, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            total_loss, seconds = _train_epoch(model, train, step, order, recipe, device, epoch, before_step)
            result.train_seconds += seconds
            log = EpochLog(epoch, lr, total_loss / steps_per_epoch, images_per_epoch / seconds, seconds)
            if not math.isfinite(log.loss):  # read once per epoch: no sync per step
                raise NonFiniteLoss(
                    f"the training loss became {log.loss} in epoch {epoch}: a setting is likely too large or not a "
                    f"number (the learning rate, a method's scale), or the weights hold NaN/inf; the run stops as failed"
                )
            last = epoch == recipe.epochs - 1
            if evaluation is not None and (
                last or (evaluate_periodically and epoch % recipe.eval_every == recipe.eval_every - 1)
            ):
                eval_start = time.perf_counter()
                log.top1, result.eval_images_per_s = evaluate(
                    model, evaluation, normalizer, device, recipe.eval_batch_size, precision=recipe.precision
                )
                result.eval_seconds += time.perf_counter() - eval_start
            result.epochs.append(log)
            if resume is not None and not last and time.monotonic() - last_save >= checkpoint_seconds:
                _save_state(
                    resume, epoch, model, optimizer, order, result
                )  # before the log line: a logged epoch is saved
                last_save = time.monotonic()
            if on_epoch:
                on_epoch(log)
    result.top1 = result.epochs[-1].top1
    result.train_images_per_s = images_per_epoch * recipe.epochs / max(result.train_seconds, 1e-9)
    return result
