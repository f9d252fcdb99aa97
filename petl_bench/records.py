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
import hashlib
import json
import logging
import math
import os
import platform
import re
import socket
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from .atomic import write_atomic
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
    "tuned": "last epoch, evaluated once on test; hyperparameters chosen on val200 (train800 -> val200) first",
}


def variant_key(task: str, variant: dict[str, int]) -> str:
    """A task's name plus its variant, e.g. ``fs_pets-shots4-split_seed1`` (the task part of a run id)."""
    return task + "".join(f"-{key}{value}" for key, value in variant.items())


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
    tuning: dict[str, Any] = field(default_factory=dict)  # tuned protocol: selection, chosen values, search cost
    data: dict[str, Any] = field(default_factory=dict)  # fingerprint of the splits read, manifest entry digest
    started_at: str = ""
    finished_at: str = ""
    schema_version: int = SCHEMA_VERSION

    def task_key(self) -> str:
        """The task and its variant, e.g. ``fs_pets-shots4-split_seed1``."""
        return variant_key(self.task, self.task_variant)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict) -> "RunRecord":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_record(run_dir: Path, record: RunRecord) -> None:
    write_atomic(run_dir / RECORD, record.to_json())


_NAMES = ("run_id", "method", "task", "suite", "backbone", "protocol")
_COSTS = ("trainable_params", "trainable_params_with_head", "checkpoint_bytes", "peak_memory_bytes",
          "train_images_per_s", "eval_images_per_s")  # fmt: skip


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value) -> bool:
    return _number(value) and math.isfinite(value)


class NewerRecord(ValueError):
    """A record written by a newer petl-bench (a higher schema version): left alone, never replaced."""


def parse_record(text: str) -> RunRecord:
    """A record from its JSON text; ValueError (saying what is wrong) unless it parses and has every
    field a report reads, with the right types."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"not a JSON object but a {type(data).__name__}")
    version = data.get("schema_version")
    if _number(version) and version > SCHEMA_VERSION:
        raise NewerRecord(f"written by a newer petl-bench (schema version {version}; this one reads {SCHEMA_VERSION})")
    if version != SCHEMA_VERSION:
        raise ValueError(f"schema version {data.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    for name in _NAMES:
        value = data.get(name)
        if not isinstance(value, str) or not value or any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError(f"field {name!r} is not a plain non-empty string: {value!r}"[:200])
    if not isinstance(data.get("seed"), int) or isinstance(data.get("seed"), bool):
        raise ValueError(f"field 'seed' is not an integer: {data.get('seed')!r}")
    for name in ("hparams", "metrics", "cost", "environment"):
        if not isinstance(data.get(name), dict):
            raise ValueError(f"field {name!r} is not an object")
    if not isinstance(data.get("data", {}), dict) or not isinstance(data.get("data", {}).get("fingerprint", ""), str):
        raise ValueError("field 'data' is not an object with a string fingerprint")
    metrics, cost = data["metrics"], data["cost"]
    if not _finite(metrics.get("top1")) or not 0 <= metrics["top1"] <= 100:
        raise ValueError(f"metrics.top1 is not a percentage: {metrics.get('top1')!r}"[:200])
    targets = metrics.get("targets", {})
    if not isinstance(targets, dict) or not all(_finite(v) and 0 <= v <= 100 for v in targets.values()):
        raise ValueError("metrics.targets holds a value that is not a percentage")
    if not isinstance(metrics.get("eval_split"), str):
        raise ValueError("metrics.eval_split is missing")
    missing = [name for name in _COSTS if not _finite(cost.get(name)) or cost[name] < 0]
    seconds = cost.get("seconds")
    if missing or not isinstance(seconds, dict) or not _finite(seconds.get("total")) or seconds["total"] < 0:
        raise ValueError(f"cost fields missing, negative or not finite: {', '.join(missing) or 'seconds.total'}")
    if not all(isinstance(v, str) for v in data.get("notes", [])) or not isinstance(data.get("task_variant", {}), dict):
        raise ValueError("notes or task_variant malformed")
    return RunRecord.from_dict(data)


def read_record(path: Path) -> RunRecord:
    """The record at ``path``; ValueError when it cannot be read, parsed or validated (or is not a regular
    file: a fifo would block the reader)."""
    if not path.is_file():
        raise ValueError("not a regular file")
    try:
        return parse_record(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(str(error)) from None


def finished_record(run_dir: Path, repair: bool = True) -> RunRecord | None:
    """The run's valid record, None when there is none. A record that does not parse and validate
    (truncated, hand-edited) is moved aside to ``record.json.invalid`` with a warning (unless not
    ``repair``), so the run trains again; one written by a newer petl-bench is a UserError."""
    path = run_dir / RECORD
    if not path.is_file():
        return None
    try:
        return read_record(path)
    except NewerRecord as error:
        raise UserError(f"{path}: {error}; upgrade petl-bench, or use another --output") from None
    except ValueError as error:
        if not repair:
            return None
        aside = path.with_name(RECORD + ".invalid")
        log.warning("%s is not a valid record (%s); moved to %s, the run will train again", path, error, aside.name)
        try:
            os.replace(path, aside)
        except OSError:
            pass
        return None


def is_finished(run_dir: Path, repair: bool = True) -> bool:
    """A valid record exists (see :func:`finished_record`)."""
    return finished_record(run_dir, repair) is not None


def on_other_data(record: RunRecord, fingerprint: str) -> bool:
    """``record`` was trained on other data than ``fingerprint`` (a record without one, from before
    fingerprints, counts as this data's)."""
    recorded = record.data.get("fingerprint") or ""
    return bool(recorded and fingerprint and recorded != fingerprint)


def finished_on(run_dir: Path, fingerprint: str, repair: bool = True) -> bool:
    """A valid record exists and was trained on the data whose fingerprint is ``fingerprint``."""
    record = finished_record(run_dir, repair)
    return record is not None and not on_other_data(record, fingerprint)


def set_aside_other_data(run_dir: Path, fingerprint: str) -> Path | None:
    """A finished run trained on other data than ``fingerprint`` is not this data's result: its folder is
    renamed to ``<run id>.data-<its fingerprint>`` (kept, and still reported, as a run on that copy), so
    the run trains again on this data. Returns the new folder, None when nothing was moved."""
    record = finished_record(run_dir, repair=False)
    if record is None or not on_other_data(record, fingerprint):
        return None
    recorded = record.data["fingerprint"]
    aside = run_dir.with_name(f"{run_dir.name}.data-{recorded[:12]}")
    suffix = 1
    while aside.exists():
        suffix += 1
        aside = run_dir.with_name(f"{run_dir.name}.data-{recorded[:12]}-{suffix}")
    os.replace(run_dir, aside)
    log.warning("%s was trained on other data (fingerprint %s, now %s); kept as %s, training again on this data",
                run_dir.name, recorded[:12], fingerprint[:12], aside.name)  # fmt: skip
    return aside


_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


def safe_name(text: str) -> str:
    """``text`` as one path component: runs of anything but letters, digits and ``._=+-`` become ``-``;
    no leading dot, never empty, at most 80 characters (longer names end in a digest of the whole)."""
    name = _UNSAFE.sub("-", text).lstrip(".-") or "x"
    if len(name) > 80:
        name = name[:69] + "-" + hashlib.sha256(text.encode()).hexdigest()[:10]
    return name


def run_folder(output: Path, run_id: str) -> Path:
    """``output/<run_id>``, refusing anything that would land outside ``output``."""
    folder = output / run_id
    if _UNSAFE.search(run_id) or run_id.startswith(".") or not folder.resolve().is_relative_to(output.resolve()):
        raise UserError(f"run id {run_id!r} is not a safe folder name")
    return folder


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


def check_writable(folder: Path, option: str) -> None:
    """A UserError when ``folder`` (or, if it does not exist yet, its nearest existing parent) is not a
    writable folder. Creates nothing."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option} {folder}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{option} {folder}: {existing} is not writable")


def load_records(results: Path) -> list[RunRecord]:
    """Every finished run under ``results`` (searched recursively)."""
    if not results.exists():
        raise UserError(f"no results folder {results}; run 'petl-bench run' first or pass --results")
    if not results.is_dir():
        raise UserError(f"--results {results} is not a folder")
    records, seen = [], {}
    for path in sorted(results.rglob(RECORD)):
        try:
            record = read_record(path)
        except ValueError as error:
            log.warning("skipping %s: %s", path, error)
            continue
        key = (record.run_id, record.data.get("fingerprint") or "")
        if key in seen:  # a copied folder: one run counted twice would look like two seeds
            log.warning("run %s is in %s and in %s; counted once (the first)", record.run_id, seen[key], path)
            continue
        seen[key] = path
        records.append(record)
    return records


def environment(device: str) -> dict[str, Any]:
    """Package versions, git commit and device, for the record."""
    import numpy
    import timm
    import torch

    from .version import __version__

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
