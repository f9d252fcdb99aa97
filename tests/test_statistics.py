"""The report's statistics on records with known answers: intervals, paired comparisons, rankings, the
critical-difference diagram, the best-epoch inflation, and `petl-bench compare` on unpaired runs."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from conftest import run_cli, synthetic_record
from scipy import stats as scipy_stats
from tasks_fixture import VTAB_GROUPS

from petl_bench import records
from petl_bench.report import runs_frame, write_report
from petl_bench.report import stats as st
from petl_bench.report.significance import paired

TASKS = [task for tasks in VTAB_GROUPS.values() for task in tasks]


def with_outcomes(method: str, task: str, seed: int, bits: np.ndarray, protocol: str = "final", eval_list="list"):
    record = synthetic_record(method, task, seed, 100.0 * bits.mean(), protocol=protocol)
    record.metrics.outcomes = records.pack_outcomes(bits, f"{eval_list}-{task}")
    return record


def bits(right: int, total: int = 1000, offset: int = 0) -> np.ndarray:
    """``right`` correct images of ``total``, starting at image ``offset`` (wrapping)."""
    out = np.zeros(total, dtype=bool)
    out[(np.arange(right) + offset) % total] = True
    return out


def test_outcomes_round_trip_through_a_record():
    hits = np.random.default_rng(0).random(1001) < 0.7
    packed = records.pack_outcomes(hits, "abc")
    assert np.array_equal(records.unpack_outcomes(packed), hits) and packed["images"] == 1001
    assert records.unpack_outcomes(None) is None and records.unpack_outcomes({"bits": "!!", "images": 3}) is None


def test_t_interval_over_five_seeds_is_the_one_computed_by_hand():
    values = [70.0, 72.0, 74.0, 76.0, 78.0]
    half = 2.7764451051977987 * math.sqrt(10.0) / math.sqrt(5)  # t(0.975, 4) * s / sqrt(n), s^2 = 40 / 4
    low, high = st.t_interval(values)
    assert low == pytest.approx(74 - half, abs=1e-9) and high == pytest.approx(74 + half, abs=1e-9)
    assert st.t_interval([74.0]) is None


def test_the_image_bootstrap_is_seeded_reproducible_and_agrees_with_scipy():
    rng = np.random.default_rng(1)
    seeds = [rng.random(400) < p for p in (0.6, 0.65, 0.7)]
    first = st.accuracy_replicates(seeds, st.rng(7))
    assert np.array_equal(first, st.accuracy_replicates(seeds, st.rng(7)))
    assert not np.array_equal(first, st.accuracy_replicates(seeds, st.rng(8)))
    reference = scipy_stats.bootstrap(
        tuple(s.astype(float) for s in seeds), lambda *xs, axis=-1: 100 * np.mean([x.mean(axis=axis) for x in xs], 0),
        paired=True, n_resamples=4000, method="percentile", random_state=np.random.default_rng(0),
    ).confidence_interval  # fmt: skip
    low, high = st.percentile_interval(first)
    assert abs(low - reference.low) < 0.5 and abs(high - reference.high) < 0.5  # Monte Carlo error ~0.1


def test_identical_outcomes_are_no_detectable_difference_with_p_1():
    runs = [with_outcomes(m, t, 0, bits(700)) for m in ("a", "b") for t in TASKS[:3]]
    result = paired(runs_frame(runs), "a", "b")
    assert result.verdict == "no detectable difference" and result.p == 1.0
    assert all(c.p == 1.0 and c.test == "McNemar exact" and c.difference == 0 for c in result.comparisons)


def test_sixty_more_right_of_1000_on_each_of_19_tasks_is_better_with_a_small_p():
    runs = [with_outcomes("a", t, 0, bits(760)) for t in TASKS] + [with_outcomes("b", t, 0, bits(700)) for t in TASKS]
    result = paired(runs_frame(runs), "a", "b")
    assert len(result.comparisons) == 19 and result.verdict == "a better"
    assert result.p < 1e-4  # Wilcoxon over 19 tasks all +6 (tied: scipy's normal approximation, 1.3e-5)
    assert all(c.verdict == "a better" and c.p_holm < 1e-10 for c in result.comparisons)  # McNemar: 60 vs 0
    again = paired(runs_frame(runs), "b", "a")
    assert again.verdict == "a better" and again.comparisons[0].difference == pytest.approx(-6.0)


def test_several_seeds_use_the_paired_bootstrap_and_holm_adjusts_over_tasks():
    runs = [with_outcomes("a", t, s, bits(720, offset=s)) for t in TASKS[:4] for s in (0, 1, 2)]
    runs += [with_outcomes("b", t, s, bits(700, offset=s)) for t in TASKS[:4] for s in (0, 1, 2)]
    result = paired(runs_frame(runs), "a", "b")
    assert {c.test for c in result.comparisons} == {"paired bootstrap"}
    assert all(c.difference == pytest.approx(2.0) and c.low <= 2.0 <= c.high for c in result.comparisons)
    assert st.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_unpaired_runs_are_named_and_what_is_paired_is_compared():
    runs = [with_outcomes("a", t, s, bits(760)) for t in TASKS[:3] for s in (0, 1)]
    runs += [with_outcomes("b", t, 0, bits(700)) for t in TASKS[:2]]  # seed 1 and the third task: a only
    old = synthetic_record("b", TASKS[2], 0, 70.0)  # a record from before per-image outcomes
    result = paired(runs_frame([*runs, old]), "a", "b")
    assert [c.task for c in result.comparisons] == sorted(TASKS[:2]) and all(c.seeds == [0] for c in result.comparisons)
    line = result.unpaired_line()
    assert "seed(s) 1 of one row only" in line and "without per-image outcomes" in line and "\n" not in line


def test_compare_command_prints_the_table_the_unpaired_line_and_the_verdict(tmp_path, monkeypatch, capsys):
    runs = [with_outcomes("a", t, 0, bits(760)) for t in TASKS[:3]] + [
        with_outcomes("b", t, 0, bits(700)) for t in TASKS[:2]
    ]
    for record in runs:
        records.write_record(tmp_path / record.run_id, record)
    code, out, err = run_cli(monkeypatch, capsys, "compare", "a", "b", "--results", str(tmp_path))
    assert code == 0, err
    assert "a better" in out and f"unpaired (not compared): {TASKS[2]}: only a has runs" in out
    code, _, err = run_cli(monkeypatch, capsys, "compare", "a", "c", "--results", str(tmp_path))
    assert code == 2 and "no final runs of 'c'" in err


def test_report_has_intervals_ranks_comparisons_a_cd_diagram_and_the_inflation(tmp_path):
    runs = []
    for index, method in enumerate(("a", "b", "c")):
        for task in TASKS:
            for seed in (0, 1):
                runs.append(with_outcomes(method, task, seed, bits(700 + 30 * index + seed, offset=seed)))
    runs += [with_outcomes("c", t, 0, bits(800), protocol="paper") for t in TASKS[:2]]
    written = {path.name for path in write_report(runs, tmp_path)}
    assert "critical_difference__vtab__vit_base_patch16_224.orig_in21k__final.png" in written
    report = (tmp_path / "report.md").read_text()
    assert "| c | 0.001M | 76.0 ± " in report and "#### Ranks:" in report and "Friedman's test p = " in report
    assert "- c vs b: c better" in report and "## Protocol effects" in report
    assert "| c | +4.00 | +4.00 | 2 |" in report  # paper 80.0 - final 76.0 on each of two tasks (seed 0)
    csv = (tmp_path / "accuracy.csv").read_text().splitlines()
    assert csv[0].endswith("lower,upper,t_lower,t_upper")


def test_the_joint_image_bootstrap_keeps_rows_paired_and_agrees_with_scipy_for_one_row():
    rng = np.random.default_rng(2)
    a = rng.random(500) < 0.7
    b = a.copy()
    b[:3] = ~b[:3]  # b differs from a on three images only
    joint = st.joint_accuracy_replicates(np.stack([a, a, b], axis=-1).astype(float), st.rng(3), resamples=1000)
    assert joint.shape == (1000, 3) and np.array_equal(joint[:, 0], joint[:, 1]), "the same images for every row"
    assert np.abs(joint[:, 0] - joint[:, 2]).max() <= 100 * 3 * 10 / 500, "b moves with a, never far"
    reference = scipy_stats.bootstrap(
        (a.astype(float),), lambda x, axis=-1: 100 * x.mean(axis=axis), n_resamples=4000, method="percentile",
        random_state=np.random.default_rng(0),
    ).confidence_interval  # fmt: skip
    low, high = st.percentile_interval(joint[:, 0])
    assert abs(low - reference.low) < 0.6 and abs(high - reference.high) < 0.6


def test_rank_intervals_resample_the_same_images_for_every_row(tmp_path):
    """a beats b by two images of 1000 on every task: on any resample of the same images a stays ahead or ties,
    so its rank never exceeds b's (resampling each row on its own would often put b ahead)."""
    runs = [with_outcomes("a", t, 0, bits(702)) for t in TASKS[:6]]
    runs += [with_outcomes("b", t, 0, bits(700)) for t in TASKS[:6]]
    runs += [with_outcomes("c", t, 0, bits(600, offset=100)) for t in TASKS[:6]]
    write_report(runs, tmp_path)
    report = (tmp_path / "report.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ") and "[" in line}
    a_low, a_high = (float(x) for x in re.search(r"\[([\d.]+), ([\d.]+)", rows["a"]).groups())
    b_low, b_high = (float(x) for x in re.search(r"\[([\d.]+), ([\d.]+)", rows["b"]).groups())
    assert a_high <= 1.5 <= b_low and (a_low, b_high) == (1.0, 2.0)
    assert "the same images for every row" in report
