"""Where petl-bench keeps things: the cache folder, the data root, and names made safe as path components
(no torch: the CLI imports this at start)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from .errors import UserError


def cache_dir() -> Path:
    """Where decoded images, converted weights and generated demo data live (``$PETL_BENCH_CACHE``)."""
    folder = Path(os.environ.get("PETL_BENCH_CACHE", Path.home() / ".cache" / "petl-bench")).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"the cache {folder} (PETL_BENCH_CACHE) is not a folder")
    return folder


def data_root(option: str | Path | None) -> Path:
    """``--data-root`` / ``--root``, else ``$PETL_BENCH_DATA``, else ``data`` in the cache folder
    (``$PETL_BENCH_CACHE/data``, ``~/.cache/petl-bench/data`` when unset), where ``petl-bench data get``
    puts data by default."""
    value = option or os.environ.get("PETL_BENCH_DATA")
    return Path(value).expanduser() if value else cache_dir() / "data"


def data_root_from(option: str | Path | None) -> Path | None:
    """The data root a run reads: as :func:`data_root`, but None when none was given and the default
    folder does not exist."""
    explicit = option or os.environ.get("PETL_BENCH_DATA")
    root = data_root(explicit)
    return root if explicit or root.is_dir() else None


UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


def safe_name(text: str) -> str:
    """``text`` as one path component: runs of anything but letters, digits and ``._=+-`` become ``-``;
    no leading dot, never empty, at most 80 characters (longer names end in a digest of the whole)."""
    name = UNSAFE.sub("-", text).lstrip(".-") or "x"
    if len(name) > 80:
        name = name[:69] + "-" + hashlib.sha256(text.encode()).hexdigest()[:10]
    return name
