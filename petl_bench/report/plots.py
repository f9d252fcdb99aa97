"""Accuracy vs trainable parameters (the paper's Figure 1) and per-group bars."""

from __future__ import annotations

from pathlib import Path

from .table import Table


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plain(text) -> str:
    """Text from records drawn as itself: a ``$`` is escaped, so a name never starts mathtext (which
    matplotlib's own tick labels need, so it stays on)."""
    return str(text).replace("$", r"\$")


def headline(table: Table, cells: dict) -> tuple[str, tuple] | None:
    for column in table.headline:
        if column in cells:
            return column, cells[column]
    return None


def readable_ylim(axis, values: list[float], least: float = 4.0) -> None:
    """At least ``least`` points of accuracy on the y axis, so one or two close values do not get a
    hundredth-of-a-percent scale."""
    low, high = min(values), max(values)
    if high - low < least:
        middle = (low + high) / 2
        axis.set_ylim(middle - least / 2, middle + least / 2)


def left_out_note(figure, rows: list) -> None:
    """Say which of our rows a plot does not draw (no complete average)."""
    if rows:
        names = ", ".join(plain(row.label) for row in rows)
        figure.text(0.01, 0.01, f"not drawn (no complete average): {names}", fontsize=7, ha="left", va="bottom")


def plot_accuracy_vs_params(table: Table, path: Path) -> Path | None:
    """One point per method: its average accuracy against its trainable parameters (symmetric log x);
    the paper's points hollow. Methods without a complete average are not drawn, and named below the plot."""
    candidates = [row for row in table.rows if row.source == "ours" and row.params is not None]
    ours = [(row, headline(table, row.cells)) for row in candidates]
    ours = [(row, found) for row, found in ours if found]
    if not ours:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for index, (row, (_, (mean, std, _))) in enumerate(ours):
        axis.errorbar(row.params, mean, yerr=std or None, fmt="o", capsize=3, color=f"C{index % 10}")
        axis.annotate(plain(row.label), (row.params, mean), textcoords="offset points", xytext=(5, 4), fontsize=8)
    for row in table.rows:
        if row.source == "paper" and row.params is not None and ours[0][1][0] in row.cells:
            axis.scatter([row.params], [row.cells[ours[0][1][0]][0]], facecolors="none", edgecolors="grey")
    axis.set_xscale("symlog", linthresh=1e4)
    axis.margins(x=0.2)
    readable_ylim(axis, [found[1][0] for _, found in ours])
    left_out_note(figure, [row for row in candidates if not headline(table, row.cells)])
    axis.set_xlabel("trainable parameters (classifier excluded; symlog)")
    axis.set_ylabel(f"top-1 (%), {plain(ours[0][1][0])}")
    has_paper = any(row.source == "paper" for row in table.rows)
    axis.set_title(
        plain(table.title) + ("\nhollow: paper (best-of-10 test evaluations)" if has_paper else ""), fontsize=9
    )
    axis.grid(alpha=0.3)
    figure.tight_layout(rect=(0, 0.04, 1, 1))  # room for the note of rows not drawn
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_bars(table: Table, path: Path) -> Path | None:
    """The summary columns (group means, averages, targets), one bar per row of ours."""
    everyone = [row for row in table.rows if row.source == "ours"]
    columns = list(table.summary)
    rows = [row for row in everyone if any(c in row.cells for c in columns)]
    if not rows or not columns:
        return None  # nothing to draw: no row has a complete group (a partial run), so no empty plot
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(max(6.0, 0.45 * len(columns) * len(rows)), 4.2))
    width = 0.8 / len(rows)
    for index, row in enumerate(rows):
        present = [(i, row.cells[c]) for i, c in enumerate(columns) if c in row.cells]
        errors = [cell[1] for _, cell in present]
        axis.bar([i + index * width for i, _ in present], [cell[0] for _, cell in present], width,
                 yerr=errors if any(errors) else None, label=plain(row.label), capsize=2, color=f"C{index % 10}")  # fmt: skip
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(columns))], [plain(c) for c in columns], fontsize=8)
    axis.set_ylabel("top-1 (%)")
    axis.set_ylim(0, min(100, max(cell[0] + cell[1] for row in rows for cell in row.cells.values()) * 1.1 + 1))
    axis.set_title(plain(table.title), fontsize=9)
    axis.legend(fontsize=7, ncols=2)
    left_out_note(figure, [row for row in everyone if row not in rows])
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def cost_panels(costs: dict[str, dict]) -> list[tuple[str, str, set[str]]]:
    """(cost, axis label, methods drawn) for the measures that compare like with like: memory only when
    it is per run (CUDA max allocated, not a CPU process's peak RSS), training speed only for methods
    that run the full model (not linear probing on cached features)."""
    everyone = set(costs)
    panels = [("trainable_params", "trainable parameters (symlog)", everyone)]
    if costs and all(c.get("peak_memory_kind") == "cuda max allocated" for c in costs.values()):
        panels.append(("peak_memory_mb", "peak memory, CUDA max allocated (MiB)", everyone))
    full = {method for method, c in costs.items() if not c.get("cached_features")}
    if full:
        panels.append(("train_images_per_s", "training images/s (full model)", full))
    return panels


def plot_accuracy_vs_cost(table: Table, costs: dict[str, dict], path: Path) -> Path | None:
    """Accuracy against each comparable cost of a run (parameters; per-run memory; throughput of the
    full model), one point per method."""
    points = [(row.label, headline(table, row.cells)) for row in table.rows if row.source == "ours"]
    points = [(method, found) for method, found in points if found and method in costs]
    if not points:
        return None
    plt = _pyplot()
    panels = cost_panels({method: costs[method] for method, _ in points})
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    axes = axes[0]
    for axis, (cost, label, drawn) in zip(axes, panels):
        for index, (method, (_, (mean, std, _))) in enumerate(points):
            if method not in drawn:
                continue
            axis.errorbar(costs[method][cost], mean, yerr=std or None, fmt="o", capsize=3, color=f"C{index % 10}")
            axis.annotate(
                plain(method), (costs[method][cost], mean), textcoords="offset points", xytext=(4, 3), fontsize=7
            )
        if cost == "trainable_params":
            axis.set_xscale("symlog", linthresh=1e4)
        else:  # speeds within a few percent of each other: an axis of +-20%, not of hundredths
            xs = [costs[m][cost] for m, _ in points if m in drawn]
            if xs and max(xs) - min(xs) < 0.2 * max(xs):
                middle = (max(xs) + min(xs)) / 2
                axis.set_xlim(middle * 0.8, middle * 1.2)
        axis.margins(x=0.25)
        readable_ylim(axis, [found[1][0] for _, found in points])
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel(f"top-1 (%), {plain(points[0][1][0])}")
    figure.suptitle(plain(table.title), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
