"""A VTAB-1K-shaped sweep: one method over 19 tasks of 1,000 training images each (synthetic JPEGs, the
shape of VTAB-1K's train800val200), trained for a few epochs through petl-bench's own sweep, then extrapolated
to the paper's 100 epochs and VTAB-1K's real test sets from the measured per-epoch and per-test-image times.
The extrapolation is stated in the printout: it assumes time per epoch stays what it was (it does: the
schedule changes only the learning rate) and evaluation costs what this run's did per image.

    python benchmarks/vtab_sweep.py --device cuda --epochs 10          # ViT-B/16, convpass (the GPU check)
    python benchmarks/vtab_sweep.py --backbone vit_small_patch14_dinov2 --image-size 56 --tasks 3 --epochs 2
    python benchmarks/vtab_sweep.py --tasks 2 --seeds 2 --epochs 1 --execution compiled   # a seed reuses a compile
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from common import make_jpeg_task, run_arguments, scratch_folder, write_csv

import petl_bench as pb
from petl_bench import records
from petl_bench.config import Recipe
from petl_bench.planning import plan
from petl_bench.runner import run_sweep
from petl_bench.task import folder_task


def vtab_test_images() -> int:
    """The 19 VTAB-1K test sets together, from the registered tasks' published sizes."""
    tasks = [task for _, task in pb.TASKS.items() if task.suite == "vtab"]
    return sum(task.sizes[task.lists.test] for task in tasks)


def task_folders(workspace: Path, count: int, test: int) -> list[Path]:
    """``count`` task folders holding the same synthetic JPEGs under different names (content does not
    change the time; each is decoded into the cache on its own, as real tasks are), labelled with the classes
    of the VTAB-1K tasks in turn (100, 102, 47, ...): the classifier's shape differs between tasks as there,
    so a compiled step is reused across tasks only where VTAB-1K's would be."""
    source = make_jpeg_task(Path(tempfile.gettempdir()) / f"petl-bench-vtab-task-{test}", test=test)
    classes = [task.num_classes for _, task in pb.TASKS.items() if task.suite == "vtab"]
    folders = []
    for index in range(count):
        folder = workspace / f"synthetic_{index:02d}"
        shutil.copytree(source, folder, symlinks=True, dirs_exist_ok=True)
        for name in ("train800val200.txt", "test.txt"):
            paths = [line.split()[0] for line in (folder / name).read_text().splitlines() if line.strip()]
            labels = [f"{path} {row % classes[index % len(classes)]}" for row, path in enumerate(paths)]
            (folder / name).write_text("\n".join(labels) + "\n")
        folders.append(folder)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = run_arguments(parser)
    parser.add_argument("--tasks", type=int, default=19)
    parser.add_argument("--epochs", type=int, default=10 if cuda else 2)
    parser.add_argument("--test-images", type=int, default=500)
    parser.add_argument("--seeds", type=int, default=1, help="seeds per task (a task's seeds run one after another)")
    args = parser.parse_args()
    workspace = scratch_folder("petl-bench-sweep-")
    os.environ["PETL_BENCH_CACHE"] = str(workspace / "cache")  # the sweep pays for its own decoding
    tasks = [folder_task(folder) for folder in task_folders(workspace, args.tasks, args.test_images)]
    recipe = Recipe(epochs=args.epochs, batch_size=args.batch_size, image_size=args.image_size,
                    execution=args.execution)  # fmt: skip
    jobs = plan([args.method], tasks, [args.backbone], list(range(args.seeds)), protocol="final", pretrained="none",
                recipe=recipe)  # fmt: skip
    start = time.perf_counter()
    summary = run_sweep(jobs, workspace / "runs", device=torch.device(args.device))
    wall = time.perf_counter() - start
    found = records.load_records(workspace / "runs")
    assert len(found) == args.tasks * args.seeds and not summary.failed, summary.failed
    train = sum(r.cost.seconds.train for r in found)
    evaluated = sum(r.metrics.eval_images for r in found)
    per_test_image = sum(r.cost.seconds.eval for r in found) / evaluated
    fixed = wall - train - sum(r.cost.seconds.eval for r in found)  # data, model builds, records, compiles
    tests = vtab_test_images() * args.tasks // 19  # the tasks' share of VTAB-1K's test images
    at_100 = fixed + train * 100 / args.epochs + per_test_image * tests
    images = sum(r.metrics.train_images for r in found) * args.epochs
    print(
        f"{args.method} on {args.backbone}, {args.tasks} tasks x 1,000 training images x {args.seeds} seed(s), "
        f"{args.epochs} epochs, batch {args.batch_size}, {args.device}, {found[0].hparams.execution}"
    )
    if args.seeds > 1:  # a later seed of a task reuses the compiled step of the seed before (in its train time)
        for name, runs in (
            ("seed 0", [r for r in found if r.seed == 0]),
            ("later seeds", [r for r in found if r.seed]),
        ):
            train_s = sum(r.cost.seconds.train for r in runs) / len(runs)
            other_s = sum(r.cost.seconds.total - r.cost.seconds.train - r.cost.seconds.eval for r in runs) / len(runs)
            print(f"{name}: {train_s:.1f} s training per run (its first step traces and compiles), {other_s:.1f} s "
                  f"other fixed costs per run")  # fmt: skip
    print(f"measured: {wall:.1f} s wall = train {train:.1f} s ({images / train:,.0f} img/s) + eval "
          f"{per_test_image * evaluated:.1f} s ({evaluated:,} test images) + fixed {fixed:.1f} s (decode, build, "
          f"compile, records)")  # fmt: skip
    print(
        f"extrapolated to 100 epochs and {tests:,} test images ({args.tasks}/19 of VTAB-1K's): {at_100 / 60:.1f} min "
        f"(train x {100 / args.epochs:g}; eval at the measured {1 / per_test_image:,.0f} img/s; fixed costs once)"
    )
    write_csv(args.csv, ["tasks", "epochs", "wall_seconds", "train_seconds", "fixed_seconds", "minutes_at_100"],
              [[args.tasks, args.epochs, wall, train, fixed, at_100 / 60]])  # fmt: skip


if __name__ == "__main__":
    main()
