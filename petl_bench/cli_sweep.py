"""``petl-bench run`` and ``petl-bench tune``: the options they share (declared once, as
:class:`SweepOptions`), parsing them into a sweep and an execution, and printing what happened. The
library does the work: :mod:`petl_bench.planning` plans and checks, :mod:`petl_bench.executors` runs,
:mod:`petl_bench.tuning` drives the tuned protocol.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from . import records
from .errors import UserError
from .output import console, render
from .progress import stderr_console

# The options `run` and `tune` share.
O_DATA_ROOT = typer.Option(
    None,
    "--data-root",
    "--root",
    help="Data folder (default: $PETL_BENCH_DATA, else data/ in the cache folder, $PETL_BENCH_CACHE/data, "
    "where 'petl-bench data get' puts it).",
)
PluginOption = typer.Option(None, "--plugin", help="Python file that registers extra methods or tasks (repeatable).")


def split_names(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def integers(text: str | None, option: str) -> list[int]:
    try:
        return [int(part) for part in split_names(text)]
    except ValueError:
        raise UserError(f"{option} takes comma-separated integers, got {text!r}") from None


@dataclass
class SweepOptions:
    """What a sweep is (methods, tasks, backbones, seeds, recipe overrides) and how it executes."""

    methods: Optional[str] = typer.Option(None, help="Comma-separated methods, or 'all' (default: the suite's).")
    suite: Optional[str] = typer.Option(
        None, metavar="vtab|fewshot|dg|demo", help="The suite (default: demo, unless --tasks/--task-dir)."
    )
    tasks: Optional[str] = typer.Option(None, help="Comma-separated registered tasks (default: the suite's).")
    task_dir: Optional[list[Path]] = typer.Option(
        None, "--task-dir", help="Folder with train/test list files (repeatable)."
    )
    backbone: Optional[str] = typer.Option(None, help="Backbone (default: the suite's).")
    backbones: Optional[str] = typer.Option(None, help="Comma-separated backbones, each crossed with every method.")
    pretrained: str = typer.Option(
        "hub", metavar="hub|none|PATH", help="The backbone's weights: hub, none, or a weights file."
    )
    data_root: Optional[Path] = O_DATA_ROOT
    seeds: Optional[str] = typer.Option(None, help="Comma-separated seeds (default: the suite's).")
    shots: Optional[str] = typer.Option(None, help="Few-shot: comma-separated shots (default 1,2,4,8,16).")
    split_seeds: Optional[str] = typer.Option(
        None, "--split-seeds", help="Few-shot / dg: split list seeds (default 0,1,2)."
    )
    epochs: Optional[int] = typer.Option(None, help="Override recipe.epochs.")
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Override recipe.batch_size.")
    image_size: Optional[int] = typer.Option(
        None, "--image-size", help="Input size in pixels (default: the suite's, else the backbone's native size)."
    )
    precision: Optional[str] = typer.Option(
        None, metavar="auto|bf16|fp32",
        help="Compute precision: bf16 autocast or fp32 (default auto: bf16 on CUDA, fp32 else).",
    )  # fmt: skip
    execution: Optional[str] = typer.Option(
        None, metavar="auto|eager|compiled",
        help="Training step: compiled (torch.compile, CUDA graphs) or eager (default auto: compiled on CUDA, "
        "eager else).",
    )  # fmt: skip
    dry_run: bool = typer.Option(False, "--dry-run", help="List the runs (finished or to run) and exit.")
    output: Path = typer.Option(Path("results/runs"), help="Where run folders go.")
    device: str = typer.Option("auto", metavar="auto|cpu|cuda[:N]", help="Where to train.")
    force: bool = typer.Option(False, help="Rerun finished runs.")
    strict: bool = typer.Option(False, help="Fail (not warn) when a split has an unexpected size.")
    checkpoint_seconds: float = typer.Option(
        60.0, help="Save the training state at most this often (resume after a crash)."
    )
    settings: Optional[list[str]] = typer.Option(
        None, "--set", help="SCOPE.KEY=VALUE, e.g. convpass.scale=10, recipe.lr=5e-4, lora.lr=5e-4."
    )
    executor: str = typer.Option(
        "local", metavar="local|slurm", help="local (this process, or worker processes on the GPUs) or slurm."
    )
    gpus: int = typer.Option(1, help="local: GPUs to use, cuda:0 .. cuda:N-1.")
    runs_per_gpu: Optional[int] = typer.Option(
        None, "--runs-per-gpu", show_default=False,
        help="local: runs trained at once on each GPU (small runs fill a large GPU); default: as many as the free "
        "memory holds (estimated per run, at most 4), one on a CPU.",
    )  # fmt: skip
    slurm_cluster: str = typer.Option("slurm", help="submitit cluster: slurm, or local/debug to try it without one.")
    partition: Optional[str] = typer.Option(None, help="SLURM partition.")
    time_minutes: int = typer.Option(240, help="SLURM time limit per run (minutes).")
    gpus_per_job: int = typer.Option(1, help="SLURM GPUs per run.")
    cpus_per_job: int = typer.Option(8, help="SLURM CPUs per run.")
    array_parallelism: int = typer.Option(64, help="SLURM array tasks running at once.")
    wait: bool = typer.Option(False, help="slurm: wait for the submitted runs and print the table.")
    plugin: Optional[list[Path]] = PluginOption

    def spec(self, cls, overrides: dict, **extra):
        """The sweep as plain values (a ``SweepSpec`` or ``TuneSpec``); ``overrides``: recipe fields."""
        recipe = {"epochs": self.epochs, "batch_size": self.batch_size, "image_size": self.image_size,
                  "precision": self.precision, "execution": self.execution, **overrides}  # fmt: skip
        return cls(
            methods=self.methods, suite=self.suite, tasks=split_names(self.tasks),
            task_dirs=[str(d) for d in self.task_dir or []], shots=integers(self.shots, "--shots"),
            split_seeds=integers(self.split_seeds, "--split-seeds"),
            backbones=split_names(self.backbones) or ([self.backbone] if self.backbone else []),
            seeds=integers(self.seeds, "--seeds"), pretrained=self.pretrained,
            recipe_overrides={k: v for k, v in recipe.items() if v is not None}, settings=list(self.settings or []),
            data_root=str(self.data_root) if self.data_root else None, plugins=[str(p) for p in self.plugin or []],
            **extra,
        )  # fmt: skip

    def execution_options(self):
        """How and where the runs execute (checked: executor, counts, a writable --output)."""
        from .executors import Execution, SlurmOptions

        slurm = SlurmOptions(
            cluster=self.slurm_cluster, partition=self.partition, time_minutes=self.time_minutes,
            gpus_per_job=self.gpus_per_job, cpus_per_job=self.cpus_per_job,
            array_parallelism=self.array_parallelism, wait=self.wait,
        )  # fmt: skip
        return Execution(self.output, self.device, self.force, self.strict, self.checkpoint_seconds, self.executor,
                         self.gpus, self.runs_per_gpu, slurm)  # fmt: skip


def with_options(cls):
    """A decorator: the command takes an instance of the dataclass ``cls`` (whose fields are typer options)
    as ``options``. The CLI shows the fields as options of the command (before the command's own), and the
    command receives them as one object: commands that share options declare them once."""

    def decorate(command):
        shared = typing.get_type_hints(cls)
        names = [field.name for field in dataclasses.fields(cls)]
        own = [p for p in inspect.signature(command).parameters.values() if p.name != "options"]
        own_types = {name: hint for name, hint in typing.get_type_hints(command).items() if name != "options"}

        @functools.wraps(command)
        def wrapper(**values):
            return command(options=cls(**{name: values.pop(name) for name in names}), **values)

        keyword = inspect.Parameter.KEYWORD_ONLY
        fields = [inspect.Parameter(f.name, keyword, default=f.default, annotation=shared[f.name])
                  for f in dataclasses.fields(cls)]  # fmt: skip
        wrapper.__signature__ = inspect.Signature(fields + [p.replace(kind=keyword) for p in own])
        wrapper.__annotations__ = {**own_types, **{name: shared[name] for name in names}}
        return wrapper

    return decorate


with_sweep_options = with_options(SweepOptions)


def progress_bars():
    """Bars in a terminal, plain progress lines in a log (``petl-bench run > log``)."""
    from .progress import progress_for

    return progress_for()


def finished_line(record) -> str:
    from .planning import configuration_text

    configuration = record.tuning.get("configuration")
    shown = f", {configuration_text(configuration)}" if configuration is not None else ""
    return (
        f"finished {record.method} on {record.task} ({record.backbone}, seed {record.seed}, {record.protocol}{shown}): "
        f"top-1 {record.metrics.top1:.1f} on {record.metrics.eval_split} in {record.cost.seconds.total:.0f}s"
    )


def print_tables(run_records: list, fmt: str = "table") -> None:
    import sys

    from .report import all_tables, runs_frame

    for table in all_tables(runs_frame(run_records)):
        if fmt == "md":
            sys.stdout.write(table.markdown())
        else:
            render(table.display_rows(), table.title, "table")


def execute(spec, run, *, dry_run: bool = False, title: str = ""):
    """Check a sweep, say what it will do, and run it (or list it): an ``executors.Outcome``, None for a
    dry run. Submitted SLURM runs are announced here."""
    from . import executors, planning

    checked = executors.check(spec, run)
    stderr_console().print((f"{title}: " if title else "") + planning.plan_summary(checked, run.output))
    if dry_run:
        render(planning.plan_rows(checked, run.output), f"Runs of {title or 'this sweep'} (nothing trained)", "table")
        return None
    with progress_bars() as progress:
        run, placement = run.placed(checked, progress)
        if placement:
            progress.console.print(placement, highlight=False)
        outcome = executors.run_checked(
            spec, checked, run, progress=progress,
            on_finished=lambda record: progress.console.print(finished_line(record), highlight=False),
        )  # fmt: skip
    if run.executor == "slurm":
        console.print(
            f"submitted {outcome.submitted} run(s) to {run.slurm.cluster}; logs in {run.output / 'slurm-logs'}"
        )
    return outcome


def counts_line(summary, output: Path) -> str:
    return (
        f"{len(summary.finished)} run(s) trained, {len(summary.skipped)} already finished, "
        f"{len(summary.busy)} running elsewhere, {len(summary.failed)} failed; records in {output}"
    )


def report_sweep(outcome, run) -> None:
    """The tables of a sweep's finished runs and one line of counts; exit 1 when a run failed."""
    summary, ids = outcome.summary, {job.run_id for job in outcome.jobs}
    finished = [r for r in records.load_records(run.output) if r.run_id in ids]
    if finished:
        print_tables(finished)
    if outcome.counted:
        console.print(counts_line(summary, run.output))
    else:
        console.print(f"{len(finished)} of {len(outcome.jobs)} run(s) have records in {run.output}")
    if summary.left_out:
        console.print(f"left out (cannot run): {', '.join(summary.left_out)}")
    for run_id, error in summary.failed:
        console.print(f"[red]failed[/] {run_id}: {error} (see {run.output / run_id / records.FAILURE})")
    if summary.failed:
        raise typer.Exit(1)


@with_sweep_options
def run_command(
    lr: Optional[float] = typer.Option(None, help="Override recipe.lr."),
    protocol: str = typer.Option(
        "final", metavar="final|paper|tune",
        help="final (last epoch, honest), paper (max over test evals), tune (train -> val).",
    ),
    *, options: SweepOptions,
) -> None:  # fmt: skip
    """Train and evaluate methods x tasks x backbones x seeds; finished runs are skipped."""
    from .planning import SweepSpec

    spec = options.spec(SweepSpec, {"lr": lr}, protocol=protocol)
    run = options.execution_options()
    outcome = execute(spec, run, dry_run=options.dry_run)
    if outcome is not None and outcome.summary is not None:
        report_sweep(outcome, run)


@with_sweep_options
def tune_command(
    lr: Optional[float] = typer.Option(None, help="Fix the learning rate instead of tuning it (--grid recipe.lr=LR)."),
    grid: Optional[list[str]] = typer.Option(
        None, "--grid", help="SCOPE.KEY=V1,V2 replaces an axis: convpass.scale=0.1,1,10, recipe.lr=1e-3,5e-3."
    ),
    search: str = typer.Option(
        "grid", metavar="grid|halving", help="grid (every configuration) or halving (successive halving)."
    ),
    search_only: bool = typer.Option(False, "--search-only", help="Run stage 1 and print the choices; no stage 2."),
    *, options: SweepOptions,
) -> None:  # fmt: skip
    """The fair protocol: search every method on train800 -> val200 over its grid (stage 1, first seed),
    retrain each winner on train800val200 and test it once, with every seed (stage 2, protocol 'tuned')."""
    from .tuning import TuneSpec

    grid = list(grid or []) + ([f"recipe.lr={lr}"] if lr is not None else [])
    spec = options.spec(TuneSpec, {}, grid=grid, search=search, output=str(options.output))
    run = options.execution_options()
    if options.dry_run:
        render(spec.grid_rows(), f"Tuning grids ({spec.search} search)", "table")
    run_tune(spec, run, dry_run=options.dry_run, search_only=search_only)


def run_tune(spec, run, *, dry_run: bool = False, search_only: bool = False) -> None:
    """Run the tuned protocol of ``spec`` stage by stage, printing each stage, the choices and stage 2's tables."""
    from .tuning import STAGE_TWO, run_tuned

    def stage(stage_spec, title: str):
        outcome = execute(stage_spec, run, dry_run=dry_run, title=title)
        if outcome is not None and outcome.summary is not None and title != STAGE_TWO:
            if outcome.summary.failed:
                report_sweep(outcome, run)
            if outcome.counted:
                console.print(f"{title}: {counts_line(outcome.summary, run.output)}")
        return outcome

    def chosen(tuned_spec) -> None:
        render(tuned_spec.choice_rows(), "Chosen on val200", "table")

    tuned = run_tuned(spec, stage, dry_run=dry_run, search_only=search_only, on_chosen=chosen)
    print_tuned(tuned, spec, run)


def print_tuned(tuned, spec, run) -> None:
    """How the tuned protocol ended: stage 2's tables, or why it stopped before stage 2."""
    if tuned.stopped == "dry run":
        if spec.rungs() > 1:
            stderr_console().print("later rungs of stage 1 depend on the rung before; not listed")
        stderr_console().print(
            "stage 2 (train800val200 -> test): one run per seed of each method, task and backbone, with the "
            "configuration stage 1 chooses on val200; listed once stage 1 has finished"
        )
    elif tuned.stopped == "submitted":
        console.print("stage 1 submitted; run the same command again when it has finished for stage 2")
    elif tuned.stopped == "busy":
        title, outcome = tuned.stages[-1]
        console.print(f"{title}: {len(outcome.summary.busy)} run(s) are training in another process; run the same "
                      f"command again once they have finished")  # fmt: skip
        raise typer.Exit(1)
    elif tuned.stopped is None:
        outcome = tuned.stages[-1][1]
        if outcome is not None and outcome.summary is not None:
            report_sweep(outcome, run)
