"""Merge and export: folded models give the trained logits; exports load back to identical logits."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import (
    TINY_RUN,
    TINY_SWIN,
    TINY_VIT,
    images,
    make_task_folder,
    randomize_trainable,
    run_cli,
    tiny_backbone,
    with_method,
)

import petl_bench as pb
from petl_bench import records
from petl_bench.errors import UserError

MERGEABLE = [("lora", {}), ("lora", {"variant": "qv", "scale": 2.0}), ("bitfit", {}), ("linear", {}), ("full", {})]


@pytest.mark.parametrize("spec", [TINY_VIT, TINY_SWIN], ids=["vit", "swin"])
@pytest.mark.parametrize("method,overrides", MERGEABLE, ids=[m + str(o) for m, o in MERGEABLE])
def test_merged_model_gives_the_trained_logits(spec, method, overrides):
    _, model = with_method(method, tiny_backbone(spec), **overrides)
    randomize_trainable(model)  # a training step's worth of non-zero updates
    merged = pb.merge(model)
    assert not any(type(m).__module__.startswith("petl_bench") for m in merged.modules()), "no wrapper left"
    x = images(spec)
    model.eval()
    with torch.no_grad():
        difference = (model(x) - merged(x)).abs().max().item()
    assert difference <= 1e-4
    if method == "lora":  # the update really was folded into the weight
        block = model.info.block_paths[0]
        original = model.backbone.get_submodule(block).attn.qkv.qkv.weight
        assert not torch.allclose(original, merged.get_submodule(block).attn.qkv.weight)


@pytest.mark.parametrize("method", ["convpass", "adapter", "adaptformer", "vpt_deep"])
def test_methods_that_cannot_fold_refuse_clearly(method):
    _, model = with_method(method, tiny_backbone(TINY_VIT))
    with pytest.raises(UserError, match=f"method '{method}' cannot be merged"):
        pb.merge(model)


@pytest.mark.parametrize("merged", [True, False], ids=["merged", "trainable-only"])
def test_export_then_load_exported_gives_identical_logits(monkeypatch, capsys, tmp_path, tiny_plugin, merged):
    task, out = make_task_folder(tmp_path / "colours"), tmp_path / "runs"
    args = ["run", "--plugin", str(tiny_plugin), "--task-dir", str(task), "--methods", "lora", "--epochs", "2",
            "--output", str(out), *TINY_RUN]  # fmt: skip
    assert run_cli(monkeypatch, capsys, *args)[0] == 0
    (record,) = records.load_records(out)
    assert record.cost.inference_images_per_s["as_trained"] > 0
    assert record.cost.inference_images_per_s["merged"] > 0, "lora merges: its merged speed is measured"
    target = tmp_path / "export" / "model.safetensors"
    extra = ["--merged"] if merged else []
    code, stdout, stderr = run_cli(monkeypatch, capsys, "export", str(out / record.run_id), "--out", str(target),
                                   "--plugin", str(tiny_plugin), *extra)  # fmt: skip
    assert code == 0, stderr
    trained, _ = pb.export.rebuild(out / record.run_id)
    assert _test_top1(trained, task) == record.metrics.top1, "the rebuilt model is the run's model"
    loaded = pb.load_exported(target)
    assert _test_top1(loaded, task) == record.metrics.top1
    assert isinstance(loaded, pb.PetlModel) != merged
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained(x), rtol=0, atol=1e-4 if merged else 0)
    description = target.with_suffix(".json").read_text()
    assert '"task": "colours"' in description and '"num_classes": 4' in description
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == target.with_suffix(".json").stat().st_mode & 0o777 == 0o666 & ~umask
    again = ["export", str(out / record.run_id), "--out", str(target), "--plugin", str(tiny_plugin), *extra]
    code, _, stderr = run_cli(monkeypatch, capsys, *again)
    assert code == 2 and "exists; pass --force to overwrite it" in stderr
    assert run_cli(monkeypatch, capsys, *again, "--force")[0] == 0


def _test_top1(model, task) -> float:
    from petl_bench.data import Normalizer, TensorDataset, read_split
    from petl_bench.engine import evaluate

    split = read_split("test", task / "test.txt", task, 4)
    data = TensorDataset.from_split(split, (16, 16), "bicubic")
    return evaluate(
        model, data, Normalizer(pb.backbones.IMAGENET_MEAN, pb.backbones.IMAGENET_STD), torch.device("cpu")
    )[0]


def test_exporting_a_method_that_cannot_fold_is_one_error_line(monkeypatch, capsys, tmp_path, tiny_plugin):
    task, out = make_task_folder(tmp_path / "colours"), tmp_path / "runs"
    args = ["run", "--plugin", str(tiny_plugin), "--task-dir", str(task), "--methods", "convpass", "--epochs", "1",
            "--output", str(out), *TINY_RUN]  # fmt: skip
    assert run_cli(monkeypatch, capsys, *args)[0] == 0
    (record,) = records.load_records(out)
    assert record.cost.inference_images_per_s["merged"] is None
    code, _, stderr = run_cli(monkeypatch, capsys, "export", str(out / record.run_id), "--out",
                              str(tmp_path / "m.safetensors"), "--merged", "--plugin", str(tiny_plugin))  # fmt: skip
    assert code == 2 and "cannot be merged" in stderr and not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("record", ["missing", '{"truncated', "[]"], ids=["missing", "truncated", "not a record"])
def test_exporting_a_folder_without_a_valid_record_is_one_error_line(monkeypatch, capsys, tmp_path, record):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if record != "missing":
        (run_dir / records.RECORD).write_text(record)
    code, _, stderr = run_cli(monkeypatch, capsys, "export", str(run_dir), "--out", str(tmp_path / "m.safetensors"))
    assert code == 2 and "holds no finished run" in stderr and "Traceback" not in stderr, stderr
    assert not (tmp_path / "m.safetensors").exists()


def test_loading_an_export_with_a_broken_description_is_a_user_error(tmp_path):
    (tmp_path / "m.safetensors").write_bytes(b"")
    (tmp_path / "m.json").write_text("{broken")
    with pytest.raises(UserError, match="is not a readable description"):
        pb.load_exported(tmp_path / "m.safetensors")
    for meta in ({"format": pb.export.FORMAT}, {"format": pb.export.FORMAT, "preprocessing": {"image_size": "x"}},
                 {"format": pb.export.FORMAT, "merged": False, "num_classes": 3, "backbone": "b",
                  "preprocessing": {"image_size": [32, 32]}}):  # fmt: skip
        (tmp_path / "m.json").write_text(json.dumps(meta))
        with pytest.raises(UserError, match="lacks or garbles a field"):
            pb.load_exported(tmp_path / "m.safetensors")
