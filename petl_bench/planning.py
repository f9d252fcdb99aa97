"""Plan a sweep: methods x tasks x backbones x seeds into jobs, each with its run identity, and check
every job before anything trains (data, method/backbone pairs, settings, batch sizes).

Nothing here trains: :mod:`petl_bench.runner` runs what this module plans.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from . import ledger, paths
from .backbones import CLIP, build_backbone, check_hub_reachable, preserved_rng
from .config import Recipe
from .datasets import data_identity
from .engine import forward_flops
from .errors import UserError, warn_once
from .model import Method, get_method
from .registry import METHODS, SUITES, TASKS
from .task import FileListTask, TaskData, folder_task

log = logging.getLogger(__name__)


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

    @functools.cached_property
    def method_object(self) -> Method:
        """The registered :class:`Method` that ``method`` names (looked up once)."""
        return get_method(self.method)

    def identity(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "method_config": self.method_object.config_identity(self.method_config),
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
        names = "__".join(paths.safe_name(name) for name in (self.task.key, self.method, self.backbone))
        return f"{names}__s{self.seed}__{paths.safe_name(self.protocol)}__{digest}"


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
        recipe, backbone, seeds = suite_defaults(definition)
        recipe = recipe.replace(**self.recipe_overrides)
        return plan(
            resolve_methods(self.methods, suite),
            tasks,
            self.backbones or [backbone],
            self.seeds or list(seeds),
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


def one_task(
    name: str | None, folder: Path | None, backbone: str | None, overrides: dict[str, Any]
) -> tuple[FileListTask, str, Recipe]:
    """A registered task or a task folder, with its backbone (given, else its suite's, else the paper's) and
    its suite's recipe with ``overrides`` (None values left out)."""
    (task,) = resolve_tasks(None, [name] if name else [], [folder] if folder else [])
    recipe, default_backbone, _ = suite_defaults(SUITES.get(task.suite) if task.suite in SUITES else None)
    recipe = recipe.replace(**{key: value for key, value in overrides.items() if value is not None})
    return task, backbone or default_backbone, recipe


def suite_defaults(definition) -> tuple[Recipe, str, tuple[int, ...]]:
    """(recipe, backbone, seeds) of a suite's runs; without a suite: the paper's recipe, its ViT-B/16, seed 0."""
    from .backbones import PAPER_BACKBONE

    if definition is None:
        return Recipe(), PAPER_BACKBONE, (0,)
    return definition.recipe, definition.backbone, tuple(definition.seeds)


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
        method_obj = get_method(method)
        config_fields = {f.name for f in dataclasses.fields(method_obj.Config)}
        scoped = settings.get(method_obj.name, {})
        recipe_fields = {f.name for f in dataclasses.fields(Recipe)}
        unknown = sorted(set(scoped) - config_fields - recipe_fields)
        if unknown:
            raise UserError(
                f"method '{method_obj.name}' has no hyperparameter {', '.join(repr(u) for u in unknown)} and the recipe "
                f"has no such setting; hyperparameters: {', '.join(sorted(config_fields)) or '(none)'}; "
                f"recipe settings: {', '.join(sorted(recipe_fields))}"
            )
        method_recipe = recipe.replace(**{k: v for k, v in scoped.items() if k not in config_fields})
        method_recipe = method_recipe.replace(head_init=method_recipe.head_init or method_obj.head_init)
        if method_recipe.warmup_epochs is not None and method_recipe.warmup_epochs >= method_recipe.epochs:
            warn_once(log, "%s: recipe.warmup_epochs=%d is not below epochs=%d: the learning rate never leaves the "
                        "warm-up (leave warmup_epochs unset for 10%% of the epochs)", method_obj.name,
                        method_recipe.warmup_epochs, method_recipe.epochs)  # fmt: skip
        overrides = {k: v for k, v in scoped.items() if k in config_fields}
        for task in tasks:
            config = method_obj.make_config(task.name, **overrides)
            for backbone in backbones:
                for seed in seeds:
                    jobs.append(
                        Job(
                            method_obj.name,
                            task,
                            backbone,
                            pretrained,
                            seed,
                            protocol,
                            method_recipe,
                            config,
                            data_root,
                        )
                    )
    return jobs


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
        return ledger.finished_on(ledger.run_folder(output, job.run_id), self.fingerprint(job), repair)

    def to_train(self, output: Path, force: bool = False) -> list[Job]:
        """The jobs without a record in ``output`` on the data they read now; every job with ``force``."""
        return [job for job in self.jobs if force or not self.finished(job, output)]


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
    record = ledger.finished_record(ledger.run_folder(output, job.run_id), repair=False)
    if record is None:
        return "to run"
    return "to run (data changed)" if ledger.on_other_data(record, checked.fingerprint(job)) else "finished"


def plan_summary(checked: Checked, output: Path) -> str:
    """One line before a sweep starts: runs, input sizes and the estimated compute (a training step
    costs about three forward passes per pass the method makes; the backbone's forward FLOPs at the run's
    input size)."""
    rows = plan_rows(checked, output)
    todo = [job for job, row in zip(checked.jobs, rows) if row["status"] != "finished"]
    total = sum(estimated_flops(checked, job) for job in todo)
    sizes = ", ".join(sorted({row["image_size"] for row in rows})) or "-"
    finished = len(rows) - len(todo)
    return (
        f"plan: {len(todo)} run(s) to train, {finished} finished; input {sizes}; "
        f"estimated {total / 1e12:,.1f} TFLOP (3 x forward per training pass x images x epochs)"
    )


def estimated_flops(checked: Checked, job: Job) -> float:
    """A run's compute, roughly: three forward passes of the backbone per training image, epoch and pass the
    method's step makes (``Method.training_passes``), and one per evaluated image."""
    data = checked.data[job.data_key]
    passes = job.method_object.training_passes(job.method_config)
    images = 3 * passes * len(data.train) * job.recipe.epochs + len(data.eval)
    return backbone_flops(job.backbone, job.recipe.image_size) * images


def check_batch(job: Job, data: TaskData) -> None:
    """Fewer training images than one batch (with drop_last, as the recipe) is an error before any
    model is built or image decoded."""
    images, batch = len(data.train), job.recipe.batch_size
    if job.recipe.drop_last and images < batch and job.method_object.trains_head:
        raise UserError(
            f"task '{job.task.key}' has {images} training images ({data.train.list_file.name}), fewer than one "
            f"batch of {batch}; pass --batch-size {max(1, min(images, batch))} or fewer"
        )


def check_job(job: Job, info, data: TaskData) -> None:
    """A UserError when ``job`` cannot run: method/backbone pair, method settings, classifier init."""
    method = job.method_object
    method.check_backbone(info)
    method.check_config(job.method_config)
    method.check_pair(info, job.method_config)
    if job.recipe.head_init == "text" and (info.kind != CLIP or not data.class_names):
        raise UserError(
            f"recipe.head_init=text needs a CLIP backbone and a task with class names "
            f"(got {job.backbone} on {job.task.name})"
        )
    if not method.trains_head and job.recipe.head_init != "text":
        raise UserError(f"method '{method.name}' trains nothing; it needs recipe.head_init=text (the dg suite's)")


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
