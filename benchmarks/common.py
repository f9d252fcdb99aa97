"""Helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_jpeg_task(folder: Path, train: int = 1000, test: int = 500, classes: int = 10, seed: int = 0) -> Path:
    """A VTAB-1K-sized task in NOAH's layout with JPEGs at native, varying sizes (natural-image-like)."""
    if (folder / "test.txt").is_file():
        return folder
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("test", test)):
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for index in range(count):
            label = index % classes
            height, width = int(rng.integers(240, 500)), int(rng.integers(240, 500))
            base = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
            image = Image.fromarray(base).resize((width, height), Image.BICUBIC)
            noise = rng.normal(0, 12, (height, width, 3))
            pixels = np.clip(np.asarray(image, dtype=float) + noise + 8 * label, 0, 255).astype(np.uint8)
            path = f"images/{split}/{index:06d}.jpg"
            Image.fromarray(pixels).save(folder / path, quality=90)
            lines.append(f"{path} {label}")
        name = "train800val200.txt" if split == "train" else "test.txt"
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def timed(function, repeat: int = 1) -> float:
    """Best wall time of ``repeat`` calls."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def write_csv(path: Path | None, columns: list[str], rows: list[list]) -> None:
    if path is None:
        return
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
