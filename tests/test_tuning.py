"""The tuned protocol: stage 1 on train800 -> val200 over each method's grid, stage 2 retrains the winner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import TINY_RUN, make_task_folder, run_cli, synthetic_record

import petl_bench as pb
from petl_bench import records
from petl_bench.tuning import grid_points, method_grid

GRID = ["--grid", "recipe.lr=1e-3,3e-2", "--grid", "recipe.weight_decay=1e-4"]


def _tune(tiny_plugin, task, out, *extra) -> list[str]:
    return ["tune", "--plugin", str(tiny_plugin), "--task-dir", str(task), "--output", str(out), "--epochs", "2",
            *TINY_RUN, *GRID, *extra]  # fmt: skip


def test_stage_two_retrains_the_argmax_of_stage_one_with_every_seed(monkeypatch, capsys, tmp_path, tiny_plugin):
    task, out = make_task_folder(tmp_path / "colours"), tmp_path / "runs"
    args = _tune(tiny_plugin, task, out, "--methods", "linear,convpass", "--seeds", "0,1",
                 "--grid", "convpass.scale=0.1,10", "--grid", "convpass.xavier_init=false")  # fmt: skip
    code, stdout, stderr = run_cli(monkeypatch, capsys, *args)
    assert code == 0, stderr
    found = records.load_records(out)
    stage_one = [r for r in found if r.protocol == "tune"]
    stage_two = [r for r in found if r.protocol == "tuned"]
    assert len(stage_one) == 2 + 4 and {r.seed for r in stage_one} == {0}
    assert len(stage_two) == 2 * 2 and {r.seed for r in stage_two} == {0, 1}
    assert all(r.metrics.eval_split == "val200" for r in stage_one)
    assert all(r.metrics.eval_split == "test" for r in stage_two)
    for method in ("linear", "convpass"):
        tried = [r for r in stage_one if r.method == method]
        best = max(r.metrics.top1 for r in tried)
        grid = grid_points(method_grid(method, {"recipe": {"lr": (1e-3, 3e-2), "weight_decay": (1e-4,)},
                                                "convpass": {"scale": (0.1, 10.0), "xavier_init": (False,)}}))  # fmt: skip
        for r in (r for r in stage_two if r.method == method):
            chosen = r.tuning["chosen"]
            scores = {c["run_id"]: c["val_top1"] for c in r.tuning["configurations"]}
            assert sorted(scores) == sorted(t.run_id for t in tried), "every configuration's record is named"
            first_best = next(p for p in grid if _score(tried, p, method) == best)
            assert chosen == first_best, "the best val200 top-1, ties broken by grid order"
            assert r.hparams.recipe["lr"] == chosen["lr"]
            assert r.tuning["selection"].startswith(f"chosen on val200 among {len(grid)} configurations")
            assert r.tuning["search_cost"]["runs"] == len(tried) and r.tuning["search_cost"]["seconds"] > 0
    assert "Chosen on val200" in stdout and "protocol 'tuned'" in stdout
    code, stdout, _ = run_cli(monkeypatch, capsys, *args)
    assert code == 0 and stdout.count("0 run(s) trained") == 2, "a rerun trains nothing"


def _score(tried, point, method):
    for r in tried:
        values = {**r.hparams.method, **r.hparams.recipe}
        if all(values[k] == v for k, v in point.items()):
            return r.metrics.top1
    raise AssertionError(point)


def test_stage_one_never_reads_a_test_image(monkeypatch, capsys, tmp_path, tiny_plugin):
    task, out = make_task_folder(tmp_path / "colours"), tmp_path / "runs"
    for path in (task / "images" / "test").iterdir():
        path.write_bytes(b"not an image")
    code, stdout, stderr = run_cli(monkeypatch, capsys, *_tune(tiny_plugin, task, out, "--methods", "lora",
                                                               "--search-only"))  # fmt: skip
    assert code == 0, stderr
    assert len(records.load_records(out)) == 2 and "Chosen on val200" in stdout


@pytest.mark.parametrize(
    "grid,message",
    [
        (["--grid", "nope.scale=1,2"], "unknown method 'nope'"),
        (["--grid", "convpass.bogus=1,2"], "convpass has no setting 'bogus'"),
        (["--grid", "convpass.scale=a,b"], "cannot read convpass.scale='a' as float"),
        (["--grid", "lora.rank=4,8"], "names method 'lora', which this tuning does not run"),
        (["--grid", "recipe.lr"], "--grid expects SCOPE.KEY=V1,V2"),
        (["--search", "bayes"], "unknown search 'bayes'"),
    ],
)
def test_a_bad_grid_is_one_error_line_before_any_training(monkeypatch, capsys, tmp_path, tiny_plugin, grid, message):
    task, out = make_task_folder(tmp_path / "colours"), tmp_path / "runs"
    code, _, stderr = run_cli(monkeypatch, capsys, *_tune(tiny_plugin, task, out, "--methods", "convpass", *grid))
    assert code == 2 and message in " ".join(stderr.split()) and "Traceback" not in stderr, stderr
    assert not out.exists() or not list(out.rglob(records.RECORD))


def test_dry_run_prints_every_grid_and_the_runs(monkeypatch, capsys, tmp_path, tiny_plugin):
    task, out = make_task_folder(tmp_path / "colours"), tmp_path / "runs"
    args = [a for a in _tune(tiny_plugin, task, out, "--methods", "convpass,linear", "--dry-run") if a not in GRID]
    code, stdout, stderr = run_cli(monkeypatch, capsys, *args)
    assert code == 0, stderr
    assert "scale=0.01,0.1,1,10,100" in stdout and "xavier_init=True,False" in stdout
    assert "lr=0.001,0.01,0.1" in stdout and "plan: 46 run(s) to train" in stderr  # 40 + 6 configurations
    assert "| configuration |" in stdout, "not a terminal: the plan is a Markdown table, not a squeezed one"
    assert "lr=0.001, weight_decay=0.0001, scale=0.01, xavier_init=True" in stdout, "each run shows its values"
    assert "stage 2 (train800val200 -> test)" in " ".join(stderr.split())
    assert not out.exists() or not any(out.iterdir())


def test_a_duplicate_grid_value_is_one_configuration_and_a_typo_lists_the_keys(
    monkeypatch, capsys, tmp_path, tiny_plugin
):
    task, out = make_task_folder(tmp_path / "colours"), tmp_path / "runs"
    args = [a for a in _tune(tiny_plugin, task, out, "--methods", "linear", "--dry-run") if a not in GRID]
    code, _, once = run_cli(monkeypatch, capsys, *args, "--grid", "recipe.lr=1e-3")
    code, _, stderr = run_cli(monkeypatch, capsys, *args, "--grid", "recipe.lr=1e-3,1e-3,0.001")
    assert code == 0 and once.split(";")[0] == stderr.split(";")[0], stderr
    code, _, stderr = run_cli(monkeypatch, capsys, *args, "--grid", "recipe.lrr=1e-3")
    assert code == 2 and "settings: " in stderr and "weight_decay" in stderr


def test_halving_keeps_the_best_third_and_ends_on_the_full_schedule(monkeypatch, capsys, tmp_path, tiny_plugin):
    task, out = make_task_folder(tmp_path / "colours"), tmp_path / "runs"
    args = _tune(tiny_plugin, task, out, "--methods", "linear", "--search", "halving", "--epochs", "3",
                 "--grid", "recipe.lr=1e-3,1e-2,1e-1")  # fmt: skip
    code, _, stderr = run_cli(monkeypatch, capsys, *args)
    assert code == 0, stderr
    stage_one = [r for r in records.load_records(out) if r.protocol == "tune"]
    assert sorted(r.hparams.recipe["epochs"] for r in stage_one) == [1, 1, 1, 3]
    short = {r.hparams.recipe["lr"]: r.metrics.top1 for r in stage_one if r.hparams.recipe["epochs"] == 1}
    (full,) = [r for r in stage_one if r.hparams.recipe["epochs"] == 3]
    assert full.hparams.recipe["lr"] == max(short, key=lambda lr: (short[lr], -[1e-3, 1e-2, 1e-1].index(lr)))
    (tuned,) = [r for r in records.load_records(out) if r.protocol == "tuned"]
    assert tuned.tuning["search"] == "halving" and tuned.hparams.recipe["lr"] == full.hparams.recipe["lr"]


def test_a_killed_tune_resumes_and_trains_nothing_twice(tmp_path, tiny_plugin):
    task, out = make_task_folder(tmp_path / "colours"), tmp_path / "runs"
    args = [sys.executable, "-m", "petl_bench.cli",
            *_tune(tiny_plugin, task, out, "--methods", "lora", "--epochs", "30", "--checkpoint-seconds", "0",
                   "--seeds", "0,1")]  # fmt: skip
    process = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not list(out.glob(f"*__tune__*/{records.RECORD}")):  # inside stage 1, after its first run
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    before = {r.run_id for r in records.load_records(out)}
    rerun = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not list(out.glob(f"*__tuned__*/{records.EPOCH_LOG}")):  # inside stage 2
        assert rerun.poll() is None and time.monotonic() < deadline + 180
        time.sleep(0.05)
    os.kill(rerun.pid, signal.SIGKILL)
    rerun.wait()
    final = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    assert "0 run(s) trained, 2 already finished" in final.stdout, "stage 1 is not trained again"
    found = records.load_records(out)
    assert len(found) == 2 + 2 and before <= {r.run_id for r in found}
    for r in found:
        lines = (out / r.run_id / records.EPOCH_LOG).read_text().splitlines()
        assert [int(line.split('"epoch": ')[1].split(",")[0]) for line in lines] == list(range(30))


def test_report_renders_tuned_tables_with_missing_cells(tmp_path):
    runs = []
    for seed in (0, 1):
        for method, task, top1 in (
            ("convpass", "cifar", 70.0 + seed),
            ("convpass", "dtd", 60.0),
            ("lora", "cifar", 65.0),
        ):
            r = synthetic_record(method, task, seed, top1, protocol="tuned")
            r.tuning = {"chosen": {"lr": 0.01, "scale": 10}, "chosen_val_top1": 71.5, "configurations": [{}] * 20,
                        "search_cost": {"runs": 20, "seconds": 3600.0, "images": 10**6}}  # fmt: skip
            runs.append(r)
    runs.append(synthetic_record("convpass", "cifar", 0, 10.0, protocol="final"))
    pb.report.write_report(runs, tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert "protocol 'tuned'" in markdown and "protocol 'final'" in markdown, "protocols are never mixed"
    assert "| vtab | vit_base_patch16_224.orig_in21k | convpass | cifar | lr=0.01, scale=10 | 71.5 | 20 |" in markdown
    assert "| vtab | vit_base_patch16_224.orig_in21k | convpass | 40 | 2.00 | 2,000,000 |" in markdown
    tuned = next(line for line in markdown.splitlines() if line.startswith("| lora |") and "65.0" in line)
    assert "–" in tuned, "a task lora never ran is a missing cell"


def test_a_second_tune_while_stage_one_trains_elsewhere_says_so_and_exits_1(tmp_path, tiny_plugin):
    task, out = make_task_folder(tmp_path / "colours"), tmp_path / "runs"
    grid = ["--grid", "recipe.lr=1e-3", "--grid", "recipe.weight_decay=1e-4"]
    tune = [a for a in _tune(tiny_plugin, task, out, "--methods", "linear", "--epochs", "2000") if a not in GRID]
    args = [sys.executable, "-m", "petl_bench.cli", *tune, *grid]
    first = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not [p for p in out.glob(f"*/{records.EPOCH_LOG}") if p.stat().st_size > 0]:
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        second = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert second.returncode == 1, second.stderr
        assert "training in another process" in " ".join(second.stdout.split())
    finally:
        first.kill()
        first.wait()
