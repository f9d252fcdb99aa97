"""Records -> pandas -> tables (Markdown, CSV) and plots (PNG), side by side with the paper.

Cells are the mean over seeds (± std when there are several). A group mean exists only where every
task of the group has a result, an average only where every group (or task) does: missing cells
are shown as missing, never filled in. The paper's numbers are the best of ten test-set
evaluations (its protocol); ours are labelled with the protocol that produced them.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import pandas as pd

from .errors import UserError
from .records import RunRecord
from .registry import METHODS, SUITES, TASKS

MISSING = "–"
MEAN_OF_GROUPS = "mean of groups"
MEAN_OF_TASKS = "mean of tasks"
# Method names in the paper's Table 1 -> registered names.
PAPER_METHODS = {
    "Full": "full", "Linear": "linear", "VPT": "vpt_deep", "Adapter": "adapter", "AdaptFormer": "adaptformer",
    "LoRA": "lora", "NOAH": "noah", "Convpass_attn": "convpass_attn", "Convpass": "convpass",
}  # fmt: skip
RUN_COLUMNS = [
    "method", "task", "backbone", "seed", "protocol", "top1", "trainable_params", "trainable_params_with_head",
    "checkpoint_bytes", "peak_memory_bytes", "train_images_per_s", "eval_images_per_s", "wall_seconds", "suite",
    "group", "eval_split", "pretrained", "run_id",
]  # fmt: skip


def runs_frame(records: list[RunRecord]) -> pd.DataFrame:
    """One row per run (top1 in percent)."""
    rows = [
        {
            "method": r.method, "task": r.task, "backbone": r.backbone, "seed": r.seed, "protocol": r.protocol,
            "top1": r.metrics["top1"], "trainable_params": r.cost["trainable_params"],
            "trainable_params_with_head": r.cost["trainable_params_with_head"],
            "checkpoint_bytes": r.cost["checkpoint_bytes"], "peak_memory_bytes": r.cost["peak_memory_bytes"],
            "train_images_per_s": r.cost["train_images_per_s"], "eval_images_per_s": r.cost["eval_images_per_s"],
            "wall_seconds": r.cost["seconds"]["total"], "suite": r.suite, "group": r.group or "",
            "eval_split": r.metrics["eval_split"], "pretrained": r.pretrained, "run_id": r.run_id,
        }
        for r in records
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def method_order(methods) -> list[str]:
    registered = METHODS.names()
    return sorted(set(methods), key=lambda m: (registered.index(m) if m in registered else len(registered), m))


@dataclass
class Layout:
    """The columns of one accuracy table: tasks in order, and their groups."""

    tasks: list[str]
    groups: dict[str, list[str]]  # group -> its tasks (empty when the tasks have no groups)


def layout_for(suite: str, present: list[str]) -> Layout:
    if suite in SUITES:
        definition = SUITES.get(suite)
        tasks = list(definition.tasks) or [name for name, task in TASKS.items() if task.suite == suite]
        tasks += [t for t in present if t not in tasks]
    else:
        tasks = sorted(set(present))
    groups: dict[str, list[str]] = {}
    for name in tasks:
        group = TASKS.get(name).group if name in TASKS else ""
        if group:
            groups.setdefault(group, []).append(name)
    return Layout(tasks, groups if len(groups) > 1 else {})


def _aggregates(values: dict[str, float], layout: Layout) -> dict[str, float]:
    """Group means and averages of one seed's per-task accuracies; incomplete ones are left out."""
    out = {}
    for group, tasks in layout.groups.items():
        if all(t in values for t in tasks):
            out[group] = sum(values[t] for t in tasks) / len(tasks)
    if layout.groups and all(g in out for g in layout.groups):
        out[MEAN_OF_GROUPS] = sum(out[g] for g in layout.groups) / len(layout.groups)
    if all(t in values for t in layout.tasks):
        out[MEAN_OF_TASKS] = sum(values[t] for t in layout.tasks) / len(layout.tasks)
    return out


def _stats(values: list[float]) -> tuple[float, float, int]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std, len(values)


def aggregate_columns(layout: Layout) -> list[str]:
    columns = list(layout.groups)
    if layout.groups:
        columns.append(MEAN_OF_GROUPS)
    return columns + [MEAN_OF_TASKS]


def accuracy_cells(frame: pd.DataFrame, layout: Layout) -> dict[str, dict[str, tuple[float, float, int]]]:
    """method -> column -> (mean, std, n) over seeds; columns are tasks, group means and averages."""
    cells: dict[str, dict[str, tuple[float, float, int]]] = {}
    for method in method_order(frame["method"]):
        runs = frame[frame["method"] == method]
        row: dict[str, list[float]] = {}
        for task, values in runs.groupby("task")["top1"]:
            row[task] = list(values)
        for _, seed_runs in runs.groupby("seed"):
            for column, value in _aggregates(dict(zip(seed_runs["task"], seed_runs["top1"])), layout).items():
                row.setdefault(column, []).append(value)
        cells[method] = {column: _stats(values) for column, values in row.items()}
    return cells


def paper_rows(layout: Layout) -> dict[str, dict[str, tuple[float, float, int]]]:
    """The paper's Table 1, where it has the cell (VTAB-1K only)."""
    table = pd.read_csv(files("petl_bench.reference") / "paper_vtab1k.csv")
    rows = {}
    for _, line in table.iterrows():
        method = PAPER_METHODS.get(line["method"], line["method"])
        row = {t: (float(line[t]), 0.0, 1) for t in layout.tasks if t in line and not pd.isna(line[t])}
        for group in layout.groups:
            if group in line:
                row[group] = (float(line[group]), 0.0, 1)
        if layout.groups:
            row[MEAN_OF_GROUPS] = (float(line["average"]), 0.0, 1)
        row[MEAN_OF_TASKS] = (float(line["mean_of_19_tasks_computed"]), 0.0, 1)
        row["params"] = float(line["params_M"]) * 1e6
        rows[method] = row
    return rows


def format_cell(cell: tuple[float, float, int] | None) -> str:
    if cell is None:
        return MISSING
    mean, std, n = cell
    return f"{mean:.1f} ± {std:.1f}" if n > 1 else f"{mean:.1f}"


def format_params(count: float | None) -> str:
    return MISSING if count is None or pd.isna(count) else f"{count / 1e6:.3f}M"


@dataclass
class AccuracyTable:
    """One per-task table: a suite on a backbone under a protocol."""

    suite: str
    backbone: str
    protocol: str
    layout: Layout
    ours: dict[str, dict[str, tuple[float, float, int]]]
    params: dict[str, float]
    paper: dict[str, dict[str, tuple[float, float, int]]]

    @property
    def slug(self) -> str:
        return f"{self.suite}__{self.backbone.replace(':', '-').replace('/', '-')}__{self.protocol}"

    @property
    def title(self) -> str:
        return f"{self.suite} on {self.backbone}, protocol '{self.protocol}'"

    def columns(self) -> list[str]:
        return self.layout.tasks + aggregate_columns(self.layout)

    def display_rows(self) -> list[dict[str, str]]:
        rows = []
        for method, cells in self.ours.items():
            rows.append({"method": method, "params": format_params(self.params.get(method)),
                         **{c: format_cell(cells.get(c)) for c in self.columns()}})  # fmt: skip
            if method in self.paper:
                paper = self.paper[method]
                rows.append({"method": f"{method} (paper)", "params": format_params(paper.get("params")),
                             **{c: format_cell(paper.get(c)) for c in self.columns()}})  # fmt: skip
        return rows

    def markdown(self) -> str:
        rows = self.display_rows()
        header = ["method", "params"] + self.columns()
        lines = [f"### {self.title}", ""]
        if self.paper:
            lines += ["Rows marked (paper) are the Convpass paper's Table 1: best of ten test-set evaluations, seed 42, one run.", ""]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row[c] for c in header) + " |" for row in rows]
        return "\n".join(lines) + "\n"

    def long_rows(self) -> list[dict]:
        out = []
        for source, table in (("ours", self.ours), ("paper", self.paper)):
            for method, cells in table.items():
                if source == "paper" and method not in self.ours:
                    continue
                for column in self.columns():
                    if column in cells:
                        mean, std, n = cells[column]
                        out.append({"suite": self.suite, "backbone": self.backbone, "protocol": self.protocol,
                                    "method": method, "source": source, "column": column,
                                    "mean": round(mean, 4), "std": round(std, 4), "n": n})  # fmt: skip
        return out


def accuracy_tables(frame: pd.DataFrame) -> list[AccuracyTable]:
    tables = []
    for (suite, backbone, protocol), runs in frame.groupby(["suite", "backbone", "protocol"], sort=True):
        layout = layout_for(suite, list(runs["task"].unique()))
        ours = accuracy_cells(runs, layout)
        params = runs.groupby("method")["trainable_params"].mean().to_dict()
        paper = paper_rows(layout) if suite == "vtab" else {}
        tables.append(AccuracyTable(suite, backbone, protocol, layout, ours, params, paper))
    return tables


def cost_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Per suite, backbone and method: parameters, checkpoint size, memory, throughput, wall time."""
    grouped = frame.groupby(["suite", "backbone", "method"], sort=False).agg(
        runs=("run_id", "count"),
        trainable_params=("trainable_params", "mean"),
        trainable_params_with_head=("trainable_params_with_head", "mean"),
        checkpoint_mb=("checkpoint_bytes", lambda v: v.mean() / 1e6),
        peak_memory_mb=("peak_memory_bytes", lambda v: v.max() / 2**20),
        train_images_per_s=("train_images_per_s", "mean"),
        eval_images_per_s=("eval_images_per_s", "mean"),
        wall_seconds_per_run=("wall_seconds", "mean"),
    )
    grouped = grouped.reset_index()
    order = {m: i for i, m in enumerate(method_order(grouped["method"]))}
    return grouped.sort_values(["suite", "backbone", "method"], key=lambda s: s.map(order) if s.name == "method" else s)


def frame_markdown(frame: pd.DataFrame) -> str:
    header = list(frame.columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in frame.iterrows():
        cells = [f"{v:,.1f}" if isinstance(v, float) else (f"{v:,}" if isinstance(v, int) else str(v)) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def overall(cells: dict[str, tuple[float, float, int]], layout: Layout) -> tuple[str, tuple[float, float, int]] | None:
    """The headline number of a row: the mean of group means, else the mean of tasks."""
    for column in (MEAN_OF_GROUPS, MEAN_OF_TASKS):
        if column in cells and (column != MEAN_OF_GROUPS or layout.groups):
            return column, cells[column]
    return None


def plot_accuracy_vs_params(table: AccuracyTable, path: Path) -> Path | None:
    """The paper's Figure 1 style: average accuracy vs trainable parameters (symmetric log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(m, table.params.get(m), overall(cells, table.layout)) for m, cells in table.ours.items()]
    points = [(m, p, o) for m, p, o in points if o is not None and p is not None]
    if not points:
        return None
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for method, params, (column, (mean, std, _)) in points:
        axis.errorbar(params, mean, yerr=std or None, fmt="o", capsize=3)
        axis.annotate(method, (params, mean), textcoords="offset points", xytext=(5, 4), fontsize=8)
        if method in table.paper and column in table.paper[method]:
            paper_mean = table.paper[method][column][0]
            axis.scatter([table.paper[method]["params"]], [paper_mean], facecolors="none", edgecolors="grey")
    axis.set_xscale("symlog", linthresh=1e4)
    axis.set_xlabel("trainable parameters (classifier excluded; symlog)")
    axis.set_ylabel(f"top-1 (%), {points[0][2][0]}")
    axis.set_title(table.title + ("\nhollow: paper (best-of-10 test evaluations)" if table.paper else ""), fontsize=9)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_group_bars(table: AccuracyTable, path: Path) -> Path | None:
    """Per-group mean accuracy, one bar per method (missing groups are left empty)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = aggregate_columns(table.layout)
    methods = list(table.ours)
    if not methods:
        return None
    figure, axis = plt.subplots(figsize=(max(6.0, 1.2 * len(columns) * max(1, len(methods)) / 3), 4.2))
    width = 0.8 / len(methods)
    for index, method in enumerate(methods):
        cells = table.ours[method]
        xs = [i + index * width for i, c in enumerate(columns) if c in cells]
        ys = [cells[c][0] for c in columns if c in cells]
        errors = [cells[c][1] for c in columns if c in cells]
        axis.bar(xs, ys, width, yerr=errors if any(errors) else None, label=method, capsize=2)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(columns))], columns, fontsize=8)
    axis.set_ylabel("top-1 (%)")
    axis.set_title(table.title, fontsize=9)
    axis.legend(fontsize=7, ncols=2)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_report(records: list[RunRecord], out: Path, formats: tuple[str, ...] = ("md", "csv")) -> list[Path]:
    """Write tables, plots and runs.csv for ``records`` into ``out``; returns the files written."""
    unknown = set(formats) - {"md", "csv"}
    if unknown:
        raise UserError(f"unknown report format {', '.join(sorted(unknown))}; choose from: md, csv")
    if not records:
        raise UserError("no finished runs found; run 'petl-bench run' first")
    out.mkdir(parents=True, exist_ok=True)
    frame = runs_frame(records)
    tables = accuracy_tables(frame)
    costs = cost_frame(frame)
    written: list[Path] = []

    def write(name: str, text: str) -> None:
        (out / name).write_text(text)
        written.append(out / name)

    frame.to_csv(out / "runs.csv", index=False)
    written.append(out / "runs.csv")
    if "md" in formats:
        parts = ["# petl-bench report", "", f"{len(frame)} runs.", "", "## Accuracy (top-1 %)", ""]
        parts += [table.markdown() for table in tables]
        parts += ["## Cost", "", frame_markdown(costs)]
        parts += ["## Plots", ""] + [f"![{t.title}](accuracy_vs_params__{t.slug}.png)" for t in tables]
        write("report.md", "\n".join(parts) + "\n")
    if "csv" in formats:
        buffer = io.StringIO()
        long = [row for table in tables for row in table.long_rows()]
        writer = csv.DictWriter(buffer, ["suite", "backbone", "protocol", "method", "source", "column", "mean", "std", "n"])
        writer.writeheader()
        writer.writerows(long)
        write("accuracy.csv", buffer.getvalue())
        write("cost.csv", costs.to_csv(index=False))
    for table in tables:
        for plot, name in ((plot_accuracy_vs_params, "accuracy_vs_params"), (plot_group_bars, "groups")):
            path = plot(table, out / f"{name}__{table.slug}.png")
            if path:
                written.append(path)
    return written
