"""RunRecords: one JSON file per finished run, written atomically, read back for reports.

A run's folder holds ``record.json`` (written last: its presence means finished),
``trainable.safetensors`` and ``epochs.jsonl`` (one line per epoch, appended as training goes), and
while training ``resume.pt``. A run killed at any moment leaves no ``record.json``, so a rerun runs it
again, continuing from ``resume.pt`` when there is one. A lock file held while a
run trains keeps a second process off the same run.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import math
import platform
import socket
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .atomic import write_atomic
from .errors import UserError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: typed settings, metrics and costs; execution recorded
READS = (1, 2)  # schema versions this version reads (1: the same fields, without execution)
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
class Settings:
    """What a run was trained with (``hparams`` in the JSON): the method's settings, the per-task defaults
    among them, the recipe as resolved, the input, precision and execution, the classes."""

    method: dict[str, Any] = field(default_factory=dict)
    task_defaults: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    input_size: list[int] = field(default_factory=list)
    precision: str | None = None  # None: a record from before the setting (bf16 on CUDA, fp32 elsewhere)
    execution: str | None = None  # None: a record from before the setting (eager)
    pretrained_source: str | None = None
    num_classes: int | None = None
    class_names: list[str] | None = None
    normalization: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class Metrics:
    """What a run scored: ``top1`` (percent) as its protocol selects it on ``eval_split``, the last
    epoch's, the curve of periodic evaluations, and every extra evaluation target."""

    top1: float
    eval_split: str
    top1_last: float | None = None
    selection: str = ""
    curve: list[dict[str, Any]] = field(default_factory=list)
    class_mask: dict[str, str] = field(default_factory=dict)  # per target: "subset" logits or "all"
    eval_images: int | None = None
    train_images: int | None = None
    targets: dict[str, float] = field(default_factory=dict)
    # Which evaluation images the selected evaluation classified correctly (see pack_outcomes); None in
    # records from before per-image outcomes, and where the selected evaluation's were not kept (a paper-
    # protocol run resumed after its best epoch).
    outcomes: dict[str, Any] | None = None


def pack_outcomes(hits, eval_list: str) -> dict[str, Any]:
    """Per-image outcomes as a record stores them: the bits packed (numpy's order) in base64, the number of
    images, and the fingerprint of the evaluation list they belong to (two runs pair only on the same one)."""
    import numpy as np

    bits = np.asarray(hits, dtype=bool)
    return {"bits": base64.b64encode(np.packbits(bits).tobytes()).decode("ascii"), "images": int(bits.size),
            "eval_list": eval_list}  # fmt: skip


def unpack_outcomes(outcomes: dict[str, Any] | None):
    """The bool array :func:`pack_outcomes` stored, None when there is none (or it does not decode)."""
    import numpy as np

    if not outcomes:
        return None
    try:
        packed = np.frombuffer(base64.b64decode(outcomes["bits"], validate=True), dtype=np.uint8)
        bits = np.unpackbits(packed, count=int(outcomes["images"])).astype(bool)
    except (KeyError, TypeError, ValueError):
        return None
    return bits if bits.size == int(outcomes["images"]) else None


@dataclass
class Seconds:
    """Wall-clock seconds of a run by phase."""

    total: float
    data: float = 0.0
    features: float = 0.0  # the classifier's cached inputs, and a method's selection stage (SCT's channels)
    train: float = 0.0
    eval: float = 0.0


@dataclass
class Costs:
    """What a run cost: trainable parameters, bytes, memory, throughput, time (``cost`` in the JSON)."""

    trainable_params: int
    trainable_params_with_head: int
    checkpoint_bytes: int
    peak_memory_bytes: int
    train_images_per_s: float
    eval_images_per_s: float
    seconds: Seconds
    peak_memory_kind: str = ""
    forward_flops: int | None = None
    head_trained_on_cached_features: bool = False
    inference_images_per_s: dict[str, Any] = field(default_factory=dict)  # as_trained, merged, measured_for


@dataclass
class RunRecord:
    """Everything about one finished run: identity, settings, metrics, cost, environment."""

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
    hparams: Settings
    metrics: Metrics
    cost: Costs
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
        """A record from its JSON object (any schema this version reads); keys it does not know are left out."""
        typed = {"hparams": Settings, "metrics": Metrics, "cost": Costs}
        values = {k: _typed(typed[k], v) if k in typed else v for k, v in data.items() if k in _fields(cls)}
        return cls(**values)


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _typed(cls, data: dict):
    values = {k: v for k, v in data.items() if k in _fields(cls)}
    if cls is Costs:
        values["seconds"] = _typed(Seconds, values["seconds"])
    return cls(**values)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_record(run_dir: Path, record: RunRecord) -> None:
    write_atomic(run_dir / RECORD, record.to_json())


_NAMES = ("run_id", "method", "task", "suite", "backbone", "protocol")
_COSTS = tuple(  # the numbers every record has: the fields of Costs without a default (seconds checked apart)
    f.name
    for f in dataclasses.fields(Costs)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name != "seconds"
)


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
    if version not in READS or isinstance(version, bool):
        raise ValueError(f"schema version {data.get('schema_version')!r}, expected one of {READS}")
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
    outcomes = metrics.get("outcomes")
    if outcomes is not None and not (
        isinstance(outcomes, dict) and isinstance(outcomes.get("bits"), str) and isinstance(outcomes.get("images"), int)
    ):
        raise ValueError("metrics.outcomes is not an object with packed bits and a count of images")
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
