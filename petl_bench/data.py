"""File-list datasets, validation, and the decoded-tensor cache.

A split is a list file of ``<relative image path> <label>`` lines (NOAH's layout). Images are
decoded and resized once (PIL, exactly as ``transforms.Resize((S, S), bicubic)`` on a PIL image),
stored as a uint8 array in the cache directory, and normalised on the device at batch time:
the same numbers as decoding every epoch, without the decoding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .errors import UserError

log = logging.getLogger(__name__)

INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
MISSING_SHOWN = 5


def cache_dir() -> Path:
    """Where decoded images, converted weights and generated demo data live."""
    return Path(os.environ.get("PETL_BENCH_CACHE", Path.home() / ".cache" / "petl-bench")).expanduser()


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


def read_split(name: str, list_file: Path, root: Path, num_classes: int | None, how_to_get: str = "") -> Split:
    """Parse and validate a list file: every line ``path label``, labels in range, every image present."""
    hint = f" {how_to_get}" if how_to_get else ""
    if not list_file.is_file():
        raise UserError(f"missing list file {list_file}.{hint}")
    paths, labels = [], []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rstrip().rsplit(maxsplit=1)  # paths may contain spaces: split on the last one
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise UserError(f"{list_file}:{number}: malformed line {line!r}; expected '<image path> <integer label>'")
        label = int(parts[1])
        if num_classes is not None and not 0 <= label < num_classes:
            raise UserError(f"{list_file}:{number}: label {label} outside [0, {num_classes})")
        paths.append(parts[0])
        labels.append(label)
    if not paths:
        raise UserError(f"{list_file} lists no images.{hint}")
    unique = len(set(zip(paths, labels)))
    if unique < len(paths):  # NOAH's 1-shot Oxford Pets lists repeat every line
        log.warning("%s repeats lines: %d lines, %d unique (kept as listed)", list_file, len(paths), unique)
    split = Split(name, list_file, root, tuple(paths), tuple(labels))
    missing = [(number, path) for number, path in enumerate(split.paths, start=1) if not (root / path).is_file()]
    if missing:
        shown = ", ".join(f"{root / path} (line {number})" for number, path in missing[:MISSING_SHOWN])
        more = f" and {len(missing) - MISSING_SHOWN} more" if len(missing) > MISSING_SHOWN else ""
        raise UserError(
            f"{len(missing)} of {len(split)} images listed in {list_file} are missing: {shown}{more}.{hint}"
        )
    return split


def check_size(split: Split, expected: int | None, strict: bool) -> None:
    """Warn (or, when strict, fail) when a split does not have the size the protocol defines."""
    if expected is None or len(split) == expected:
        return
    message = f"{split.list_file} has {len(split)} images; the protocol expects {expected}"
    if strict:
        raise UserError(message + " (--strict)")
    log.warning(message)


def _decode(job: tuple[str, int, int, str]) -> np.ndarray:
    path, height, width, interpolation = job
    try:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((width, height), INTERPOLATIONS[interpolation])
            return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UserError(f"cannot decode image {path}: {error} (a corrupt or truncated download?)") from None


def _cache_key(split: Split, size: tuple[int, int], interpolation: str) -> str:
    digest = hashlib.sha256()
    digest.update(f"v1|{size}|{interpolation}|{split.root.resolve()}\n".encode())
    digest.update(split.list_file.read_bytes())
    for path in split.files():
        stat = path.stat()
        digest.update(f"{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def _decode_into(path: Path, split: Split, size: tuple[int, int], interpolation: str, workers, progress) -> None:
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(len(split), 3, size[0], size[1]))
    jobs = [(str(file), size[0], size[1], interpolation) for file in split.files()]
    task = progress.add_task(f"decoding {split.name} ({len(jobs)} images)", total=len(jobs)) if progress else None
    workers = workers or min(8, os.cpu_count() or 1)
    if workers > 1 and len(jobs) >= 256:
        with ProcessPoolExecutor(workers) as pool:
            for index, decoded in enumerate(pool.map(_decode, jobs, chunksize=64)):
                array[index] = decoded
                if progress and index % 64 == 0:
                    progress.update(task, completed=index)
    else:
        for index, job in enumerate(jobs):
            array[index] = _decode(job)
    array.flush()
    if progress:
        progress.remove_task(task)


def decoded_images(
    split: Split, size: tuple[int, int], interpolation: str = "bicubic", workers: int | None = None, progress=None
) -> torch.Tensor:
    """The split's images as a uint8 tensor (N, 3, H, W), decoded once and memory-mapped from the cache.

    The cache key covers the list file's content, the image files' sizes and modification times, the
    size and the interpolation. Concurrent writers each write a private file and rename it into place.
    """
    if interpolation not in INTERPOLATIONS:
        raise UserError(f"unknown interpolation '{interpolation}'; choose from: {', '.join(INTERPOLATIONS)}")
    folder = cache_dir() / "decoded"
    folder.mkdir(parents=True, exist_ok=True)
    key = _cache_key(split, size, interpolation)
    target = folder / f"{key}.npy"
    if not target.exists():
        temporary = folder / f".{key}.{os.getpid()}.tmp.npy"
        try:
            _decode_into(temporary, split, size, interpolation, workers, progress)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        os.replace(temporary, target)
        (folder / f"{key}.json").write_text(
            json.dumps({"list_file": str(split.list_file), "images": len(split), "size": size})
        )
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
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        stop = len(self) - len(self) % batch_size if drop_last else len(self)
        for start in range(0, stop, batch_size):
            index = order[start : start + batch_size]
            if shuffle:
                yield self.images[index.to(self.images.device)], self.labels[index.to(self.labels.device)]
            else:
                yield self.images[start : start + batch_size], self.labels[start : start + batch_size]


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


AUGMENTATIONS = ("none", "deit", "crop_flip")


class _AugmentedFiles(torch.utils.data.Dataset):
    def __init__(self, split: Split, transform):
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        with Image.open(self.split.root / self.split.paths[index]) as image:
            return self.transform(image.convert("RGB")), self.split.labels[index]


@dataclass
class AugmentedStream:
    """Training batches decoded and augmented every epoch (few-shot and domain generalisation recipes).

    ``deit``: timm's DeiT pipeline (random resized crop, flip, RandAugment, random erasing) as NOAH's
    few-shot runs; ``crop_flip``: random resized crop and horizontal flip (the paper's CLIP runs).
    Optional mixup / cutmix (timm) turn labels into smoothed soft targets.
    """

    split: Split
    size: tuple[int, int]
    augment: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    rand_augment: str = "rand-m9-mstd0.5-inc1"
    random_erasing: float = 0.25
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0
    workers: int = 0
    device: torch.device | str = "cpu"

    def __len__(self) -> int:
        return len(self.split)

    def transform(self):
        from timm.data import create_transform
        from torchvision import transforms

        if self.augment == "deit":
            return create_transform(
                self.size, is_training=True, auto_augment=self.rand_augment, re_prob=self.random_erasing,
                re_mode="pixel", re_count=1, interpolation="bicubic", color_jitter=0.4, mean=self.mean, std=self.std,
            )  # fmt: skip
        if self.augment == "crop_flip":
            return transforms.Compose([
                transforms.RandomResizedCrop(self.size, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(self.mean, self.std),
            ])  # fmt: skip
        raise UserError(f"unknown augmentation '{self.augment}'; choose from: {', '.join(AUGMENTATIONS)}")

    def batches(self, batch_size: int, *, shuffle: bool = False, generator=None, drop_last: bool = False):
        from timm.data import Mixup

        loader = torch.utils.data.DataLoader(
            _AugmentedFiles(self.split, self.transform()), batch_size=batch_size, shuffle=shuffle, generator=generator,
            drop_last=drop_last, num_workers=self.workers, persistent_workers=False,
        )  # fmt: skip
        mix = None
        if self.mixup or self.cutmix:
            mix = Mixup(mixup_alpha=self.mixup, cutmix_alpha=self.cutmix, label_smoothing=self.label_smoothing,
                        num_classes=self.num_classes)  # fmt: skip
        for images, labels in loader:
            images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            if mix is not None and len(labels) % 2 == 0:  # timm's batch mixing pairs samples
                images, labels = mix(images, labels)
            yield images, labels
