"""Per-task accuracy tables (VTAB-1K, the demo, your own tasks) and the backbone comparison.

A group mean exists only where every task of the group has a result, an average only where every
group (or task) does; aggregates are computed per seed, then reported as mean ± std over seeds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.resources import files

import numpy as np
import pandas as pd

from ..errors import warn_once
from ..registry import METHODS, SUITES, TASKS
from .stats import accuracy_replicates, percentile_interval
from .stats import rng as stats_rng
from .table import PAPER_METHODS, Row, Stat, Table, escape_markdown, row_order, slug, stats, with_paper

log = logging.getLogger(__name__)

MEAN_OF_GROUPS = "mean of groups"
MEAN_OF_TASKS = "mean of tasks"
PAPER_NOTE = "Rows marked (paper) are the Convpass paper's numbers: best of ten test-set evaluations, seed 42, one run."
PUBLISHED_NOTE = (
    "Rows marked (published: ...) are other publications' numbers (published_vtab1k_next.csv and _third.csv, each row "
    "names its source); their average is the published one, in the column of its kind (`mean of groups` or "
    "`mean of tasks`; the other computed where every task is printed). Their selection rules differ: SSF the best "
    "test epoch; FacT, RepAdapter and the binary adapters the best of ten test evaluations; PETL_Vision re-runs the "
    "last epoch after a val200 search; Adapter+ the last epoch over 3 seeds; DTL the last epoch, one seed."
)
PAPER_BACKBONES = {
    "vit_base_patch16_224.orig_in21k": "ViT-B/16",
    "swin_base_patch4_window7_224.ms_in22k": "Swin-B",
    "convnext_base.fb_in22k": "ConvNeXt-B",
}


@dataclass
class Layout:
    """The columns of one accuracy table: tasks in order, and their groups."""

    tasks: list[str]
    groups: dict[str, list[str]]  # group -> its tasks (empty when the tasks have no groups)

    def aggregate_columns(self) -> list[str]:
        return [*self.groups, *([MEAN_OF_GROUPS] if self.groups else []), MEAN_OF_TASKS]


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


def aggregates(values: dict[str, float], layout: Layout) -> dict[str, float]:
    """Group means and averages of per-task accuracies; incomplete ones are left out."""
    out = {}
    for group, tasks in layout.groups.items():
        if all(t in values for t in tasks):
            out[group] = sum(values[t] for t in tasks) / len(tasks)
    if layout.groups and all(g in out for g in layout.groups):
        out[MEAN_OF_GROUPS] = sum(out[g] for g in layout.groups) / len(layout.groups)
    if all(t in values for t in layout.tasks):
        out[MEAN_OF_TASKS] = sum(values[t] for t in layout.tasks) / len(layout.tasks)
    return out


def row_cells(runs: pd.DataFrame, layout: Layout) -> dict[str, Stat]:
    """One row's cells: per task the mean ± std over its seeds; every aggregate is the aggregate of the
    task cells shown (means of means). Its ± is the std over seeds of the per-seed aggregate, where every
    task of the aggregate has the same seeds; else none is shown."""
    cells = {task: stats(list(values)) for task, values in runs.groupby("task")["top1"]}
    means = aggregates({task: cell[0] for task, cell in cells.items()}, layout)
    seeds = {task: frozenset(group["seed"]) for task, group in runs.groupby("task")}
    per_seed: dict[str, list[float]] = {}
    for _, seed_runs in runs.groupby("seed"):
        for column, value in aggregates(dict(zip(seed_runs["task"], seed_runs["top1"])), layout).items():
            per_seed.setdefault(column, []).append(value)
    for column, mean in means.items():
        tasks = layout.groups.get(column) or layout.tasks
        same_seeds = len({seeds[t] for t in tasks}) == 1 and len(per_seed.get(column, [])) == len(seeds[tasks[0]])
        spread = stats(per_seed[column]) if same_seeds else (mean, 0.0, 1)
        cells[column] = (mean, spread[1], spread[2])
    return cells


def accuracy_cells(frame: pd.DataFrame, layout: Layout) -> tuple[dict[str, dict[str, Stat]], dict[str, str]]:
    """(row label -> column -> stats over seeds, row label -> method): one row per method and settings
    (``report.table.row_labels``); columns are tasks, group means and averages."""
    cells, methods = {}, {}
    for label, method in row_order(frame):
        cells[label] = row_cells(frame[frame["row"] == label], layout)
        methods[label] = method
    return cells, methods


def _reference(name: str) -> pd.DataFrame:
    return pd.read_csv(files("petl_bench.reference") / name)


def paper_rows(name: str, layout: Layout) -> tuple[dict[str, dict[str, Stat]], dict[str, float]]:
    """The reference paper's table (the Convpass paper's Table 1 for VTAB-1K), where it has the cell."""
    rows, params = {}, {}
    for _, line in _reference(name).iterrows():
        method = PAPER_METHODS.get(line["method"], line["method"])
        row = {t: (float(line[t]), 0.0, 1) for t in layout.tasks if t in line and not pd.isna(line[t])}
        row.update({g: (float(line[g]), 0.0, 1) for g in layout.groups if g in line})
        if layout.groups:
            row[MEAN_OF_GROUPS] = (float(line["average"]), 0.0, 1)
        row[MEAN_OF_TASKS] = (float(line["mean_of_19_tasks_computed"]), 0.0, 1)
        rows[method], params[method] = row, float(line["params_M"]) * 1e6
    return rows, params


AVERAGE_KINDS = {
    "mean_of_group_means": "average = mean of group means",
    "mean_of_tasks": "average = mean of tasks",
    "mean_of_19_tasks": "average = mean of tasks",
}


def short_source(source: str) -> str:
    """A published row's source in a few words: 'FacT paper', 'PETL_Vision re-run', 'luogen1996/RepAdapter README'."""
    if "PETL_Vision" in source.split(" ")[0]:
        return "PETL_Vision re-run"
    head = source.split(";")[0].split(" (")[0].split(",")[0]
    return " ".join(head.split()[:2])


def published_name(method: str) -> str:
    """A published row's method name without its variant and source: 'FacT-TT (r=4)' -> 'FacT-TT'."""
    return method.split(" (")[0].split(" [")[0].strip()


def published_rows(names_csv: tuple[str, ...], layout: Layout, methods) -> dict[str, list[Row]]:
    """Other publications' rows of the ``methods`` present, by the names each method declares."""
    names = {name: method for method in methods if method in METHODS for name in METHODS.get(method).published_as}
    rows: dict[str, list[Row]] = {}
    lines = pd.concat([_reference(name) for name in names_csv], ignore_index=True) if names_csv else pd.DataFrame()
    for _, line in lines.iterrows():
        method = names.get(published_name(line["method"]))
        if method is None:
            continue
        cells = {
            c: (float(line[c]), 0.0, 1) for c in [*layout.tasks, *layout.groups] if c in line and pd.notna(line[c])
        }
        kind = line["average_kind"]
        if kind == "mean_of_group_means" and pd.notna(line["mean"]):
            cells[MEAN_OF_GROUPS] = (float(line["mean"]), 0.0, 1)
        if kind in ("mean_of_tasks", "mean_of_19_tasks") and pd.notna(line["mean"]):
            cells[MEAN_OF_TASKS] = (float(line["mean"]), 0.0, 1)
        elif all(t in cells for t in layout.tasks):
            cells[MEAN_OF_TASKS] = (sum(cells[t][0] for t in layout.tasks) / len(layout.tasks), 0.0, 1)
        source = short_source(line["source"])
        shown = line["method"] if source in line["method"] else f"{line['method']}; {source}"
        label = f"{method} (published: {shown}; {AVERAGE_KINDS.get(kind, kind)})"
        rows.setdefault(method, []).append(Row(label, cells, float(line["params_m"]) * 1e6, "published", method))
    return rows


def mixed_data(runs: pd.DataFrame) -> dict[str, int]:
    """Tasks whose runs read different copies of the data: task -> number of distinct fingerprints."""
    known = runs[runs["data_fingerprint"].fillna("") != ""]
    counts = known.groupby("task")["data_fingerprint"].nunique()
    return {task: int(n) for task, n in counts.items() if n > 1}


def mixed_data_note(mixed: dict[str, int], title: str) -> str:
    if not mixed:
        return ""
    tasks = ", ".join(f"{task} ({n} copies)" for task, n in sorted(mixed.items()))
    warn_once(log, "%s: runs of %s read different data (different fingerprints); not comparable", title, tasks)
    return f"WARNING: MIXED DATA. Runs of {escape_markdown(tasks)} read different copies of the data (their fingerprints differ)."


NO_REFERENCE_NOTE = (
    "No published rows beside these: the published VTAB-1K numbers are for ViT-B/16 (ImageNet-21k) at 224 px, "
    "and these runs used another backbone or input size."
)


def published_setting(runs: pd.DataFrame, layout) -> bool:
    """The runs are on the backbone and input size the suite's published numbers were measured with."""
    sizes = set(runs["image_size"].dropna().astype(int))
    return set(runs["backbone"]) == {layout.reference_backbone} and sizes <= {layout.reference_size}


def task_tables(frame: pd.DataFrame, suite: str, layout) -> list[Table]:
    """One table per backbone and protocol of the suite's runs, with the published numbers the suite's
    layout names beside them where the runs are on the setting those were measured with."""
    tables = []
    has_references = bool(layout.paper or layout.published)
    for (backbone, protocol), runs in frame.groupby(["backbone", "protocol"], sort=True):
        columns = layout_for(suite, list(runs["task"].unique()))
        ours, methods = accuracy_cells(runs, columns)
        params = runs.groupby("row")["trainable_params"].mean().to_dict()
        comparable = has_references and published_setting(runs, layout)
        paper, paper_params = paper_rows(layout.paper, columns) if comparable and layout.paper else ({}, {})
        published = published_rows(layout.published, columns, set(methods.values())) if comparable else {}
        title = f"{suite} on {backbone}, protocol '{protocol}'"
        mixed = mixed_data(runs)
        notes = [mixed_data_note(mixed, title)] if mixed else []
        notes += [NO_REFERENCE_NOTE] if has_references and not comparable else []
        notes += [PAPER_NOTE] if paper else []
        notes += [PUBLISHED_NOTE] if published else []
        rows = with_paper(ours, paper, params, paper_params, published, methods)
        replicates = attach_intervals(rows, runs, columns)
        notes += [INTERVAL_NOTE] if replicates else []
        tables.append(
            Table(
                title=title + (" [MIXED DATA]" if mixed else ""),
                slug=slug(suite, backbone, protocol),
                columns=columns.tasks + columns.aggregate_columns(),
                rows=rows,
                key={"suite": suite, "backbone": backbone, "protocol": protocol},
                note=" ".join(notes),
                headline=(MEAN_OF_GROUPS, MEAN_OF_TASKS) if columns.groups else (MEAN_OF_TASKS,),
                summary=tuple(columns.aggregate_columns()),
                replicates=replicates,
            )
        )
    return tables


INTERVAL_NOTE = (
    "Where a row's runs stored per-image outcomes, `±` is the half-width of the 95% bootstrap interval over test "
    "images (seeds pooled, images resampled within every task for the averages; accuracy.csv has its bounds and "
    "the t-interval over seeds); elsewhere it is the std over seeds."
)


def task_outcomes(runs: pd.DataFrame) -> dict[str, tuple[str, list[np.ndarray]]]:
    """Per task of one row: (its evaluation list, every seed's per-image outcomes), where every seed stored
    per-image outcomes on the same evaluation list."""
    found = {}
    for task, group in runs.sort_values("seed").groupby("task", sort=True):
        outcomes = list(group["outcomes"])
        if any(o is None for o in outcomes) or len({(o[0], len(o[1])) for o in outcomes}) != 1:
            continue
        found[task] = (outcomes[0][0], [o[1] for o in outcomes])
    return found


def attach_intervals(rows: list[Row], runs: pd.DataFrame, layout: Layout) -> dict[str, dict[str, np.ndarray]]:
    """Each of our rows' 95% bootstrap intervals (tasks, and the aggregates whose every task has one):
    row label -> task -> replicates, for the rankings."""
    generator, replicates = stats_rng(), {}
    for row in rows:
        if row.source != "ours":
            continue
        outcomes = task_outcomes(runs[runs["row"] == row.label])
        per_task = {task: accuracy_replicates(seeds, generator) for task, (_, seeds) in outcomes.items()}
        if not per_task:
            continue
        replicates[row.label] = per_task
        row.outcomes = outcomes
        combined = {**per_task, **aggregates(per_task, layout)}
        row.intervals = {column: percentile_interval(values) for column, values in combined.items()}
    return replicates


def backbone_table(frame: pd.DataFrame, suite: str, report_layout) -> Table | None:
    """The suite's group means per backbone and method, beside the paper's backbone table (Table 3)."""
    if frame.empty:
        return None
    columns = [*layout_for(suite, []).groups, MEAN_OF_GROUPS]
    paper = _reference(report_layout.backbone_paper)
    rows = []
    for (backbone, protocol), runs in frame.groupby(["backbone", "protocol"], sort=True):
        layout = layout_for(suite, list(runs["task"].unique()))
        params = runs.groupby("row")["trainable_params"].mean().to_dict()
        ours, methods = accuracy_cells(runs, layout)
        for row_label, cells in ours.items():
            method = methods[row_label]
            label = f"{backbone} / {row_label}" + ("" if protocol == "final" else f" ({protocol})")
            rows.append(
                Row(label, {c: v for c, v in cells.items() if c in columns}, params.get(row_label), "ours", method)
            )
            short = PAPER_BACKBONES.get(backbone)
            for _, line in paper[(paper["model"] == short)].iterrows():
                if PAPER_METHODS.get(line["method"]) == method:
                    cells = {c: (float(line[c]), 0.0, 1) for c in columns[:3]} | {
                        MEAN_OF_GROUPS: (float(line["average"]), 0.0, 1)
                    }
                    rows.append(Row(f"{short} / {line['method']} (paper)", cells, None, "paper", method))
    return Table(
        title=f"{report_layout.title or suite} by backbone", slug=f"{suite}__backbones", columns=columns, rows=rows,
        key={"suite": suite},
        note="Group means (top-1 %); rows marked (paper) are the Convpass paper's backbone table (Table 3).",
        summary=tuple(columns),
    )  # fmt: skip
