"""``petl-bench data``: list, get and verify the datasets the suites read."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from . import datasets, registry
from .errors import UserError
from .output import console, render
from .progress import progress_for
from .task import data_root

data_app = typer.Typer(help="Get, check and fingerprint the data: VTAB-1K, few-shot FGVC, ImageNet and its variants.")
RootOption = typer.Option(None, "--root", help="Data root (default: $PETL_BENCH_DATA, else ~/.cache/petl-bench/data).")


def chosen_datasets(names: list[str]) -> list[datasets.Dataset]:
    """Datasets by name, or every dataset of a suite named instead."""
    chosen: list[datasets.Dataset] = []
    for name in names:
        if name in registry.DATASETS:
            found = [registry.DATASETS.get(name)]
        else:
            found = [d for _, d in registry.DATASETS.items() if d.suite == name]
        if not found:
            known = ", ".join(d.name for _, d in registry.DATASETS.items())
            raise UserError(f"unknown dataset or suite '{name}'; choose from: {known} (or a suite: vtab, fewshot, dg)")
        chosen += [d for d in found if d not in chosen]
    return chosen


def presence(dataset: datasets.Dataset, root: Path) -> str:
    tasks = dataset.checked_tasks()
    found = 0
    for task in tasks:
        try:
            task.folder(root)
            found += 1
        except UserError:
            continue
    if found == len(tasks):
        return "yes"
    return "no" if not found else f"{found} of {len(tasks)} tasks"


@data_app.command("list")
def list_command(root: Optional[Path] = RootOption) -> None:
    """Every dataset the tool knows: where it comes from, its size, whether it downloads, whether it is here."""
    folder = data_root(root)
    rows = [
        {"dataset": d.name, "suite": d.suite, "tasks": len(d.checked_tasks()), "source": d.source, "disk": d.size,
         "download": "automatic" if d.automatic else "by hand",
         "present": presence(d, folder)}
        for _, d in registry.DATASETS.items()
    ]  # fmt: skip
    render(rows, f"Datasets (data root {folder})", "table")
    console.print("'petl-bench data get NAME' downloads an automatic one (or prints the steps) and verifies it.")


def verify_datasets(chosen: list[datasets.Dataset], root: Path, deep: bool) -> int:
    """Check every task of ``chosen``, print the table and the problems, record the good ones in the
    manifest; the number of problems."""
    checks = []
    with progress_for() as progress:
        bar = progress.add_task("verifying", total=sum(len(d.checked_tasks()) for d in chosen))
        for dataset in chosen:
            for task in dataset.checked_tasks():
                checks.append(datasets.check_task(task, root, deep))
                progress.update(bar, advance=1)
        good = {c.task: datasets.manifest_entry(c, root) for c in checks if c.ok}
    rows = [
        {"task": c.task, "folder": str(c.folder) if c.folder else "-", "lists": len(c.lists),
         "lines": " / ".join(f"{n}" for n in c.lines.values()) or "-", "images": len(c.images),
         **({"decoded": c.decoded} if deep else {}),
         "status": "ok" if c.ok else f"{len(c.problems)} problem(s)"}
        for c in checks
    ]  # fmt: skip
    render(rows, f"Verified under {root}", "table")
    if good:
        manifest = datasets.write_manifest(root, good)
        console.print(f"{len(good)} task(s) verified; fingerprints in {manifest}")
    problems = [p for c in checks for p in c.problems]
    errors = Console(stderr=True, highlight=False, soft_wrap=True)
    for problem in problems:
        errors.print(f"problem: {problem}")
    return len(problems)


@data_app.command("verify")
def verify_command(
    root: Optional[Path] = RootOption,
    suite: Optional[str] = typer.Option(None, help="Only this suite's datasets (vtab, fewshot, dg, demo)."),
    deep: bool = typer.Option(False, "--deep", help="Also decode every image."),
) -> None:
    """Check lists, line counts, labels and images of every task; write petl-bench-manifest.json. Exit 1
    when anything is wrong."""
    folder = data_root(root)
    if suite:
        chosen = chosen_datasets([suite])
    else:
        chosen = [d for _, d in registry.DATASETS.items() if d.suite != "demo" and presence(d, folder) != "no"]
        if not chosen:
            raise UserError(f"no dataset found under {folder}; get one with: petl-bench data get vtab-1k")
    if verify_datasets(chosen, folder, deep):
        raise typer.Exit(1)


def already_verified(dataset: datasets.Dataset, root: Path) -> bool:
    tasks = dataset.checked_tasks()
    return bool(tasks) and all(datasets.verified_entry(task, root) for task in tasks)


@data_app.command("get")
def get_command(
    names: list[str] = typer.Argument(..., help="Datasets (see data list) or suites: vtab-1k, fewshot, dg, ..."),
    root: Optional[Path] = RootOption,
) -> None:
    """Download and arrange datasets under the data root, then verify them (a no-op once verified).
    Datasets that cannot be downloaded for you print the steps to follow."""
    folder = data_root(root)
    chosen = chosen_datasets(names)
    folder.mkdir(parents=True, exist_ok=True)
    to_verify = []
    for dataset in chosen:
        if already_verified(dataset, folder):
            console.print(f"{dataset.name}: already verified under {folder}; nothing to do")
            continue
        if dataset.automatic:
            console.print(f"{dataset.name}: getting it from {dataset.source} ({dataset.size})")
            dataset.fetch(folder)
        else:
            console.print(f"{dataset.name} cannot be downloaded for you. {dataset.steps}")
            if dataset.arrange:
                dataset.arrange(folder)
        to_verify.append(dataset)
    if to_verify and verify_datasets(to_verify, folder, deep=False):
        raise typer.Exit(1)
