"""Helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import atexit
import csv
import shutil
import tempfile
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


def scratch_folder(prefix: str) -> Path:
    """A temporary folder removed when the script exits (runs, caches: up to hundreds of MB per run)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
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


def run_arguments(parser) -> bool:
    """The options the end-to-end benchmarks share, with defaults for the machine: ViT-B/16 at its 224 px on a
    GPU, a small ViT at 56 px on a CPU. Returns whether CUDA is there (for the script's own defaults)."""
    import torch

    import petl_bench as pb

    cuda = torch.cuda.is_available()
    parser.add_argument("--backbone", default=pb.PAPER_BACKBONE if cuda else "vit_small_patch14_dinov2")
    parser.add_argument("--image-size", type=int, default=None if cuda else 56)
    parser.add_argument("--method", default="convpass")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--execution", default="auto", help="auto (compiled on CUDA), eager or compiled")
    parser.add_argument("--csv", type=Path)
    return cuda
