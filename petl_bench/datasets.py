"""Getting, checking and fingerprinting the data: ``petl-bench data list / get / verify``.

A :class:`Dataset` says where a suite's data comes from, how much disk it needs and how to fetch it
(``fetch(root)``, or manual steps when it cannot be fetched for the user); the tasks packages declare
them beside their tasks. ``verify`` checks every list of every task (present, the published line
counts, labels in range, every image present; ``deep``: every image decodes) and writes
``petl-bench-manifest.json`` in the data root: per task, the sha256 of each list and one digest over
the images (path, size, sha256). Runs record the fingerprint of the splits they read
(:func:`split_fingerprint`, cached) and the manifest entry's digest, so a report can tell copies apart.

Downloads and extractions never leave a folder that ``verify`` accepts: archives extract into a
temporary folder beside the destination and each task folder is renamed into place at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from PIL import Image

from .atomic import write_atomic
from .data import cache_key, cache_subdir, file_digest
from .errors import UserError, warn_once
from .records import now
from .registry import TASKS

log = logging.getLogger(__name__)

MANIFEST = "petl-bench-manifest.json"


@dataclass(frozen=True)
class Dataset:
    """Where one dataset comes from and which registered tasks it provides."""

    name: str
    suite: str
    source: str  # one line: where the files come from
    size: str  # disk space it needs
    tasks: tuple[str, ...] = ()  # registered task names
    fetch: Callable[[Path], None] | None = None  # None: cannot be fetched for the user
    from_file: Callable[[Path, Path], None] | None = None  # (archive fetched elsewhere, root): ``get --from``
    steps: str = ""  # what the user does by hand (manual datasets)
    arrange: Callable[[Path], None] | None = None  # manual datasets: what get adds once the files are in place
    extra_tasks: tuple = field(default=(), compare=False)  # unregistered FileListTasks to verify (dg targets)

    @property
    def automatic(self) -> bool:
        return self.fetch is not None

    def checked_tasks(self) -> list:
        return [TASKS.get(name) for name in self.tasks] + list(self.extra_tasks)


# --- downloading and extracting ------------------------------------------------------------------


# --- checking ------------------------------------------------------------------------------------


@dataclass
class TaskCheck:
    """What ``verify`` found for one task."""

    task: str
    folder: Path | None
    lists: dict[str, str] = field(default_factory=dict)  # list name -> sha256
    lines: dict[str, int] = field(default_factory=dict)
    images: set = field(default_factory=set)  # (image root, relative path)
    digests: dict = field(default_factory=dict, repr=False)  # path -> (sha256, size): each image read once
    problems: list[str] = field(default_factory=list)
    decoded: int = 0
    fingerprints: dict[str, str] = field(default_factory=dict)  # list name -> the fingerprint a run records

    @property
    def ok(self) -> bool:
        return self.folder is not None and not self.problems


def task_lists(task) -> list[str]:
    """Every list file a task reads, over all its variants (few-shot: every shot and split seed)."""
    names = []
    for variant in task.variants():
        for name in (variant.lists.train, variant.lists.val, variant.lists.trainval, variant.lists.test):
            if name not in names:
                names.append(name)
    return names


def check_task(task, root: Path, deep: bool = False) -> TaskCheck:
    """Every fault of one task in one pass: each list's lines, labels, sizes and images, then the lists
    against each other (see :func:`cross_check`)."""
    try:
        folder = task.folder(root)
    except UserError as error:
        return TaskCheck(task.name, None, problems=[f"{task.name}: {str(error).split('. ')[0]}"])
    check = TaskCheck(task.name, folder)
    splits = {}
    for name in task_lists(task):
        split, problems = task.check_list(folder, name)
        check.problems += [f"{task.name}: {problem}" for problem in problems]
        if split is None:
            continue
        splits[name] = split
        check.lists[name] = file_digest(folder / name)
        if not problems:  # every image is there: what a run will record for this list
            check.fingerprints[name] = split_fingerprint(split, check.digests)
        check.lines[name] = len(split)
        expected = task.sizes.get(name)
        if expected is not None and len(split) != expected:
            check.problems.append(f"{task.name}: {folder / name} has {len(split)} lines, expected {expected}")
        check.images.update((split.root, path) for path in split.paths)
    for variant in task.variants():
        check.problems += [
            f"{task.name}: {p}" for p in cross_check(variant.lists, splits) if f"{task.name}: {p}" not in check.problems
        ]
    if deep:
        check.decoded = _decode_all(check)
    return check


def _pairs(split) -> list[tuple[str, int]]:
    return [(os.path.normpath(split.root / path), label) for path, label in zip(split.paths, split.labels)]


def cross_check(lists, splits: dict) -> list[str]:
    """The lists of one task against each other: an image has one label everywhere; train ∪ val is
    train+val (VTAB-1K's train800 ∪ val200 = train800val200); val shares no image with train, test none
    with either; test lists no image twice."""
    found = {role: splits.get(name) for role, name in
             (("train", lists.train), ("val", lists.val), ("trainval", lists.trainval), ("test", lists.test))}  # fmt: skip
    problems, labels, conflicts = [], {}, []
    for role, split in found.items():
        for image, label in _pairs(split) if split else []:
            if labels.setdefault(image, (label, role))[0] != label:
                first, where = labels[image]
                conflicts.append(
                    f"{image} is labelled {first} in {getattr(lists, where)} and {label} in {getattr(lists, role)}"
                )
    problems += conflicts[:3] + ([f"{len(conflicts) - 3} more images with two labels"] if len(conflicts) > 3 else [])
    train, val, trainval, test = (
        set(_pairs(found[r])) if found[r] else None for r in ("train", "val", "trainval", "test")
    )
    distinct = lists.train != lists.trainval and lists.val not in (lists.train, lists.trainval)
    if distinct and None not in (train, val, trainval) and train | val != trainval:
        problems.append(f"{lists.train} and {lists.val} together are not {lists.trainval} "
                        f"({len(train | val - trainval)} lines only in them, {len(trainval - (train | val))} only in {lists.trainval})")  # fmt: skip
    images = {role: {image for image, _ in _pairs(split)} for role, split in found.items() if split}
    if distinct and "train" in images and "val" in images and images["train"] & images["val"]:
        problems.append(
            f"{len(images['train'] & images['val'])} image(s) of {lists.val} are also in {lists.train} (a leak)"
        )
    for role in ("train", "val", "trainval"):
        shared = images.get("test", set()) & images.get(role, set())
        if shared and lists.test != getattr(lists, role):
            problems.append(f"{len(shared)} image(s) of {lists.test} are also in {getattr(lists, role)} (a leak)")
            break
    return list(dict.fromkeys(problems))


def _decode_all(check: TaskCheck) -> int:
    decoded = 0
    for image_root, path in sorted(check.images):
        try:
            with Image.open(image_root / path) as image:
                image.load()
            decoded += 1
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            check.problems.append(f"{check.task}: {image_root / path} does not decode ({error})")
    return decoded


def files_digest(
    files: list[tuple[str, Path]], start: bytes = b"", workers: int = 4, known: dict[Path, tuple] | None = None
) -> str:
    """sha256 over ``start`` and one line per file, in the order given: its name, size and sha256. A file
    is read once: listed several times, or already in ``known`` (path -> (sha256, size), filled as files are
    read, so that several digests over the same images share the reading)."""
    digests = known if known is not None else {}
    unread = [path for path in dict.fromkeys(path for _, path in files) if path not in digests]
    with ThreadPoolExecutor(workers) as pool:
        digests.update(zip(unread, pool.map(lambda path: (file_digest(path), path.stat().st_size), unread)))
    total = hashlib.sha256(start)
    for name, path in files:
        digest, size = digests[path]
        total.update(f"{name}\t{size}\t{digest}\n".encode())
    return total.hexdigest()


def images_digest(check: TaskCheck) -> str:
    """One sha256 over every image of the task: relative path, size and sha256 of each, sorted."""
    return files_digest(
        sorted((os.path.relpath(root / path, check.folder), root / path) for root, path in check.images),
        known=check.digests,
    )


def manifest_entry(check: TaskCheck, root: Path) -> dict:
    return {
        "folder": os.path.relpath(check.folder, root),
        "lists": dict(sorted(check.lists.items())),
        "images": images_digest(check),
        "image_count": len(check.images),
        "fingerprints": dict(sorted(check.fingerprints.items())),
        "verified_at": now(),
    }


def _valid_entry(entry) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("folder", ""), str)
        and isinstance(entry.get("lists", {}), dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in entry.get("lists", {}).items())
        and isinstance(entry.get("images", ""), str)
    )


def read_manifest(root: Path) -> dict:
    """The manifest under ``root`` ({"tasks": {}} when there is none or it does not parse); an entry that is
    not a well-formed object is dropped with a warning (``verify`` rewrites the file without it)."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return {"tasks": {}}
    if not isinstance(manifest, dict) or not isinstance(manifest.get("tasks"), dict):
        return {"tasks": {}}
    for name, entry in list(manifest["tasks"].items()):
        if not _valid_entry(entry):
            warn_once(log, "%s: the entry for %r is malformed; ignored (petl-bench data verify rewrites it)",
                      root / MANIFEST, name)  # fmt: skip
            del manifest["tasks"][name]
    return manifest


def write_manifest(root: Path, entries: dict[str, dict], failed: Iterable[str] = ()) -> Path:
    """Record ``entries`` (tasks that verified), drop the entries of ``failed`` tasks and malformed ones.
    Nothing is written (nor a folder created) when that changes nothing: a verify that found no data
    leaves no file behind."""
    manifest = read_manifest(root)
    manifest["tasks"].update(entries)
    for name in failed:
        manifest["tasks"].pop(name, None)
    manifest["version"] = 1
    path = root / MANIFEST
    try:
        unchanged = json.loads(path.read_text()) == manifest
    except (OSError, ValueError):
        unchanged = not manifest["tasks"]  # no file (or an unreadable one) and nothing to record
    if not unchanged:
        write_atomic(path, json.dumps(manifest, indent=2, sort_keys=True))
    return path


def entry_digest(entry: dict) -> str:
    """The digest a run records for its task's manifest entry (lists and images, not the date)."""
    identity = {key: entry.get(key) for key in ("lists", "images", "image_count")}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def verified_entry(task, root: Path) -> dict | None:
    """The manifest entry of ``task`` when its lists still have the recorded digests."""
    entry = read_manifest(root)["tasks"].get(task.name)
    if not entry:
        return None
    folder = root / entry.get("folder", "")
    lists = entry.get("lists", {})
    if not lists or not all((folder / n).is_file() and file_digest(folder / n) == d for n, d in lists.items()):
        return None
    return entry


# --- fingerprints in records ---------------------------------------------------------------------


def split_fingerprint(split, known: dict[Path, tuple] | None = None) -> str:
    """sha256 over the list file and every image it names (path, size, content), cached under the key of
    the decoded images (list content, image sizes and modification times); ``known``: see files_digest."""
    cached = cache_subdir("fingerprints") / f"{cache_key(split, (0, 0), 'sha256')}.txt"
    if cached.is_file():
        return cached.read_text().strip()
    digest = files_digest(list(zip(split.paths, split.files())), start=split.list_file.read_bytes(), known=known)
    write_atomic(cached, digest)
    return digest


def manifest_for(list_file: Path, levels: int = 4) -> tuple[str, dict] | None:
    """(task name, manifest entry) of the task folder holding ``list_file``, from a manifest in one of
    the folders above it."""
    folders = list(list_file.resolve().parents)[:levels]
    for root in folders:
        for name, entry in read_manifest(root)["tasks"].items():
            if (root / entry.get("folder", "")).resolve() in folders:
                return name, entry
    return None


def data_identity(data) -> dict:
    """What a record says about its data: each split's fingerprint, one over them all, and the
    manifest entry's digest when a verified copy has one."""
    splits = {"train": data.train, "eval": data.eval, **{name: t.split for name, t in data.targets.items()}}
    fingerprints = {name: split_fingerprint(split) for name, split in splits.items()}
    combined = hashlib.sha256("".join(f"{k}={v}\n" for k, v in sorted(fingerprints.items())).encode()).hexdigest()
    found = manifest_for(data.train.list_file)
    mismatch = manifest_mismatch(found, splits, fingerprints) if found else ""
    if mismatch:
        warn_once(
            log, "%s; the run records no manifest entry (run 'petl-bench data verify' to check the data)", mismatch
        )
    return {
        "fingerprint": combined,
        "splits": fingerprints,
        "manifest": entry_digest(found[1]) if found and not mismatch else None,
        **({"manifest_mismatch": mismatch} if mismatch else {}),
    }


def manifest_mismatch(found: tuple[str, dict], splits: dict, fingerprints: dict) -> str:
    """What differs between a task's manifest entry and the data a run read ("" when nothing does): a list
    whose fingerprint (or, in an entry written before fingerprints, whose sha256) is not the recorded one."""
    task, entry = found
    recorded, digests = entry.get("fingerprints") or {}, entry.get("lists") or {}
    for role, split in splits.items():
        name = split.list_file.name
        if name in recorded and recorded[name] != fingerprints[role]:
            return f"the manifest entry of {task} does not match {name} (its images or lines changed since verify)"
        if name not in recorded and name in digests and digests[name] != file_digest(split.list_file):
            return f"the manifest entry of {task} does not match {name} (the list changed since verify)"
    return ""
