"""Run planned jobs (:mod:`petl_bench.planning`): prepare the model and data, train, evaluate and write
each run's checkpoint, epoch log and record, skipping finished runs.

The job ledger is the run folders themselves (see :mod:`petl_bench.records`): a job whose record
exists is skipped unless forced, one that another process is running (it holds the lock) is left
to it, and anything else runs, continuing from its saved training state when it has one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import ledger, records
from .atomic import write_atomic
from .augment import AugmentedStream
from .backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_backbone,
    classifier_input,
)
from .checkpoints import save_trainable
from .clip import init_classifier_from_text
from .costs import inference_key, inference_speeds, method_flops
from .data import Normalizer, TensorDataset, kept_on_devices, on_device
from .datasets import data_identity
from .engine import (
    EpochLog,
    Recipe,
    evaluate,
    execution_of,
    extract_features,
    fit,
    peak_memory_bytes,
    precision_of,
    seed_everything,
    select_stage,
)
from .errors import UserError
from .model import (
    Method,
    PetlModel,
    attach_method,
    count_trainable,
    head_parameter_names,
    task_key,
    trainable_parameters,
)
from .planning import Checked, Job, validate
from .task import TaskData

log = logging.getLogger(__name__)
IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)


def trains_head_on_features(model, recipe: Recipe) -> bool:
    """Only the classifier trains, on a frozen encoder kept in eval mode, with nothing augmented: then
    the classifier's inputs never change and can be computed once (exact)."""
    trainable = set(trainable_parameters(model))
    return (
        recipe.cache_features
        and recipe.augment == "none"
        and model.method.encoder_eval(model.config)
        and bool(trainable)
        and trainable == head_parameter_names(model)
    )


def fits_on_gpu(data: TensorDataset, device: torch.device) -> bool:
    """Decoded evaluation images go to the GPU when they take under 40% of its free memory."""
    return device.type != "cuda" or data.images.numel() < 0.4 * torch.cuda.mem_get_info(device)[0]


def training_data(recipe: Recipe, data: TaskData, info, mean, std, device: torch.device, progress=None):
    """Cached decoded images (no augmentation, the VTAB recipe), or a stream augmented every epoch."""
    size = info.preprocessing.image_size
    if recipe.augment == "none":
        return on_device("train", data.train, size, info.preprocessing.interpolation, device, progress)
    return AugmentedStream(
        data.train, size, recipe.augment, mean, std, data.num_classes, rand_augment=recipe.rand_augment,
        random_erasing=recipe.random_erasing, mixup=recipe.mixup, cutmix=recipe.cutmix,
        label_smoothing=recipe.label_smoothing, workers=recipe.workers, device=device,
    )  # fmt: skip


def normalization(recipe: Recipe, info) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if recipe.normalization == "imagenet":
        return IMAGENET
    if recipe.normalization == "backbone":
        return info.preprocessing.mean, info.preprocessing.std
    raise UserError(f"unknown recipe.normalization '{recipe.normalization}'; choose imagenet or backbone")


@dataclass
class Prepared:
    """A model with its method attached, on the device, and its data ready."""

    model: PetlModel
    train: TensorDataset | AugmentedStream
    evaluation: TensorDataset
    targets: dict[str, TensorDataset]
    normalizer: Normalizer
    seconds: float  # spent preparing the data


def prepare(
    method: Method, config: Any, backbone: str, pretrained: str, recipe: Recipe, data: TaskData, seed: int,
    device: torch.device, progress=None,
) -> Prepared:  # fmt: skip
    """Seed, build the backbone, attach the method (classifier from prompts if asked), prepare the data."""
    seed_everything(seed)
    network, info = build_backbone(
        backbone,
        pretrained,
        num_classes=data.num_classes,
        drop_path_rate=recipe.drop_path,
        image_size=recipe.image_size,
    )
    model = attach_method(network, info, method, config, recipe.head_init)
    if recipe.head_init == "text":
        init_classifier_from_text(model.backbone, info, data.class_names or (), recipe.prompt_template)
    model = model.to(device)
    mean, std = normalization(recipe, info)
    start = time.perf_counter()
    size, interpolation = info.preprocessing.image_size, info.preprocessing.interpolation
    train = training_data(recipe, data, info, mean, std, device, progress)
    evaluation = on_device("eval", data.eval, size, interpolation, device, progress,
                           fits=lambda images: fits_on_gpu(images, device))  # fmt: skip
    targets = {
        name: TensorDataset.from_split(target.split, size, interpolation, progress=progress)
        for name, target in data.targets.items()
    }
    return Prepared(model, train, evaluation, targets, Normalizer(mean, std).to(device), time.perf_counter() - start)


def run_job(
    job: Job, run_dir: Path, data: TaskData, device: torch.device, progress=None, checkpoint_seconds: float = 60.0,
    overall=None,
) -> records.RunRecord:  # fmt: skip
    """Train and evaluate one job, writing its checkpoint, epoch log and (last) its record.

    The training state is saved to ``resume.pt`` at most every ``checkpoint_seconds``; a run that was
    interrupted continues from it."""
    started, wall_start = records.now(), time.perf_counter()
    prepared = prepare(
        job.method_object, job.method_config, job.backbone, job.pretrained, job.recipe, data, job.seed, device,
        progress,
    )  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    selection_seconds = run_selection(prepared, data, job.recipe, device)
    trainee, train, evaluation, feature_seconds = what_trains(prepared, job.recipe, device, progress)
    with EpochWatcher(run_dir, job, progress, overall) as watcher:
        result = fit(
            trainee, train, evaluation, prepared.normalizer, job.recipe, device=device, seed=job.seed,
            evaluate_periodically=job.protocol == "paper", on_epoch=watcher, resume=run_dir / records.RESUME,
            checkpoint_seconds=checkpoint_seconds,
        )  # fmt: skip
    if result.top1 is None or not len(evaluation):
        raise RuntimeError("the run evaluated no image; no record is written")
    model, info = prepared.model, prepared.model.info
    identity = data_identity(data)
    metrics = run_metrics(job, data, result, identity["splits"]["eval"])
    metrics.eval_images, metrics.train_images = len(evaluation), len(train)
    metrics.targets = evaluate_targets(job, prepared, data, device)
    checkpoint = save_trainable(model, run_dir / records.CHECKPOINT)
    seconds = records.Seconds(
        total=0.0, data=prepared.seconds, features=feature_seconds + selection_seconds, train=result.train_seconds,
        eval=result.eval_seconds,
    )  # fmt: skip
    record = records.RunRecord(
        run_id=job.run_id, method=job.method, task=job.task.name, task_variant=dict(job.task.variant),
        suite=job.task.suite, group=job.task.group, backbone=job.backbone, pretrained=info.pretrained,
        backbone_checkpoint_sha256=info.checkpoint_sha256, seed=job.seed, protocol=job.protocol,
        hparams=run_hparams(job, info, data, prepared.normalizer, device), data=identity,
        metrics=metrics, cost=run_costs(job, prepared, data, result, trainee is not model, checkpoint, device, seconds),
        environment=records.environment(str(device)), notes=[note for note in (info.notes,) if note],
        started_at=started, tuning=dict(job.tuning or {}),
    )  # fmt: skip
    record.cost.seconds.total = time.perf_counter() - wall_start
    record.finished_at = records.now()
    records.write_record(run_dir, record)
    (run_dir / records.RESUME).unlink(missing_ok=True)
    return record


def run_selection(prepared: Prepared, data: TaskData, recipe: Recipe, device: torch.device) -> float:
    """The method's selection stage (if it has one) on the training images without augmentation: the
    cached ones, or decoded here when training augments them. Seconds (counted with the features')."""
    if not prepared.model.method.selects:
        return 0.0
    return select_stage(prepared.model, plain_training_images(prepared, data), prepared.normalizer, device)


def plain_training_images(prepared: Prepared, data: TaskData) -> TensorDataset:
    """The training images without augmentation: the cached ones, or decoded here when training augments."""
    if isinstance(prepared.train, TensorDataset):
        return prepared.train
    info = prepared.model.info
    return TensorDataset.from_split(data.train, info.preprocessing.image_size, info.preprocessing.interpolation)


def what_trains(prepared: Prepared, recipe: Recipe, device: torch.device, progress=None):
    """(the module to train, its training data, its evaluation data, seconds spent on features): the model
    and its images, or for linear probing the classifier on features computed once (one encoder pass per
    image, not per epoch)."""
    model = prepared.model
    if not trains_head_on_features(model, recipe):
        return model, prepared.train, prepared.evaluation, 0.0
    start = time.perf_counter()
    model.eval()
    extract, batch, normalizer = classifier_input(model.backbone), recipe.eval_batch_size, prepared.normalizer
    train, evaluation = (
        extract_features(extract, split, normalizer, device, batch, progress, f"features of {name}", recipe.precision)
        for name, split in (("train", prepared.train), ("eval", prepared.evaluation))
    )
    return model.head, train, evaluation, time.perf_counter() - start


class EpochWatcher:
    """Called after every epoch: appends it to the run's epoch log and moves the progress bars. A resumed
    run replays its earlier epochs into a fresh log."""

    def __init__(self, run_dir: Path, job: Job, progress=None, overall=None) -> None:
        self.log_file, self.job, self.progress, self.overall = run_dir / records.EPOCH_LOG, job, progress, overall
        self.bar = None

    def __enter__(self) -> "EpochWatcher":
        self.log_file.write_text("")
        if self.progress:
            self.bar = self.progress.add_task(
                f"{self.job.method} on {self.job.task.name}", total=self.job.recipe.epochs
            )
        return self

    def __exit__(self, *exc) -> None:
        if self.progress:
            self.progress.remove_task(self.bar)

    def __call__(self, entry: EpochLog) -> None:
        with open(self.log_file, "a") as handle:
            handle.write(json.dumps(dataclasses.asdict(entry)) + "\n")
        if not self.progress:
            return
        if self.overall is not None:
            self.progress.update(self.overall, advance=1)
        accuracy = f" top1 {entry.top1:.1f}" if entry.top1 is not None else ""
        self.progress.update(
            self.bar, advance=1, description=f"{self.job.method} on {self.job.task.name}: loss {entry.loss:.3f} "
            f"lr {entry.lr:.1e} {entry.images_per_s:.0f} img/s{accuracy}",
        )  # fmt: skip


def evaluate_targets(job: Job, prepared: Prepared, data: TaskData, device: torch.device) -> dict[str, float]:
    """Top-1 on each extra evaluation target (domain generalisation), on the target's classes or all."""
    found = {}
    for name, target in data.targets.items():
        classes = target.classes if job.recipe.class_mask == "subset" else None
        found[name] = evaluate(
            prepared.model, prepared.targets[name], prepared.normalizer, device, job.recipe.eval_batch_size, classes,
            job.recipe.precision,
        )[0]  # fmt: skip
    return found


def run_costs(
    job: Job, prepared: Prepared, data: TaskData, result, on_features: bool, checkpoint: Path, device, seconds
) -> records.Costs:
    """What the run cost: parameters, stored bytes, memory, FLOPs, throughput."""
    model, info = prepared.model, prepared.model.info
    without_head, with_head = count_trainable(model)
    return records.Costs(
        trainable_params=without_head, trainable_params_with_head=with_head,
        checkpoint_bytes=model.method.stored_bytes(model) or checkpoint.stat().st_size,
        peak_memory_bytes=peak_memory_bytes(device),
        peak_memory_kind="cuda max allocated" if device.type == "cuda" else "process peak RSS",
        forward_flops=method_flops(model, info, job, device, data.num_classes),
        head_trained_on_cached_features=on_features, train_images_per_s=result.train_images_per_s,
        eval_images_per_s=result.eval_images_per_s,
        inference_images_per_s=inference_speeds(
            model, prepared.evaluation, prepared.normalizer, device, job.recipe, inference_key(job, info, device)
        ),
        seconds=seconds,
    )  # fmt: skip


def run_hparams(job: Job, info, data: TaskData, normalizer: Normalizer, device: torch.device) -> records.Settings:
    """A record's settings: the method's, the recipe as resolved (warm-up, input size), the weights and
    the classes."""
    method = job.method_object
    return records.Settings(
        method=method.config_identity(job.method_config),
        task_defaults=dict(method.task_defaults.get(task_key(job.task.name), {})),
        recipe={
            **dataclasses.asdict(job.recipe),
            "warmup_epochs": job.recipe.warmup,
            "image_size": info.preprocessing.image_size[0],
        },
        input_size=list(info.preprocessing.image_size),
        precision=precision_of(device, job.recipe.precision),
        execution=execution_of(device, job.recipe.execution, method.compiles),
        pretrained_source=job.pretrained,
        num_classes=data.num_classes,
        class_names=list(data.class_names) if data.class_names else None,
        normalization={"mean": normalizer.mean.flatten().tolist(), "std": normalizer.std.flatten().tolist()},
    )


def run_metrics(job: Job, data: TaskData, result, eval_list: str = "") -> records.Metrics:
    """The top-1 the protocol selects (``paper``: the max over the test evaluations, the first on ties), its
    per-image outcomes, and the curve."""
    curve = result.curve
    best = max(curve, key=lambda point: point["top1"]) if job.protocol == "paper" and curve else None
    outcomes = result.outcomes_of(best["epoch"] if best else None)
    return records.Metrics(
        top1=best["top1"] if best else result.top1,
        top1_last=result.top1,
        eval_split=data.eval.name,
        selection=records.SELECTION[job.protocol],
        curve=curve,
        class_mask={
            name: ("subset" if t.classes and job.recipe.class_mask == "subset" else "all")
            for name, t in data.targets.items()
        },
        outcomes=records.pack_outcomes(outcomes.numpy(), eval_list) if outcomes is not None else None,
    )


@dataclass
class SweepSummary:
    finished: list[records.RunRecord] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # unsupported method/backbone pairs of a multi-backbone sweep


def run_sweep(
    jobs: list[Job],
    output: Path,
    *,
    device: torch.device,
    force: bool = False,
    strict: bool = False,
    progress=None,
    checkpoint_seconds: float = 60.0,
    skip_unsupported: bool = False,
    checked: Checked | None = None,
    on_finished: Callable[[records.RunRecord], None] | None = None,
) -> SweepSummary:
    """Run every job that has no record yet (all of them with ``force``); see :func:`validate` for
    ``skip_unsupported``. ``checked``: the result of :func:`validate` when the caller ran it already.
    The overall bar counts epochs, so its time estimate follows the training actually left. A task's decoded
    images stay on the GPU from one run to the next that reads them (``data.on_device``)."""
    checked = checked or validate(jobs, strict, skip_unsupported)
    summary = SweepSummary(left_out=checked.left_out)
    todo = checked.to_train(output, force)
    total = sum(job.recipe.epochs for job in todo)
    overall = progress.add_task(f"runs 0/{len(todo)}", total=total) if progress and todo else None
    with kept_on_devices():  # a task's images stay on the GPU for its next seed
        done = 0
        for job in checked.jobs:
            run_dir = ledger.run_folder(output, job.run_id)
            if checked.finished(job, output) and not force:
                summary.skipped.append(job.run_id)
                continue
            ledger.set_aside_other_data(run_dir, checked.fingerprint(job))
            with ledger.run_lock(run_dir) as acquired:
                if not acquired:
                    summary.busy.append(job.run_id)
                elif checked.finished(job, output) and not force:
                    summary.skipped.append(job.run_id)
                else:
                    record = _run_one(job, run_dir, checked.data[job.data_key], device, progress, checkpoint_seconds,
                                      summary, overall)  # fmt: skip
                    if record is not None and on_finished:
                        on_finished(record)
            done += 1
            if overall is not None:
                progress.update(overall, description=f"runs {done}/{len(todo)}")
    return summary


def _run_one(job, run_dir, data, device, progress, checkpoint_seconds, summary, overall) -> records.RunRecord | None:
    """Run ``job`` holding its lock; a failure is written to ``failed.json`` and the sweep goes on."""
    (run_dir / records.FAILURE).unlink(missing_ok=True)
    try:
        record = run_job(job, run_dir, data, device, progress, checkpoint_seconds, overall)
        summary.finished.append(record)
        return record
    except (UserError, KeyboardInterrupt):
        remove_if_empty(run_dir)
        raise
    except Exception as error:  # one broken run must not stop a 450-run sweep
        log.error("run %s failed: %s", job.run_id, error)
        failure = {"error": repr(error), "traceback": traceback.format_exc(), "at": records.now()}
        write_atomic(run_dir / records.FAILURE, json.dumps(failure))
        summary.failed.append((job.run_id, repr(error)))
        return None


def remove_if_empty(run_dir: Path) -> None:
    """Remove a run folder that holds nothing but its lock and an empty epoch log (a run stopped
    before its first epoch), so a failed first try leaves no clutter."""
    leftovers = {path.name: path for path in run_dir.iterdir()}
    log_file = leftovers.get(records.EPOCH_LOG)
    if set(leftovers) <= {".lock", records.EPOCH_LOG} and (log_file is None or log_file.stat().st_size == 0):
        for path in leftovers.values():
            path.unlink(missing_ok=True)
        run_dir.rmdir()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA device")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; choose auto, cpu or cuda[:N]") from None
