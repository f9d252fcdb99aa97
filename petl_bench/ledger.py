"""The job ledger: a sweep's run folders. ``output/<run id>/record.json`` (written last) means finished;
a lock held while a run trains keeps a second process off it; a record that does not validate is moved
aside so the run trains again; a record trained on other data than the run reads now is kept under
another name. Nothing else records which runs are done.
"""

from __future__ import annotations

import fcntl
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import UserError
from .paths import UNSAFE
from .records import RECORD, NewerRecord, RunRecord, read_record

log = logging.getLogger(__name__)


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


def run_folder(output: Path, run_id: str) -> Path:
    """``output/<run_id>``, refusing anything that would land outside ``output``."""
    folder = output / run_id
    if UNSAFE.search(run_id) or run_id.startswith(".") or not folder.resolve().is_relative_to(output.resolve()):
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
