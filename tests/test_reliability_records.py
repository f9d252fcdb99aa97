"""Records the report and a rerun must not trust: copies of one run, newer schemas (issue: reliability, round two)."""

from __future__ import annotations

import json
import shutil

from test_report import record as synthetic_record
from test_run import TINY_RUN, run_cli

from petl_bench import records


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
