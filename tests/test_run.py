"""`petl-bench run` / `report` end to end on a tiny backbone: records, resume, bad inputs, concurrency."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, cli_process, make_task_folder, run_cli  # noqa: F401 - re-used

import petl_bench as pb
from petl_bench import records


@pytest.fixture
def task(tmp_path) -> Path:
    return make_task_folder(tmp_path / "colours")


def test_run_writes_records_and_a_rerun_skips_them(monkeypatch, capsys, tmp_path, task, tiny_plugin):
    out = tmp_path / "runs"
    args = ["run", "--plugin", str(tiny_plugin), "--task-dir", str(task), "--methods", "linear,convpass",
            "--epochs", "3", "--seeds", "0,1", "--output", str(out), *TINY_RUN]  # fmt: skip
    code, stdout, stderr = run_cli(monkeypatch, capsys, *args)
    assert code == 0, stderr
    assert "4 run(s) trained" in stdout and "convpass" in stdout
    found = records.load_records(out)
    assert len(found) == 4
    record = next(r for r in found if r.method == "convpass")
    assert (
        record.protocol == "final"
        and record.metrics.eval_split == "test"
        and record.metrics.curve == [{"epoch": 2, "top1": record.metrics.top1}]
    )
    assert record.hparams.method["scale"] == 1.0 and record.hparams.recipe["epochs"] == 3
    assert record.cost.trainable_params == 2 * 2 * ((2 * 8 + 1) * 32 + 9 * 64 + 16)
    assert record.cost.checkpoint_bytes > 0 and record.cost.peak_memory_bytes > 0
    assert record.cost.train_images_per_s > 0 and record.environment["torch"]
    run_dir = out / record.run_id
    assert len((run_dir / records.EPOCH_LOG).read_text().splitlines()) == 3
    assert (run_dir / records.CHECKPOINT).stat().st_size == record.cost.checkpoint_bytes

    code, stdout, _ = run_cli(monkeypatch, capsys, *args)
    assert code == 0 and "0 run(s) trained, 4 already finished" in stdout
    code, stdout, _ = run_cli(monkeypatch, capsys, *args[:-2], "--set", "convpass.scale=10", *TINY_RUN[-2:])
    assert "2 run(s) trained, 2 already finished" in stdout, "a changed hyperparameter is a new run"

    report = tmp_path / "report"
    code, stdout, stderr = run_cli(monkeypatch, capsys, "report", "--results", str(out), "--out", str(report))
    assert code == 0, stderr
    runs = (report / "runs.csv").read_text().splitlines()
    assert runs[0].startswith("method,task,backbone,seed,protocol,top1,trainable_params")
    assert len(runs) == 1 + 6
    assert (report / "report.md").is_file() and list(report.glob("accuracy_vs_params__*.png"))


def test_paper_protocol_records_the_max_over_periodic_test_evaluations(
    monkeypatch, capsys, tmp_path, task, tiny_plugin
):
    out = tmp_path / "runs"
    code, _, stderr = run_cli(
        monkeypatch, capsys, "run", "--plugin", str(tiny_plugin), "--task-dir", str(task), "--methods", "lora",
        "--epochs", "4", "--protocol", "paper", "--set", "recipe.eval_every=2", "--output", str(out), *TINY_RUN,
    )  # fmt: skip
    assert code == 0, stderr
    (record,) = records.load_records(out)
    curve = record.metrics.curve
    assert [point["epoch"] for point in curve] == [1, 3]
    assert record.metrics.top1 == max(point["top1"] for point in curve)
    assert record.metrics.top1_last == curve[-1]["top1"]
    assert record.metrics.selection.startswith("PAPER PROTOCOL")


def test_tune_protocol_trains_on_train_and_evaluates_val(monkeypatch, capsys, tmp_path, task, tiny_plugin):
    out = tmp_path / "runs"
    args = ["run", "--plugin", str(tiny_plugin), "--task-dir", str(task), "--methods", "linear", "--epochs", "1",
            "--protocol", "tune", "--output", str(out), *TINY_RUN]  # fmt: skip
    assert run_cli(monkeypatch, capsys, *args)[0] == 0
    (record,) = records.load_records(out)
    assert record.metrics.eval_split == "val200" and record.metrics.eval_images == 8
    assert record.metrics.train_images == 32


BAD_INPUTS = [
    (["--methods", "nope"], "unknown method 'nope'; choose from:"),
    (["--tasks", "nope"], "unknown task 'nope'; choose from:"),
    (["--backbone", "nope"], "unknown backbone 'nope'"),
    (["--protocol", "best"], "unknown protocol 'best'; choose from: final, paper, tune"),
    (["--set", "convpass.bogus=1"], "method 'convpass' has no hyperparameter 'bogus'"),
    (["--set", "recipe.bogus=1"], "unknown recipe setting bogus"),
    (["--set", "recipe.augment=fancy"], "recipe.augment is 'fancy'; choose from: none, deit, crop_flip"),
    (["--set", "recipe.epochs=many"], "cannot read recipe.epochs='many' as int"),
    (["--set", "noequals"], "--set expects SCOPE.KEY=VALUE"),
    (["--seeds", "a,b"], "--seeds takes comma-separated integers"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--methods", "vpt_deep", "--backbone", "convnext_atto"], "method 'vpt_deep' does not support the convnext"),
]


@pytest.mark.parametrize("extra,message", BAD_INPUTS, ids=[m.split(";")[0][:30] for _, m in BAD_INPUTS])
def test_bad_options_exit_2_with_one_clear_line(monkeypatch, capsys, tmp_path, task, tiny_plugin, extra, message):
    out = tmp_path / "runs"
    base = ["run", "--plugin", str(tiny_plugin), "--task-dir", str(task), "--epochs", "1", "--output", str(out)]
    code, _, stderr = run_cli(monkeypatch, capsys, *base, *TINY_RUN, *extra)
    assert code == 2
    assert message in stderr and "Traceback" not in stderr
    assert not list(out.rglob(records.RECORD)) if out.exists() else True


def _break(folder: Path, how: str) -> None:
    lists = folder / "train800val200.txt"
    lines = lists.read_text().splitlines()
    if how == "missing image":
        (folder / lines[5].split()[0]).unlink()
    elif how == "malformed line":
        lines[7] = "images/train/000007.jpg"
    elif how == "label out of range":
        lines[7] = "images/train/000007.jpg 4"
    elif how == "missing list":
        (folder / "test.txt").unlink()
    lists.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "how,message",
    [
        ("missing image", r"1 of 40 images listed in .*train800val200.txt are missing: .*000005.jpg \(line 6\)"),
        ("malformed line", r"train800val200.txt:8: malformed line"),
        ("label out of range", r"train800val200.txt:8: label 4 outside \[0, 4\)"),
        ("missing list", r"missing list file .*test.txt"),
    ],
)
def test_bad_data_exits_2_before_anything_trains(monkeypatch, capsys, tmp_path, task, tiny_plugin, how, message):
    import re

    (task / "classes.txt").write_text("a\nb\nc\nd\n")
    _break(task, how)
    out = tmp_path / "runs"
    code, _, stderr = run_cli(monkeypatch, capsys, "run", "--plugin", str(tiny_plugin), "--task-dir", str(task),
                              "--output", str(out), *TINY_RUN)  # fmt: skip
    assert code == 2 and re.search(message, " ".join(stderr.split())), stderr
    assert not out.exists() or not list(out.iterdir()), "no partial run folders"


def test_vtab_without_data_says_how_to_get_it(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("PETL_BENCH_DATA", raising=False)
    code, _, stderr = run_cli(
        monkeypatch, capsys, "run", "--suite", "vtab", "--methods", "linear", "--output", str(tmp_path)
    )
    assert code == 2 and "needs a data root" in stderr and "NOAH" in stderr
    code, _, stderr = run_cli(
        monkeypatch, capsys, "run", "--tasks", "cifar", "--data-root", str(tmp_path), "--output", str(tmp_path)
    )
    assert code == 2 and "task 'cifar' not found under" in stderr


def test_debug_shows_the_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "petl_bench.cli", "--debug", "params", "--methods", "nope"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode != 0 and "Traceback" in result.stderr and "UserError" in result.stderr


def _wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.05)


def test_a_run_killed_mid_training_leaves_no_record_and_the_rerun_completes(tmp_path, task, tiny_plugin):
    out = tmp_path / "runs"
    args = ["run", "--plugin", str(tiny_plugin), "--task-dir", str(task), "--methods", "linear,lora", "--epochs", "400",
            "--checkpoint-seconds", "0", "--output", str(out), *TINY_RUN]  # fmt: skip
    process = cli_process(*args, cwd=tmp_path)
    logs = lambda: [p for p in out.glob("*/epochs.jsonl") if p.stat().st_size > 0]  # noqa: E731
    # Kill while the second run (lora) is training: the first (linear) has its record.
    _wait_for(lambda: any("lora" in str(p) for p in logs()) or process.poll() is not None)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished = records.load_records(out)
    assert [r.method for r in finished] == ["linear"], "the killed run must not look finished"
    lora_dir = next(p.parent for p in out.glob("*lora*/epochs.jsonl"))
    assert not (lora_dir / records.RECORD).exists()
    assert (lora_dir / records.RESUME).is_file(), "the training state was saved"
    rerun = cli_process(*args, cwd=tmp_path)
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert "1 run(s) trained, 1 already finished" in stdout
    assert sorted(r.method for r in records.load_records(out)) == ["linear", "lora"]
    epochs = [json.loads(line)["epoch"] for line in (lora_dir / records.EPOCH_LOG).read_text().splitlines()]
    assert epochs == list(range(400)), "the resumed run continues where it stopped"
    assert not (lora_dir / records.RESUME).exists()


def test_two_processes_on_one_output_folder_do_not_collide(tmp_path, task, tiny_plugin):
    out = tmp_path / "runs"
    args = ["run", "--plugin", str(tiny_plugin), "--task-dir", str(task), "--methods", "linear,lora,bitfit",
            "--seeds", "0,1", "--epochs", "20", "--output", str(out), *TINY_RUN]  # fmt: skip
    first, second = cli_process(*args, cwd=tmp_path), cli_process(*args, cwd=tmp_path)
    results = [first.communicate(timeout=600), second.communicate(timeout=600)]
    assert first.returncode == 0 and second.returncode == 0, results
    trained = sum(int(stdout.split(" run(s) trained")[0].split()[-1]) for stdout, _ in results)
    assert trained == 6, "every run trained exactly once across both processes"
    found = records.load_records(out)
    assert len(found) == 6 and len({r.run_id for r in found}) == 6
    for record_file in out.rglob(records.RECORD):
        json.loads(record_file.read_text())
    assert not list(out.rglob("*.tmp")), "no temporary files left behind"


def test_cached_feature_linear_probe_equals_the_uncached_path(monkeypatch, capsys, tmp_path, task, tiny_plugin):
    from safetensors.torch import load_file

    heads = {}
    for cache in ("true", "false"):
        out = tmp_path / cache
        code, _, stderr = run_cli(
            monkeypatch, capsys, "run", "--plugin", str(tiny_plugin), "--task-dir", str(task), "--methods", "linear",
            "--epochs", "1", "--set", "recipe.warmup_epochs=0", "--set", f"recipe.cache_features={cache}",
            "--output", str(out), *TINY_RUN,
        )  # fmt: skip
        assert code == 0, stderr
        (record,) = records.load_records(out)
        assert record.cost.head_trained_on_cached_features == (cache == "true")
        heads[cache] = (load_file(str(out / record.run_id / records.CHECKPOINT)), record.metrics.top1)
    for name in ("head.weight", "head.bias"):
        torch.testing.assert_close(heads["true"][0][name], heads["false"][0][name], rtol=1e-4, atol=1e-5)
    assert heads["true"][1] == heads["false"][1]


def test_every_record_carries_its_efficiency_profile(monkeypatch, capsys, tmp_path, task, tiny_plugin):
    out = tmp_path / "runs"
    code, _, stderr = run_cli(monkeypatch, capsys, "run", "--plugin", str(tiny_plugin), "--task-dir", str(task),
                              "--methods", "convpass", "--epochs", "1", "--output", str(out), *TINY_RUN)  # fmt: skip
    assert code == 0, stderr
    (record,) = records.load_records(out)
    cost = record.cost
    for field in ("train_images_per_s", "eval_images_per_s", "peak_memory_bytes", "forward_flops", "trainable_params",
                  "trainable_params_with_head", "checkpoint_bytes"):  # fmt: skip
        assert getattr(cost, field) > 0, field
    assert all(getattr(cost.seconds, phase) > 0 for phase in ("data", "train", "eval", "total"))
    # one 16x16 image through a 2-block width-32 ViT: at least the patch embedding and the MLPs
    assert cost.forward_flops > 2 * 2 * 5 * 32 * 128


def test_all_methods_leaves_out_what_cannot_run_here(monkeypatch, capsys, tmp_path, task, tiny_plugin):
    out = tmp_path / "runs"
    code, stdout, stderr = run_cli(monkeypatch, capsys, "run", "--plugin", str(tiny_plugin), "--task-dir", str(task),
                                   "--methods", "all", "--epochs", "1", "--output", str(out), *TINY_RUN)  # fmt: skip
    assert code == 0, stderr
    text = " ".join(stdout.split())
    assert "zero_shot on tiny_test_vit / colours" in text and "noah on tiny_test_vit / colours" in text
    methods = {r.method for r in records.load_records(out)}
    # every registered method ran but those that cannot here: zero-shot (CLIP only), NOAH and GLoRA (no subnet or
    # paths for the task), SCT (96 channels of a 32-wide test ViT)
    assert methods == set(pb.METHODS.names()) - {"zero_shot", "noah", "glora", "sct"}
    assert {"full", "linear", "convpass", "lora", "ssf", "bi_lora", "adapter_plus", "dtl", "arc"} <= methods


def test_a_finished_run_is_not_reused_on_changed_data(monkeypatch, capsys, tmp_path, task, tiny_plugin):
    """A copy of the data with one image changed is other data: the run trains again, and the first result is
    kept (and reported) as a run on the first copy, in a row of its own."""
    import shutil

    import numpy as np
    from PIL import Image

    out = tmp_path / "runs"
    args = [
        "run",
        "--plugin",
        str(tiny_plugin),
        "--methods",
        "linear",
        "--epochs",
        "1",
        "--output",
        str(out),
        *TINY_RUN,
    ]
    code, stdout, stderr = run_cli(monkeypatch, capsys, *args, "--task-dir", str(task))
    assert code == 0 and "1 run(s) trained" in stdout, stderr
    copy = tmp_path / "copy" / task.name
    shutil.copytree(task, copy)
    code, stdout, stderr = run_cli(monkeypatch, capsys, *args, "--task-dir", str(copy))
    assert "0 run(s) trained, 1 already finished" in stdout, "an identical copy is the same data"
    image = copy / "images" / "train" / "000000.jpg"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    code, stdout, stderr = run_cli(monkeypatch, capsys, *args, "--task-dir", str(copy), "--dry-run")
    assert "plan: 1 run(s) to train, 0 finished" in stderr and "data changed" in stdout
    code, stdout, stderr = run_cli(monkeypatch, capsys, *args, "--task-dir", str(copy))
    assert code == 0 and "1 run(s) trained, 0 already finished" in stdout, stderr
    found = records.load_records(out)
    assert len(found) == 2 and len({r.data["fingerprint"] for r in found}) == 2
    code, stdout, stderr = run_cli(monkeypatch, capsys, *args, "--task-dir", str(copy))
    assert "0 run(s) trained, 1 already finished" in stdout
    code, stdout, stderr = run_cli(monkeypatch, capsys, "report", "--results", str(out), "--out", str(tmp_path / "r"))
    assert code == 0 and "linear (data copy 1)" in stdout and "linear (data copy 2)" in stdout
    assert stderr.count("MIXED DATA") + stderr.count("different data") <= 1


def test_precision_is_a_setting_recorded_in_every_record(monkeypatch, capsys, tmp_path, task, tiny_plugin):
    out = tmp_path / "runs"
    args = ["run", "--plugin", str(tiny_plugin), "--task-dir", str(task), "--methods", "lora", "--epochs", "1",
            "--output", str(out), *TINY_RUN]  # fmt: skip
    assert run_cli(monkeypatch, capsys, *args)[0] == 0
    code, stdout, stderr = run_cli(monkeypatch, capsys, *args, "--precision", "bf16")
    assert code == 0 and "1 run(s) trained" in stdout, "another precision is another run"
    found = {r.hparams.precision: r for r in records.load_records(out)}
    assert set(found) == {"fp32", "bf16"}, "auto on a CPU is fp32; the record says which"
    assert found["fp32"].run_id != found["bf16"].run_id
    code, _, stderr = run_cli(monkeypatch, capsys, *args, "--precision", "fp16")
    assert code == 2 and "recipe.precision is 'fp16'; choose from: auto, bf16, fp32" in stderr


def test_inference_speed_is_measured_once_per_architecture_in_a_sweep(monkeypatch, capsys, tmp_path, task, tiny_plugin):
    out = tmp_path / "runs"
    args = ["run", "--plugin", str(tiny_plugin), "--task-dir", str(task), "--methods", "lora,convpass", "--epochs", "1",
            "--seeds", "0,1", "--output", str(out), *TINY_RUN]  # fmt: skip
    assert run_cli(monkeypatch, capsys, *args)[0] == 0
    speeds = {}
    for record in records.load_records(out):
        speeds.setdefault(record.method, []).append(record.cost.inference_images_per_s)
    for method, measured in speeds.items():
        assert len(measured) == 2 and measured[0] == measured[1], "the seeds share one measurement"
        assert measured[0]["as_trained"] > 0 and method in measured[0]["measured_for"]
    assert speeds["lora"][0] != speeds["convpass"][0]


def test_the_plans_compute_estimate_counts_every_trained_pass(tmp_path, task, tiny_plugin):
    """DyT's step trains the teacher pass as well as the student's (its official loss): twice the training
    compute of a one-pass method in the plan's estimate; without distillation, once."""
    from petl_bench.planning import SweepSpec, estimated_flops, validate

    def flops(method: str, *settings: str) -> float:
        spec = SweepSpec(methods=method, task_dirs=[str(task)], backbones=["tiny_test_vit"], seeds=[0],
                         pretrained="none", recipe_overrides={"batch_size": 8, "image_size": 16, "epochs": 5},
                         settings=list(settings), plugins=[str(tiny_plugin)])  # fmt: skip
        checked = validate(spec.jobs(), strict=False)
        (job,) = checked.jobs
        data = checked.data[job.data_key]
        return estimated_flops(checked, job), len(data.train), len(data.eval)

    lora, train, evaluated = flops("lora")
    per_image = lora / (3 * train * 5 + evaluated)  # the backbone's forward FLOPs per image
    assert flops("dyt")[0] == pytest.approx(per_image * (2 * 3 * train * 5 + evaluated))
    assert flops("dyt", "dyt.distill=false")[0] == pytest.approx(lora)
