"""The tuned protocol's own sections: what stage 1 chose per task, and what the search cost."""

from __future__ import annotations

from collections import defaultdict

from ..records import RunRecord
from .table import markdown_table, method_order


def _tuned(records: list[RunRecord]) -> list[RunRecord]:
    return [r for r in records if r.protocol == "tuned" and r.tuning]


def chosen_rows(records: list[RunRecord]) -> list[list[str]]:
    """One row per (suite, backbone, method, task): the chosen values and their val200 top-1."""
    seen = {}
    for r in _tuned(records):
        values = ", ".join(f"{k}={v}" for k, v in r.tuning.get("chosen", {}).items()) or "-"
        configurations = len(r.tuning.get("configurations", []))
        seen[(r.suite, r.backbone, r.method, r.task_key())] = [
            r.suite, r.backbone, r.method, r.task_key(), values, f"{r.tuning.get('chosen_val_top1', 0):.1f}",
            str(configurations),
        ]  # fmt: skip
    order = {m: i for i, m in enumerate(method_order({key[2] for key in seen}))}
    return [seen[key] for key in sorted(seen, key=lambda k: (k[0], k[1], order[k[2]], k[3]))]


def cost_rows(records: list[RunRecord]) -> list[list[str]]:
    """Per suite, backbone and method: stage-1 runs, wall time and images processed, summed over tasks."""
    totals: dict[tuple, list[float]] = defaultdict(lambda: [0, 0.0, 0])
    counted = set()
    for r in _tuned(records):
        key = (r.suite, r.backbone, r.method)
        if (key, r.task_key()) in counted:  # every seed of a task carries the same search
            continue
        counted.add((key, r.task_key()))
        cost = r.tuning.get("search_cost", {})
        total = totals[key]
        total[0] += cost.get("runs", 0)
        total[1] += cost.get("seconds", 0.0)
        total[2] += cost.get("images", 0)
    return [
        [*key, f"{runs:,}", f"{seconds / 3600:,.2f}", f"{images:,}"] for key, (runs, seconds, images) in totals.items()
    ]


def tuned_markdown(records: list[RunRecord]) -> str:
    """The report's tuned sections (empty when no run used the tuned protocol)."""
    chosen = chosen_rows(records)
    if not chosen:
        return ""
    parts = [
        "## Tuned protocol: chosen configurations",
        "",
        "Each method was searched over its grid on train800 -> val200 (first seed); the best val200 top-1 "
        "(ties: the first in grid order) was retrained on train800val200 and tested once per seed.",
        "",
        markdown_table(["suite", "backbone", "method", "task", "chosen", "val200 top-1", "configurations"], chosen),
        "## Tuned protocol: search cost (stage 1)",
        "",
        markdown_table(["suite", "backbone", "method", "runs", "hours", "images processed"], cost_rows(records)),
    ]
    return "\n".join(parts)
