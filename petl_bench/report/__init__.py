"""Records -> pandas -> tables (Markdown, CSV) and plots (PNG), side by side with the paper.

Cells are the mean over seeds (± std when there are several). Missing cells are shown as missing,
never filled in. The paper's numbers are the best of ten test-set evaluations (its protocol); ours
are labelled with the protocol that produced them.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import pandas as pd

from ..errors import UserError
from ..records import RunRecord
from ..registry import SUITES
from ..task import ReportLayout
from .accuracy import MEAN_OF_GROUPS, MEAN_OF_TASKS, backbone_table, task_tables
from .dg import dg_tables
from .fewshot import fewshot_tables, plot_fewshot
from .plots import plot_accuracy_vs_cost, plot_accuracy_vs_params, plot_bars
from .significance import inflation_markdown, statistics_markdown
from .table import (
    INTERNAL,
    MISSING,
    Table,
    csv_safe,
    csv_safe_frame,
    escape_markdown,
    markdown_table,
    method_order,
    runs_frame,
)
from .tuned import tuned_markdown

__all__ = ["MEAN_OF_GROUPS", "MEAN_OF_TASKS", "Table", "all_tables", "cost_frame", "runs_frame", "write_report"]
TABLES = {"tasks": task_tables, "shots": fewshot_tables, "targets": dg_tables}  # by ReportLayout.kind


def report_layout(suite: str) -> ReportLayout:
    """How a suite declares its report (a suite that is not registered, e.g. task folders: a column per task)."""
    return SUITES.get(suite).report if suite in SUITES else ReportLayout()


def all_tables(frame: pd.DataFrame, kinds: tuple[str, ...] = tuple(TABLES), backbones: bool = True) -> list[Table]:
    """Every suite's tables, in suite order, as each suite's :class:`ReportLayout` declares them (those of
    ``kinds``); then, with ``backbones``, the per-backbone tables of the suites that declare one."""
    tables, by_backbone = [], []
    for suite, runs in frame.groupby("suite", sort=True):
        layout = report_layout(suite)
        if layout.kind not in kinds:
            continue
        tables += TABLES[layout.kind](runs, suite, layout)
        if backbones and layout.backbone_paper:
            by_backbone += [t for t in [backbone_table(runs, suite, layout)] if t]
    return tables + by_backbone


def accuracy_tables(frame: pd.DataFrame) -> list[Table]:
    """The tables of the suites laid out by task (a column per task, group means, averages)."""
    return all_tables(frame, ("tasks",), backbones=False)


def count_range(values: pd.Series) -> str:
    """A parameter count as an integer, or its range over tasks when it differs (per-task defaults)."""
    low, high = int(values.min()), int(values.max())
    return f"{low:,}" if low == high else f"{low:,}–{high:,}"


def speed_measures(cached: pd.Series) -> str:
    if cached.all():
        return "classifier on cached features (linear probing)"
    return "full model" if not cached.any() else "mixed"


def distinct(values: pd.Series) -> str:
    """The different values of a column, sorted and comma-separated ("" when there are none)."""
    return ", ".join(sorted({str(v) for v in values.dropna()}))


def table_runs(frame: pd.DataFrame, key: dict[str, str]) -> pd.DataFrame:
    """The runs a table covers: those matching its key (suite, backbone, protocol, ...)."""
    runs = frame
    for column, value in key.items():
        if column in runs:
            runs = runs[runs[column] == value]
    return runs


def cost_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Per suite, backbone and method: parameters, checkpoint size, memory, throughput, wall time."""
    grouped = (
        frame.groupby(["suite", "backbone", "method", "row"], sort=False)
        .agg(
            runs=("run_id", "count"),
            trainable_params=("trainable_params", count_range),
            trainable_params_with_head=("trainable_params_with_head", count_range),
            checkpoint_kb=("checkpoint_bytes", lambda v: v.mean() / 1e3),
            peak_memory_mb=("peak_memory_bytes", lambda v: v.max() / 2**20),
            peak_memory_kind=("peak_memory_kind", distinct),
            train_images_per_s=("train_images_per_s", "mean"),
            eval_images_per_s=("eval_images_per_s", "mean"),
            speeds_measure=("cached_features", speed_measures),
            inference_images_per_s=("inference_images_per_s", "mean"),
            merged_inference_images_per_s=("merged_inference_images_per_s", "mean"),
            wall_seconds_per_run=("wall_seconds", "mean"),
        )
        .reset_index()
    )
    order = {m: i for i, m in enumerate(method_order(grouped["method"]))}
    grouped = grouped.sort_values(
        ["suite", "backbone", "method", "row"], key=lambda s: s.map(order) if s.name == "method" else s
    )
    return grouped.drop(columns="method").rename(columns={"row": "method"})


def method_costs(frame: pd.DataFrame, key: dict[str, str]) -> dict[str, dict]:
    """Mean cost per method over the runs a table covers, with what the measures are."""
    grouped = (
        table_runs(frame, key)
        .groupby("row")
        .agg(
            trainable_params=("trainable_params", "mean"),
            peak_memory_mb=("peak_memory_bytes", lambda v: v.mean() / 2**20),
            peak_memory_kind=("peak_memory_kind", distinct),
            train_images_per_s=("train_images_per_s", "mean"),
            cached_features=("cached_features", "any"),
        )
    )
    return grouped.to_dict(orient="index")


def _values(runs: pd.DataFrame, column: str) -> str:
    return distinct(runs[column]) or "?"


def settings_note(frame: pd.DataFrame, key: dict[str, str]) -> str:
    """What a table's runs were trained with: recipe, seeds, input size, weights and their notes."""
    runs = table_runs(frame, key)
    if runs.empty:
        return ""
    notes = _values(runs, "weights_notes") if runs["weights_notes"].astype(bool).any() else ""
    return (
        f"Settings: protocol {_values(runs, 'protocol')}; epochs {_values(runs, 'epochs')}; lr {_values(runs, 'lr')}; "
        f"batch {_values(runs, 'batch_size')}; input {_values(runs, 'image_size')} px; seeds {_values(runs, 'seed')}; "
        f"weights {_values(runs, 'pretrained')}" + (f" ({notes})" if notes else "") + "."
    )


COLUMNS_LEGEND = (
    "Cells are top-1 accuracy (%) on the evaluation split, the mean over seeds (± the sample standard "
    "deviation when there are several); `–` is a run that does not exist. `params` counts the trainable "
    "parameters without the classifier. Group columns average the group's tasks; `mean of groups` "
    "averages the group means (the Convpass paper's average), `mean of tasks` the tasks. Rows marked "
    "`(paper)` are published numbers, printed beside ours."
)
COST_LEGEND = (
    "`trainable_params`: without / with the classifier (a range when per-task settings differ). "
    "`peak_memory_mb`: see `peak_memory_kind` (a CPU's process peak RSS grows over a sweep and compares "
    "poorly across methods). Speeds are images/s; `speeds_measure` says what ran: the full model, or "
    "only the classifier on cached features (linear probing, not comparable with the others). "
    "`inference_images_per_s`: the full model in eval mode as trained, and `merged_...` folded into the "
    "backbone (methods that merge; same images, batch and device)."
)


def cell_text(value) -> str:
    """A cost-table cell: numbers with thousands separators, a missing value (NaN) as the tables' dash."""
    if isinstance(value, float):
        return MISSING if math.isnan(value) else f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def frame_markdown(frame: pd.DataFrame) -> str:
    return markdown_table(list(frame.columns), [[cell_text(v) for v in row] for _, row in frame.iterrows()])


def write_report(records: list[RunRecord], out: Path, formats: tuple[str, ...] = ("md", "csv")) -> list[Path]:
    """Write tables, plots and runs.csv for ``records`` into ``out``; returns the files written."""
    unknown = set(formats) - {"md", "csv"}
    if unknown:
        raise UserError(f"unknown report format {', '.join(sorted(unknown))}; choose from: md, csv")
    if not records:
        raise UserError("no finished runs found; run 'petl-bench run' first")
    out.mkdir(parents=True, exist_ok=True)
    frame = runs_frame(records)
    tables, costs = all_tables(frame), cost_frame(frame)
    csv_safe_frame(frame.drop(columns=INTERNAL)).to_csv(out / "runs.csv", index=False)
    plots = write_plots(frame, tables, out)
    statistics, statistics_plots = statistics_markdown(frame, tables, out)
    plots += statistics_plots
    written = [out / "runs.csv", *plots]
    if "md" in formats:
        (out / "report.md").write_text(report_markdown(frame, tables, costs, records, plots, statistics))
        written.append(out / "report.md")
    if "csv" in formats:
        (out / "accuracy.csv").write_text(accuracy_csv(tables))
        (out / "cost.csv").write_text(csv_safe_frame(costs).to_csv(index=False))
        written += [out / "accuracy.csv", out / "cost.csv"]
    return written


def write_plots(frame: pd.DataFrame, tables: list[Table], out: Path) -> list[Path]:
    """Per table: accuracy vs parameters, the summary bars and (with a headline) accuracy vs cost; per
    suite laid out by shots: one figure of accuracy vs shots."""
    plots = []
    for table in tables:
        plots += [plot_accuracy_vs_params(table, out / f"accuracy_vs_params__{table.slug}.png")]
        plots += [plot_bars(table, out / f"groups__{table.slug}.png")]
        if table.headline:
            per_method = method_costs(frame, table.key)
            plots += [plot_accuracy_vs_cost(table, per_method, out / f"accuracy_vs_cost__{table.slug}.png")]
    shots = [t for t in tables if "dataset" in t.key]  # the per-dataset tables of a `shots` layout
    for key in sorted({(t.key["suite"], t.key["backbone"], t.key["protocol"]) for t in shots}):
        panels = [t for t in shots if (t.key["suite"], t.key["backbone"], t.key["protocol"]) == key]
        plots.append(plot_fewshot(panels, out / f"{key[0]}__{panels[0].slug.split('__', 2)[2]}.png"))
    return [path for path in plots if path]


def report_markdown(frame, tables: list[Table], costs, records: list[RunRecord], plots, statistics: str = "") -> str:
    parts = ["# petl-bench report", "", f"{len(frame)} runs.", "", "## Accuracy (top-1 %)", "", COLUMNS_LEGEND, ""]
    for table in tables:
        parts += [table.markdown(), escape_markdown(settings_note(frame, table.key)), ""]
    tuned, inflation = tuned_markdown(records), inflation_markdown(frame)
    parts += [part for part in (statistics, inflation, tuned) if part]
    parts += ["## Cost", "", COST_LEGEND, "", frame_markdown(costs), "## Plots", ""]
    parts += [f"![{path.stem}]({path.name})" for path in plots]
    return "\n".join(parts) + "\n"


ACCURACY_COLUMNS = ["suite", "dataset", "backbone", "protocol", "class_mask", "table", "method", "source", "column",
                    "mean", "std", "n", "lower", "upper", "t_lower", "t_upper"]  # fmt: skip


def accuracy_csv(tables: list[Table]) -> str:
    """Every cell of every table as one row (long format)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, ACCURACY_COLUMNS, restval="")
    writer.writeheader()
    writer.writerows(
        {key: csv_safe(value) for key, value in row.items()} for table in tables for row in table.long_rows()
    )
    return buffer.getvalue()
