"""Which differences are real: paired comparisons of two rows, rankings with their uncertainty and a
critical-difference diagram, and the best-epoch inflation of the paper protocol (see :mod:`.stats`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import stats
from .stats import ALPHA, Comparison, average_ranks, compare_task, decide, friedman_p, percentile_interval, rng
from .table import Table, escape_markdown, markdown_table

TOP = 4  # the report compares the best row with the next TOP - 1


@dataclass
class Paired:
    """Two rows compared task by task on the seeds and images they share."""

    a: str
    b: str
    comparisons: list[Comparison] = field(default_factory=list)
    unpaired: list[str] = field(default_factory=list)  # what could not be paired, and why
    p: float = 1.0  # across tasks: Wilcoxon signed-rank (one task: its Holm-adjusted p)
    verdict: str = "no paired runs"

    def unpaired_line(self) -> str:
        return "unpaired (not compared): " + "; ".join(self.unpaired) if self.unpaired else ""


def _seeds(runs: pd.DataFrame) -> dict[int, tuple]:
    return {int(seed): outcome for seed, outcome in zip(runs["seed"], runs["outcomes"])}


def _pair_task(task: str, a_seeds: dict[int, tuple], b_seeds: dict[int, tuple], a: str, b: str):
    """(the seeds both rows ran on the same images, what is unpaired on this task); ``*_seeds``: seed ->
    (test list, outcomes) or None."""
    if not a_seeds or not b_seeds:
        return [], [f"{task}: only {a if not b_seeds else b} has runs"]
    lonely = sorted(set(a_seeds) ^ set(b_seeds))
    notes = [f"{task}: seed(s) {', '.join(map(str, lonely))} of one row only"] if lonely else []
    shared = sorted(set(a_seeds) & set(b_seeds))
    missing = [s for s in shared if a_seeds[s] is None or b_seeds[s] is None]
    if missing:
        notes.append(f"{task}: seed(s) {', '.join(map(str, missing))} without per-image outcomes (older records)")
    seeds = [s for s in shared if s not in missing]
    other = [s for s in seeds if a_seeds[s][0] != b_seeds[s][0] or len(a_seeds[s][1]) != len(b_seeds[s][1])]
    if other:
        notes.append(f"{task}: seed(s) {', '.join(map(str, other))} evaluated on different test lists")
    return [s for s in seeds if s not in other], notes


def paired(frame: pd.DataFrame, a: str, b: str, alpha: float = ALPHA) -> Paired:
    """Compare rows ``a`` and ``b`` (report row labels: a method, or a method and its settings) on every
    task either ran, pairing runs by seed on the same test images; what cannot be paired is listed."""
    result, generator = Paired(a, b), rng()
    for task in sorted(set(frame.loc[frame["row"].isin([a, b]), "task"])):
        on_task = frame[frame["task"] == task]
        first, second = _seeds(on_task[on_task["row"] == a]), _seeds(on_task[on_task["row"] == b])
        seeds, notes = _pair_task(task, first, second, a, b)
        result.unpaired += notes
        if seeds:
            outcomes_a, outcomes_b = [first[s][1] for s in seeds], [second[s][1] for s in seeds]
            result.comparisons.append(compare_task(task, seeds, outcomes_a, outcomes_b, generator))
    if result.comparisons:
        result.p, result.verdict = decide(result.comparisons, a, b, alpha)
    return result


def select_pair(run_records: list, a: str, b: str, suite: str | None, backbone: str | None, protocol: str):
    """The runs ``petl-bench compare`` pairs: one suite and backbone holding both rows, under ``protocol``
    (a UserError saying what to pass otherwise)."""
    from ..errors import UserError
    from .table import runs_frame

    frame = runs_frame(run_records) if run_records else pd.DataFrame(columns=["row"])
    for column, value in (("suite", suite), ("backbone", backbone), ("protocol", protocol)):
        if value is not None and len(frame):
            frame = frame[frame[column] == value]
    rows = sorted(set(frame["row"]))
    for name in (a, b):
        if name not in rows:
            raise UserError(f"no {protocol} runs of '{name}' here; rows: {', '.join(rows) or 'none'}")
    both = frame[frame["row"].isin([a, b])]
    places = sorted({(s, k) for s, k in zip(both["suite"], both["backbone"])})
    if len(places) > 1:
        shown = ", ".join(f"{s} on {k}" for s, k in places)
        raise UserError(f"'{a}' and '{b}' ran in {shown}; pass --suite and --backbone to pick one")
    return both


def comparison_rows(result: Paired) -> list[dict]:
    return [
        {
            "task": c.task,
            "seeds": ",".join(map(str, c.seeds)),
            "difference": f"{c.difference:+.2f}",
            "95% interval": f"[{c.low:+.2f}, {c.high:+.2f}]",
            "test": c.test,
            "p": f"{c.p:.3g}",
            "p (Holm)": f"{c.p_holm:.3g}",
            "verdict": c.verdict,
        }  # fmt: skip
        for c in result.comparisons
    ]


def summary_line(result: Paired, alpha: float = ALPHA) -> str:
    """One line: the overall verdict, its test, and the count of per-task verdicts."""
    if not result.comparisons:
        return f"{result.a} vs {result.b}: no paired runs"
    counts = pd.Series([c.verdict for c in result.comparisons]).value_counts().to_dict()
    shown = ", ".join(f"{verdict} on {n}" for verdict, n in counts.items())
    test = "Wilcoxon signed-rank over tasks" if len(result.comparisons) > 1 else result.comparisons[0].test
    mean = float(np.mean([c.difference for c in result.comparisons]))
    tasks = len(result.comparisons)
    floor = 2 / 2**tasks  # the smallest two-sided p of Wilcoxon's exact test over this many tasks
    caveat = (
        f" (over {tasks} tasks Wilcoxon's p cannot go below {floor:.3g}: only the per-task verdicts can show a "
        f"difference)"
        if tasks > 1 and floor > alpha
        else ""
    )
    return (
        f"{result.a} vs {result.b}: {result.verdict} (mean difference {mean:+.2f} points over "
        f"{tasks} task(s); {test} p = {result.p:.3g}, level {alpha}); per task (Holm): {shown}{caveat}"
    )


def _headline(table: Table, label: str) -> float | None:
    row = next(r for r in table.rows if r.source == "ours" and r.label == label)
    for column in table.headline:
        if column in row.cells:
            return row.cells[column][0]
    tasks = [row.cells[c][0] for c in table.columns if c in row.cells and c not in table.summary]
    return float(np.mean(tasks)) if tasks else None  # no aggregate complete: the mean of the tasks it has


def top_rows(table: Table, count: int = TOP) -> list[str]:
    """Our rows with a headline number, best first."""
    scored = [(label, _headline(table, label)) for label in table.ours()]
    return [label for label, value in sorted((s for s in scored if s[1] is not None), key=lambda s: -s[1])][:count]


def ranking(table: Table) -> tuple[pd.DataFrame, list[str], list[str]] | None:
    """(tasks x rows matrix of accuracies, the tasks, the rows): our rows over the tasks every one of them
    has; None with fewer than 2 rows or 2 tasks."""
    ours = table.ours()
    columns = [c for c in table.columns if c not in table.summary]  # the tasks, not their aggregates
    tasks = [t for t in columns if all(t in cells for cells in ours.values())]
    if "dataset" in table.key or len(ours) < 2 or len(tasks) < 2:
        return None
    matrix = pd.DataFrame({label: [cells[t][0] for t in tasks] for label, cells in ours.items()}, index=tasks)
    return matrix, tasks, list(ours)


def rank_intervals(table: Table, tasks: list[str], rows: list[str]) -> dict[str, tuple[float, float]]:
    """95% bootstrap intervals of each row's average rank: within every task the same images resampled for
    every row (the rows are ranked on one resample of the test set, so their outcomes' correlation stays),
    where every row stored per-image outcomes for every task on the same evaluation list."""
    outcomes = {row.label: row.outcomes for row in table.rows if row.label in rows and row.source == "ours"}
    if not all(t in outcomes.get(r, {}) for r in rows for t in tasks):
        return {}
    if any(len({(outcomes[r][t][0], len(outcomes[r][t][1][0])) for r in rows}) != 1 for t in tasks):
        return {}
    generator = rng()
    shares = {t: np.stack([np.mean(outcomes[r][t][1], axis=0) for r in rows], axis=-1) for t in tasks}  # images x rows
    cube = np.stack([stats.joint_accuracy_replicates(shares[t], generator) for t in tasks])
    ranks = average_ranks(cube)  # tasks x replicates x rows -> replicates x rows
    return {row: percentile_interval(ranks[:, i]) for i, row in enumerate(rows)}


def ranking_markdown(table: Table, out: Path) -> tuple[str, Path | None]:
    """The ranking table (average rank, its interval, Friedman's test) and the critical-difference PNG."""
    found = ranking(table)
    if found is None:
        return "", None
    matrix, tasks, rows = found
    ranks = dict(zip(rows, average_ranks(matrix.to_numpy())))
    intervals = rank_intervals(table, tasks, rows)
    p = friedman_p(matrix.to_numpy())
    lines = [
        {
            "method": label,
            "average rank": f"{ranks[label]:.2f}",
            "95% interval": f"[{intervals[label][0]:.2f}, {intervals[label][1]:.2f}]" if label in intervals else "n/a",
            "mean accuracy": f"{matrix[label].mean():.1f}",
        }  # fmt: skip
        for label in sorted(rows, key=lambda r: ranks[r])
    ]
    header = ["method", "average rank", "95% interval", "mean accuracy"]
    friedman = f"Friedman's test p = {p:.3g}" if p is not None else "Friedman's test needs 3 or more rows"
    text = (
        f"#### Ranks: {escape_markdown(table.title)}\n\nAverage rank over the {len(tasks)} tasks every row has (1 is "
        f"best); the interval resamples the test images of every task, the same images for every row ("
        f"{'n/a: a row lacks per-image outcomes on the same images' if not intervals else 'seeded bootstrap'}); "
        f"{friedman}.\n\n" + markdown_table(header, [[r[c] for c in header] for r in lines])
    )
    plot = critical_difference(matrix, ranks, table, out) if p is not None else None
    return text, plot


def critical_difference(matrix: pd.DataFrame, ranks: dict[str, float], table: Table, out: Path) -> Path:
    """The critical-difference diagram (scikit-posthocs): rows on a rank axis, rows joined by a bar where
    Nemenyi's post-hoc test after Friedman finds no difference at the 5% level."""
    import scikit_posthocs as posthocs

    from .plots import _pyplot, plain

    plt = _pyplot()
    significance = posthocs.posthoc_nemenyi_friedman(matrix.to_numpy())
    labels = [plain(label) for label in matrix.columns]
    significance.index, significance.columns = labels, labels
    figure, axis = plt.subplots(figsize=(7, 1.2 + 0.3 * len(labels)))
    posthocs.critical_difference_diagram(pd.Series({plain(k): v for k, v in ranks.items()}), significance, ax=axis)
    axis.set_title(plain(f"average rank over {len(matrix)} tasks: {table.title}"), fontsize=9, pad=22)
    path = out / f"critical_difference__{table.slug}.png"
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def comparisons_markdown(frame: pd.DataFrame, table: Table) -> str:
    """The best row against the next ones, one line each (``petl-bench compare`` gives every task)."""
    best = top_rows(table)
    if len(best) < 2:
        return ""
    runs = frame
    for column, value in table.key.items():
        if column in runs:
            runs = runs[runs[column] == value]
    lines = [summary_line(paired(runs, best[0], other)) for other in best[1:]]
    return f"#### Paired comparisons: {escape_markdown(table.title)}\n\n" + "\n".join(
        f"- {escape_markdown(line)}" for line in lines
    )


def inflation_markdown(frame: pd.DataFrame) -> str:
    """Where a method ran the same task and seed under ``final`` and ``paper``: what selecting the best
    test epoch adds (paper - final), per method."""
    keys = ["row", "suite", "backbone", "task", "seed"]
    both = frame[frame["protocol"].isin(["final", "paper"])]
    wide = both.pivot_table(index=keys, columns="protocol", values="top1", aggfunc="mean")
    if not {"final", "paper"} <= set(wide.columns):
        return ""
    wide = wide.dropna(subset=["final", "paper"])
    if wide.empty:
        return ""
    gain = (wide["paper"] - wide["final"]).groupby(level="row")
    rows = [[escape_markdown(str(label)), f"{values.mean():+.2f}", f"{values.max():+.2f}", str(len(values))]
            for label, values in gain]  # fmt: skip
    return (
        "## Protocol effects\n\nThe same method, task and seed under `paper` (best of the periodic test "
        "evaluations) and `final` (last epoch): what selecting on the test set adds, in points.\n\n"
        + markdown_table(["method", "mean inflation", "largest", "runs"], rows)
    )


def statistics_markdown(frame: pd.DataFrame, tables: list[Table], out: Path) -> tuple[str, list[Path]]:
    """The report's statistics section: per table laid out by task, its ranks and paired comparisons."""
    parts, plots = [], []
    for table in tables:
        text, plot = ranking_markdown(table, out)
        comparisons = comparisons_markdown(frame, table) if table.replicates else ""
        parts += [part for part in (text, comparisons) if part]
        plots += [plot] if plot else []
    if not parts:
        return "", plots
    legend = (
        "## Statistics\n\nPaired comparisons pair runs by seed on the same test images: per task the mean "
        "difference with its 95% bootstrap interval, McNemar's exact test for one seed or the paired bootstrap "
        "for several, Holm's correction over the tasks; across tasks Wilcoxon's signed-rank test. A verdict "
        f"is 'A better', 'B better' or 'no detectable difference' at the {ALPHA} level. In a critical-difference "
        "diagram, rows sit at their average rank (left is better); rows joined by a bar are not told apart by "
        "Nemenyi's test after Friedman's."
    )
    return "\n\n".join([legend, *parts]) + "\n", plots
