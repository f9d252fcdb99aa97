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

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tarfile
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from PIL import Image

from .atomic import write_atomic
from .data import cache_key, cache_subdir, ensure_free_space, file_digest
from .errors import DownloadError, UserError, warn_once
from .hub import require_hub
from .records import now
from .registry import TASKS

log = logging.getLogger(__name__)

MANIFEST = "petl-bench-manifest.json"
PARTIAL = ".partial-"  # prefix of temporary extraction folders


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


def hub_file(repo_id: str, filename: str, repo_type: str = "dataset", advice: str = "") -> Path:
    """A file from the Hugging Face hub through ``huggingface_hub``: resumable, into the user's HF cache,
    honouring ``HF_ENDPOINT``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE``, with its progress bar."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cached = try_to_load_from_cache(repo_id, filename, repo_type=repo_type)
    if not isinstance(cached, str):
        require_hub(
            f"{filename} of the hub dataset {repo_id}", advice or "get it where the hub is reachable and run this again"
        )
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, repo_type=repo_type))
    except LocalEntryNotFoundError:
        raise UserError(f"{filename} of the hub dataset {repo_id} is not in the Hugging Face cache") from None
    except (HfHubHTTPError, OSError) as error:
        raise DownloadError(
            f"cannot get {filename} from the hub dataset {repo_id}: {str(error).splitlines()[0]}"
        ) from None


@contextlib.contextmanager
def downloading(what: str, host: str = ""):
    """Network and checksum failures while downloading ``what`` (from ``host``) as one UserError line."""
    try:
        yield
    except (OSError, RuntimeError) as error:  # urllib's URLError is an OSError; torchvision's md5 check a RuntimeError
        reason = error
        if isinstance(error, OSError):
            reason = getattr(error, "reason", None) or error.strerror or error
        raise DownloadError(f"cannot download {what}{f' from {host}' if host else ''}: {reason}") from None


def remove_partials(folder: Path) -> None:
    """Temporary extraction folders an interrupted ``data get`` left behind."""
    if folder.is_dir():
        for stale in folder.glob(f"{PARTIAL}*"):
            shutil.rmtree(stale, ignore_errors=True)


def declared_size(archive: Path) -> int:
    """The bytes an archive says its members hold (zip: each member's size; tar: each file's)."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as bundle:
            return sum(member.file_size for member in bundle.infolist())
    with tarfile.open(archive) as bundle:
        return sum(member.size for member in bundle.getmembers() if member.isfile())


def extract_archive(archive: Path, into: Path, progress=None) -> None:
    """Every member of a zip (CRC-checked as it is read) or tar archive under ``into``; members that
    would land outside ``into`` are refused, and an archive declaring more than the free space is refused
    before anything is written. A broken archive (truncated, corrupt data, encrypted or unknown
    compression) is a DownloadError: one line, exit 1."""
    broken = (zipfile.BadZipFile, tarfile.TarError, EOFError, zipfile.LargeZipFile, zlib.error, NotImplementedError)
    try:
        into.parent.mkdir(parents=True, exist_ok=True)
        ensure_free_space(into.parent, declared_size(archive), f"extracting {archive.name}")
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as bundle:
                members = [m for m in bundle.infolist() if not m.is_dir()]
                bar = progress.add_task(f"extracting {archive.name}", total=len(members)) if progress else None
                for member in members:
                    if member.flag_bits & 0x1:
                        raise zipfile.BadZipFile(f"{member.filename} is encrypted")
                    bundle.extract(member, into)
                    if progress:
                        progress.update(bar, advance=1)
            return
        with tarfile.open(archive) as bundle:
            bundle.extractall(into, filter="data")
    except broken as error:
        raise DownloadError(
            f"{archive} is truncated or corrupt ({str(error)[:120] or type(error).__name__}); delete it (or the hub "
            f"cache entry) and download again"
        ) from None


def find_folder(tree: Path, names: tuple[str, ...], depth: int = 3) -> Path | None:
    """The first folder named one of ``names`` at most ``depth`` levels under ``tree``, breadth first."""
    level = [tree]
    for _ in range(depth):
        for folder in level:
            for name in names:
                if (folder / name).is_dir():
                    return folder / name
        level = [child for folder in level for child in sorted(folder.iterdir()) if child.is_dir()]
    return None


def move_into_place(source: Path, destination: Path) -> None:
    """Rename ``source`` to ``destination``, replacing a folder that is there (never a half-moved folder); a
    file of that name is the user's, and is refused rather than deleted."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    if (destination.exists() or destination.is_symlink()) and not destination.is_dir():
        raise UserError(f"{destination} is a file, not a task folder; move it away and run the command again")
    if destination.exists() or destination.is_symlink():
        old = destination.with_name(f"{PARTIAL}old-{destination.name}-{os.getpid()}")
        os.replace(destination, old)
        os.replace(source, destination)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    else:
        os.replace(source, destination)


def install_archive(archive: Path, destination: Path, tasks: list, progress=None) -> None:
    """Extract ``archive`` beside ``destination`` and move each task's folder (found under any of its
    names) to ``destination/<task name>``; tasks the archive lacks are left for ``verify`` to report."""
    destination.mkdir(parents=True, exist_ok=True)
    remove_partials(destination)
    scratch = destination / f"{PARTIAL}{os.getpid()}"
    try:
        extract_archive(archive, scratch, progress)
        for task in tasks:
            found = find_folder(scratch, (task.name, *task.aliases))
            if found is None:
                log.warning("%s has no folder for task %s", archive.name, task.name)
                continue
            move_into_place(found, destination / task.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_class_folder_list(folder: Path, label_of: Callable[[str], int | None], list_name: str) -> int:
    """``folder/<list_name>`` listing every image under the class sub-folders of ``folder`` as
    ``<class>/<file> <label>`` (NOAH's format); ``label_of(class folder)`` (None: not a class). Lines written."""
    lines = []
    for class_folder in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = label_of(class_folder.name)
        if label is None:
            continue
        lines += [
            f"{class_folder.name}/{image.name} {label}" for image in sorted(class_folder.iterdir()) if image.is_file()
        ]
    target = folder / list_name
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, "\n".join(lines) + "\n")
    return len(lines)


def install_class_folders(archive: Path, destination: Path, top: str, label_of, list_name: str, progress=None) -> None:
    """Extract ``archive``, take its ``top`` folder of class sub-folders, write the list and move the
    folder to ``destination`` (only once it is complete)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    remove_partials(destination.parent)
    scratch = destination.parent / f"{PARTIAL}{destination.name}-{os.getpid()}"
    try:
        extract_archive(archive, scratch, progress)
        found = find_folder(scratch, (top,))
        if found is None:
            raise UserError(f"{archive.name} has no folder '{top}'")
        write_class_folder_list(found, label_of, list_name)
        move_into_place(found, destination)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def link_or_copy(source: Path, destination: Path) -> None:
    """``destination`` as a symbolic link to ``source`` where the filesystem allows, else a copy."""
    if destination.is_symlink() or destination.exists():
        return
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        destination.symlink_to(source.resolve(), target_is_directory=source.is_dir())
    except OSError:
        scratch = destination.with_name(f"{PARTIAL}{destination.name}-{os.getpid()}")
        shutil.copytree(source, scratch)
        os.replace(scratch, destination)


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
