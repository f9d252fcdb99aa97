"""What the CLI commands print through: one stdout console and tables as rich, CSV or Markdown."""

from __future__ import annotations

import csv
import io
import sys

from rich.console import Console
from rich.table import Table

from .errors import UserError

console = Console(width=None if sys.stdout.isatty() else 160)


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
    elif fmt == "md" or not console.is_terminal:  # a file or pipe gets Markdown, not a table squeezed to 80 columns
        from .report.table import markdown_table

        heading = f"{title}\n\n" if fmt != "md" and title else ""
        sys.stdout.write(heading + markdown_table(columns, [[str(row[c]) for c in columns] for row in rows]) + "\n")
    else:
        table = Table(title=title)
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*(f"{v:,}" if isinstance(v, int) else str(v) for v in row.values()))
        console.print(table)
