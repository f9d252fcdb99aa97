"""What a new user meets: the same number whatever the cache holds, plans before work, output in logs."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import make_task_folder

import petl_bench as pb
from petl_bench import records
from petl_bench.config import Recipe
from petl_bench.planning import plan
from petl_bench.runner import run_sweep
from petl_bench.task import folder_task

TINY = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)


def _drawing_weights(path):
    """A weight source that, like the demo backbone's one-time conversion, draws random numbers the
    first time (building and checking a model) and then caches its file."""

    def weights():
        if not path.exists():
            from safetensors.torch import save_file

            torch.randn(1000), np.random.rand(10), random.random()
            model = pb.build_backbone("vit_tiny_patch16_224", "none", image_size=16, **TINY)[0]
            save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("head")}, path)
        return path

    return weights


def test_the_same_run_gives_the_same_record_on_a_cold_and_a_warm_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PETL_BENCH_CACHE", str(tmp_path / "cold-cache"))
    name = "cold_warm_test_vit"
    if name not in pb.BACKBONES:
        source = pb.BackboneSource(name, "vit_tiny_patch16_224", _drawing_weights(tmp_path / "w.safetensors"),
                                   model_kwargs=TINY)  # fmt: skip
        pb.register_backbone(source, name=name)
    task = folder_task(make_task_folder(tmp_path / "colours"))
    jobs = plan(["linear", "lora"], [task], [name], [0], protocol="final", pretrained="hub",
                recipe=Recipe(epochs=3, batch_size=8, image_size=16))  # fmt: skip
    cold = run_sweep(jobs, tmp_path / "cold", device=torch.device("cpu"))
    assert not list((tmp_path / "cold-cache").rglob(".*tmp*"))
    warm = run_sweep(jobs, tmp_path / "warm", device=torch.device("cpu"))
    for first, second in zip(cold.finished, warm.finished):
        assert first.run_id == second.run_id
        assert first.metrics.top1 == second.metrics.top1
        losses = [
            [line for line in (out / r.run_id / records.EPOCH_LOG).read_text().splitlines()]
            for out, r in ((tmp_path / "cold", first), (tmp_path / "warm", second))
        ]
        assert [line.split('"loss": ')[1].split(",")[0] for line in losses[0]] == [
            line.split('"loss": ')[1].split(",")[0] for line in losses[1]
        ], f"{first.method}: the epoch losses differ between a cold and a warm cache"


@pytest.mark.parametrize("epochs,warmup", [(100, 10), (5, 0), (10, 1), (19, 1), (30, 3), (1, 0)])
def test_warmup_is_ten_percent_of_the_schedule_and_keeps_the_paper_identity(epochs, warmup):
    assert Recipe(epochs=epochs).warmup == warmup
    assert Recipe(epochs=7, warmup_epochs=2).warmup == 2
    paper = Recipe().identity()
    assert paper["warmup_epochs"] == 10 and "warmup_fraction" not in paper


# --- plan before work, output in logs -------------------------------------------------------------------

import subprocess  # noqa: E402
import sys  # noqa: E402

from conftest import TINY_RUN, run_cli  # noqa: E402


def _args(tiny_plugin, task, out, *extra):
    return ["run", "--plugin", str(tiny_plugin), "--task-dir", str(task), "--output", str(out), *TINY_RUN, *extra]


def test_dry_run_lists_every_run_and_trains_nothing(monkeypatch, capsys, tmp_path, tiny_plugin):
    task, out = make_task_folder(tmp_path / "colours"), tmp_path / "runs"
    sweep = ["--methods", "linear,lora", "--seeds", "0,1", "--epochs", "2"]
    code, stdout, stderr = run_cli(monkeypatch, capsys, *_args(tiny_plugin, task, out, *sweep, "--dry-run"))
    assert code == 0, stderr
    assert stdout.count("to run") == 4 and "16x16" in stdout and "plan: 4 run(s) to train" in stderr
    assert not out.exists() or not any(out.iterdir()), "a dry run writes nothing"
    assert run_cli(monkeypatch, capsys, *_args(tiny_plugin, task, out, "--methods", "linear", "--epochs", "2"))[0] == 0
    code, stdout, stderr = run_cli(monkeypatch, capsys, *_args(tiny_plugin, task, out, *sweep, "--dry-run"))
    assert stdout.count("to run") == 3 and stdout.count("finished") == 1 and "1 finished" in stderr


def test_a_log_gets_plain_progress_lines_and_one_line_per_finished_run(tmp_path, tiny_plugin):
    task, out = make_task_folder(tmp_path / "colours"), tmp_path / "runs"
    result = subprocess.run(
        [sys.executable, "-m", "petl_bench.cli", *_args(tiny_plugin, task, out, "--methods", "linear,lora",
                                                         "--epochs", "3")],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert any(line.startswith("plan: 2 run(s) to train") for line in lines)
    assert sum(line.startswith("finished ") and "top-1" in line for line in lines) == 2
    assert any("runs 2/2" in line and "6/6" in line for line in lines), "the overall progress reaches its end"
    assert "\x1b[" not in result.stderr, "no terminal control codes in a log"


def test_image_size_and_warmup_are_recorded_resolved(monkeypatch, capsys, tmp_path, tiny_plugin):
    task, out = make_task_folder(tmp_path / "colours"), tmp_path / "runs"
    args = [
        a for a in _args(tiny_plugin, task, out, "--methods", "linear", "--epochs", "5") if a != "recipe.image_size=16"
    ]
    args.remove("--set")
    assert run_cli(monkeypatch, capsys, *args, "--image-size", "24")[0] == 0
    (record,) = records.load_records(out)
    assert record.hparams.input_size == [24, 24] and record.hparams.recipe["image_size"] == 24
    assert record.hparams.recipe["warmup_epochs"] == 0 and record.hparams.recipe["head_init"] == "default"


def test_version_and_an_unreachable_hub_fail_fast(tmp_path):
    from petl_bench import __version__

    version = subprocess.run([sys.executable, "-m", "petl_bench.cli", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and __version__ in version.stdout
    env = {**__import__("os").environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    task = make_task_folder(tmp_path / "colours")
    start = __import__("time").monotonic()
    result = subprocess.run([sys.executable, "-m", "petl_bench.cli", "run", "--task-dir", str(task), "--methods",
                             "linear", "--backbone", "vit_tiny_patch16_224", "--batch-size", "8", "--output",
                             str(tmp_path / "runs")],
                            capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "cannot reach http://127.0.0.1:9" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and __import__("time").monotonic() - start < 30
    assert not (tmp_path / "runs").exists()


def test_params_with_a_task_counts_that_tasks_classifier(monkeypatch, capsys):
    code, stdout, stderr = run_cli(monkeypatch, capsys, "params", "--methods", "noah", "--task", "dmlab",
                                   "--format", "csv")  # fmt: skip
    assert code == 0, stderr
    row = stdout.splitlines()[1].split(",")
    assert int(row[3]) - int(row[2]) == 768 * 6 + 6, "dmlab has 6 classes"


def test_cost_table_prints_integer_counts_and_what_speeds_measure(tmp_path):
    from conftest import synthetic_record as record

    runs = [record("convpass", "cifar", 0, 50.0, params=1000), record("convpass", "dtd", 0, 50.0, params=2000),
            record("linear", "cifar", 0, 40.0, params=0)]  # fmt: skip
    runs[2].cost.head_trained_on_cached_features = True
    costs = pb.report.cost_frame(pb.report.runs_frame(runs)).set_index("method")
    assert costs.loc["convpass", "trainable_params"] == "1,000–2,000" and costs.loc["linear", "trainable_params"] == "0"
    assert costs.loc["linear", "speeds_measure"].startswith("classifier on cached features")
    assert costs.loc["convpass", "speeds_measure"] == "full model"
    pb.report.write_report(runs, tmp_path)
    cost_rows = [line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| vtab |")]
    assert cost_rows and not any("nan" in line for line in cost_rows), "a missing value is a dash, not nan"


def test_an_explicit_warmup_not_below_the_epochs_is_warned_about(caplog):
    from petl_bench.task import FileListTask

    task = FileListTask(name="warm", suite="custom", num_classes=3)
    plan(["linear"], [task], ["x"], [0], protocol="final", pretrained="none", recipe=Recipe(epochs=5, warmup_epochs=5))
    assert "recipe.warmup_epochs=5 is not below epochs=5" in caplog.text


def test_tasks_say_what_they_are_evaluated_on(monkeypatch, capsys):
    code, stdout, _ = run_cli(monkeypatch, capsys, "tasks", "--suite", "dg")
    flat = " ".join(stdout.split())
    assert code == 0 and "ImageNet val" in flat and "imagenet_sketch" in flat and "imagenet_r" in flat


def test_unknown_recipe_settings_list_only_settings(monkeypatch, capsys, tmp_path, tiny_plugin):
    task = make_task_folder(tmp_path / "colours")
    code, _, stderr = run_cli(
        monkeypatch, capsys, *_args(tiny_plugin, task, tmp_path / "runs", "--set", "recipe.bogus=1")
    )
    assert code == 2 and "unknown recipe setting bogus" in stderr
    assert "EXECUTION" not in stderr and "CHOICES" not in stderr and "warmup_fraction" in " ".join(stderr.split())


def test_version_and_help_start_without_torch():
    import subprocess
    import sys

    from petl_bench import backbones, cli

    assert cli.PAPER_BACKBONE == backbones.PAPER_BACKBONE
    for argv in (["--version"], ["--help"], ["run", "--help"]):
        probe = (
            "import sys; from petl_bench import cli; sys.argv = ['petl-bench', *%r]\n"
            "try:\n    cli.main()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules, file=sys.stderr)"
            % (argv,)
        )
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
        assert done.stderr.strip().splitlines()[-1] == "False", (argv, done.stderr)
