"""What bad inputs, crafted files and crashes do: refused, skipped or recovered, never run or trusted."""

from __future__ import annotations

import csv
import errno
import fcntl
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RUN, TINY_VIT, cli_process, make_task_folder, run_cli, synthetic_record, tiny_backbone

import petl_bench as pb
from petl_bench import atomic, ledger, records
from petl_bench import data as data_module
from petl_bench.data import Normalizer, TensorDataset, decoded_images, read_split
from petl_bench.engine import Recipe, fit
from petl_bench.errors import UserError


@pytest.fixture
def task(tmp_path) -> Path:
    return make_task_folder(tmp_path / "colours")


def _base(tiny_plugin, task, out) -> list[str]:
    return ["run", "--plugin", str(tiny_plugin), "--task-dir", str(task), "--output", str(out), *TINY_RUN]


# --- 1, 9: the training state -------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tiny_setup():
    backbone = tiny_backbone(TINY_VIT, num_classes=3, seed=0)
    runner = pb.METHODS.get("lora")()
    model = pb.attach_method(*backbone, runner, runner.make_config())
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), generator=generator, dtype=torch.uint8)
    return model, TensorDataset(images, torch.arange(16) % 3)


def _write_state(path: Path, how: str, marker: Path) -> None:
    if how == "pickle payload":
        path.write_bytes(pickle.dumps({"epoch": 1, "params": _Payload(marker)}))
    elif how == "garbage":
        path.write_bytes(os.urandom(2000))
    elif how == "truncated":
        model, data = _tiny_setup()

        class Stop(Exception):
            pass

        def stop(entry):
            raise Stop

        with pytest.raises(Stop):
            fit(model, data, None, Normalizer((0.5,) * 3, (0.5,) * 3), Recipe(epochs=3, batch_size=8),
                device=torch.device("cpu"), seed=0, on_epoch=stop, resume=path, checkpoint_seconds=0)  # fmt: skip
        path.write_bytes(path.read_bytes()[:-200]) if path.exists() else path.write_bytes(b"PK")
    elif how == "another model":
        torch.save({"format": "petl-bench-resume/2", "epoch": 0, "params": {"x": torch.zeros(1)}}, path)


@pytest.mark.parametrize("how", ["pickle payload", "garbage", "truncated", "another model"])
def test_an_unusable_training_state_is_never_run_and_the_run_starts_afresh(tmp_path, caplog, how):
    recipe = Recipe(epochs=2, batch_size=8, warmup_epochs=1)
    normalizer, cpu = Normalizer((0.5,) * 3, (0.5,) * 3), torch.device("cpu")
    model, data = _tiny_setup()
    torch.manual_seed(5)
    expected = fit(model, data, data, normalizer, recipe, device=cpu, seed=3)
    state, marker = tmp_path / "resume.pt", tmp_path / "pwned"
    _write_state(state, how, marker)
    model, data = _tiny_setup()
    torch.manual_seed(5)
    result = fit(model, data, data, normalizer, recipe, device=cpu, seed=3, resume=state)
    assert not marker.exists(), "the file's code must never run"
    assert "discarded the saved training state" in caplog.text and (tmp_path / "resume.pt.rejected").is_file()
    assert [e.loss for e in result.epochs] == [e.loss for e in expected.epochs], "exactly as a fresh run"


# --- 2, 12: reports -------------------------------------------------------------------------------------


def test_report_neutralises_formulas_markup_and_mathtext(tmp_path):
    evil = [
        synthetic_record('=HYPERLINK("http://x","y")', "cifar", 0, 50.0, suite="custom"),
        synthetic_record("<img src=x onerror=alert(1)>", "cifar", 0, 60.0, suite="custom"),
        synthetic_record("convpass", "cifar", 0, 70.0, suite="custom"),
    ]  # one task of its own suite: every row complete, so every plot is drawn
    evil[2].backbone = "$\\foo{x}$|[link](http://x)"
    pb.report.write_report(evil, tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert "<img" not in markdown and "&lt;img" in markdown and "[link](" not in markdown
    for name in ("runs.csv", "cost.csv", "accuracy.csv"):
        for row in csv.reader((tmp_path / name).open()):
            assert not any(cell.startswith(("=", "+", "@")) for cell in row), (name, row)
    assert any(p.suffix == ".png" for p in tmp_path.iterdir())
    import matplotlib

    assert matplotlib.rcParams["text.parse_math"], "mathtext stays on: matplotlib's log-axis tick labels use it"


MALFORMED = {
    "a JSON list": lambda d: [d],
    "missing fields": lambda d: {k: v for k, v in d.items() if k != "metrics"},
    "top-1 as a string": lambda d: {**d, "metrics": {**d["metrics"], "top1": "50"}},
    "no cost.seconds": lambda d: {**d, "cost": {k: v for k, v in d["cost"].items() if k != "seconds"}},
    "NUL in a name": lambda d: {**d, "method": "lo\x00ra"},
    "top-1 1e308": lambda d: {**d, "metrics": {**d["metrics"], "top1": 1e308}},
    "top-1 -1e308": lambda d: {**d, "metrics": {**d["metrics"], "top1": -1e308}},
    "top-1 above 100": lambda d: {**d, "metrics": {**d["metrics"], "top1": 100.5}},
    "a target's top-1 NaN": lambda d: {**d, "metrics": {**d["metrics"], "targets": {"imagenet_a": float("nan")}}},
    "negative cost": lambda d: {**d, "cost": {**d["cost"], "trainable_params": -1}},
    "infinite seconds": lambda d: {**d, "cost": {**d["cost"], "seconds": {"total": float("inf")}}},
    "truncated": None,
}


def test_a_malformed_record_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    good = synthetic_record("lora", "cifar", 0, 50.0)
    records.write_record(tmp_path / "good", good)
    for index, change in enumerate(MALFORMED.values()):
        folder = tmp_path / f"bad{index}"
        folder.mkdir()
        text = good.to_json()
        text = text[: len(text) // 2] if change is None else json.dumps(change(json.loads(text)))
        (folder / records.RECORD).write_text(text)
    found = records.load_records(tmp_path)
    assert [r.run_id for r in found] == [good.run_id]
    for index in range(len(MALFORMED)):
        assert f"bad{index}" in caplog.text
    pb.report.write_report(found, tmp_path / "report")


# --- 3: names become paths -----------------------------------------------------------------------------


def test_task_names_never_escape_the_output_folder(tmp_path, task):
    from petl_bench.planning import plan
    from petl_bench.runner import run_sweep
    from petl_bench.task import folder_task

    escaped = folder_task(task)
    escaped.name = "../../escaped"
    (job,) = plan(["linear"], [escaped], ["vit_tiny_patch16_224"], [0], protocol="final", pretrained="none",
                  recipe=Recipe(epochs=1, batch_size=8, image_size=16))  # fmt: skip
    assert "/" not in job.run_id and not job.run_id.startswith(".")
    out = tmp_path / "deep" / "runs"
    run_sweep([job], out, device=torch.device("cpu"))
    assert [p.parent.parent for p in tmp_path.rglob(records.RECORD)] == [out]
    with pytest.raises(UserError):
        ledger.run_folder(out, "../x")


# --- 4: kill -9 while decoding -------------------------------------------------------------------------


def _processes_mentioning(text: str) -> list[int]:
    """Processes whose command line mentions ``text`` (the fork server names the run's folder in its sys.path)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_kill_during_decoding_frees_the_run_and_the_rerun_completes(tmp_path, task, tiny_plugin):
    from PIL import Image

    big = task / "images" / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(big)
    (task / "test.txt").write_text("".join(f"images/big.png {i % 4}\n" for i in range(3000)))
    out, cache = tmp_path / "runs", tmp_path / "cache"
    env = {**os.environ, "PETL_BENCH_CACHE": str(cache)}
    args = [*_base(tiny_plugin, task, out), "--methods", "linear", "--epochs", "1"]
    process = subprocess.Popen([sys.executable, "-m", "petl_bench.cli", *args], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not list((cache / "decoded").glob(".*.tmp.npy")) and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(3.0)  # the decode workers are up and working
    assert process.poll() is None, "decoding finished before the kill: make the split larger"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    deadline = time.monotonic() + 20
    while True:  # nothing may keep holding the run's lock
        with open(run_dir / ".lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "an orphaned worker still holds the run lock"
        time.sleep(0.2)
    deadline = time.monotonic() + 20
    while _processes_mentioning(str(tmp_path)):  # the fork server and its decode workers end too
        assert time.monotonic() < deadline, f"left running: {_processes_mentioning(str(tmp_path))}"
        time.sleep(0.2)
    rerun = subprocess.run([sys.executable, "-m", "petl_bench.cli", *args], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert rerun.returncode == 0 and "1 run(s) trained" in rerun.stdout, rerun.stderr
    assert not list((cache / "decoded").glob(".*.tmp*")), "the killed decode's temporary file was removed"


# --- 5, 6: records that must not be trusted --------------------------------------------------------------


def test_a_truncated_record_is_not_finished_and_the_run_trains_again(monkeypatch, capsys, tmp_path, task, tiny_plugin):
    out = tmp_path / "runs"
    args = [*_base(tiny_plugin, task, out), "--methods", "linear", "--epochs", "1"]
    assert run_cli(monkeypatch, capsys, *args)[0] == 0
    (path,) = out.rglob(records.RECORD)
    path.write_text(path.read_text()[:100])
    code, stdout, _ = run_cli(monkeypatch, capsys, *args)
    assert code == 0 and "1 run(s) trained, 0 already finished" in stdout
    assert (path.parent / "record.json.invalid").is_file() and len(records.load_records(out)) == 1


BAD_RECIPES = [
    (["--epochs", "0"], "recipe.epochs must be >= 1"),
    (["--set", "recipe.eval_every=0"], "recipe.eval_every must be >= 1"),
    (["--set", "recipe.eval_batch_size=-1"], "recipe.eval_batch_size must be >= 0"),
    (["--set", "recipe.drop_path=5"], "recipe.drop_path must be in [0.0, 1.0)"),
    (["--seeds", "-1"], "seeds must be integers in [0, 2**32)"),
    (["--seeds", "1e20"], "--seeds takes comma-separated integers"),
    (["--seeds", str(2**40)], "seeds must be integers in [0, 2**32)"),
    (["--lr", "nan"], "recipe.lr must be a finite number"),
    (["--lr", "-1"], "recipe.lr must be >= 0"),
    (["--set", "recipe.weight_decay=-1"], "recipe.weight_decay must be >= 0"),
    (["--set", "recipe.workers=-1"], "recipe.workers must be >= 0"),
    (["--set", "recipe.image_size=0"], "recipe.image_size must be >= 1"),
    (["--batch-size", "64"], "fewer than one batch of 64; pass --batch-size 40"),
]


@pytest.mark.parametrize("extra,message", BAD_RECIPES, ids=[" ".join(e) for e, _ in BAD_RECIPES])
def test_bad_recipe_values_fail_before_training_and_write_nothing(
    monkeypatch, capsys, tmp_path, task, tiny_plugin, extra, message
):
    out = tmp_path / "runs"
    code, _, stderr = run_cli(monkeypatch, capsys, *_base(tiny_plugin, task, out), "--methods", "linear", *extra)
    assert code == 2 and message in " ".join(stderr.split()) and "Traceback" not in stderr, stderr
    assert not out.exists(), "nothing written"


# --- 7, 8: the decoded cache ------------------------------------------------------------------------------


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    (tmp_path / "a.png").write_bytes(b"")
    Image.fromarray(np.full((8, 8), 30000, dtype=np.uint16)).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode.startswith("I")
    (tmp_path / "list.txt").write_text("a.png 0\n")
    split = read_split("t", tmp_path / "list.txt", tmp_path, 1)
    pixels = decoded_images(split, (8, 8))
    assert int(pixels.min()) == int(pixels.max()) == round(30000 * 255 / 65535)


@pytest.mark.parametrize("damage", ["zeroed", "truncated"])
def test_a_damaged_cache_entry_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
    folder = make_task_folder(tmp_path / "t")
    split = read_split("test", folder / "test.txt", folder, 4)
    expected = decoded_images(split, (16, 16)).clone()
    (entry,) = (data_module.cache_dir() / "decoded").glob(f"{data_module.cache_key(split, (16, 16), 'bicubic')}.npy")
    size = entry.stat().st_size
    data_module._VERIFIED.clear()  # a new process
    if damage == "zeroed":
        entry.write_bytes(b"\0" * size)
    else:
        entry.write_bytes(entry.read_bytes()[: size // 2])
    again = decoded_images(split, (16, 16))
    assert "is damaged" in caplog.text and torch.equal(again, expected)


def test_a_cache_without_room_is_an_error_before_writing(tmp_path, monkeypatch):
    folder = make_task_folder(tmp_path / "t")
    split = read_split("test", folder / "test.txt", folder, 4)
    monkeypatch.setattr(data_module.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    key = data_module.cache_key(split, (13, 13), "bicubic")  # a size no other test decodes
    with pytest.raises(UserError, match="not enough free space"):
        decoded_images(split, (13, 13))
    assert not list((data_module.cache_dir() / "decoded").glob(f"*{key}*"))


# --- 10, 11: exit codes and one-line errors through the real CLI ----------------------------------------------


@pytest.mark.parametrize(
    "args",
    [["run", "--epochs", "abc"], ["run", "--bogus"], ["run", "--epochs"], ["frobnicate"]],
    ids=["bad value", "unknown option", "missing value", "unknown command"],
)
def test_usage_errors_exit_2_with_one_error_line(tmp_path, args):
    result = subprocess.run([sys.executable, "-m", "petl_bench.cli", *args], capture_output=True, text=True,
                            cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.strip().startswith("error:")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


FAILING_PLUGIN = """
import petl_bench as pb

@pb.register_method
class Broken(pb.Method):
    name = "broken"

    def attach(self, model, info, config):
        raise RuntimeError("boom")
"""


def test_a_sweep_with_a_failed_run_exits_1(tmp_path, task, tiny_plugin):
    plugin = tmp_path / "broken.py"
    plugin.write_text(FAILING_PLUGIN)
    out = tmp_path / "runs"
    args = [*_base(tiny_plugin, task, out), "--plugin", str(plugin), "--methods", "linear,broken", "--epochs", "1"]
    result = subprocess.run([sys.executable, "-m", "petl_bench.cli", *args], capture_output=True, text=True,
                            cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "1 failed" in result.stdout and len(records.load_records(out)) == 1


@pytest.mark.parametrize("signum,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_and_sigterm_say_so_and_the_training_state_is_kept(tmp_path, task, tiny_plugin, signum, code, word):
    out = tmp_path / "runs"
    args = [*_base(tiny_plugin, task, out), "--methods", "lora", "--epochs", "400", "--checkpoint-seconds", "0"]
    process = cli_process(*args, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not [p for p in out.glob("*/epochs.jsonl") if p.stat().st_size > 0]:
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code and word in stderr and "Traceback" not in stderr, stderr
    assert list(out.glob(f"*/{records.RESUME}")), "the training state is kept to continue from"


@pytest.mark.parametrize(
    "case,message",
    [
        ("label ²", "malformed line"),
        ("label --1", "malformed line"),
        ("not UTF-8", "is not UTF-8 text"),
        ("output is a file", "is not a folder"),
        ("cache is a file", "is not a folder"),
        ("pretrained is text", "is not a readable checkpoint"),
        ("disk full", "No space left on device"),
    ],
)
def test_environment_and_data_faults_are_one_error_line(
    monkeypatch, capsys, tmp_path, task, tiny_plugin, case, message
):
    out = tmp_path / "runs"
    lists = task / "train800val200.txt"
    extra = ["--methods", "linear", "--epochs", "1"]
    if case.startswith("label"):
        lists.write_text(lists.read_text().replace(" 1\n", f" {case.split()[1]}\n", 1))
    elif case == "not UTF-8":
        lists.write_bytes(lists.read_bytes() + b"images/\xff\xfe.jpg 0\n")
    elif case == "output is a file":
        out.write_text("")
    elif case == "cache is a file":
        (tmp_path / "cachefile").write_text("")
        monkeypatch.setenv("PETL_BENCH_CACHE", str(tmp_path / "cachefile"))
    elif case == "pretrained is text":
        (tmp_path / "weights.pth").write_text("not weights")
        extra = [*extra, "--pretrained", str(tmp_path / "weights.pth")]
    elif case == "disk full":

        def full(_):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(atomic.os, "fsync", full)
    code, _, stderr = run_cli(monkeypatch, capsys, *_base(tiny_plugin, task, out), *extra)
    assert code == 2 and message in " ".join(stderr.split()) and "Traceback" not in stderr, stderr
    if case == "disk full":
        assert not list(out.rglob("*.tmp")), "temporary files are removed"


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_path(tmp_path, task):
    lists = task / "train800val200.txt"
    lists.write_bytes(b"\xef\xbb\xbf" + lists.read_bytes())
    split = read_split("t", lists, task, 4)
    assert split.paths[0] == "images/train/000000.jpg"


def test_report_out_pointing_at_a_file_is_one_error_line(monkeypatch, capsys, tmp_path):
    records.write_record(tmp_path / "runs" / "r", synthetic_record("lora", "cifar", 0, 50.0))
    (tmp_path / "file").write_text("")
    code, _, stderr = run_cli(monkeypatch, capsys, "report", "--results", str(tmp_path / "runs"),
                              "--out", str(tmp_path / "file"))  # fmt: skip
    assert code == 2 and "is not a folder" in stderr
