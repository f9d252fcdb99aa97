"""One training epoch on a VTAB-1K-sized task: the decoded-tensor cache vs decoding JPEGs every epoch.

Both pipelines produce the same tensors (PIL bicubic resize, ToTensor, ImageNet Normalize); the
cached one decodes once (timed separately) and normalises on the device.

    python benchmarks/cache_epoch.py                      # CPU, demo backbone, 112 px, linear probe
    python benchmarks/cache_epoch.py --device cuda --backbone vit_base_patch16_224.orig_in21k --image-size 224
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from common import make_jpeg_task, scratch_folder, timed, write_csv
from torch.utils.data import DataLoader, Dataset

import petl_bench as pb
from petl_bench.data import Normalizer, TensorDataset, read_split
from petl_bench.runner import IMAGENET


class DecodeEveryEpoch(Dataset):
    def __init__(self, split, size):
        from torchvision import transforms

        self.split = split
        self.transform = transforms.Compose([
            transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(*IMAGENET),
        ])  # fmt: skip

    def __len__(self):
        return len(self.split)

    def __getitem__(self, index):
        from PIL import Image

        with Image.open(self.split.root / self.split.paths[index]) as image:
            return self.transform(image.convert("RGB")), self.split.labels[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vit_small_patch14_dinov2.imgfocus")
    parser.add_argument("--method", default="linear")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--task-dir", type=Path, help="an existing task folder (default: generated JPEGs)")
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args()
    os.environ["PETL_BENCH_CACHE"] = str(scratch_folder("petl-bench-cache-"))  # time the decode from scratch

    device = torch.device(args.device)
    folder = args.task_dir or make_jpeg_task(Path(tempfile.gettempdir()) / "petl-bench-jpeg-task")
    split = read_split("train", folder / "train800val200.txt", folder, None)
    size = (args.image_size, args.image_size)
    model = pb.create_model(args.method, args.backbone, num_classes=10, pretrained="none", image_size=args.image_size)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    normalizer = Normalizer(*IMAGENET).to(device)

    def step(images, labels):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    decode_seconds = timed(lambda: TensorDataset.from_split(split, size, "bicubic"))
    cached = TensorDataset.from_split(split, size, "bicubic").to(device)

    def cached_epoch(train: bool):
        for images, labels in cached.batches(args.batch_size, shuffle=True, drop_last=True):
            batch = normalizer(images)
            if train:
                step(batch, labels)

    loader = DataLoader(DecodeEveryEpoch(split, args.image_size), batch_size=args.batch_size, shuffle=True,
                        drop_last=True, num_workers=args.workers)  # fmt: skip

    def decoding_epoch(train: bool):
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            if train:
                step(images, labels)

    rows = []
    for label, train in (("data only", False), ("training epoch", True)):
        seconds_cached = timed(lambda train=train: cached_epoch(train))
        seconds_decoding = timed(lambda train=train: decoding_epoch(train))
        rows.append([label, seconds_decoding, seconds_cached, seconds_decoding / seconds_cached])
    print(f"task: {len(split)} JPEGs from {folder}; {args.backbone} + {args.method} at {args.image_size}px on {device}")
    print(f"one-time decode into the cache: {decode_seconds:.2f} s")
    print(f"{'':16} {'decode every epoch':>20} {'cached':>10} {'ratio':>8}")
    for label, slow, fast, ratio in rows:
        print(f"{label:16} {slow:19.2f}s {fast:9.2f}s {ratio:7.1f}x")
    write_csv(args.csv, ["measure", "decode_every_epoch_seconds", "cached_seconds", "ratio"], rows)


if __name__ == "__main__":
    main()
