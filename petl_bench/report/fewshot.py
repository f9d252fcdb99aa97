"""Few-shot tables (methods x shots per dataset, and the average over the datasets) and the
paper's Figure 5 style plot: accuracy vs shots, mean over split seeds with a ± std band."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import pandas as pd

from ..registry import TASKS
from .table import PAPER_METHODS, Stat, Table, row_order, slug, stats, with_paper

AVERAGE = "average"
PAPER_AVERAGE = "Average of 5 datasets"


def _shot_column(shots: int) -> str:
    return f"{shots}-shot"


def _paper(dataset: str, layout) -> dict[str, dict[str, Stat]]:
    if not layout.paper:
        return {}
    name = PAPER_AVERAGE if dataset == AVERAGE else dict(layout.paper_names).get(dataset)
    table = pd.read_csv(files("petl_bench.reference") / layout.paper)
    rows: dict[str, dict[str, Stat]] = {}
    for _, line in table[table["dataset"] == name].iterrows():
        method = PAPER_METHODS.get(line["method"], line["method"])
        rows.setdefault(method, {})[_shot_column(int(line["shots"]))] = (float(line["accuracy"]), 0.0, 1)
    return rows


def fewshot_tables(frame: pd.DataFrame, suite: str, layout) -> list[Table]:
    """Per backbone and protocol: one table per dataset, then the average over all the suite's datasets."""
    tables = []
    datasets_all = [name for name, task in TASKS.items() if task.suite == suite]
    for (backbone, protocol), runs in frame.groupby(["backbone", "protocol"], sort=True):
        shots = sorted(int(s) for s in runs["shots"].unique())
        columns = [_shot_column(s) for s in shots]
        per_dataset: dict[str, dict[str, dict[str, Stat]]] = {}
        rows = row_order(runs)
        methods = dict(rows)
        average: dict[str, dict[str, list[float]]] = {label: {} for label, _ in rows}
        for dataset in [d for d in datasets_all if d in set(runs["task"])]:
            cells: dict[str, dict[str, Stat]] = {}
            for label, _ in rows:
                chosen = runs[(runs["task"] == dataset) & (runs["row"] == label)]
                cells[label] = {_shot_column(int(k)): stats(list(v)) for k, v in chosen.groupby("shots")["top1"]}
            per_dataset[dataset] = cells
        for label, _ in rows:
            for (shot, _, _), group in runs[runs["row"] == label].groupby(["shots", "split_seed", "seed"]):
                if set(group["task"]) >= set(datasets_all):  # the average needs every dataset
                    value = group.groupby("task")["top1"].mean().mean()
                    average[label].setdefault(_shot_column(int(shot)), []).append(value)
        params = runs.groupby("row")["trainable_params"].mean().to_dict()
        sections = [
            *per_dataset.items(),
            (AVERAGE, {m: {c: stats(v) for c, v in s.items()} for m, s in average.items()}),
        ]
        for dataset, cells in sections:
            display = (
                TASKS.get(dataset).description if dataset in TASKS else f"average of the {len(datasets_all)} datasets"
            )
            tables.append(
                Table(
                    title=f"{layout.title or suite} {display} on {backbone}, protocol '{protocol}'",
                    slug=slug(suite, dataset, backbone, protocol),
                    columns=columns,
                    rows=with_paper(cells, _paper(dataset, layout), params, {}, methods=methods),
                    key={"suite": suite, "dataset": dataset, "backbone": backbone, "protocol": protocol},
                    note="Mean ± std over split seeds (and seeds). (paper): read off the paper's Figure 5 (about ±0.02).",
                )
            )
    return tables


def plot_fewshot(tables: list[Table], path: Path) -> Path | None:
    """One panel per dataset: top-1 vs shots, a line and ± std band per method, the paper dashed."""
    from .plots import _pyplot, plain

    plt = _pyplot()
    tables = [t for t in tables if any(row.cells for row in t.rows if row.source == "ours")]
    if not tables:
        return None
    columns = max(1, min(3, len(tables)))
    rows = -(-len(tables) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    colors = {}
    for axis, table in zip(axes.flat, tables):
        for row in table.rows:
            points = [(int(c.split("-")[0]), row.cells[c]) for c in table.columns if c in row.cells]
            if not points:
                continue
            xs = [x for x, _ in points]
            means = [cell[0] for _, cell in points]
            color = colors.setdefault(row.label if row.source == "ours" else row.method, f"C{len(colors) % 10}")
            if row.source == "paper":
                axis.plot(xs, means, "--", color=color, alpha=0.6, linewidth=1)
                continue
            stds = [cell[1] for _, cell in points]
            axis.plot(xs, means, "o-", color=color, label=plain(row.label))
            axis.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                              color=color, alpha=0.2)  # fmt: skip
        axis.set_xscale("log", base=2)
        axis.set_title(plain(table.title.split(" on ")[0]), fontsize=9)
        axis.set_xlabel("shots per class")
        axis.set_ylabel("top-1 (%)")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(tables) :]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7)
    figure.suptitle("few-shot accuracy (dashed: the paper's Figure 5)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
