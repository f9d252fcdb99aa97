"""The ``petl-bench`` command line: parse options, call the library, print tables.

User mistakes (unknown names, bad options, missing data) print one ``error:`` line and exit 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import sys
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console
from rich.table import Table

from . import registry
from .backbones import PAPER_BACKBONE, build_backbone
from .checkpoints import checkpoint_bytes
from .errors import UserError
from .model import attach_method, count_trainable, get_method

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    pretty_exceptions_enable=False,
    help="Benchmark parameter-efficient transfer learning methods on vision backbones.",
)
console = Console()
PluginOption = typer.Option(None, "--plugin", help="Python file that registers extra methods or tasks (repeatable).")


def split_names(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def load_plugins(paths: Optional[list[Path]]) -> None:
    for path in paths or []:
        registry.load_plugin(path)


def render(rows: list[dict], title: str, fmt: str) -> None:
    """Print ``rows`` as a rich table, CSV or Markdown."""
    if fmt not in ("table", "csv", "md"):
        raise UserError(f"unknown format '{fmt}'; choose from: table, csv, md")
    columns = list(rows[0]) if rows else []
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        sys.stdout.write(buffer.getvalue())
    elif fmt == "md":
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
        sys.stdout.write("\n".join(lines) + "\n")
    else:
        table = Table(title=title)
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*(f"{v:,}" if isinstance(v, int) else str(v) for v in row.values()))
        console.print(table)


@app.callback()
def main_options(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log more."),
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


@app.command("methods")
def methods_command(plugin: Optional[list[Path]] = PluginOption) -> None:
    """List the registered methods: citation, what they train, backbones, default hyperparameters."""
    load_plugins(plugin)
    table = Table(title="Registered methods")
    for column in ("name", "citation", "trains", "backbones", "defaults"):
        table.add_column(column, overflow="fold")
    for name, cls in registry.METHODS.items():
        defaults = ", ".join(f"{k}={v}" for k, v in cls.defaults().items()) or "-"
        if cls.task_defaults:
            keys = sorted({key for values in cls.task_defaults.values() for key in values})
            defaults += f" (per task: {', '.join(keys)} for {len(cls.task_defaults)} tasks)"
        table.add_row(name, cls.citation, cls.trains, ", ".join(cls.kinds), defaults)
    console.print(table)


@app.command("tasks")
def tasks_command(
    suite: Optional[str] = typer.Option(None, help="Only tasks of this suite."),
    plugin: Optional[list[Path]] = PluginOption,
) -> None:
    """List the registered tasks."""
    load_plugins(plugin)
    rows = [
        {"name": name, "suite": task.suite, "group": task.group or "-", "classes": task.num_classes,
         "aliases": ", ".join(task.aliases) or "-"}
        for name, task in registry.TASKS.items()
        if suite is None or task.suite == suite
    ]  # fmt: skip
    render(rows, "Registered tasks", "table")


@app.command("params")
def params_command(
    backbone: str = typer.Option(PAPER_BACKBONE, help="Backbone name (built without weights)."),
    methods: Optional[str] = typer.Option(None, help="Comma-separated methods (default: all registered)."),
    num_classes: int = typer.Option(100, "--num-classes", help="Classifier size for the 'with head' column."),
    task: Optional[str] = typer.Option(None, help="Apply the methods' per-task defaults for this task."),
    fmt: str = typer.Option("table", "--format", help="table, csv or md."),
    plugin: Optional[list[Path]] = PluginOption,
) -> None:
    """Trainable parameters of each method, without and with the classifier, and checkpoint bytes."""
    load_plugins(plugin)
    names = [registry.METHODS.resolve(name) for name in split_names(methods)] or registry.METHODS.names()
    runners = [get_method(name) for name in names]
    configs = [runner.make_config(task) for runner in runners]
    base, info = build_backbone(backbone, "none", num_classes=num_classes)
    rows = []
    for runner, config in zip(runners, configs):
        runner.check_backbone(info)
    for runner, config in zip(runners, configs):
        model = attach_method(copy.deepcopy(base), copy.deepcopy(info), runner, config)
        without, with_head = count_trainable(model)
        rows.append(
            {
                "method": runner.name,
                "backbone": backbone,
                "trainable_params": without,
                "trainable_params_with_head": with_head,
                "checkpoint_bytes": len(checkpoint_bytes(model)),
            }
        )
    render(rows, f"Trainable parameters on {backbone} ({num_classes} classes)", fmt)


def main() -> None:
    """Entry point: run the app, turning user errors into one line and exit code 2."""
    debug = "--debug" in sys.argv[1:]
    try:
        app(standalone_mode=False)
    except UserError as error:
        if debug:
            raise
        Console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Abort:
        Console(stderr=True).print("aborted")
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except click.exceptions.Exit as exit_:
        sys.exit(exit_.exit_code)


if __name__ == "__main__":
    main()
