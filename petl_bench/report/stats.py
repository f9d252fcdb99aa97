"""The statistics of the report: intervals, paired comparisons and rankings, from per-image outcomes.

Every bootstrap here resamples test images (with replacement), the same images for every seed of a
method and for both methods of a pair, as ``scipy.stats.bootstrap(..., paired=True)`` does. Because an
accuracy is a mean of per-image values, a resample only changes how often each distinct per-image value is
drawn: with S seeds, an image's value is the share of seeds that got it right (S + 1 possible values), and
for a pair the difference of two such shares (2S + 1 values). Drawing those counts from a multinomial is
the image bootstrap exactly, at a cost independent of the number of images (tests check it against
``scipy.stats.bootstrap``). Intervals are percentile intervals; every draw comes from a seeded generator.

Tests: ``scipy.stats`` (t, binomtest for McNemar's exact test, wilcoxon, friedmanchisquare) and
scikit-posthocs (Nemenyi's post-hoc test after Friedman, the critical-difference diagram).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
ALPHA = 0.05
RESAMPLES = 2000
SEED = 0


def t_interval(values: list[float], level: float = LEVEL) -> tuple[float, float] | None:
    """The t-interval of the mean of ``values`` (seeds): mean ± t(level, n - 1) * s / sqrt(n); None for n < 2."""
    if len(values) < 2:
        return None
    return t_bounds(float(np.mean(values)), float(np.std(values, ddof=1)), len(values), level)


def t_bounds(mean: float, std: float, n: int, level: float = LEVEL) -> tuple[float, float]:
    """mean ± t(level, n - 1) * std / sqrt(n), from a cell's summary (n >= 2)."""
    from scipy import stats

    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return mean - half, mean + half


def image_values(outcomes: list[np.ndarray]) -> np.ndarray:
    """Per image, the number of seeds that classified it correctly (``outcomes``: one bool array per seed,
    the same images in the same order)."""
    return np.sum(np.stack([np.asarray(o, dtype=np.int64) for o in outcomes]), axis=0)


def resampled_means(values: np.ndarray, scale: int, offset: int, rng, resamples: int = RESAMPLES) -> np.ndarray:
    """Bootstrap replicates of ``mean((values - offset) / scale)`` over images: multinomial counts of the
    distinct integer values (0 .. 2 * offset + scale), which is resampling the images themselves."""
    counts = np.bincount(values + offset, minlength=scale + offset + 1)
    drawn = rng.multinomial(len(values), counts / counts.sum(), size=resamples)
    return drawn @ ((np.arange(len(counts)) - offset) / scale) / len(values)


def accuracy_replicates(outcomes: list[np.ndarray], rng, resamples: int = RESAMPLES) -> np.ndarray:
    """Bootstrap replicates (percent) of a cell's accuracy: the mean over seeds, images resampled."""
    return 100.0 * resampled_means(image_values(outcomes), len(outcomes), 0, rng, resamples)


def difference_replicates(a: list[np.ndarray], b: list[np.ndarray], rng, resamples: int = RESAMPLES) -> np.ndarray:
    """Bootstrap replicates (percentage points) of accuracy(a) - accuracy(b): the same seeds in the same
    order, the same images resampled for both."""
    return 100.0 * resampled_means(image_values(a) - image_values(b), len(a), len(a), rng, resamples)


def joint_accuracy_replicates(values: np.ndarray, rng, resamples: int = RESAMPLES, chunk: int = 200) -> np.ndarray:
    """Bootstrap replicates (percent, resamples x rows) of several rows' accuracies on the same images, the
    images resampled once for all rows, as a ranking needs (``values``: images x rows, each entry the share
    of a row's seeds right on that image): multinomial counts of the distinct rows of ``values``, which is
    resampling the images themselves; drawn ``chunk`` replicates at a time to bound the memory."""
    patterns, counts = np.unique(values, axis=0, return_counts=True)
    n, parts = len(values), []
    for start in range(0, resamples, chunk):
        drawn = rng.multinomial(n, counts / n, size=min(chunk, resamples - start))
        parts.append(drawn @ patterns / n)
    return 100.0 * np.concatenate(parts)


def percentile_interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    low, high = np.quantile(replicates, [0.5 - level / 2, 0.5 + level / 2])
    return float(low), float(high)


def bootstrap_p(replicates: np.ndarray) -> float:
    """Two-sided p-value of "no difference" from a difference's replicates: twice the smaller share of
    replicates on either side of zero (zero counting for both), at most 1."""
    below = (np.sum(replicates <= 0) + 1) / (len(replicates) + 1)
    above = (np.sum(replicates >= 0) + 1) / (len(replicates) + 1)
    return float(min(1.0, 2 * min(below, above)))


def mcnemar_p(a: np.ndarray, b: np.ndarray) -> float:
    """McNemar's exact test (one seed, the same images): the images one method gets right and the other
    wrong, binomial with p = 1/2 under "no difference"; 1 when there are none."""
    from scipy import stats

    only_a = int(np.sum(a & ~b))
    only_b = int(np.sum(~a & b))
    if only_a + only_b == 0:
        return 1.0
    return float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment (the family-wise error over tasks stays below the level)."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [1.0] * len(pvalues), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[index]))
        adjusted[index] = running
    return adjusted


def wilcoxon_p(differences: list[float]) -> float:
    """Wilcoxon's signed-rank test that per-task differences centre on zero; 1 when all are zero."""
    from scipy import stats

    if not any(abs(d) > 1e-12 for d in differences):
        return 1.0
    return float(stats.wilcoxon(differences).pvalue)


def verdict(difference: float, p: float, a: str, b: str, alpha: float = ALPHA) -> str:
    if p < alpha:
        return f"{a} better" if difference > 0 else f"{b} better"
    return "no detectable difference"


def average_ranks(accuracies: np.ndarray) -> np.ndarray:
    """Mean over tasks (the first axis) of each method's (last axis) rank, 1 the best accuracy, ties averaged;
    any axes between (bootstrap replicates) are kept."""
    from scipy import stats

    return np.mean(stats.rankdata(-accuracies, axis=-1), axis=0)


def friedman_p(matrix: np.ndarray) -> float | None:
    """Friedman's test that the methods (columns) rank alike over the tasks (rows); None below 3 methods
    or 2 tasks."""
    from scipy import stats

    if matrix.shape[1] < 3 or matrix.shape[0] < 2:
        return None
    if np.all(matrix == matrix[:, :1]):
        return 1.0
    return float(stats.friedmanchisquare(*matrix.T).pvalue)


@dataclass
class Comparison:
    """One task's paired comparison of two rows."""

    task: str
    seeds: list[int]
    difference: float  # percentage points, a - b, mean over the paired seeds
    low: float
    high: float
    p: float
    test: str  # "McNemar exact" (one seed) or "paired bootstrap" (several)
    p_holm: float = 1.0
    verdict: str = ""


def compare_task(task: str, seeds: list[int], a: list[np.ndarray], b: list[np.ndarray], rng) -> Comparison:
    """A paired comparison on one task: the same seeds, the same images."""
    replicates = difference_replicates(a, b, rng)
    difference = 100.0 * float(np.mean(image_values(a) - image_values(b))) / len(a)
    low, high = percentile_interval(replicates)
    if len(seeds) == 1:
        return Comparison(task, seeds, difference, low, high, mcnemar_p(a[0], b[0]), "McNemar exact")
    return Comparison(task, seeds, difference, low, high, bootstrap_p(replicates), "paired bootstrap")


def decide(comparisons: list[Comparison], a: str, b: str, alpha: float = ALPHA) -> tuple[float, str]:
    """Holm-adjust the per-task p-values and give each task its verdict; then across tasks, Wilcoxon's
    signed-rank test on the per-task differences: (its p-value, the overall verdict)."""
    for comparison, adjusted in zip(comparisons, holm([c.p for c in comparisons])):
        comparison.p_holm = adjusted
        comparison.verdict = verdict(comparison.difference, adjusted, a, b, alpha)
    differences = [c.difference for c in comparisons]
    if len(comparisons) == 1:
        return comparisons[0].p_holm, comparisons[0].verdict
    p = wilcoxon_p(differences)
    return p, verdict(float(np.mean(differences)), p, a, b, alpha)


def rng(seed: int = SEED) -> np.random.Generator:
    return np.random.default_rng(seed)
