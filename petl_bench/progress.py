"""Progress for long work: rich bars in a terminal, plain throttled lines in a log.

Both expose the subset of ``rich.progress.Progress`` the library uses (``add_task``, ``update``,
``remove_task``, ``console``), so the runner and the data pipeline never ask where they print.
"""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass

from rich.console import Console

LINE_SECONDS = 10.0  # a plain progress line per task at most this often


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def bars(console: Console):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


@dataclass
class _Line:
    description: str
    total: float | None
    completed: float = 0.0
    printed: float = 0.0


class PlainProgress:
    """Progress as lines (``[  12s] lora on cifar: loss 0.71 ... 3/100``), at most one per task every
    ``LINE_SECONDS`` seconds, plus one when a task completes: for logs, SLURM and CI."""

    def __init__(self, console: Console | None = None, every: float = LINE_SECONDS):
        self.console = console or stderr_console()
        self.every = every
        self.tasks: dict[int, _Line] = {}
        self.keys = itertools.count()  # never reused, whatever order tasks are removed in
        self.origin = time.monotonic()

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **_) -> int:
        key = next(self.keys)
        self.tasks[key] = _Line(description, total, printed=time.monotonic())
        return key

    def update(self, key: int, *, advance: float = 0, completed: float | None = None, description: str | None = None,
               total: float | None = None, **_) -> None:  # fmt: skip
        line = self.tasks.get(key)
        if line is None:
            return
        line.completed = completed if completed is not None else line.completed + advance
        line.description = description or line.description
        line.total = total if total is not None else line.total
        now = time.monotonic()
        done = line.total is not None and line.completed >= line.total
        if done or now - line.printed >= self.every:
            self._print(line)
            line.printed = now

    def remove_task(self, key: int) -> None:
        self.tasks.pop(key, None)

    def _print(self, line: _Line) -> None:
        count = f" {line.completed:.0f}/{line.total:.0f}" if line.total else ""
        elapsed = time.monotonic() - self.origin
        self.console.print(f"[{elapsed:6.0f}s] {line.description}{count}", markup=False)


def progress_for(console: Console | None = None):
    """Rich bars when stderr is a terminal, plain lines otherwise."""
    console = console or stderr_console()
    return bars(console) if console.is_terminal and sys.stderr.isatty() else PlainProgress(console)
