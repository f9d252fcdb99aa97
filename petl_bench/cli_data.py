"""``petl-bench data``: list, get and verify the datasets the suites read."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console

from . import registry
from .errors import UserError
from .output import console, render
from .paths import data_root
from .progress import progress_for

if TYPE_CHECKING:
    from . import datasets

data_app = typer.Typer(help="Get, check and fingerprint the data: VTAB-1K, few-shot FGVC, ImageNet and its variants.")
RootOption = typer.Option(
    None, "--root", "--data-root",
    help="Data root (default: $PETL_BENCH_DATA, else data/ in the cache folder: $PETL_BENCH_CACHE/data, "
    "~/.cache/petl-bench/data when unset).",
)  # fmt: skip


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
    found = sum(task.present(root) for task in tasks)
    if found == len(tasks):
        return "yes"
    if not found and dataset.suite == "demo":
        return "no (generated on first use)"
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


def check_all(tasks: list, root: Path, deep: bool) -> list:
    from . import datasets

    with progress_for() as progress:
        bar = progress.add_task("verifying", total=len(tasks))
        checks = []
        for task in tasks:
            checks.append(datasets.check_task(task, root, deep))
            progress.update(bar, advance=1)
    return checks


def record_manifest(checks: list, root: Path) -> None:
    """Fingerprint the tasks that verified, forget those that did not; a root that cannot be written is
    said, not an error (the data was still checked)."""
    from . import datasets

    good = {c.task: datasets.manifest_entry(c, root) for c in checks if c.ok}
    try:
        manifest = datasets.write_manifest(root, good, failed=[c.task for c in checks if not c.ok])
    except OSError as error:
        console.print(f"the manifest could not be written under {root} ({error.strerror}); runs will not name it")
        return
    if good:
        console.print(f"{len(good)} task(s) verified; fingerprints in {manifest}")


def verify_tasks(tasks: list, root: Path, deep: bool) -> int:
    """Check every task, print the table and every problem, update the manifest; the number of problems."""
    checks = check_all(tasks, root, deep)
    rows = [
        {"task": c.task, "folder": str(c.folder) if c.folder else "-", "lists": len(c.lists),
         "lines": " / ".join(f"{n}" for n in c.lines.values()) or "-", "images": len(c.images),
         **({"decoded": c.decoded} if deep else {}),
         "status": "ok" if c.ok else f"{len(c.problems)} problem(s)"}
        for c in checks
    ]  # fmt: skip
    ok = sum(c.ok for c in checks)
    render(rows, f"Checked under {root}: {ok} of {len(checks)} task(s) verified", "table")
    record_manifest(checks, root)
    problems = [p for c in checks for p in c.problems]
    errors = Console(stderr=True, highlight=False, soft_wrap=True)
    for problem in problems:
        errors.print(f"problem: {problem}")
    return len(problems)


def verify_datasets(chosen: list[datasets.Dataset], root: Path, deep: bool) -> int:
    return verify_tasks([task for dataset in chosen for task in dataset.checked_tasks()], root, deep)


def tasks_to_verify(root: Path, suite: str | None, names: list[str]) -> list:
    """``--tasks``, else every task of ``--suite``, else every task present under the root (saying how many
    of each dataset's tasks are not there)."""
    if names:
        return [registry.TASKS.get(name) for name in names]
    if suite:
        return [task for dataset in chosen_datasets([suite]) for task in dataset.checked_tasks()]
    tasks = []
    for _, dataset in registry.DATASETS.items():
        if dataset.suite == "demo":
            continue
        found = [task for task in dataset.checked_tasks() if task.present(root)]
        if found and len(found) < len(dataset.checked_tasks()):
            console.print(f"{dataset.name}: {len(found)} of {len(dataset.checked_tasks())} tasks here; checking those "
                          f"(--suite {dataset.suite} checks them all)")  # fmt: skip
        tasks += found
    if not tasks:
        raise UserError(f"no dataset found under {root}; get one with: petl-bench data get vtab-1k")
    return tasks


@data_app.command("verify")
def verify_command(
    root: Optional[Path] = RootOption,
    suite: Optional[str] = typer.Option(
        None, help="Every task of this suite (vtab, fewshot, dg, demo), present or not."
    ),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated tasks (default: every task found under the root)."),
    deep: bool = typer.Option(False, "--deep", help="Also decode every image."),
) -> None:
    """Check lists, line counts, labels, images and the lists against each other (consistent labels, train +
    val = train+val, no image shared between train, val and test); write petl-bench-manifest.json. Exit 1
    when anything is wrong, listing every problem."""
    folder = data_root(root)
    names = [name.strip() for name in (tasks or "").split(",") if name.strip()]
    if verify_tasks(tasks_to_verify(folder, suite, names), folder, deep):
        raise typer.Exit(1)


def already_verified(dataset: datasets.Dataset, root: Path) -> bool:
    from . import datasets

    tasks = dataset.checked_tasks()
    return bool(tasks) and all(datasets.verified_entry(task, root) for task in tasks)


def get_one(dataset: datasets.Dataset, folder: Path, archive: Path | None) -> None:
    """Fetch (or, with ``archive``, install from a file fetched elsewhere) one dataset, or print its steps."""
    if archive is not None:
        if dataset.from_file is None:
            raise UserError(f"--from works for datasets that come as one archive (vtab-1k), not {dataset.name}")
        if not archive.is_file():
            raise UserError(f"--from {archive}: no such file")
        console.print(f"{dataset.name}: installing {archive}")
        dataset.from_file(archive, folder)
    elif dataset.automatic:
        console.print(f"{dataset.name}: getting it from {dataset.source} ({dataset.size})")
        dataset.fetch(folder)
    else:
        console.print(f"{dataset.name} cannot be downloaded for you. {dataset.steps}")
        if dataset.arrange:
            dataset.arrange(folder)


@data_app.command("get")
def get_command(
    names: list[str] = typer.Argument(..., help="Datasets (see data list) or suites: vtab-1k, fewshot, dg, ..."),
    root: Optional[Path] = RootOption,
    archive: Optional[Path] = typer.Option(
        None,
        "--from",
        metavar="PATH",
        help="An archive fetched elsewhere (vtab-1k.zip) to install instead of downloading.",
    ),
) -> None:
    """Download and arrange datasets under the data root, then verify them (a no-op once verified).
    Datasets that cannot be downloaded for you print the steps to follow. A dataset that fails to download
    is reported and the others go on; exit 1 when any failed."""
    folder = data_root(root)
    chosen = chosen_datasets(names)
    if archive is not None and len(chosen) != 1:
        raise UserError(
            "--from installs one dataset: name only it (e.g. petl-bench data get vtab-1k --from vtab-1k.zip)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    to_verify, failed = [], []
    for dataset in chosen:
        if archive is None and already_verified(dataset, folder):
            console.print(f"{dataset.name}: already verified under {folder}; nothing to do")
            continue
        try:
            get_one(dataset, folder, archive)
        except UserError as error:
            if len(chosen) == 1:
                raise
            Console(stderr=True, highlight=False, soft_wrap=True).print(f"[red]failed[/] {dataset.name}: {error}")
            failed.append(dataset.name)
            continue
        to_verify.append(dataset)
    problems = verify_datasets(to_verify, folder, deep=False) if to_verify else 0
    if failed:
        console.print(f"not downloaded: {', '.join(failed)} (see above); run the same command again to retry them")
    if problems or failed:
        raise typer.Exit(1)
