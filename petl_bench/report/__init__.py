"""Records -> pandas -> tables (Markdown, CSV) and plots (PNG), side by side with the paper.

Cells are the mean over seeds (± std when there are several). Missing cells are shown as missing,
never filled in. The paper's numbers are the best of ten test-set evaluations (its protocol); ours
are labelled with the protocol that produced them.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pandas as pd

from ..errors import UserError
from ..records import RunRecord
from .accuracy import MEAN_OF_GROUPS, MEAN_OF_TASKS, accuracy_tables, backbone_table
from .dg import dg_tables
from .fewshot import fewshot_tables, plot_fewshot
from .plots import plot_accuracy_vs_cost, plot_accuracy_vs_params, plot_bars
from .table import Table, csv_safe, csv_safe_frame, markdown_table, method_order, runs_frame

FAMILIES = ("fewshot", "dg")  # suites with their own tables

__all__ = ["MEAN_OF_GROUPS", "MEAN_OF_TASKS", "Table", "all_tables", "cost_frame", "runs_frame", "write_report"]


def all_tables(frame: pd.DataFrame) -> list[Table]:
    tables = accuracy_tables(frame[~frame["suite"].isin(FAMILIES)])
    backbones = backbone_table(frame)
    return tables + ([backbones] if backbones else []) + fewshot_tables(frame) + dg_tables(frame)


def cost_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Per suite, backbone and method: parameters, checkpoint size, memory, throughput, wall time."""
    grouped = (
        frame.groupby(["suite", "backbone", "method"], sort=False)
        .agg(
            runs=("run_id", "count"),
            trainable_params=("trainable_params", "mean"),
            trainable_params_with_head=("trainable_params_with_head", "mean"),
            checkpoint_mb=("checkpoint_bytes", lambda v: v.mean() / 1e6),
            peak_memory_mb=("peak_memory_bytes", lambda v: v.max() / 2**20),
            train_images_per_s=("train_images_per_s", "mean"),
            eval_images_per_s=("eval_images_per_s", "mean"),
            wall_seconds_per_run=("wall_seconds", "mean"),
        )
        .reset_index()
    )
    order = {m: i for i, m in enumerate(method_order(grouped["method"]))}
    return grouped.sort_values(["suite", "backbone", "method"], key=lambda s: s.map(order) if s.name == "method" else s)


def method_costs(frame: pd.DataFrame, key: dict[str, str]) -> dict[str, dict[str, float]]:
    """Mean cost per method over the runs a table covers."""
    runs = frame
    for column, value in key.items():
        runs = runs[runs[column] == value]
    grouped = runs.groupby("method").agg(
        trainable_params=("trainable_params", "mean"),
        peak_memory_mb=("peak_memory_bytes", lambda v: v.mean() / 2**20),
        train_images_per_s=("train_images_per_s", "mean"),
    )
    return grouped.to_dict(orient="index")


def frame_markdown(frame: pd.DataFrame) -> str:
    rows = [
        [f"{v:,.1f}" if isinstance(v, float) else (f"{v:,}" if isinstance(v, int) else str(v)) for v in row]
        for _, row in frame.iterrows()
    ]
    return markdown_table(list(frame.columns), rows)


def write_report(records: list[RunRecord], out: Path, formats: tuple[str, ...] = ("md", "csv")) -> list[Path]:
    """Write tables, plots and runs.csv for ``records`` into ``out``; returns the files written."""
    unknown = set(formats) - {"md", "csv"}
    if unknown:
        raise UserError(f"unknown report format {', '.join(sorted(unknown))}; choose from: md, csv")
    if not records:
        raise UserError("no finished runs found; run 'petl-bench run' first")
    out.mkdir(parents=True, exist_ok=True)
    frame = runs_frame(records)
    tables = all_tables(frame)
    costs = cost_frame(frame)
    written: list[Path] = []

    def write(name: str, text: str) -> None:
        (out / name).write_text(text)
        written.append(out / name)

    csv_safe_frame(frame).to_csv(out / "runs.csv", index=False)
    written.append(out / "runs.csv")
    plots = []
    for table in tables:
        plots += [plot_accuracy_vs_params(table, out / f"accuracy_vs_params__{table.slug}.png")]
        plots += [plot_bars(table, out / f"groups__{table.slug}.png")]
        if table.headline:
            per_method = method_costs(frame, table.key)
            plots += [plot_accuracy_vs_cost(table, per_method, out / f"accuracy_vs_cost__{table.slug}.png")]
    fewshot = [t for t in tables if t.key.get("suite") == "fewshot"]
    for backbone, protocol in {(t.key["backbone"], t.key["protocol"]) for t in fewshot}:
        panels = [t for t in fewshot if (t.key["backbone"], t.key["protocol"]) == (backbone, protocol)]
        plots.append(plot_fewshot(panels, out / f"fewshot__{panels[0].slug.split('__', 2)[2]}.png"))
    written += [path for path in plots if path]
    if "md" in formats:
        parts = ["# petl-bench report", "", f"{len(frame)} runs.", "", "## Accuracy (top-1 %)", ""]
        parts += [table.markdown() for table in tables]
        parts += ["## Cost", "", frame_markdown(costs), "## Plots", ""]
        parts += [f"![{path.stem}]({path.name})" for path in plots if path]
        write("report.md", "\n".join(parts) + "\n")
    if "csv" in formats:
        buffer = io.StringIO()
        long = [row for table in tables for row in table.long_rows()]
        columns = [
            "suite",
            "dataset",
            "backbone",
            "protocol",
            "class_mask",
            "table",
            "method",
            "source",
            "column",
            "mean",
            "std",
            "n",
        ]
        writer = csv.DictWriter(buffer, columns, restval="")
        writer.writeheader()
        writer.writerows({key: csv_safe(value) for key, value in row.items()} for row in long)
        write("accuracy.csv", buffer.getvalue())
        write("cost.csv", csv_safe_frame(costs).to_csv(index=False))
    return written
