"""File-list datasets, validation, and the decoded-tensor cache.

A split is a list file of ``<relative image path> <label>`` lines (NOAH's layout). Images are
decoded and resized once (PIL, exactly as ``transforms.Resize((S, S), bicubic)`` on a PIL image),
stored as a uint8 array in the cache directory, and normalised on the device at batch time:
the same numbers as decoding every epoch, without the decoding.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .atomic import write_atomic
from .errors import UserError
from .paths import cache_dir

log = logging.getLogger(__name__)

INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
MISSING_SHOWN = 5
LABEL = re.compile(r"-?[0-9]+")  # ASCII digits only: '²'.isdigit() is True, int('²') fails
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def cache_subdir(name: str) -> Path:
    """A folder under the cache, created; a clear error when it cannot be."""
    folder = cache_dir() / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the cache folder {folder}: {error.strerror} (set PETL_BENCH_CACHE)") from None
    return folder


def ensure_free_space(folder: Path, needed: int, what: str) -> None:
    """A UserError, before writing, when ``folder``'s filesystem has less than ``needed`` bytes free
    (a memory-mapped file on a full filesystem kills the process with SIGBUS, without a message)."""
    free = shutil.disk_usage(folder).free
    if free < needed * 1.05 + (16 << 20):
        raise UserError(
            f"not enough free space for {what}: {needed / 2**20:,.0f} MiB needed, {free / 2**20:,.0f} MiB free "
            f"in {folder} (set PETL_BENCH_CACHE to a larger disk)"
        )


@dataclass(frozen=True)
class Split:
    """One split of a task: images (under ``root``) with integer labels, read from ``list_file``."""

    name: str
    list_file: Path
    root: Path
    paths: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def files(self) -> list[Path]:
        return [self.root / path for path in self.paths]


LINE_PROBLEMS_SHOWN = 10


def list_problems(name: str, list_file: Path, root: Path, num_classes: int | None, how_to_get: str = ""):
    """(the split of a list file's good lines or None, every problem found): unreadable file, each malformed
    line and label out of range (the first few, then a count), no lines at all, missing images."""
    hint = f" {how_to_get}" if how_to_get else ""
    if not list_file.is_file():
        return None, [f"missing list file {list_file}.{hint}"]
    try:
        text = list_file.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first path
    except UnicodeDecodeError as error:
        return None, [f"{list_file} is not UTF-8 text ({error.reason} at byte {error.start})"]
    except OSError as error:
        return None, [f"cannot read {list_file}: {error.strerror}"]
    paths, labels, bad = [], [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rstrip().rsplit(maxsplit=1)  # paths may contain spaces: split on the last one
        if len(parts) != 2 or not LABEL.fullmatch(parts[1]):
            bad.append(f"{list_file}:{number}: malformed line {line!r}; expected '<image path> <integer label>'")
        elif num_classes is not None and not 0 <= int(parts[1]) < num_classes:
            bad.append(f"{list_file}:{number}: label {int(parts[1])} outside [0, {num_classes})")
        else:
            paths.append(parts[0])
            labels.append(int(parts[1]))
    problems = bad[:LINE_PROBLEMS_SHOWN]
    if len(bad) > LINE_PROBLEMS_SHOWN:
        problems.append(f"{list_file}: {len(bad) - LINE_PROBLEMS_SHOWN} more malformed lines or labels")
    if not paths and not bad:
        return None, [f"{list_file} lists no images.{hint}"]
    unique = len(set(zip(paths, labels)))
    if unique < len(paths):  # NOAH's 1-shot Oxford Pets lists repeat every line
        log.warning("%s repeats lines: %d lines, %d unique (kept as listed)", list_file, len(paths), unique)
    split = Split(name, list_file, root, tuple(paths), tuple(labels))
    missing = [(number, path) for number, path in enumerate(split.paths, start=1) if not (root / path).is_file()]
    if missing:
        shown = ", ".join(f"{root / path} (line {number})" for number, path in missing[:MISSING_SHOWN])
        more = f" and {len(missing) - MISSING_SHOWN} more" if len(missing) > MISSING_SHOWN else ""
        problems.append(
            f"{len(missing)} of {len(split)} images listed in {list_file} are missing: {shown}{more}.{hint}"
        )
    return split, problems


def read_split(name: str, list_file: Path, root: Path, num_classes: int | None, how_to_get: str = "") -> Split:
    """Parse and validate a list file: every line ``path label``, labels in range, every image present."""
    split, problems = list_problems(name, list_file, root, num_classes, how_to_get)
    if problems:
        more = (
            f" (and {len(problems) - 1} more problem(s); 'petl-bench data verify' lists them)"
            if len(problems) > 1
            else ""
        )
        raise UserError(problems[0] + more)
    return split


def check_size(split: Split, expected: int | None, strict: bool) -> None:
    """Warn (or, when strict, fail) when a split does not have the size the protocol defines."""
    if expected is None or len(split) == expected:
        return
    message = f"{split.list_file} has {len(split)} images; the protocol expects {expected}"
    if strict:
        raise UserError(message + " (--strict)")
    log.warning(message)


def float_range(values: np.ndarray) -> float:
    """The full-scale value of a 32-bit float image: 1 for [0, 1] data, 255 or 65535 for data stored
    as floats of 8- or 16-bit values, else its maximum."""
    top = float(np.nanmax(values, initial=0.0))
    return next((scale for scale in (1.0, 255.0, 65535.0) if top <= scale), top)


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB image; 16-bit (and 32-bit integer or float) greyscale is scaled to 8 bits, not clipped to
    black and white as ``convert("RGB")`` does (65535 -> 255, 30000 -> 117; a float 0.5 -> 128)."""
    if image.mode in SIXTEEN_BIT or image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        if image.mode == "F":
            top = float_range(values)
        else:
            top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) <= 65535 else values.max()
        scaled = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    return image.convert("RGB")


def _decode(job: tuple[str, int, int, str]) -> np.ndarray:
    path, height, width, interpolation = job
    try:
        with Image.open(path) as image:
            image = to_rgb(image).resize((width, height), INTERPOLATIONS[interpolation])
            return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UserError(f"cannot decode image {path}: {error} (a corrupt or truncated download?)") from None


def cache_key(split: Split, size: tuple[int, int], interpolation: str) -> str:
    digest = hashlib.sha256()
    digest.update(f"v2|{size}|{interpolation}|{split.root.resolve()}\n".encode())
    digest.update(split.list_file.read_bytes())
    for path in split.files():
        stat = path.stat()
        digest.update(f"{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def _die_with(owner: int) -> None:
    """Decode workers end when the process that started the pool dies, even by kill -9 (Linux). A worker's
    parent is the fork server, and each worker holds the fork server's keep-alive pipe, so a death signal
    tied to the parent would never fire: a thread watches the owner instead and ends the worker, after
    which the fork server sees its pipe close and ends too."""
    import threading

    def watch() -> None:
        while True:
            time.sleep(0.5)
            try:
                os.kill(owner, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass

    threading.Thread(target=watch, daemon=True, name="die-with-owner").start()


def usable_core_ids() -> list[int]:
    """The cores this process may run on (its affinity: a SLURM task's share, not the machine's)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def usable_cores() -> int:
    """How many cores this process may run on."""
    return len(usable_core_ids())


def _decode_into(path: Path, split: Split, size: tuple[int, int], interpolation: str, workers, progress) -> None:
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(len(split), 3, size[0], size[1]))
    jobs = [(str(file), size[0], size[1], interpolation) for file in split.files()]
    task = progress.add_task(f"decoding {split.name} ({len(jobs)} images)", total=len(jobs)) if progress else None
    workers = workers or usable_cores()  # decoding is CPU-bound and runs before training: all of them

    def fill(target: np.ndarray, decoded_images) -> None:
        for index, decoded in enumerate(decoded_images):
            target[index] = decoded
            if progress and index % 64 == 0:
                progress.update(task, completed=index)

    if workers > 1 and len(jobs) >= 256:
        # from a fork server, not forked from here: workers inherit no file descriptor (a run's lock among
        # them), and they (then the fork server) end with this process, so a kill -9 leaves nothing behind
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_die_with, initargs=(os.getpid(),)) as pool:
            fill(array, pool.map(_decode, jobs, chunksize=64))
    else:
        fill(array, map(_decode, jobs))
    array.flush()
    del array
    if progress:
        progress.remove_task(task)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: Path) -> None:
    """Delete ``.<name>.<pid>.tmp*`` files whose writing process is gone (killed mid-write)."""
    for path in folder.glob(".*.tmp*"):
        match = re.search(r"\.(\d+)\.tmp", path.name)
        if match and not _alive(int(match.group(1))):
            log.info("removing %s, left by a process that died while writing it", path)
            path.unlink(missing_ok=True)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


_VERIFIED: set[tuple[str, int, int]] = set()  # cache files checked in this process: (path, size, mtime)


def _load_verified(target: Path, sidecar: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached array when its sidecar's checksum and shape match, else None (with a warning)."""
    try:
        meta = json.loads(sidecar.read_text())
        stat = target.stat()
        stamp = (str(target), stat.st_size, stat.st_mtime_ns)
        if stamp not in _VERIFIED:
            if meta.get("sha256") != file_digest(target):
                raise ValueError("checksum mismatch")
            _VERIFIED.add(stamp)
        array = np.load(target, mmap_mode="c")
        if tuple(array.shape) != shape or array.dtype != np.uint8:
            raise ValueError(f"shape {array.shape}, expected {shape}")
        return array
    except (OSError, ValueError) as error:
        log.warning("cache entry %s is damaged (%s); decoding the images again", target, error)
        return None


def decoded_images(
    split: Split, size: tuple[int, int], interpolation: str = "bicubic", workers: int | None = None, progress=None
) -> torch.Tensor:
    """The split's images as a uint8 tensor (N, 3, H, W), decoded once and memory-mapped from the cache.

    The cache key covers the list file's content, the image files' sizes and modification times, the
    size and the interpolation. Each entry's sha256 is stored beside it and checked on first use in a
    process; a damaged entry is decoded again. Concurrent writers each write a private file and rename
    it into place.
    """
    if interpolation not in INTERPOLATIONS:
        raise UserError(f"unknown interpolation '{interpolation}'; choose from: {', '.join(INTERPOLATIONS)}")
    folder = cache_subdir("decoded")
    key = cache_key(split, size, interpolation)
    target, sidecar = folder / f"{key}.npy", folder / f"{key}.json"
    shape = (len(split), 3, size[0], size[1])
    if target.exists() and sidecar.exists():
        array = _load_verified(target, sidecar, shape)
        if array is not None:
            return torch.from_numpy(array)
    remove_stale_temporaries(folder)
    ensure_free_space(folder, int(np.prod(shape)), f"the decoded images of {split.list_file}")
    temporary = folder / f".{key}.{os.getpid()}.tmp.npy"
    try:
        _decode_into(temporary, split, size, interpolation, workers, progress)
        checksum = file_digest(temporary)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    meta = {"list_file": str(split.list_file), "images": len(split), "size": list(size), "sha256": checksum}
    write_atomic(sidecar, json.dumps(meta))
    stat = target.stat()
    _VERIFIED.add((str(target), stat.st_size, stat.st_mtime_ns))
    return torch.from_numpy(np.load(target, mmap_mode="c"))


@dataclass
class TensorDataset:
    """Decoded uint8 images and labels, kept on one device."""

    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def from_split(cls, split: Split, size: tuple[int, int], interpolation: str, progress=None) -> "TensorDataset":
        images = decoded_images(split, size, interpolation, progress=progress)
        return cls(images, torch.tensor(split.labels, dtype=torch.long))

    def to(self, device: torch.device | str) -> "TensorDataset":
        return TensorDataset(self.images.to(device), self.labels.to(device))

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stop = len(self) - len(self) % batch_size if drop_last else len(self)
        if not shuffle:
            for start in range(0, stop, batch_size):
                yield self.images[start : start + batch_size], self.labels[start : start + batch_size]
            return
        # The epoch's order is drawn on the CPU (the same stream as ever) and moved to the data's device
        # once, not one batch of indices per step (each a copy from pageable memory that waits for the GPU).
        order = torch.randperm(len(self), generator=generator)
        image_order = order.to(self.images.device)
        label_order = image_order if self.labels.device == self.images.device else order.to(self.labels.device)
        for start in range(0, stop, batch_size):
            yield (
                self.images[image_order[start : start + batch_size]],
                self.labels[label_order[start : start + batch_size]],
            )


_KEPT: dict[str, tuple[tuple[str, str], TensorDataset]] = {}  # role -> (cache key and device, the split there)


def on_device(
    role: str, split: Split, size: tuple[int, int], interpolation: str, device: torch.device, progress=None,
    fits: Callable[[TensorDataset], bool] = lambda data: True,
) -> TensorDataset:  # fmt: skip
    """``split``'s decoded images and labels on ``device`` (if ``fits`` says they fit there), kept there for
    the next call with the same ``role`` and images inside :func:`kept_on_devices`: a sweep runs a task's seeds
    one after another, and they upload its images once. One split per role (train, eval); the one kept before
    is dropped before another is loaded. On the CPU: the memory-mapped cache, as :meth:`TensorDataset.from_split`."""
    if device.type == "cpu":
        return TensorDataset.from_split(split, size, interpolation, progress=progress)
    key = (cache_key(split, size, interpolation), str(device))
    kept = _KEPT.pop(role, None)
    if kept is not None and kept[0] == key:
        _KEPT[role] = kept
        return kept[1]
    del kept  # frees the previous split's device memory before the next is moved there
    data = TensorDataset.from_split(split, size, interpolation, progress=progress)
    if not fits(data):
        return data
    data = data.to(device)
    if _KEEPING:
        _KEPT[role] = (key, data)
    return data


_KEEPING: list[bool] = []


@contextlib.contextmanager
def kept_on_devices():
    """Inside, :func:`on_device` keeps each role's last split on its device; leaving drops them."""
    _KEEPING.append(True)
    try:
        yield
    finally:
        _KEEPING.pop()
        if not _KEEPING:
            _KEPT.clear()


class Normalizer(torch.nn.Module):
    """uint8 -> float, then (x / 255 - mean) / std: ToTensor + Normalize, on the device.

    Float input comes from an augmentation pipeline that normalised it already and passes through."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.is_floating_point():
            return images
        return (images.float().div(255) - self.mean) / self.std
