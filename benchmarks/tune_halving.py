"""Successive halving against the full grid: same picks, val200 gap, compute.

Runs stage 1 of ``petl-bench tune`` twice into one output folder, once as the full grid and once as
successive halving (the last rung's runs are the grid's own runs, so they are shared), and compares
per (method, task): whether halving picks the grid's configuration, the grid's val200 top-1 of the
halving pick against the grid's best, and the images processed by each search.

    python benchmarks/tune_halving.py --output /tmp/halving        # the demo suite, CPU minutes
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from common import write_csv

from petl_bench import records
from petl_bench.tuning import TuneSpec

METHODS = "linear,convpass,lora"
GRID = ["--grid", "recipe.weight_decay=1e-4", "--grid", "convpass.scale=0.1,1,10",
        "--grid", "convpass.xavier_init=false"]  # fmt: skip


def tune(search: str, output: Path, extra: list[str]) -> None:
    command = [sys.executable, "-m", "petl_bench.cli", "tune", "--suite", "demo", "--methods", METHODS,
               "--search", search, "--search-only", "--output", str(output), *GRID, *extra]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def images(spec: TuneSpec, rungs: range) -> int:
    total = 0
    for rung in rungs:
        for _, pairs in spec.stage_one(rung).items():
            for _, job in pairs:
                record = records.read_record(Path(spec.output) / job.run_id / records.RECORD)
                total += record.metrics.train_images * record.hparams.recipe["epochs"]
                total += record.metrics.eval_images
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("results/halving"))
    parser.add_argument("--csv", type=Path)
    args, extra = parser.parse_known_args()
    tune("grid", args.output, extra)
    tune("halving", args.output, extra)
    common = dict(methods=METHODS, suite="demo", grid=GRID[1::2], output=str(args.output))
    grid = TuneSpec(search="grid", **common)
    halving = TuneSpec(search="halving", **common)
    grid_choice = {(j.method, j.task.key): j.tuning for j in grid.stage_two()}
    halving_choice = {(j.method, j.task.key): j.tuning for j in halving.stage_two()}
    rows, same = [], 0
    for key, chosen in grid_choice.items():
        picked = halving_choice[key]["chosen"]
        scores = {tuple(sorted(c["values"].items())): c["val_top1"] for c in chosen["configurations"]}
        gap = chosen["chosen_val_top1"] - scores[tuple(sorted(picked.items()))]
        same += picked == chosen["chosen"]
        rows.append([*key, chosen["chosen"], picked, f"{gap:.1f}"])
        print(f"{key[0]:9} {key[1]:18} grid {chosen['chosen']} halving {picked} val200 gap {gap:.1f}")
    grid_images, halving_images = images(grid, range(1)), images(halving, range(halving.rungs()))
    print(f"same pick: {same}/{len(rows)}; images processed: grid {grid_images:,}, halving {halving_images:,} "
          f"({halving_images / grid_images:.2f}x)")  # fmt: skip
    write_csv(args.csv, ["method", "task", "grid_choice", "halving_choice", "val200_gap"], rows)


if __name__ == "__main__":
    main()
