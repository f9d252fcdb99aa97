"""RunRecords: one JSON file per finished run, written atomically, read back for reports.

A run's folder holds ``record.json`` (written last: its presence means finished),
``trainable.safetensors`` and ``epochs.jsonl`` (one line per epoch, appended as training goes), and
while training ``resume.pt``. A run killed at any moment leaves no ``record.json``, so a rerun runs it
again, continuing from ``resume.pt`` when there is one. A lock file held while a
run trains keeps a second process off the same run.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import platform
import socket
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
RECORD = "record.json"
CHECKPOINT = "trainable.safetensors"
EPOCH_LOG = "epochs.jsonl"
FAILURE = "failed.json"
RESUME = "resume.pt"
SELECTION = {
    "final": "last epoch, evaluated once on test",
    "paper": "PAPER PROTOCOL: max of test accuracies evaluated every 10 epochs (selects on the test set)",
    "tune": "last epoch, evaluated on val (train on train split only)",
}


@dataclass
class RunRecord:
    """Everything about one finished run: identity, metrics, cost, environment."""

    run_id: str
    method: str
    task: str
    suite: str
    group: str
    backbone: str
    pretrained: str
    backbone_checkpoint_sha256: str | None
    seed: int
    protocol: str
    hparams: dict[str, Any]  # {"method": {...}, "task_defaults": {...}, "recipe": {...}}
    metrics: dict[str, Any]  # top1 (percent), eval_split, selection, top1_last, curve
    cost: dict[str, Any]  # trainable params, checkpoint bytes, peak memory, images/s, seconds by phase
    environment: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    task_variant: dict[str, int] = field(default_factory=dict)  # few-shot: {"shots": k, "split_seed": s}
    started_at: str = ""
    finished_at: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict) -> "RunRecord":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_atomic(path: Path, text: str) -> None:
    """Write via a private temporary file and rename: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_record(run_dir: Path, record: RunRecord) -> None:
    write_atomic(run_dir / RECORD, record.to_json())


def is_finished(run_dir: Path) -> bool:
    return (run_dir / RECORD).is_file()


@contextmanager
def run_lock(run_dir: Path) -> Iterator[bool]:
    """Hold an exclusive lock on a run folder; yields False when another process holds it.
    The operating system releases the lock when the holder dies, even by kill -9."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_records(results: Path) -> list[RunRecord]:
    """Every finished run under ``results`` (searched recursively)."""
    if not results.exists():
        raise UserError(f"no results folder {results}; run 'petl-bench run' first or pass --results")
    records = []
    for path in sorted(results.rglob(RECORD)):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            log.warning("skipping unreadable record %s: %s", path, error)
            continue
        if data.get("schema_version") != SCHEMA_VERSION:
            log.warning("skipping %s: schema version %s, expected %s", path, data.get("schema_version"), SCHEMA_VERSION)
            continue
        records.append(RunRecord.from_dict(data))
    return records


def environment(device: str) -> dict[str, Any]:
    """Package versions, git commit and device, for the record."""
    import numpy
    import timm
    import torch

    from . import __version__

    info = {
        "petl_bench": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "device": device,
        "git_commit": _git_commit(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5)
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
