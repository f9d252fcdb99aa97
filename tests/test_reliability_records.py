"""Records the report and a rerun must not trust: copies of one run, newer schemas (issue: reliability, round two)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import TINY_RUN, run_cli, synthetic_record

from petl_bench import install, records


def test_one_run_in_two_result_folders_is_counted_once(tmp_path, caplog):
    run = synthetic_record("lora", "cifar", 0, 50.0)
    records.write_record(tmp_path / "a" / run.run_id, run)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    found = records.load_records(tmp_path)
    assert len(found) == 1
    assert "counted once" in caplog.text and str(tmp_path / "a") in caplog.text and str(tmp_path / "b") in caplog.text


def test_a_record_of_a_newer_schema_is_left_alone_and_the_run_refused(monkeypatch, capsys, tmp_path, tiny_plugin):
    from conftest import make_task_folder

    task = make_task_folder(tmp_path / "colours")
    out = tmp_path / "runs"
    args = ["run", "--plugin", str(tiny_plugin), "--methods", "linear", "--epochs", "1", "--output", str(out),
            "--task-dir", str(task), *TINY_RUN]  # fmt: skip
    assert run_cli(monkeypatch, capsys, *args)[0] == 0
    (path,) = out.rglob(records.RECORD)
    newer = json.loads(path.read_text()) | {"schema_version": records.SCHEMA_VERSION + 1}
    path.write_text(json.dumps(newer))
    checkpoint = (path.parent / records.CHECKPOINT).read_bytes()
    code, stdout, stderr = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and "written by a newer petl-bench" in stderr and stderr.count("error:") == 1
    assert json.loads(path.read_text()) == newer and (path.parent / records.CHECKPOINT).read_bytes() == checkpoint
    assert not list(path.parent.glob("*.invalid"))


@pytest.mark.parametrize(
    "setting,message",
    [
        ("lora.dropout=2", "lora.dropout must be in [0.0, 1.0)"),
        ("lora.rank=-1", "lora.rank must be in [1, 8192]"),
        ("lora.rank=0", "lora.rank must be in [1, 8192]"),
        ("vpt_deep.tokens=100000000", "vpt_deep.tokens must be in [1, 1000]"),
        ("convpass.scale=nan", "convpass.scale must be a finite number"),
        ("peft:lora.lora_dropout=nan", "peft:lora.lora_dropout must be a finite number"),
        ("peft:lora.target_modules=[unclosed", "is not a regular expression"),
    ],
)
def test_method_settings_out_of_bounds_are_one_line_before_anything_trains(
    monkeypatch, capsys, tmp_path, tiny_plugin, setting, message
):
    from conftest import make_task_folder

    task, out = make_task_folder(tmp_path / "colours"), tmp_path / "runs"
    method = setting.split(".")[0]
    base = ["--plugin", str(tiny_plugin), "--task-dir", str(task), "--methods", method, "--output", str(out), *TINY_RUN]
    for command in (["run", *base, "--set", setting], ["run", *base, "--set", setting, "--dry-run"]):
        code, _, stderr = run_cli(monkeypatch, capsys, *command)
        assert code == 2 and message in " ".join(stderr.split()) and "Traceback" not in stderr, stderr
    key, value = setting.split("=", 1)
    if method == "lora":  # tune checks its grid's values the same way, before any training
        code, _, stderr = run_cli(monkeypatch, capsys, "tune", *base, "--dry-run", "--grid", f"{key}={value}")
        assert code == 2 and message in " ".join(stderr.split()), stderr
    assert not out.exists() or not list(out.rglob(records.RECORD))


def test_a_non_finite_loss_fails_the_run_naming_the_likely_cause(monkeypatch, capsys, tmp_path, tiny_plugin):
    from conftest import make_task_folder

    task, out = make_task_folder(tmp_path / "colours"), tmp_path / "runs"
    code, stdout, stderr = run_cli(monkeypatch, capsys, "run", "--plugin", str(tiny_plugin), "--task-dir", str(task),
                                   "--methods", "convpass", "--epochs", "2", "--output", str(out), *TINY_RUN,
                                   "--set", "convpass.scale=1e38")  # fmt: skip
    assert code == 1 and "0 run(s) trained" in stdout and "1 failed" in stdout
    assert "the training loss became" in " ".join(stdout.split()) and "a setting is likely too large" in stdout
    assert not list(out.rglob(records.RECORD)), "no record at chance"


@pytest.mark.parametrize(
    "value,message",
    [(float("nan"), "holds NaN or infinite values"), (None, "holds torch.int8 values, not floating-point weights")],
)
def test_weights_with_nan_or_integer_tensors_are_refused(monkeypatch, capsys, tmp_path, tiny_plugin, value, message):
    import torch
    from conftest import make_task_folder
    from safetensors.torch import save_file

    import petl_bench as pb

    task, out = make_task_folder(tmp_path / "colours"), tmp_path / "runs"
    assert run_cli(monkeypatch, capsys, "methods", "--plugin", str(tiny_plugin))[0] == 0
    model, _ = pb.build_backbone("tiny_test_vit", "none", num_classes=4, image_size=16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if value is None:
        state["pos_embed"] = state["pos_embed"].to(torch.int8)
    else:
        state["pos_embed"][0, 0, 0] = value
    weights = tmp_path / "weights.safetensors"
    save_file(state, str(weights))
    args = ["run", "--plugin", str(tiny_plugin), "--task-dir", str(task), "--methods", "linear", "--epochs", "1",
            "--output", str(out), *TINY_RUN]  # fmt: skip
    args[args.index("none")] = str(weights)
    code, _, stderr = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and message in " ".join(stderr.split()) and stderr.count("error:") == 1, stderr
    assert not list(out.rglob(records.RECORD))


def test_float16_weights_are_cast_and_the_record_says_so(monkeypatch, capsys, tmp_path, tiny_plugin):
    import torch
    from conftest import make_task_folder
    from safetensors.torch import save_file

    import petl_bench as pb

    task, out = make_task_folder(tmp_path / "colours"), tmp_path / "runs"
    assert run_cli(monkeypatch, capsys, "methods", "--plugin", str(tiny_plugin))[0] == 0
    model, _ = pb.build_backbone("tiny_test_vit", "none", num_classes=4, image_size=16)
    weights = tmp_path / "half.safetensors"
    save_file({k: v.to(torch.float16) for k, v in model.state_dict().items()}, str(weights))
    args = ["run", "--plugin", str(tiny_plugin), "--task-dir", str(task), "--methods", "linear", "--epochs", "1",
            "--output", str(out), *TINY_RUN]  # fmt: skip
    args[args.index("none")] = str(weights)
    code, _, stderr = run_cli(monkeypatch, capsys, *args)
    assert code == 0, stderr
    (record,) = records.load_records(out)
    assert any("float16 tensor(s) cast to float32" in note for note in record.notes), record.notes


def test_a_fifo_named_like_a_record_is_skipped_not_read(tmp_path, caplog):
    import os

    run = synthetic_record("lora", "cifar", 0, 50.0)
    records.write_record(tmp_path / "good", run)
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / records.RECORD)
    assert [r.run_id for r in records.load_records(tmp_path)] == [run.run_id]
    assert "not a regular file" in caplog.text


def test_data_get_refuses_to_replace_a_users_file_named_like_a_task_folder(tmp_path):
    from conftest import VTAB_TASKS, vtab_zip

    import petl_bench as pb
    from petl_bench.errors import UserError

    archive = vtab_zip(tmp_path / "few.zip", tasks=[t for t in VTAB_TASKS if t[1] == "kitti"])
    destination = tmp_path / "data" / "vtab-1k"
    destination.mkdir(parents=True)
    (destination / "kitti").write_text("my notes")
    with pytest.raises(UserError, match="is a file, not a task folder"):
        install.install_archive(archive, destination, [pb.TASKS.get("kitti")])
    assert (destination / "kitti").read_text() == "my notes"


@pytest.mark.parametrize(
    "code,message",
    [
        (
            "import petl_bench as pb\n\n@pb.register_method\nclass Mine(pb.Method):\n    name = 'lora'\n",
            "method 'lora' is already registered",
        ),
        ("import sys\nsys.exit(0)\n", "called sys.exit(0) while loading"),
    ],
    ids=["built-in name", "sys.exit"],
)
def test_a_misbehaving_plugin_is_one_line_exit_2(tmp_path, code, message):
    import subprocess
    import sys

    plugin = tmp_path / "plugin.py"
    plugin.write_text(code)
    done = subprocess.run([sys.executable, "-m", "petl_bench.cli", "methods", "--plugin", str(plugin)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("value,expected", [(0.5, 128), (200.0, 200), (30000.0, round(30000 * 255 / 65535))])
def test_float_tiffs_are_scaled_not_clipped(tmp_path, value, expected):
    import numpy as np
    from PIL import Image

    from petl_bench.data import decoded_images, read_split

    Image.fromarray(np.full((8, 8), value, dtype=np.float32), mode="F").save(tmp_path / "a.tif")
    assert Image.open(tmp_path / "a.tif").mode == "F"
    (tmp_path / "list.txt").write_text("a.tif 0\n")
    pixels = decoded_images(read_split("t", tmp_path / "list.txt", tmp_path, 1), (8, 8))
    assert int(pixels.min()) == int(pixels.max()) == expected


def test_a_malformed_manifest_entry_is_dropped_and_verify_rewrites_it(tmp_path, monkeypatch, capsys, caplog):
    import json as json_module

    from conftest import VTAB_TASKS, vtab_zip

    import petl_bench as pb
    from petl_bench import datasets

    root = tmp_path / "data"
    archive = vtab_zip(tmp_path / "few.zip", tasks=[t for t in VTAB_TASKS if t[1] == "kitti"])
    install.install_archive(archive, root / "vtab-1k", [pb.TASKS.get("kitti")])
    (root / datasets.MANIFEST).write_text(json_module.dumps({"tasks": {"aaa": "x", "bbb": {"lists": 3}}}))
    assert datasets.read_manifest(root)["tasks"] == {} and "malformed" in caplog.text
    data = pb.TASKS.get("kitti").splits(root, "final")
    assert datasets.data_identity(data)["manifest"] is None, "a run reads past the bad entries"
    code, stdout, stderr = run_cli(monkeypatch, capsys, "data", "verify", "--root", str(root), "--tasks", "kitti")
    assert code == 0, stderr
    written = json_module.loads((root / datasets.MANIFEST).read_text())["tasks"]
    assert set(written) == {"kitti"}, "verify rewrote the manifest without the malformed entries"
    assert datasets.data_identity(data)["manifest"] == datasets.entry_digest(written["kitti"])


def test_verify_on_a_root_it_cannot_write_verifies_and_says_so(tmp_path, monkeypatch, capsys):
    from conftest import VTAB_TASKS, vtab_zip

    import petl_bench as pb
    from petl_bench import datasets

    root = tmp_path / "data"
    archive = vtab_zip(tmp_path / "few.zip", tasks=[t for t in VTAB_TASKS if t[1] == "kitti"])
    install.install_archive(archive, root / "vtab-1k", [pb.TASKS.get("kitti")])

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(datasets, "write_manifest", read_only)
    code, stdout, _ = run_cli(monkeypatch, capsys, "data", "verify", "--root", str(root), "--tasks", "kitti")
    text = " ".join(stdout.split())
    assert code == 0 and "1 of 1 task(s) verified" in text and "the manifest could not be written" in text


def test_an_integer_index_of_an_original_checkpoint_is_not_refused_as_a_weight(tmp_path):
    """Original Swin checkpoints carry int64 ``relative_position_index`` buffers that timm's filter drops:
    integer tensors are refused only where the model holds a floating weight."""
    import torch
    from conftest import TINY_SWIN, tiny_backbone

    import petl_bench as pb

    model, _ = tiny_backbone(TINY_SWIN)
    state = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    state["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.int64)
    weights = tmp_path / "swin.pth"
    torch.save(state, weights)
    spec = {k: v for k, v in TINY_SWIN.items() if k != "name"}
    loaded, _ = pb.build_backbone(TINY_SWIN["name"], str(weights), num_classes=5, **spec)
    torch.testing.assert_close(
        loaded.state_dict()["layers.0.blocks.0.norm1.weight"], state["layers.0.blocks.0.norm1.weight"]
    )


def test_verify_that_finds_no_data_writes_nothing(monkeypatch, capsys, tmp_path):
    root = tmp_path / "nothing-here"
    code, _, stderr = run_cli(monkeypatch, capsys, "data", "verify", "--root", str(root), "--tasks", "cifar")
    assert code == 1 and "task 'cifar' not found" in stderr
    assert not root.exists(), "no folder and no manifest for a verify that verified nothing"
