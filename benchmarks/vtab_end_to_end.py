"""One VTAB-1K-sized task end to end: petl-bench against a naive pipeline that mirrors the official
Convpass / NOAH scripts (a DataLoader decoding and resizing JPEGs every epoch, fp32, the test set
evaluated every 10 epochs). Same model, same recipe, same epochs; prints wall times and the ratio.

    python benchmarks/vtab_end_to_end.py                                  # CPU: small backbone, few epochs
    python benchmarks/vtab_end_to_end.py --device cuda --backbone vit_base_patch16_224.orig_in21k --epochs 100
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from cache_epoch import DecodeEveryEpoch
from common import make_jpeg_task, run_arguments, scratch_folder, write_csv
from torch.utils.data import DataLoader

import petl_bench as pb
from petl_bench import records
from petl_bench.engine import Recipe, lr_at_epoch
from petl_bench.planning import plan
from petl_bench.runner import run_sweep
from petl_bench.task import folder_task


def petl_bench_pipeline(task, args, recipe: Recipe, device: torch.device, output: Path) -> float:
    jobs = plan([args.method], [task], [args.backbone], [0], protocol="final", pretrained="none", recipe=recipe)
    start = time.perf_counter()
    summary = run_sweep(jobs, output, device=device, force=True)
    assert len(summary.finished) == 1, summary
    return time.perf_counter() - start


def naive_pipeline(task, args, recipe: Recipe, device: torch.device) -> float:
    """The official scripts' loop: decode every epoch, fp32, test every 10 epochs, keep the best."""
    start = time.perf_counter()
    torch.manual_seed(0)
    data = task.splits(None, "final")
    model = pb.create_model(args.method, args.backbone, num_classes=data.num_classes, pretrained="none",
                            image_size=args.image_size, drop_path_rate=recipe.drop_path).to(device)  # fmt: skip
    size = model.info.preprocessing.image_size[0]
    train = DataLoader(DecodeEveryEpoch(data.train, size), batch_size=recipe.batch_size, shuffle=True, drop_last=True,
                       num_workers=args.workers)  # fmt: skip
    test = DataLoader(DecodeEveryEpoch(data.eval, size), batch_size=256, num_workers=args.workers)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.lr,
                                  weight_decay=recipe.weight_decay)  # fmt: skip
    best = 0.0
    for epoch in range(recipe.epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr_at_epoch(recipe, epoch)
        model.train()
        for images, labels in train:
            loss = torch.nn.functional.cross_entropy(model(images.to(device)), labels.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch % args.eval_every == args.eval_every - 1:
            model.eval()
            correct = 0
            with torch.no_grad():
                for images, labels in test:
                    correct += int((model(images.to(device)).argmax(-1).cpu() == labels).sum())
            best = max(best, correct / len(data.eval))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = run_arguments(parser)
    parser.add_argument("--epochs", type=int, default=100 if cuda else 4)
    parser.add_argument("--eval-every", type=int, default=10 if cuda else 2)
    parser.add_argument("--test-images", type=int, default=2000 if cuda else 500)
    parser.add_argument("--workers", type=int, default=4 if cuda else 2)
    args = parser.parse_args()
    device = torch.device(args.device)
    workspace = scratch_folder("petl-bench-e2e-")
    os.environ["PETL_BENCH_CACHE"] = str(workspace / "cache")  # petl-bench pays for its own decoding
    folder = make_jpeg_task(
        Path(tempfile.gettempdir()) / f"petl-bench-vtab-task-{args.test_images}", test=args.test_images
    )
    task = folder_task(folder)
    recipe = Recipe(epochs=args.epochs, batch_size=args.batch_size, image_size=args.image_size,
                    warmup_epochs=min(10, args.epochs // 10), eval_every=args.eval_every,
                    execution=args.execution)  # fmt: skip
    naive = naive_pipeline(task, args, recipe, device)
    ours = petl_bench_pipeline(task, args, recipe, device, workspace / "runs")
    (record,) = records.load_records(workspace / "runs")
    print(f"{len(task.splits(None, 'final').train)} training JPEGs, {args.test_images} test JPEGs; "
          f"{args.backbone} + {args.method}, {args.epochs} epochs, batch {args.batch_size}, on {device}")  # fmt: skip
    print(f"{'pipeline':12} {'wall s':>9}")
    print(f"{'naive':12} {naive:9.1f}  (decode every epoch, fp32, test every {args.eval_every} epochs)")
    print(f"{'petl-bench':12} {ours:9.1f}  (decode once into the cache{', bf16' if device.type == 'cuda' else ''}, "
          f"one test pass; data {record.cost.seconds.data:.1f} s, train {record.cost.seconds.train:.1f} s, "
          f"eval {record.cost.seconds.eval:.1f} s)")  # fmt: skip
    print(f"ratio: {naive / ours:.2f}x")
    write_csv(args.csv, ["pipeline", "wall_seconds"], [["petl-bench", ours], ["naive", naive]])


if __name__ == "__main__":
    main()
