"""Writing files so that a reader (or a crash) never sees half of one: every writer in petl-bench goes
through here; and whether a folder can be written before anything is. Imports only the error type."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import UserError


@contextmanager
def atomic_path(path: Path, mode: int | None = None) -> Iterator[Path]:
    """A private temporary path beside ``path`` to write to; when the block ends without an error it is
    renamed onto ``path`` (with ``mode``'s permissions under the umask, if given), otherwise removed. The
    name ends in ``.<pid>.tmp`` so that a killed writer's leftovers can be recognised and cleaned."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        yield temporary
        if mode is not None:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(temporary, mode & ~umask)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8, flushed to disk): readers see the old file or the whole new one."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


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
