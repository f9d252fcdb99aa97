"""Fetching and installing data: downloads with a clear error, archives extracted beside their destination
and moved into place task by task (an interrupted install never leaves a folder that ``verify`` accepts),
class-folder datasets listed, shared images linked."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable

from .atomic import write_atomic
from .data import ensure_free_space
from .errors import DownloadError, UserError
from .hub import require_hub

log = logging.getLogger(__name__)


PARTIAL = ".partial-"  # prefix of temporary extraction folders


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
