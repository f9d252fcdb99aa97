"""The one training loop and the one evaluation loop.

The default :class:`Recipe` is the Convpass paper's VTAB-1K recipe: AdamW (lr 1e-3, weight decay
1e-4 on every trainable tensor), batch 64 with drop_last, 100 epochs, cosine schedule with a warm-up
of 10% of the epochs (10 at 100) from 1e-6 and minimum 1e-5 stepped once per epoch, drop-path 0.1,
cross-entropy, no augmentation. fp32 on CPU, bf16 autocast on CUDA.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import resource
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .config import Recipe, check_bounds  # noqa: F401 - Recipe re-exported: its old home
from .data import Normalizer, TensorDataset
from .errors import UserError
from .training_state import EpochLog, FitResult, restore_state, save_state

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


@torch.no_grad()
def _evaluate(model, data, normalizer, device, batch_size, classes, precision):
    model.eval()
    subset = torch.tensor(classes, device=device) if classes is not None else None
    hits, start = [], time.perf_counter()
    for images, labels in data.batches(batch_size):
        with autocast(device, precision):
            logits = model(normalizer(images.to(device, non_blocking=True)))
        predictions = logits.argmax(-1) if subset is None else subset[logits[:, subset].argmax(-1)]
        hits.append(predictions == labels.to(device))
    outcomes = torch.cat(hits).cpu()  # the one read of the pass
    seconds = time.perf_counter() - start
    return 100.0 * int(outcomes.sum()) / len(data), len(data) / max(seconds, 1e-9), outcomes


@torch.no_grad()
def select_stage(
    model, data: TensorDataset, normalizer: Normalizer, device: torch.device, batch_size: int = 50
) -> float:
    """A method's selection stage (``Method.selects``), once per task before training: the model in eval
    mode (no drop-path, no dropout), fp32, over ``data``, the training images without augmentation (never
    the evaluation split); the official SCT code's batch of 50. Returns the seconds it took (0 without one)."""
    method = getattr(model, "method", None)
    if method is None or not method.selects:
        return 0.0
    start = time.perf_counter()
    model.eval()
    batches = (
        (normalizer(images.to(device, non_blocking=True)), labels.to(device))
        for images, labels in data.batches(batch_size)
    )
    method.select(model, batches)
    return time.perf_counter() - start


def eval_batch(batch_size: int, device: torch.device) -> int:
    """The evaluation batch: ``batch_size``, or for 0 the first try of "as large as memory allows" (CUDA: 1024,
    halved on out-of-memory; CPU: 256)."""
    return batch_size or (1024 if device.type == "cuda" else 256)


def evaluate_outcomes(
    model: nn.Module,
    data: TensorDataset,
    normalizer: Normalizer,
    device: torch.device,
    batch_size: int = 0,
    classes: tuple[int, ...] | None = None,
    precision: str = "auto",
) -> tuple[float, float, torch.Tensor]:
    """(top-1 in percent, images/s, which images were classified correctly: a bool tensor in ``data``'s
    order) of ``model`` on ``data``; with ``classes``, the prediction is the best of those logits only
    (ImageNet-A/-R evaluated on their 200 classes). ``batch_size`` 0 takes batches as large as memory allows."""
    batch = eval_batch(batch_size, device)
    while True:
        try:
            return _evaluate(model, data, normalizer, device, batch, classes, precision)
        except torch.cuda.OutOfMemoryError:
            if batch_size or batch == 1:
                raise
            torch.cuda.empty_cache()
            batch //= 2


def evaluate(model, data, normalizer, device, batch_size=0, classes=None, precision="auto") -> tuple[float, float]:
    """(top-1 in percent, images/s): :func:`evaluate_outcomes` without the per-image outcomes."""
    return evaluate_outcomes(model, data, normalizer, device, batch_size, classes, precision)[:2]


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
    batch = eval_batch(batch_size, device)
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


def execution_of(device: torch.device, execution: str = "auto", compiles: bool = True) -> str:
    """How the training step runs: ``compiled`` (torch.compile of forward, loss and backward; CUDA graphs on
    CUDA) or ``eager``; ``auto`` is compiled on CUDA, where the host's kernel launches bound a PETL step, for
    methods that declare they compile without graph breaks (``Method.compiles``), and eager elsewhere."""
    if execution == "auto":
        return "compiled" if device.type == "cuda" and compiles else "eager"
    return execution


FITS_SHARING_GRAPHS = 16  # fits that reuse each other's compiled graphs before they are all dropped
_fits_since_reset = 0


def compiled(loss_of: Callable, device: torch.device, backend: str | None) -> Callable:
    """``loss_of`` through torch.compile (one graph, static shapes; CUDA graphs on CUDA). The graphs of earlier
    fits in this process are kept: a fit of the same architecture at the same shapes (the next seed of a task)
    reuses its graph, with its own parameters as inputs, instead of tracing and compiling again. When dynamo's
    per-function cache is full (its recompile limit; a fullgraph compile then raises instead of falling back
    to eager) or after :data:`FITS_SHARING_GRAPHS` fits, the cache is emptied and the step compiled afresh."""
    global _fits_since_reset
    if _fits_since_reset >= FITS_SHARING_GRAPHS:
        torch._dynamo.reset()
        _fits_since_reset = 0
    _fits_since_reset += 1
    options = {"backend": backend} if backend else {"mode": "reduce-overhead" if device.type == "cuda" else None}
    step = torch.compile(loss_of, fullgraph=True, dynamic=False, **options)
    limit_hit = getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", torch._dynamo.exc.Unsupported)

    def call(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        global _fits_since_reset
        try:
            return step(images, labels)
        except limit_hit:
            torch._dynamo.reset()
            _fits_since_reset = 1
            return step(images, labels)

    return call


def train_step(model, normalizer, optimizer, recipe: Recipe, device, backend: str | None = None):
    """One training step as a function of a batch: forward under autocast, the fp32 loss, backward, AdamW.
    The loss is returned on the device (no read). Compiled, the forward, loss and backward are one graph
    without breaks (``fullgraph``) at static shapes (a last partial batch gets its own graph), replayed
    through CUDA graphs on CUDA; the fused optimizer stays one launch outside it. ``backend`` (tests:
    ``aot_eager``) overrides torch.compile's default."""

    method = getattr(model, "method", None)

    def criterion(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return classification_loss(logits.float(), labels, recipe.label_smoothing)

    def compute():
        return autocast(device, recipe.precision)

    def loss_of(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if getattr(method, "extra_loss", False):  # the method's own training loss (DyT: two passes, distillation)
            return method.training_loss(model, normalizer(images), labels, criterion, compute)
        with compute():
            logits = model(normalizer(images))
        return criterion(logits, labels)

    if execution_of(device, recipe.execution, getattr(method, "compiles", True)) == "compiled":
        loss_of = compiled(loss_of, device, backend)

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
    """Train ``model``'s trainable parameters, then evaluate the final model once (if ``evaluation``);
    ``train`` is a :class:`TensorDataset` (cached uint8 images) or an :class:`AugmentedStream`.

    With ``evaluate_periodically`` (the paper protocol) the evaluation split is also scored after
    every ``recipe.eval_every``-th epoch, as the official code did. With ``resume``, the training
    state is saved there at most every ``checkpoint_seconds`` and training continues from it when
    the file exists, so an interrupted run ends exactly as an uninterrupted one.
    """
    result = FitResult(top1=None)
    if not any(p.requires_grad for p in model.parameters()):  # nothing to train (zero-shot): evaluate only
        if evaluation is not None:
            _score(result, model, evaluation, normalizer, recipe, device, epoch=0)
        return result
    steps_per_epoch, images_per_epoch = _epoch_size(len(train), recipe)
    optimizer = adamw(parameter_groups(model, recipe.weight_decay_scope), recipe, device)
    order = torch.Generator().manual_seed(seed)
    first_epoch = restore_state(resume, model, optimizer, order, result) if resume and resume.is_file() else 0
    for entry in result.epochs if on_epoch else []:  # a resumed run replays the epochs it had
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
            log = _checked(EpochLog(epoch, lr, total_loss / steps_per_epoch, images_per_epoch / seconds, seconds))
            last = epoch == recipe.epochs - 1
            if evaluation is not None and (last or (evaluate_periodically and (epoch + 1) % recipe.eval_every == 0)):
                log.top1 = _score(result, model, evaluation, normalizer, recipe, device, epoch)
            result.epochs.append(log)
            if resume is not None and not last and time.monotonic() - last_save >= checkpoint_seconds:
                save_state(
                    resume, epoch, model, optimizer, order, result
                )  # before the log line: a logged epoch is saved
                last_save = time.monotonic()
            if on_epoch:
                on_epoch(log)
    result.top1 = result.epochs[-1].top1
    result.train_images_per_s = images_per_epoch * recipe.epochs / max(result.train_seconds, 1e-9)
    return result


def _epoch_size(images: int, recipe: Recipe) -> tuple[int, int]:
    """(steps, images trained) per epoch: full batches only with ``drop_last``."""
    steps = images // recipe.batch_size if recipe.drop_last else math.ceil(images / recipe.batch_size)
    if steps == 0:
        raise UserError(f"{images} training images are fewer than one batch of {recipe.batch_size}")
    return steps, steps * recipe.batch_size if recipe.drop_last else images


def _checked(log: EpochLog) -> EpochLog:
    """The epoch's log, unless its loss is not finite (read once per epoch: no sync per step)."""
    if not math.isfinite(log.loss):
        raise NonFiniteLoss(
            f"the training loss became {log.loss} in epoch {log.epoch}: a setting is likely too large or not a "
            f"number (the learning rate, a method's scale), or the weights hold NaN/inf; the run stops as failed"
        )
    return log


def _score(result: FitResult, model, evaluation, normalizer, recipe: Recipe, device, epoch: int) -> float:
    """Top-1 on ``evaluation``; its per-image outcomes, speed and time added to ``result``."""
    start = time.perf_counter()
    result.top1, result.eval_images_per_s, result.outcomes[epoch] = evaluate_outcomes(
        model, evaluation, normalizer, device, recipe.eval_batch_size, precision=recipe.precision
    )
    result.eval_seconds += time.perf_counter() - start
    return result.top1
