"""The ``petl-bench`` command line: parse options, call the library, print tables.

User mistakes (unknown names, bad options, missing data) print one ``error:`` line and exit 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import click
import typer
from rich.console import Console

from . import records, registry
from .cli_data import data_app
from .config import PAPER_BACKBONE
from .errors import UserError
from .output import console, render
from .progress import stderr_console

# torch, timm and the methods are imported by the commands that need them: --version and --help start fast.

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    pretty_exceptions_enable=False,
    help="Benchmark parameter-efficient transfer learning methods on vision backbones.",
)
PluginOption = typer.Option(None, "--plugin", help="Python file that registers extra methods or tasks (repeatable).")


def split_names(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def integers(text: str | None, option: str) -> list[int]:
    try:
        return [int(part) for part in split_names(text)]
    except ValueError:
        raise UserError(f"{option} takes comma-separated integers, got {text!r}") from None


def load_plugins(paths: Optional[list[Path]]) -> None:
    for path in paths or []:
        registry.load_plugin(path)


def show_version(value: bool) -> None:
    if value:
        from . import __version__

        console.print(f"petl-bench {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log more."),
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", callback=show_version, is_eager=True
    ),
) -> None:
    from rich.logging import RichHandler

    handler = RichHandler(console=stderr_console(), show_time=False, show_path=False, markup=False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s",
                        handlers=[handler])  # fmt: skip


@app.command("methods")
def methods_command(plugin: Optional[list[Path]] = PluginOption) -> None:
    """List the registered methods: citation, what they train, backbones, default hyperparameters."""
    load_plugins(plugin)
    rows = []
    for name, cls in registry.METHODS.items():
        defaults = ", ".join(f"{k}={v}" for k, v in cls.defaults().items()) or "-"
        if cls.task_defaults:
            keys = sorted({key for values in cls.task_defaults.values() for key in values})
            defaults += f" (per task: {', '.join(keys)} for {len(cls.task_defaults)} tasks)"
        rows.append({"name": name, "citation": cls.citation, "trains": cls.trains, "backbones": ", ".join(cls.kinds),
                     "defaults": defaults})  # fmt: skip
    for prefix, about in registry.METHODS.families().items():
        rows.append({"name": f"{prefix}TYPE", "citation": about["citation"], "trains": about["trains"],
                     "backbones": about["backbones"], "defaults": about["defaults"]})  # fmt: skip
    render(rows, "Registered methods", "table")


@app.command("tasks")
def tasks_command(
    suite: Optional[str] = typer.Option(None, help="Only tasks of this suite."),
    plugin: Optional[list[Path]] = PluginOption,
) -> None:
    """List the registered tasks."""
    load_plugins(plugin)
    rows = [
        {"name": name, "suite": task.suite, "group": task.group or "-", "classes": task.num_classes,
         "evaluated on": "; ".join(task.evaluation_sets()), "description": task.description or "-",
         "aliases": ", ".join(task.aliases) or "-"}
        for name, task in registry.TASKS.items()
        if suite is None or task.suite == suite
    ]  # fmt: skip
    render(rows, "Registered tasks", "table")


@app.command("params")
def params_command(
    backbone: str = typer.Option(PAPER_BACKBONE, help="Backbone name (built without weights)."),
    methods: Optional[str] = typer.Option(None, help="Comma-separated methods (default: all registered)."),
    num_classes: Optional[int] = typer.Option(
        None, "--num-classes", help="Classifier size for the 'with head' column (default: the task's, else 100)."
    ),
    task: Optional[str] = typer.Option(None, help="Apply the methods' per-task defaults for this task."),
    fmt: str = typer.Option("table", "--format", help="table, csv or md."),
    plugin: Optional[list[Path]] = PluginOption,
) -> None:
    """Trainable parameters of each method, without and with the classifier, and checkpoint bytes."""
    from .backbones import build_backbone
    from .checkpoints import checkpoint_bytes
    from .model import attach_method, count_trainable, get_method

    load_plugins(plugin)
    if num_classes is None:
        num_classes = registry.TASKS.get(task).num_classes if task and task in registry.TASKS else 100
    names = [registry.METHODS.resolve(name) for name in split_names(methods)] or registry.METHODS.names()
    runners = [get_method(name) for name in names]
    configs = [runner.make_config(task) for runner in runners]
    base, info = build_backbone(backbone, "none", num_classes=num_classes)
    rows, skipped = [], []
    for runner, config in zip(runners, configs):
        try:  # attach_method checks the method/backbone pair first
            model = attach_method(copy.deepcopy(base), copy.deepcopy(info), runner, config)
        except UserError as error:
            if methods:  # asked for by name: the error is the answer
                raise
            skipped.append(f"{runner.name}: {error}")
            continue
        without, with_head = count_trainable(model)
        rows.append(
            {
                "method": runner.name,
                "backbone": backbone,
                "trainable_params": without,
                "trainable_params_with_head": with_head,
                "checkpoint_bytes": model.method.stored_bytes(model) or len(checkpoint_bytes(model)),
            }
        )
    render(rows, f"Trainable parameters on {backbone} ({num_classes} classes{', task ' + task if task else ''})", fmt)
    for note in skipped:
        Console(stderr=True).print(f"not counted: {note}", highlight=False)


def progress_bars():
    """Bars in a terminal, plain progress lines in a log (``petl-bench run > log``)."""
    from .progress import progress_for

    return progress_for()


def finished_line(record) -> str:
    from .runner import configuration_text

    seconds = record.cost["seconds"]["total"]
    configuration = record.tuning.get("configuration")
    shown = f", {configuration_text(configuration)}" if configuration is not None else ""
    return (
        f"finished {record.method} on {record.task} ({record.backbone}, seed {record.seed}, {record.protocol}{shown}): "
        f"top-1 {record.metrics['top1']:.1f} on {record.metrics['eval_split']} in {seconds:.0f}s"
    )


def print_tables(run_records: list, fmt: str = "table") -> None:
    from .report import all_tables, runs_frame

    for table in all_tables(runs_frame(run_records)):
        if fmt == "md":
            sys.stdout.write(table.markdown())
        else:
            render(table.display_rows(), table.title, "table")


# Options shared by `run` and `tune`.
O_METHODS = typer.Option(None, help="Comma-separated methods, or 'all' (default: the suite's).")
O_SUITE = typer.Option(
    None, metavar="vtab|fewshot|dg|demo", help="The suite (default: demo, unless --tasks/--task-dir)."
)
O_TASKS = typer.Option(None, help="Comma-separated registered tasks (default: the suite's).")
O_TASK_DIR = typer.Option(None, "--task-dir", help="Folder with train/test list files (repeatable).")
O_BACKBONE = typer.Option(None, help="Backbone (default: the suite's).")
O_BACKBONES = typer.Option(None, help="Comma-separated backbones, each crossed with every method.")
O_PRETRAINED = typer.Option(
    "hub", metavar="hub|none|PATH", help="The backbone's weights: hub, none, or a weights file."
)
O_DATA_ROOT = typer.Option(
    None,
    "--data-root",
    "--root",
    help="Data folder (default: $PETL_BENCH_DATA, else data/ in the cache folder, $PETL_BENCH_CACHE/data, "
    "where 'petl-bench data get' puts it).",
)
O_SEEDS = typer.Option(None, help="Comma-separated seeds (default: the suite's).")
O_SHOTS = typer.Option(None, help="Few-shot: comma-separated shots (default 1,2,4,8,16).")
O_SPLIT_SEEDS = typer.Option(None, "--split-seeds", help="Few-shot / dg: split list seeds (default 0,1,2).")
O_EPOCHS = typer.Option(None, help="Override recipe.epochs.")
O_BATCH = typer.Option(None, "--batch-size", help="Override recipe.batch_size.")
O_LR = typer.Option(None, help="Override recipe.lr.")
O_IMAGE_SIZE = typer.Option(
    None, "--image-size", help="Input size in pixels (default: the suite's, else the backbone's native size)."
)
O_PRECISION = typer.Option(
    None,
    metavar="auto|bf16|fp32",
    help="Compute precision: bf16 autocast or fp32 (default auto: bf16 on CUDA, fp32 else).",
)
O_EXECUTION = typer.Option(
    None,
    "--execution",
    metavar="auto|eager|compiled",
    help="Training step: compiled (torch.compile, CUDA graphs) or eager (default auto: compiled on CUDA, eager else).",
)
O_DRY_RUN = typer.Option(False, "--dry-run", help="List the runs (finished or to run) and exit.")
O_OUTPUT = typer.Option(Path("results/runs"), help="Where run folders go.")
O_DEVICE = typer.Option("auto", metavar="auto|cpu|cuda[:N]", help="Where to train.")
O_FORCE = typer.Option(False, help="Rerun finished runs.")
O_STRICT = typer.Option(False, help="Fail (not warn) when a split has an unexpected size.")
O_CHECKPOINT = typer.Option(60.0, help="Save the training state at most this often (resume after a crash).")
O_SET = typer.Option(None, "--set", help="SCOPE.KEY=VALUE, e.g. convpass.scale=10, recipe.lr=5e-4, lora.lr=5e-4.")
O_EXECUTOR = typer.Option(
    "local", metavar="local|slurm", help="local (this process, or one per GPU with --gpus) or slurm (submitit)."
)
O_GPUS = typer.Option(1, help="local: worker processes, one per visible GPU.")
O_CLUSTER = typer.Option("slurm", help="submitit cluster: slurm, or local/debug to try it without one.")
O_PARTITION = typer.Option(None, help="SLURM partition.")
O_TIME = typer.Option(240, help="SLURM time limit per run (minutes).")
O_GPUS_PER_JOB = typer.Option(1, help="SLURM GPUs per run.")
O_CPUS_PER_JOB = typer.Option(8, help="SLURM CPUs per run.")
O_ARRAY = typer.Option(64, help="SLURM array tasks running at once.")
O_WAIT = typer.Option(False, help="slurm: wait for the submitted runs and print the table.")


@dataclass
class Execution:
    """How and where a sweep's runs execute (the options `run` and `tune` share)."""

    output: Path
    device: str = "auto"
    force: bool = False
    strict: bool = False
    checkpoint_seconds: float = 60.0
    executor: str = "local"
    gpus: int = 1
    slurm: Any = None  # executors.SlurmOptions


def sweep_spec(cls, *, methods, suite, tasks, task_dir, backbone, backbones, pretrained, data_root, seeds, shots,
               split_seeds, overrides, settings, plugin, **extra):  # fmt: skip
    return cls(
        methods=methods, suite=suite, tasks=split_names(tasks), task_dirs=[str(d) for d in task_dir or []],
        shots=integers(shots, "--shots"), split_seeds=integers(split_seeds, "--split-seeds"),
        backbones=split_names(backbones) or ([backbone] if backbone else []), seeds=integers(seeds, "--seeds"),
        pretrained=pretrained, recipe_overrides={k: v for k, v in overrides.items() if v is not None},
        settings=list(settings or []), data_root=str(data_root) if data_root else None,
        plugins=[str(p) for p in plugin or []], **extra,
    )  # fmt: skip


def execute(spec, run: Execution, *, dry_run: bool = False, title: str = "") -> tuple[list, Any] | None:
    """Check, announce and run (or submit) a spec's jobs; returns (jobs, summary), None for a dry run or a
    submission that is not waited for."""
    from . import executors, runner

    jobs = spec.jobs()
    checked = runner.validate(jobs, run.strict, spec.skip_unsupported)
    stderr_console().print((f"{title}: " if title else "") + runner.plan_summary(checked, run.output))
    if dry_run:
        render(runner.plan_rows(checked, run.output), f"Runs of {title or 'this sweep'} (nothing trained)", "table")
        return None
    if run.executor == "slurm":
        submitted = executors.submit(
            spec, run.output, run.slurm, force=run.force, checkpoint_seconds=run.checkpoint_seconds, checked=checked
        )
        console.print(f"submitted {len(submitted)} run(s) to {run.slurm.cluster}; logs in {run.output / 'slurm-logs'}")
        if not run.slurm.wait:
            return None
        return jobs, runner.SweepSummary(skipped=[j.run_id for j in jobs])
    if run.gpus > 1:
        executors.run_on_gpus(spec, run.output, run.gpus, force=run.force, checkpoint_seconds=run.checkpoint_seconds)
        return jobs, runner.SweepSummary(skipped=[j.run_id for j in jobs])
    with progress_bars() as progress:
        summary = runner.run_sweep(
            jobs, run.output, device=runner.pick_device(run.device), force=run.force, progress=progress,
            checkpoint_seconds=run.checkpoint_seconds, checked=checked,
            on_finished=lambda record: progress.console.print(finished_line(record), highlight=False),
        )  # fmt: skip
    return jobs, summary


def execution(output, device, force, strict, checkpoint_seconds, executor, gpus, slurm_cluster, partition,
              time_minutes, gpus_per_job, cpus_per_job, array_parallelism, wait) -> Execution:  # fmt: skip
    from . import executors

    if executor not in ("local", "slurm"):
        raise UserError(f"unknown executor '{executor}'; choose from: local, slurm")
    slurm = None
    if executor == "slurm":
        try:
            import submitit  # noqa: F401
        except ModuleNotFoundError:
            raise UserError("--executor slurm needs submitit: pip install 'petl-bench[slurm]'") from None
        slurm = executors.SlurmOptions(
            cluster=slurm_cluster, partition=partition, time_minutes=time_minutes, gpus_per_job=gpus_per_job,
            cpus_per_job=cpus_per_job, array_parallelism=array_parallelism, wait=wait,
        )  # fmt: skip
    records.check_writable(output, "--output")
    return Execution(output, device, force, strict, checkpoint_seconds, executor, gpus, slurm)


def counts_line(summary, output: Path) -> str:
    return (
        f"{len(summary.finished)} run(s) trained, {len(summary.skipped)} already finished, "
        f"{len(summary.busy)} running elsewhere, {len(summary.failed)} failed; records in {output}"
    )


def report_sweep(jobs: list, summary, run: Execution) -> None:
    """The tables of a sweep's finished runs and one line of counts; exit 1 when a run failed."""
    ids = {job.run_id for job in jobs}
    finished = [r for r in records.load_records(run.output) if r.run_id in ids]
    if finished:
        print_tables(finished)
    if run.executor == "local" and run.gpus <= 1:
        console.print(counts_line(summary, run.output))
    else:
        console.print(f"{len(finished)} of {len(jobs)} run(s) have records in {run.output}")
    if summary.left_out:
        console.print(f"left out (cannot run): {', '.join(summary.left_out)}")
    for run_id, error in summary.failed:
        console.print(f"[red]failed[/] {run_id}: {error} (see {run.output / run_id / records.FAILURE})")
    if summary.failed:
        raise typer.Exit(1)


@app.command("run")
def run_command(
    methods: Optional[str] = O_METHODS, suite: Optional[str] = O_SUITE, tasks: Optional[str] = O_TASKS,
    task_dir: Optional[list[Path]] = O_TASK_DIR, backbone: Optional[str] = O_BACKBONE,
    backbones: Optional[str] = O_BACKBONES, pretrained: str = O_PRETRAINED, data_root: Optional[Path] = O_DATA_ROOT,
    seeds: Optional[str] = O_SEEDS, shots: Optional[str] = O_SHOTS, split_seeds: Optional[str] = O_SPLIT_SEEDS,
    epochs: Optional[int] = O_EPOCHS, batch_size: Optional[int] = O_BATCH, lr: Optional[float] = O_LR,
    image_size: Optional[int] = O_IMAGE_SIZE, precision: Optional[str] = O_PRECISION,
    execution_mode: Optional[str] = O_EXECUTION, dry_run: bool = O_DRY_RUN,
    protocol: str = typer.Option(
        "final", metavar="final|paper|tune",
        help="final (last epoch, honest), paper (max over test evals), tune (train -> val).",
    ),
    output: Path = O_OUTPUT, device: str = O_DEVICE, force: bool = O_FORCE, strict: bool = O_STRICT,
    checkpoint_seconds: float = O_CHECKPOINT, settings: Optional[list[str]] = O_SET, executor: str = O_EXECUTOR,
    gpus: int = O_GPUS, slurm_cluster: str = O_CLUSTER, partition: Optional[str] = O_PARTITION,
    time_minutes: int = O_TIME, gpus_per_job: int = O_GPUS_PER_JOB, cpus_per_job: int = O_CPUS_PER_JOB,
    array_parallelism: int = O_ARRAY, wait: bool = O_WAIT, plugin: Optional[list[Path]] = PluginOption,
) -> None:  # fmt: skip
    """Train and evaluate methods x tasks x backbones x seeds; finished runs are skipped."""
    from . import runner

    overrides = {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "image_size": image_size,
        "precision": precision,
        "execution": execution_mode,
    }
    spec = sweep_spec(
        runner.SweepSpec, methods=methods, suite=suite, tasks=tasks, task_dir=task_dir, backbone=backbone,
        backbones=backbones, pretrained=pretrained, data_root=data_root, seeds=seeds, shots=shots,
        split_seeds=split_seeds, overrides=overrides, settings=settings, plugin=plugin, protocol=protocol,
    )  # fmt: skip
    run = execution(output, device, force, strict, checkpoint_seconds, executor, gpus, slurm_cluster, partition,
                    time_minutes, gpus_per_job, cpus_per_job, array_parallelism, wait)  # fmt: skip
    result = execute(spec, run, dry_run=dry_run)
    if result is not None:
        report_sweep(*result, run)


@app.command("tune")
def tune_command(
    methods: Optional[str] = O_METHODS, suite: Optional[str] = O_SUITE, tasks: Optional[str] = O_TASKS,
    task_dir: Optional[list[Path]] = O_TASK_DIR, backbone: Optional[str] = O_BACKBONE,
    backbones: Optional[str] = O_BACKBONES, pretrained: str = O_PRETRAINED, data_root: Optional[Path] = O_DATA_ROOT,
    seeds: Optional[str] = O_SEEDS, shots: Optional[str] = O_SHOTS, split_seeds: Optional[str] = O_SPLIT_SEEDS,
    epochs: Optional[int] = O_EPOCHS, batch_size: Optional[int] = O_BATCH, image_size: Optional[int] = O_IMAGE_SIZE,
    precision: Optional[str] = O_PRECISION, execution_mode: Optional[str] = O_EXECUTION,
    lr: Optional[float] = typer.Option(None, help="Fix the learning rate instead of tuning it (--grid recipe.lr=LR)."),
    grid: Optional[list[str]] = typer.Option(
        None, "--grid", help="SCOPE.KEY=V1,V2 replaces an axis: convpass.scale=0.1,1,10, recipe.lr=1e-3,5e-3."
    ),
    search: str = typer.Option(
        "grid", metavar="grid|halving", help="grid (every configuration) or halving (successive halving)."
    ),
    search_only: bool = typer.Option(False, "--search-only", help="Run stage 1 and print the choices; no stage 2."),
    dry_run: bool = O_DRY_RUN, output: Path = O_OUTPUT, device: str = O_DEVICE, force: bool = O_FORCE,
    strict: bool = O_STRICT, checkpoint_seconds: float = O_CHECKPOINT, settings: Optional[list[str]] = O_SET,
    executor: str = O_EXECUTOR, gpus: int = O_GPUS, slurm_cluster: str = O_CLUSTER,
    partition: Optional[str] = O_PARTITION, time_minutes: int = O_TIME, gpus_per_job: int = O_GPUS_PER_JOB,
    cpus_per_job: int = O_CPUS_PER_JOB, array_parallelism: int = O_ARRAY, wait: bool = O_WAIT,
    plugin: Optional[list[Path]] = PluginOption,
) -> None:  # fmt: skip
    """The fair protocol: search every method on train800 -> val200 over its grid (stage 1, first seed),
    retrain each winner on train800val200 and test it once, with every seed (stage 2, protocol 'tuned')."""
    from .tuning import TuneSpec

    overrides = {
        "epochs": epochs,
        "batch_size": batch_size,
        "image_size": image_size,
        "precision": precision,
        "execution": execution_mode,
    }
    spec = sweep_spec(
        TuneSpec, methods=methods, suite=suite, tasks=tasks, task_dir=task_dir, backbone=backbone,
        backbones=backbones, pretrained=pretrained, data_root=data_root, seeds=seeds, shots=shots,
        split_seeds=split_seeds, overrides=overrides, settings=settings, plugin=plugin,
        grid=list(grid or []) + ([f"recipe.lr={lr}"] if lr is not None else []),
        search=search, output=str(output),
    )  # fmt: skip
    run = execution(output, device, force, strict, checkpoint_seconds, executor, gpus, slurm_cluster, partition,
                    time_minutes, gpus_per_job, cpus_per_job, array_parallelism, wait)  # fmt: skip
    rungs = spec.rungs()
    if dry_run:
        print_grids(spec)
    for rung in range(rungs):
        stage_one = dataclasses.replace(spec, stage=1, rung=rung)
        title = f"stage 1{f', rung {rung + 1}/{rungs}' if rungs > 1 else ''} (train800 -> val200)"
        if dry_run and rung:
            stderr_console().print(f"{title}: depends on the rung before; not listed")
            continue
        result = execute(stage_one, run, dry_run=dry_run, title=title)
        if result is None and dry_run:
            continue
        if result is None:
            console.print("stage 1 submitted; run the same command again when it has finished for stage 2")
            return
        if result[1].failed:
            report_sweep(*result, run)
        if run.executor == "local" and run.gpus <= 1:
            console.print(f"{title}: {counts_line(result[1], run.output)}")
        if result[1].busy:  # another tune is training them: stage 2 needs all of stage 1
            console.print(f"{title}: {len(result[1].busy)} run(s) are training in another process; run the same "
                          f"command again once they have finished")  # fmt: skip
            raise typer.Exit(1)
    if dry_run:
        stderr_console().print(
            "stage 2 (train800val200 -> test): one run per seed of each method, task and backbone, with the "
            "configuration stage 1 chooses on val200; listed once stage 1 has finished"
        )
        return
    print_choices(spec)
    if search_only:
        return
    result = execute(dataclasses.replace(spec, stage=2), run, title="stage 2 (train800val200 -> test, every seed)")
    if result is not None:
        report_sweep(*result, run)


def print_grids(spec) -> None:
    """Every method's grid and the number of stage-1 runs, before any training."""
    render(spec.grid_rows(), f"Tuning grids ({spec.search} search)", "table")


def print_choices(spec) -> None:
    """The configuration stage 1 chose for each (method, task, backbone), with its val200 top-1."""
    chosen = {}
    for job in spec.stage_two():
        values = ", ".join(f"{k}={v}" for k, v in job.tuning["chosen"].items())
        chosen[(job.method, job.task.key, job.backbone)] = {
            "method": job.method, "task": job.task.key, "backbone": job.backbone, "chosen": values or "-",
            "val200 top-1": f"{job.tuning['chosen_val_top1']:.1f}", "of": len(job.tuning["configurations"]),
        }  # fmt: skip
    render(list(chosen.values()), "Chosen on val200", "table")


@app.command("report")
def report_command(
    results: Path = typer.Option(Path("results/runs"), help="Folder of run records."),
    out: Path = typer.Option(Path("results/report"), help="Where tables and plots go."),
    fmt: str = typer.Option("md,csv", "--format", help="Comma-separated: md, csv."),
) -> None:
    """Tables (Markdown, CSV), runs.csv and PNG plots from the run records."""
    from .report import write_report

    records.check_writable(out, "--out")
    run_records = records.load_records(results)
    written = write_report(run_records, out, tuple(split_names(fmt)))
    print_tables(run_records)
    console.print(f"wrote {len(written)} files to {out}: " + ", ".join(p.name for p in written))


@app.command("export")
def export_command(
    run_dir: Path = typer.Argument(
        ..., metavar="RUN_DIR", help="A finished run's folder (under --output of run/tune)."
    ),
    out: Path = typer.Option(..., "--out", help="The .safetensors file to write (a .json is written beside it)."),
    merged: bool = typer.Option(False, "--merged", help="Fold the method into the backbone: the whole model."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing export at --out."),
    plugin: Optional[list[Path]] = PluginOption,
) -> None:
    """Write a trained run for deployment: merged into the backbone, or its trainable-only checkpoint."""
    from .export import export_run

    load_plugins(plugin)
    weights, sidecar = export_run(run_dir, out, merged, force)
    kind = "merged model" if merged else "trainable-only checkpoint"
    console.print(f"wrote the {kind} to {weights} and its description to {sidecar}; load with pb.load_exported")


app.add_typer(data_app, name="data")

noah_app = typer.Typer(help="NOAH: supernet training, evolutionary search and retraining of the winner.")
app.add_typer(noah_app, name="noah")


@noah_app.command("search")
def noah_search_command(
    task: Optional[str] = typer.Option(None, help="A registered task (e.g. a VTAB-1K task or demo_digits)."),
    task_dir: Optional[Path] = typer.Option(None, "--task-dir", help="Or a folder with train/val/test lists."),
    backbone: Optional[str] = typer.Option(None, help="Backbone (default: the task's suite's)."),
    pretrained: str = typer.Option("hub", help="hub, none, or a weights file."),
    data_root: Optional[Path] = O_DATA_ROOT,
    seed: int = typer.Option(0, help="Seed of the supernet, the search and the retrain."),
    budget: float = typer.Option(0.64, help="Parameter limit in millions (NOAH's --param-limits)."),
    counter: str = typer.Option(
        "noah", help="Budget counter: noah (NOAH's, dead prompt parameters included) or effective."
    ),
    supernet_epochs: int = typer.Option(500, help="Supernet training epochs (NOAH: 500)."),
    supernet_lr: float = typer.Option(5e-4, help="Supernet learning rate (NOAH: 5e-4)."),
    population: int = typer.Option(50, help="Candidate subnets per generation (NOAH: 50)."),
    select: int = typer.Option(10, help="Parents kept per generation (top-k)."),
    mutation: int = typer.Option(25, help="Children made by mutation per generation (NOAH: 25)."),
    crossover: int = typer.Option(25, help="Children made by crossover per generation (NOAH: 25)."),
    m_prob: float = typer.Option(0.2, help="Probability that a mutation changes a module's depth (NOAH: 0.2)."),
    s_prob: float = typer.Option(0.4, help="Probability that a mutation changes a block's size (NOAH: 0.4)."),
    generations: int = typer.Option(15, help="Generations of the evolutionary search (NOAH: 15)."),
    sizes: str = typer.Option("1,5,10", help="Candidate prompt lengths / LoRA ranks / adapter widths."),
    depths: str = typer.Option("3,6,9,12", help="Candidate numbers of blocks carrying each module type."),
    epochs: Optional[int] = typer.Option(None, help="Retrain epochs (default: the suite's recipe)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size (default: the suite's recipe)."),
    image_size: Optional[int] = typer.Option(None, help="Input size (default: the suite's or the backbone's)."),
    retrain: bool = typer.Option(True, help="Retrain the winner on train+val and test it."),
    output: Path = typer.Option(Path("results/runs"), help="Run folders; the search goes to OUTPUT/noah-search/."),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]."),
    plugin: Optional[list[Path]] = PluginOption,
) -> None:
    """Train a NOAH supernet on train, search a subnet on val under a budget, retrain it on train+val."""
    from . import runner
    from .config import Recipe
    from .methods.noah_search import SearchSettings, SearchSpace, run_search
    from .paths import data_root_from

    load_plugins(plugin)
    if (task is None) == (task_dir is None):
        raise UserError("give exactly one of --task or --task-dir")
    (chosen,) = runner.resolve_tasks(None, [task] if task else [], [task_dir] if task_dir else [])
    definition = registry.SUITES.get(chosen.suite) if chosen.suite in registry.SUITES else None
    recipe = definition.recipe if definition else Recipe()
    recipe = recipe.replace(
        **{
            k: v
            for k, v in {"epochs": epochs, "batch_size": batch_size, "image_size": image_size}.items()
            if v is not None
        }
    )
    space = SearchSpace(tuple(integers(sizes, "--sizes")), tuple(integers(depths, "--depths")))
    settings = SearchSettings(
        budget_m=budget, counter=counter, population=population, select=select, mutation=mutation,
        crossover=crossover, m_prob=m_prob, s_prob=s_prob, generations=generations,
        supernet_recipe=recipe.replace(epochs=supernet_epochs, lr=supernet_lr), space=space,
    )  # fmt: skip
    backbone = backbone or (definition.backbone if definition else PAPER_BACKBONE)
    target = runner.pick_device(device)
    with progress_bars() as progress:
        subnet_file = run_search(
            chosen, backbone=backbone, pretrained=pretrained, data_root=data_root_from(data_root), output=output,
            seed=seed, settings=settings, device=target, image_size=recipe.image_size, progress=progress,
        )  # fmt: skip
    found = json.loads(subnet_file.read_text())
    console.print(
        f"subnet: prompt {found['prompt']}, lora {found['lora']}, adapter {found['adapter']}; "
        f"val top-1 {found['val_top1']:.2f}, {found['effective_params']:,} effective parameters "
        f"({found['noah_counted_params']:,} by NOAH's counter); written to {subnet_file}"
    )
    if not retrain:
        return
    jobs = runner.plan(
        ["noah"], [chosen], [backbone], [seed], protocol="final", pretrained=pretrained, recipe=recipe,
        settings={"noah": {"subnet": str(subnet_file)}}, data_root=data_root_from(data_root),
    )  # fmt: skip
    with progress_bars() as progress:
        runner.run_sweep(jobs, output, device=target, progress=progress)
    print_tables([r for r in records.load_records(output) if r.run_id == jobs[0].run_id])


def _exception_types(name: str) -> tuple[type, ...]:
    """``name`` ("Abort", "Exit", "ClickException") as click and as the installed typer define it:
    typer 0.29 bundles its own click, whose exceptions are not click's."""
    found = {getattr(click.exceptions, name)}
    for module in ("typer", "typer._click.exceptions", "typer.exceptions"):
        try:
            found.add(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


ABORT, EXIT, CLICK_ERROR = _exception_types("Abort"), _exception_types("Exit"), _exception_types("ClickException")


INTERRUPTED = 130
TERMINATED = 143


def fail(message: str, code: int = 2) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)


def tidy_help(command) -> None:
    """Help that shows values, not Python types: a flag takes no value (no ``<bool>``), a repeatable option
    says PATH or TEXT (not ``<list[Path]>``). Options with a fixed set of values declare it as their metavar."""
    for param in getattr(command, "params", []):
        if getattr(param, "metavar", None) is not None or getattr(param, "param_type_name", "") != "option":
            continue
        if getattr(param, "is_flag", False):
            param.metavar = ""
        elif getattr(param, "multiple", False):
            annotation = str(getattr(getattr(param, "type_descriptor", None), "annotation", ""))
            param.metavar = "PATH" if "Path" in annotation else "TEXT"
    for sub in getattr(command, "commands", {}).values():
        tidy_help(sub)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM and ``kill`` send), handled like Ctrl-C (click turns both into an Abort)."""

    received = False


def _terminate(signum, frame) -> None:
    Terminated.received = True
    raise Terminated()


def main() -> None:
    """Entry point. Exit codes: 0 done; 1 a run failed; 2 a usage or data error (one ``error:`` line);
    130 interrupted (Ctrl-C), 143 terminated (SIGTERM), both saying so. ``--debug`` shows tracebacks instead."""
    import signal

    debug = "--debug" in sys.argv[1:]
    signal.signal(signal.SIGTERM, _terminate)
    try:
        command = typer.main.get_command(app)
        tidy_help(command)
        code = command(standalone_mode=False)
    except (UserError, OSError) as error:
        if debug:
            raise
        if isinstance(error, OSError):
            where = f": {error.filename}" if error.filename else ""
            fail(f"{error.strerror or error}{where}")
        fail(str(error), error.exit_code)
    except (KeyboardInterrupt, *ABORT):
        code = INTERRUPTED
    except CLICK_ERROR as error:
        if debug:
            raise
        context = getattr(error, "ctx", None)
        hint = f" (see '{context.command_path} --help')" if context is not None else ""
        fail(f"{error.format_message()}{hint}", getattr(error, "exit_code", 2) or 2)
    except EXIT as exit_:
        code = exit_.exit_code
    if code == INTERRUPTED and Terminated.received:
        code = TERMINATED
    if code in (INTERRUPTED, TERMINATED):  # typer turns Ctrl-C into this code itself
        what = "terminated" if code == TERMINATED else "interrupted"
        Console(stderr=True).print(f"{what}; rerun the same command to continue where it stopped")
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
