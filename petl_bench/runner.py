"""Plan methods x tasks x backbones x seeds into jobs and run them, skipping finished runs.

The job ledger is the run folders themselves (see :mod:`petl_bench.records`): a job whose record
exists is skipped unless forced, one that another process is running (it holds the lock) is left
to it, and anything else runs, continuing from its saved training state when it has one.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from . import records
from .atomic import write_atomic
from .backbones import (
    CLIP,
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_backbone,
    check_hub_reachable,
    classifier_input,
    init_classifier_from_text,
    preserved_rng,
)
from .checkpoints import save_trainable
from .data import AugmentedStream, Normalizer, TensorDataset
from .datasets import data_identity
from .engine import (
    EpochLog,
    Recipe,
    evaluate,
    execution_of,
    extract_features,
    fit,
    forward_flops,
    peak_memory_bytes,
    precision_of,
    seed_everything,
)
from .errors import UserError, warn_once
from .export import merge
from .model import (
    Method,
    PetlModel,
    attach_method,
    count_trainable,
    get_method,
    head_parameter_names,
    task_key,
    trainable_parameters,
)
from .registry import METHODS, SUITES, TASKS
from .task import FileListTask, TaskData, folder_task

log = logging.getLogger(__name__)
IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)


def parse_settings(items: Iterable[str]) -> dict[str, dict[str, str]]:
    """``["convpass.scale=10", "recipe.lr=5e-4"]`` -> ``{"convpass": {"scale": "10"}, "recipe": {"lr": "5e-4"}}``."""
    settings: dict[str, dict[str, str]] = {}
    for item in items:
        scope_key, sep, value = item.partition("=")
        scope, dot, key = scope_key.strip().partition(".")
        if not sep or not dot or not key:
            raise UserError(f"--set expects SCOPE.KEY=VALUE (e.g. convpass.scale=10 or recipe.lr=5e-4), got {item!r}")
        scope = "recipe" if scope == "recipe" else METHODS.resolve(scope)
        settings.setdefault(scope, {})[key.strip()] = value.strip()
    return settings


@dataclass(frozen=True)
class Job:
    """One run: a method on a task with a backbone, a seed and a protocol."""

    method: str
    task: FileListTask
    backbone: str
    pretrained: str
    seed: int
    protocol: str
    recipe: Recipe
    method_config: Any
    data_root: Path | None = None
    tuning: dict | None = field(default=None, compare=False)  # tuned protocol: how the configuration was chosen

    def identity(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "method_config": get_method(self.method).config_identity(self.method_config),
            "task": self.task.name,
            "task_variant": self.task.variant,
            "num_classes": self.task.num_classes,
            "backbone": self.backbone,
            "pretrained": self.pretrained,
            "seed": self.seed,
            "protocol": self.protocol,
            "recipe": self.recipe.identity(),
        }

    @property
    def data_key(self) -> tuple[str, str]:
        """What decides the splits a job reads: the task (variant) and the protocol."""
        return self.task.key, self.protocol

    @property
    def run_id(self) -> str:
        digest = hashlib.sha256(json.dumps(self.identity(), sort_keys=True, default=str).encode()).hexdigest()[:10]
        names = "__".join(records.safe_name(name) for name in (self.task.key, self.method, self.backbone))
        return f"{names}__s{self.seed}__{records.safe_name(self.protocol)}__{digest}"


@dataclass
class SweepSpec:
    """A sweep as plain values (what the command line said), so other processes and SLURM tasks can
    rebuild its jobs, plugins included."""

    methods: str | None = None
    suite: str | None = None
    tasks: list[str] = field(default_factory=list)
    task_dirs: list[str] = field(default_factory=list)
    shots: list[int] = field(default_factory=list)
    split_seeds: list[int] = field(default_factory=list)
    backbones: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    protocol: str = "final"
    pretrained: str = "hub"
    recipe_overrides: dict[str, Any] = field(default_factory=dict)
    settings: list[str] = field(default_factory=list)
    data_root: str | None = None
    plugins: list[str] = field(default_factory=list)

    @property
    def skip_unsupported(self) -> bool:
        """Several backbones, or every method: leave out the pairs that cannot run instead of failing."""
        return len(self.backbones) > 1 or self.methods is None or self.methods.strip().lower() == "all"

    def jobs(self) -> list[Job]:
        from .backbones import PAPER_BACKBONE
        from .paths import data_root_from
        from .registry import load_plugin
        from .task import PROTOCOLS

        for plugin in self.plugins:
            load_plugin(plugin)
        if self.protocol not in PROTOCOLS:
            raise UserError(f"unknown protocol '{self.protocol}'; choose from: {', '.join(PROTOCOLS)}")
        suite = self.suite if self.suite or self.tasks or self.task_dirs else "demo"
        tasks = resolve_tasks(suite, self.tasks, [Path(d) for d in self.task_dirs], self.shots, self.split_seeds)
        if not tasks:
            raise UserError("no tasks selected; use --suite, --tasks or --task-dir")
        suites = {task.suite for task in tasks}
        if suite is None and len(suites) == 1 and next(iter(suites)) in SUITES:  # --tasks of one suite: its defaults
            suite = next(iter(suites))
        definition = SUITES.get(suite) if suite else None
        if not self.backbones and definition is None:  # tasks of no suite: say which backbone they get
            warn_once(
                log, "no --backbone given: using %s (the paper's ViT-B/16; pass --backbone for another)", PAPER_BACKBONE
            )
        recipe = (definition.recipe if definition else Recipe()).replace(**self.recipe_overrides)
        return plan(
            resolve_methods(self.methods, suite),
            tasks,
            self.backbones or [definition.backbone if definition else PAPER_BACKBONE],
            self.seeds or list(definition.seeds if definition else (0,)),
            protocol=self.protocol,
            pretrained=self.pretrained,
            recipe=recipe,
            settings=parse_settings(self.settings),
            data_root=data_root_from(self.data_root),
        )


def resolve_tasks(
    suite: str | None,
    task_names: list[str],
    task_dirs: list[Path],
    shots: list[int] | None = None,
    split_seeds: list[int] | None = None,
) -> list[FileListTask]:
    """``--tasks`` if given, else the suite's tasks (unless only ``--task-dir`` is given), plus ``--task-dir``
    folders; few-shot and domain-generalisation tasks expand to one task per shots / split seed."""
    if task_names:
        tasks = [TASKS.get(name) for name in task_names]
    elif suite and not task_dirs:
        definition = SUITES.get(suite)
        names = definition.tasks or [n for n, t in TASKS.items() if t.suite == definition.name]
        tasks = [TASKS.get(name) for name in names]
    else:
        tasks = []
    tasks += [folder_task(path) for path in task_dirs]
    return [variant for task in tasks for variant in task.variants(shots, split_seeds)]


def plan(
    methods: list[str],
    tasks: list[FileListTask],
    backbones: list[str],
    seeds: list[int],
    *,
    protocol: str,
    pretrained: str,
    recipe: Recipe,
    settings: dict[str, dict[str, str]] | None = None,
    data_root: Path | None = None,
) -> list[Job]:
    """The cross product, with each method's per-task defaults and ``--set`` overrides resolved."""
    settings = settings or {}
    recipe = recipe.replace(**settings.get("recipe", {}))
    bad_seeds = [seed for seed in seeds if not 0 <= seed < 2**32]
    if bad_seeds:
        raise UserError(f"seeds must be integers in [0, 2**32), got {', '.join(map(str, bad_seeds))}")
    jobs = []
    for method in methods:
        runner = get_method(method)
        config_fields = {f.name for f in dataclasses.fields(runner.Config)}
        scoped = settings.get(runner.name, {})
        recipe_fields = {f.name for f in dataclasses.fields(Recipe)}
        unknown = sorted(set(scoped) - config_fields - recipe_fields)
        if unknown:
            raise UserError(
                f"method '{runner.name}' has no hyperparameter {', '.join(repr(u) for u in unknown)} and the recipe "
                f"has no such setting; hyperparameters: {', '.join(sorted(config_fields)) or '(none)'}; "
                f"recipe settings: {', '.join(sorted(recipe_fields))}"
            )
        method_recipe = recipe.replace(**{k: v for k, v in scoped.items() if k not in config_fields})
        method_recipe = method_recipe.replace(head_init=method_recipe.head_init or runner.head_init)
        if method_recipe.warmup_epochs is not None and method_recipe.warmup_epochs >= method_recipe.epochs:
            warn_once(log, "%s: recipe.warmup_epochs=%d is not below epochs=%d: the learning rate never leaves the "
                        "warm-up (leave warmup_epochs unset for 10%% of the epochs)", runner.name,
                        method_recipe.warmup_epochs, method_recipe.epochs)  # fmt: skip
        overrides = {k: v for k, v in scoped.items() if k in config_fields}
        for task in tasks:
            config = runner.make_config(task.name, **overrides)
            for backbone in backbones:
                for seed in seeds:
                    jobs.append(
                        Job(runner.name, task, backbone, pretrained, seed, protocol, method_recipe, config, data_root)
                    )
    return jobs


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


def on_device_if_it_fits(data: TensorDataset, device: torch.device) -> TensorDataset:
    """The decoded evaluation images on the GPU when they take under 40% of its free memory."""
    if device.type != "cuda":
        return data
    free, _ = torch.cuda.mem_get_info(device)
    return data.to(device) if data.images.numel() < 0.4 * free else data


def training_data(recipe: Recipe, data: TaskData, info, mean, std, device: torch.device, progress=None):
    """Cached decoded images (no augmentation, the VTAB recipe), or a stream augmented every epoch."""
    size = info.preprocessing.image_size
    if recipe.augment == "none":
        return TensorDataset.from_split(data.train, size, info.preprocessing.interpolation, progress=progress).to(
            device
        )
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
    evaluation = on_device_if_it_fits(
        TensorDataset.from_split(data.eval, size, interpolation, progress=progress), device
    )
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
    runner = get_method(job.method)
    prepared = prepare(
        runner, job.method_config, job.backbone, job.pretrained, job.recipe, data, job.seed, device, progress
    )
    model, info, normalizer = prepared.model, prepared.model.info, prepared.normalizer
    train, evaluation, targets, data_seconds = prepared.train, prepared.evaluation, prepared.targets, prepared.seconds
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainee, feature_seconds = model, 0.0
    if trains_head_on_features(model, job.recipe):  # linear probing: one encoder pass per image, not per epoch
        start = time.perf_counter()
        model.eval()
        extract = classifier_input(model.backbone)
        batch = job.recipe.eval_batch_size
        precision = job.recipe.precision
        train = extract_features(extract, train, normalizer, device, batch, progress, "features of train", precision)
        evaluation = extract_features(
            extract, evaluation, normalizer, device, batch, progress, "features of eval", precision
        )
        trainee, feature_seconds = model.head, time.perf_counter() - start

    epoch_log = run_dir / records.EPOCH_LOG
    epoch_log.write_text("")  # a resumed run replays its earlier epochs into the log
    resume = run_dir / records.RESUME
    bar = progress.add_task(f"{job.method} on {job.task.name}", total=job.recipe.epochs) if progress else None

    def on_epoch(entry: EpochLog) -> None:
        with open(epoch_log, "a") as handle:
            handle.write(json.dumps(dataclasses.asdict(entry)) + "\n")
        if progress:
            if overall is not None:
                progress.update(overall, advance=1)
            accuracy = f" top1 {entry.top1:.1f}" if entry.top1 is not None else ""
            progress.update(
                bar,
                advance=1,
                description=f"{job.method} on {job.task.name}: loss {entry.loss:.3f} lr {entry.lr:.1e} "
                f"{entry.images_per_s:.0f} img/s{accuracy}",
            )

    result = fit(
        trainee, train, evaluation, normalizer, job.recipe, device=device, seed=job.seed,
        evaluate_periodically=job.protocol == "paper", on_epoch=on_epoch, resume=resume,
        checkpoint_seconds=checkpoint_seconds,
    )  # fmt: skip
    if progress:
        progress.remove_task(bar)
    target_top1 = {}
    for name, target in data.targets.items():
        classes = target.classes if job.recipe.class_mask == "subset" else None
        target_top1[name] = evaluate(
            model, targets[name], normalizer, device, job.recipe.eval_batch_size, classes, job.recipe.precision
        )[0]
    if result.top1 is None or not len(evaluation):
        raise RuntimeError("the run evaluated no image; no record is written")
    checkpoint = save_trainable(model, run_dir / records.CHECKPOINT)
    without_head, with_head = count_trainable(model)
    record = records.RunRecord(
        run_id=job.run_id,
        method=job.method,
        task=job.task.name,
        task_variant=dict(job.task.variant),
        suite=job.task.suite,
        group=job.task.group,
        backbone=job.backbone,
        pretrained=info.pretrained,
        backbone_checkpoint_sha256=info.checkpoint_sha256,
        seed=job.seed,
        protocol=job.protocol,
        hparams=run_hparams(job, info, data, normalizer, device),
        data=data_identity(data),
        metrics={
            **run_metrics(job, data, result),
            "eval_images": len(evaluation),
            "train_images": len(train),
            "targets": target_top1,
        },
        cost={
            "trainable_params": without_head,
            "trainable_params_with_head": with_head,
            "checkpoint_bytes": model.method.stored_bytes(model) or checkpoint.stat().st_size,
            "peak_memory_bytes": peak_memory_bytes(device),
            "peak_memory_kind": "cuda max allocated" if device.type == "cuda" else "process peak RSS",
            "forward_flops": method_flops(model, info, job, device, data.num_classes),
            "head_trained_on_cached_features": trainee is not model,
            "train_images_per_s": result.train_images_per_s,
            "eval_images_per_s": result.eval_images_per_s,
            "inference_images_per_s": inference_speeds(
                model, prepared.evaluation, normalizer, device, job.recipe, inference_key(job, info, device)
            ),
            "seconds": {
                "data": data_seconds,
                "features": feature_seconds,
                "train": result.train_seconds,
                "eval": result.eval_seconds,
                "total": time.perf_counter() - wall_start,
            },
        },
        environment=records.environment(str(device)),
        notes=[note for note in (info.notes,) if note],
        started_at=started,
        finished_at=records.now(),
        tuning=dict(job.tuning or {}),
    )
    records.write_record(run_dir, record)
    resume.unlink(missing_ok=True)
    return record


_FLOPS: dict[str, int] = {}


def method_flops(model, info, job: Job, device: torch.device, num_classes: int) -> int:
    """The method model's forward FLOPs per image, counted once per (method, settings, backbone, input size,
    classes) in a process: the tasks and seeds of a sweep share it."""
    config = json.dumps(get_method(job.method).config_identity(job.method_config), sort_keys=True, default=str)
    key = f"{job.method} {config} {job.backbone} {info.preprocessing.image_size} {num_classes}"
    if key not in _FLOPS:
        _FLOPS[key] = forward_flops(model, info.preprocessing.image_size, device)
    return _FLOPS[key]


def inference_key(job: Job, info, device: torch.device) -> str:
    """What an inference speed depends on: the architecture (method and settings, backbone, input size),
    the device, the batch and the precision; not the task or the seed."""
    config = json.dumps(get_method(job.method).config_identity(job.method_config), sort_keys=True, default=str)
    size = "x".join(map(str, info.preprocessing.image_size))
    return f"{job.method} {config} on {job.backbone} at {size}, {device}, batch {job.recipe.eval_batch_size}, {job.recipe.precision}"


def run_hparams(job: Job, info, data: TaskData, normalizer: Normalizer, device: torch.device) -> dict[str, Any]:
    """A record's settings: the method's, the recipe as resolved (warm-up, input size), the weights and
    the classes."""
    runner = get_method(job.method)
    return {
        "method": runner.config_identity(job.method_config),
        "task_defaults": dict(runner.task_defaults.get(task_key(job.task.name), {})),
        "recipe": {
            **dataclasses.asdict(job.recipe),
            "warmup_epochs": job.recipe.warmup,
            "image_size": info.preprocessing.image_size[0],
        },
        "input_size": list(info.preprocessing.image_size),
        "precision": precision_of(device, job.recipe.precision),
        "execution": execution_of(device, job.recipe.execution),
        "pretrained_source": job.pretrained,
        "num_classes": data.num_classes,
        "class_names": list(data.class_names) if data.class_names else None,
        "normalization": {"mean": normalizer.mean.flatten().tolist(), "std": normalizer.std.flatten().tolist()},
    }


def run_metrics(job: Job, data: TaskData, result) -> dict[str, Any]:
    """The top-1 the protocol selects (``paper``: the max over the test evaluations), and the curve."""
    curve = result.curve
    top1 = max(point["top1"] for point in curve) if job.protocol == "paper" and curve else result.top1
    return {
        "top1": top1,
        "top1_last": result.top1,
        "eval_split": data.eval.name,
        "selection": records.SELECTION[job.protocol],
        "curve": curve,
        "class_mask": {
            name: ("subset" if t.classes and job.recipe.class_mask == "subset" else "all")
            for name, t in data.targets.items()
        },
    }


INFERENCE_IMAGES = 512  # images timed for the inference throughput


_INFERENCE_SPEEDS: dict[str, dict] = {}


def inference_speeds(model: PetlModel, data: TensorDataset, normalizer, device, recipe: Recipe, key: str) -> dict:
    """Full-model images/s in eval mode on the same images, batch and device: the model as trained and,
    for methods that fold into the backbone, merged (so 'no inference overhead' is measured). Measured
    once per ``key`` (method, its settings, backbone, input size, device, batch, precision) in a process:
    the runs of a sweep over tasks and seeds share the architecture, so they share the measurement."""
    if key not in _INFERENCE_SPEEDS:
        _INFERENCE_SPEEDS[key] = _measure_inference(model, data, normalizer, device, recipe)
    return {**_INFERENCE_SPEEDS[key], "measured_for": key}


def _measure_inference(model: PetlModel, data: TensorDataset, normalizer, device, recipe: Recipe) -> dict:
    subset = TensorDataset(data.images[:INFERENCE_IMAGES], data.labels[:INFERENCE_IMAGES])
    speeds = {"as_trained": evaluate(model, subset, normalizer, device, recipe.eval_batch_size, precision=recipe.precision)[1],
              "merged": None}  # fmt: skip
    if model.method.merges:
        speeds["merged"] = evaluate(
            merge(model), subset, normalizer, device, recipe.eval_batch_size, precision=recipe.precision
        )[1]
    return speeds


@dataclass
class SweepSummary:
    finished: list[records.RunRecord] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # unsupported method/backbone pairs of a multi-backbone sweep


@dataclass
class Checked:
    """A sweep after every check: the data of each task, the jobs that can run, the pairs left out and
    a description of each backbone at each input size."""

    data: dict[tuple[str, str], TaskData]  # by Job.data_key
    jobs: list[Job]
    left_out: list[str]
    infos: dict[tuple[str, int | None], Any]
    fingerprints: dict[tuple[str, str], str] = field(default_factory=dict)  # by Job.data_key

    def info(self, job: Job):
        return self.infos[(job.backbone, job.recipe.image_size)]

    def fingerprint(self, job: Job) -> str:
        """The fingerprint of the data ``job`` reads (computed once per task, cached on disk)."""
        if job.data_key not in self.fingerprints:
            self.fingerprints[job.data_key] = data_identity(self.data[job.data_key])["fingerprint"]
        return self.fingerprints[job.data_key]

    def finished(self, job: Job, output: Path, repair: bool = True) -> bool:
        """``job`` has a record in ``output`` trained on the data it reads now."""
        return records.finished_on(records.run_folder(output, job.run_id), self.fingerprint(job), repair)


def validate(jobs: list[Job], strict: bool, skip_unsupported: bool = False) -> Checked:
    """Check every task's data and every method/backbone pair before anything trains.

    With ``skip_unsupported`` (a sweep over several backbones) an unsupported pair is left out with a
    warning instead of failing the sweep."""
    data = {}
    for job in jobs:
        if job.data_key not in data:
            data[job.data_key] = job.task.splits(job.data_root, job.protocol, strict=strict)
        check_batch(job, data[job.data_key])
    infos: dict[tuple[str, int | None], Any] = {}
    runnable, left_out = [], []
    for job in jobs:
        key = (job.backbone, job.recipe.image_size)
        if key not in infos:
            if job.pretrained == "hub":
                check_hub_reachable(job.backbone)
            infos[key] = skeleton(job.backbone, job.recipe.image_size)[1]
        try:
            check_job(job, infos[key], data[job.data_key])
        except UserError as error:
            if not skip_unsupported:
                raise
            pair = f"{job.method} on {job.backbone} / {job.task.key}"
            log.warning("left out %s: %s", pair, error)
            left_out.append(pair)
            continue
        runnable.append(job)
    return Checked(data, runnable, left_out, infos)


@functools.lru_cache(maxsize=1)
def skeleton(backbone: str, image_size: int | None) -> tuple[torch.nn.Module, Any]:
    """(network, info) of the backbone without weights, built once for validation and the plan summary
    (the last one kept); the global random streams are left as they were."""
    with preserved_rng():
        return build_backbone(backbone, "none", num_classes=1, image_size=image_size)


@functools.lru_cache(maxsize=16)
def backbone_flops(backbone: str, image_size: int | None) -> int:
    """The backbone's forward FLOPs per image at ``image_size``, counted once per process."""
    network, info = skeleton(backbone, image_size)
    return forward_flops(network, info.preprocessing.image_size, torch.device("cpu"))


def plan_rows(checked: Checked, output: Path) -> list[dict[str, Any]]:
    """One row per run of the sweep: what it is and whether it is finished (for ``--dry-run``)."""
    rows = []
    for job in checked.jobs:
        size = checked.info(job).preprocessing.image_size
        configuration = (job.tuning or {}).get("configuration")
        rows.append({
            **({"configuration": configuration_text(configuration)} if configuration is not None else {}),
            "method": job.method, "task": job.task.key, "backbone": job.backbone, "seed": job.seed,
            "protocol": job.protocol, "image_size": f"{size[0]}x{size[1]}", "epochs": job.recipe.epochs,
            "batch": job.recipe.batch_size, "train_images": len(checked.data[job.data_key].train),
            "status": _status(checked, job, output), "run_id": job.run_id,
        })  # fmt: skip
    return rows


def configuration_text(values: dict) -> str:
    """A tuning configuration as ``lr=0.001, scale=10`` (``-`` when it sets nothing)."""
    return ", ".join(f"{key}={value}" for key, value in values.items()) or "-"


def _status(checked: Checked, job: Job, output: Path) -> str:
    record = records.finished_record(records.run_folder(output, job.run_id), repair=False)
    if record is None:
        return "to run"
    return "to run (data changed)" if records.on_other_data(record, checked.fingerprint(job)) else "finished"


def plan_summary(checked: Checked, output: Path) -> str:
    """One line before a sweep starts: runs, input sizes and the estimated compute (a training step
    costs about three forward passes; the backbone's forward FLOPs at the run's input size)."""
    rows = plan_rows(checked, output)
    todo = [(job, row) for job, row in zip(checked.jobs, rows) if row["status"] != "finished"]
    total = 0.0
    for job, row in todo:
        evaluated = len(checked.data[job.data_key].eval)
        total += backbone_flops(job.backbone, job.recipe.image_size) * (
            3 * row["train_images"] * row["epochs"] + evaluated
        )
    sizes = ", ".join(sorted({row["image_size"] for row in rows})) or "-"
    finished = len(rows) - len(todo)
    return (
        f"plan: {len(todo)} run(s) to train, {finished} finished; input {sizes}; "
        f"estimated {total / 1e12:,.1f} TFLOP (3 x forward x images x epochs)"
    )


def check_batch(job: Job, data: TaskData) -> None:
    """Fewer training images than one batch (with drop_last, as the recipe) is an error before any
    model is built or image decoded."""
    images, batch = len(data.train), job.recipe.batch_size
    if job.recipe.drop_last and images < batch and get_method(job.method).trains_head:
        raise UserError(
            f"task '{job.task.key}' has {images} training images ({data.train.list_file.name}), fewer than one "
            f"batch of {batch}; pass --batch-size {max(1, min(images, batch))} or fewer"
        )


def check_job(job: Job, info, data: TaskData) -> None:
    """A UserError when ``job`` cannot run: method/backbone pair, method settings, classifier init."""
    method = get_method(job.method)
    method.check_backbone(info)
    method.check_config(job.method_config)
    if job.recipe.head_init == "text" and (info.kind != CLIP or not data.class_names):
        raise UserError(
            f"recipe.head_init=text needs a CLIP backbone and a task with class names "
            f"(got {job.backbone} on {job.task.name})"
        )
    if not method.trains_head and job.recipe.head_init != "text":
        raise UserError(f"method '{method.name}' trains nothing; it needs recipe.head_init=text (the dg suite's)")


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
    The overall bar counts epochs, so its time estimate follows the training actually left."""
    checked = checked or validate(jobs, strict, skip_unsupported)
    summary = SweepSummary(left_out=checked.left_out)
    todo = [job for job in checked.jobs if force or not checked.finished(job, output)]
    total = sum(job.recipe.epochs for job in todo)
    overall = progress.add_task(f"runs 0/{len(todo)}", total=total) if progress and todo else None
    done = 0
    for job in checked.jobs:
        run_dir = records.run_folder(output, job.run_id)
        if checked.finished(job, output) and not force:
            summary.skipped.append(job.run_id)
            continue
        records.set_aside_other_data(run_dir, checked.fingerprint(job))
        with records.run_lock(run_dir) as acquired:
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


def default_methods(suite: str | None) -> list[str]:
    if suite:
        methods = SUITES.get(suite).methods
        if methods:
            return list(methods)
    return METHODS.names()


def resolve_methods(text: str | None, suite: str | None) -> list[str]:
    if text is None:
        return default_methods(suite)
    if text.strip().lower() == "all":
        return METHODS.names()
    return [METHODS.resolve(name) for name in text.split(",") if name.strip()]
