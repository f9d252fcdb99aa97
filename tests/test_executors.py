"""Sweeps outside this process: SLURM through submitit (its local cluster here) and the job ledger."""

from __future__ import annotations

import pytest
from conftest import TINY_RUN, make_task_folder, run_cli

from petl_bench import records

pytest.importorskip("submitit")


def test_slurm_executor_runs_each_run_once_and_skips_them_on_resubmission(monkeypatch, capsys, tmp_path, tiny_plugin):
    task = make_task_folder(tmp_path / "colours")
    out = tmp_path / "runs"
    args = ["run", "--plugin", str(tiny_plugin), "--task-dir", str(task), "--methods", "linear,lora", "--epochs", "1",
            "--output", str(out), *TINY_RUN, "--executor", "slurm", "--slurm-cluster", "local", "--gpus-per-job", "0",
            "--wait"]  # fmt: skip
    code, stdout, stderr = run_cli(monkeypatch, capsys, *args)
    assert code == 0, stderr
    assert "submitted 2 run(s) to local" in stdout and "2 of 2 run(s) have records" in stdout
    assert sorted(r.method for r in records.load_records(out)) == ["linear", "lora"]
    assert list((out / "slurm-logs").rglob("*.out")), "task logs live under the output folder"
    code, stdout, _ = run_cli(monkeypatch, capsys, *args)
    assert code == 0 and "submitted 0 run(s)" in stdout, "finished runs are the ledger: nothing to resubmit"


def test_gpus_beyond_the_visible_ones_are_refused(monkeypatch, capsys, tmp_path, tiny_plugin):
    task = make_task_folder(tmp_path / "colours")
    for option, message in (
        ("--gpus", "--gpus 2: worker processes"),
        ("--runs-per-gpu", "--runs-per-gpu 2: worker processes"),
    ):
        code, _, stderr = run_cli(monkeypatch, capsys, "run", "--plugin", str(tiny_plugin), "--task-dir", str(task),
                                  "--methods", "linear", option, "2", "--output", str(tmp_path / "r"), *TINY_RUN)  # fmt: skip
        assert code == 2 and message in stderr and "torch sees 0" in stderr and len(stderr.strip().splitlines()) == 1
        assert not (tmp_path / "r").exists(), "refused before the plan: nothing written"


def test_slurm_without_a_cluster_is_a_clear_error(monkeypatch, capsys, tmp_path, tiny_plugin):
    task = make_task_folder(tmp_path / "colours")
    code, _, stderr = run_cli(monkeypatch, capsys, "run", "--plugin", str(tiny_plugin), "--task-dir", str(task),
                              "--methods", "linear", "--executor", "slurm", "--output", str(tmp_path / "r"), *TINY_RUN)  # fmt: skip
    assert code == 2 and "cannot submit to slurm" in stderr and "srun" in stderr


def test_tune_on_slurm_runs_stage_one_then_stage_two(monkeypatch, capsys, tmp_path, tiny_plugin):
    task = make_task_folder(tmp_path / "colours")
    out = tmp_path / "runs"
    args = ["tune", "--plugin", str(tiny_plugin), "--task-dir", str(task), "--methods", "linear", "--epochs", "1",
            "--grid", "recipe.lr=1e-3,1e-2", "--grid", "recipe.weight_decay=1e-4", "--output", str(out), *TINY_RUN,
            "--executor", "slurm", "--slurm-cluster", "local", "--gpus-per-job", "0"]  # fmt: skip
    code, stdout, stderr = run_cli(monkeypatch, capsys, *args, "--wait")
    assert code == 0, stderr
    found = records.load_records(out)
    assert sorted(r.protocol for r in found) == ["tune", "tune", "tuned"]
    (tuned,) = [r for r in found if r.protocol == "tuned"]
    assert tuned.tuning["selection"].startswith("chosen on val200 among 2 configurations")
