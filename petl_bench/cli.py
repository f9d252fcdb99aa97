"""The ``petl-bench`` command line: parse options, call the library, print tables.

User mistakes (unknown names, bad options, missing data) print one ``error:`` line and exit 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import copy
import importlib
import logging
import sys
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console

from . import atomic, records, registry
from .cli_data import data_app
from .cli_e2vpt import e2vpt_app
from .cli_glora import glora_app
from .cli_noah import noah_app
from .cli_sweep import (
    PluginOption,
    print_tables,
    run_command,
    split_names,
    tune_command,
)
from .cli_vqt import vqt_app
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
    set_: Optional[list[str]] = typer.Option(
        None, "--set", help="METHOD.KEY=VALUE, e.g. glora.paths=FILE, lora.rank=16."
    ),
    plugin: Optional[list[Path]] = PluginOption,
) -> None:
    """Trainable parameters of each method, without and with the classifier, and checkpoint bytes."""
    from .backbones import build_backbone
    from .checkpoints import checkpoint_bytes
    from .model import attach_method, count_trainable, get_method
    from .planning import parse_settings

    load_plugins(plugin)
    if num_classes is None:
        num_classes = registry.TASKS.get(task).num_classes if task and task in registry.TASKS else 100
    names = [registry.METHODS.resolve(name) for name in split_names(methods)] or registry.METHODS.names()
    method_objs = [get_method(name) for name in names]
    settings = parse_settings(set_ or [])
    configs = [method_obj.make_config(task, **settings.get(method_obj.name, {})) for method_obj in method_objs]
    base, info = build_backbone(backbone, "none", num_classes=num_classes)
    rows, skipped = [], []
    for method_obj, config in zip(method_objs, configs):
        try:  # attach_method checks the method/backbone pair first
            model = attach_method(copy.deepcopy(base), copy.deepcopy(info), method_obj, config)
        except UserError as error:
            if methods:  # asked for by name: the error is the answer
                raise
            skipped.append(f"{method_obj.name}: {error}")
            continue
        without, with_head = count_trainable(model)
        rows.append(
            {
                "method": method_obj.name,
                "backbone": backbone,
                "trainable_params": without,
                "trainable_params_with_head": with_head,
                "checkpoint_bytes": model.method.stored_bytes(model) or len(checkpoint_bytes(model)),
            }
        )
    render(rows, f"Trainable parameters on {backbone} ({num_classes} classes{', task ' + task if task else ''})", fmt)
    for note in skipped:
        Console(stderr=True).print(f"not counted: {note}", highlight=False)


@app.command("report")
def report_command(
    results: Path = typer.Option(Path("results/runs"), help="Folder of run records."),
    out: Path = typer.Option(Path("results/report"), help="Where tables and plots go."),
    fmt: str = typer.Option("md,csv", "--format", help="Comma-separated: md, csv."),
) -> None:
    """Tables (Markdown, CSV), runs.csv and PNG plots from the run records."""
    from .report import write_report

    atomic.check_writable(out, "--out")
    run_records = records.load_records(results)
    written = write_report(run_records, out, tuple(split_names(fmt)))
    print_tables(run_records)
    console.print(f"wrote {len(written)} files to {out}: " + ", ".join(p.name for p in written))


@app.command("compare")
def compare_command(
    a: str = typer.Argument(..., metavar="A", help="A method, or a report row (a method and its settings)."),
    b: str = typer.Argument(..., metavar="B", help="The other method or row."),
    results: Path = typer.Option(Path("results/runs"), help="Folder of run records."),
    suite: Optional[str] = typer.Option(None, help="Only runs of this suite (needed when several hold both)."),
    backbone: Optional[str] = typer.Option(None, help="Only runs on this backbone (likewise)."),
    protocol: str = typer.Option("final", metavar="final|paper|tune|tuned", help="Only runs of this protocol."),
    alpha: float = typer.Option(0.05, help="The level of the tests (Holm-corrected over tasks)."),
) -> None:
    """Are A and B different? Per task, the paired difference (same seeds, same test images) with its 95%
    bootstrap interval and test; across tasks, Wilcoxon's signed-rank test."""
    from .report.significance import comparison_rows, paired, select_pair, summary_line

    frame = select_pair(records.load_records(results), a, b, suite, backbone, protocol)
    result = paired(frame, a, b, alpha)
    title = f"{a} vs {b}: {frame['suite'].iloc[0]} on {frame['backbone'].iloc[0]}, protocol '{protocol}'"
    render(comparison_rows(result), title, "table")
    if result.unpaired:
        console.print(result.unpaired_line(), highlight=False)
    console.print(summary_line(result, alpha), highlight=False)


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


app.command("run")(run_command)
app.command("tune")(tune_command)
app.add_typer(data_app, name="data")

app.add_typer(noah_app, name="noah")
app.add_typer(glora_app, name="glora")
app.add_typer(e2vpt_app, name="e2vpt")
app.add_typer(vqt_app, name="vqt")


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
