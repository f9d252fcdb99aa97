"""Kernels dispatched per training step, per method: the GPU speed proxy that runs on any CPU.

On a GPU, a small-batch PETL step costs about max(GPU time, host time per kernel x kernels): the host
launches every kernel. This counts what one step (forward under bf16 autocast, fp32 loss, backward,
AdamW, zero_grad) dispatches, with fake tensors (nothing is computed: seconds per method on a CPU).
The floor is the frozen backbone in training mode with only the classifier trained and gradients to
the input. ``+/block`` is a method's kernels over the floor's, per transformer block.

    python benchmarks/op_count.py                                   # ViT-B/16, batch 64, every method
    python benchmarks/op_count.py --methods convpass,lora --optimizer fused --top 8
    python benchmarks/op_count.py --memory        # and each step's peak memory (fake tensors, as --runs-per-gpu)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import write_csv

import petl_bench as pb
from petl_bench.opcount import count_step, step_memory

SKIP = {"zero_shot"}  # trains nothing


def build(method: str, backbone: str, image_size: int | None) -> pb.PetlModel:
    overrides = {"task": "cifar"} if method == "noah" else {}
    return pb.create_model(method, backbone, num_classes=100, pretrained="none", image_size=image_size, **overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vit_base_patch16_224")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    parser.add_argument(
        "--optimizer", default="fused", choices=["fused", "foreach", "for-loop"], help="fused: what training uses"
    )
    parser.add_argument("--fp32", action="store_true", help="no autocast (default: bf16 autocast)")
    parser.add_argument("--memory", action="store_true", help="also estimate each step's peak memory (GiB)")
    parser.add_argument("--top", type=int, default=0, help="also print each method's N most frequent kernels")
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args()
    methods = args.methods.split(",") if args.methods else [m for m in pb.METHODS.names() if m not in SKIP]
    dtype = None if args.fp32 else torch.bfloat16

    def count(method: str, input_grad: bool = False):
        model = build(method, args.backbone, args.image_size)
        if method == "linear" and input_grad:
            model.method.frozen_encoder_eval = False  # the floor runs the encoder in training mode
        model.train()
        size = model.info.preprocessing.image_size
        start = time.perf_counter()
        found = count_step(model, args.batch_size, size, 100, dtype=dtype, input_grad=input_grad,
                           optimizer=args.optimizer)  # fmt: skip
        gib = None
        if args.memory:  # what --runs-per-gpu is chosen from (the training step's part of a run's need)
            found_bytes = step_memory(model, args.batch_size, size, 100, dtype=dtype, optimizer=args.optimizer,
                                      input_grad=input_grad)  # fmt: skip
            gib = found_bytes / 2**30
        return found, len(model.info.block_paths), time.perf_counter() - start, gib

    def gib_cell(gib) -> str:
        return f" {gib:8.2f}" if gib is not None else ""

    floor, blocks, _, floor_gib = count("linear", input_grad=True)
    print(f"{args.backbone}, batch {args.batch_size}, {'fp32' if dtype is None else 'bf16 autocast'}, "
          f"AdamW {args.optimizer}; kernels per training step")  # fmt: skip
    print(f"{'method':18} {'kernels':>8} {'views':>7} {'x floor':>8} {'+/block':>8} {'syncs':>6} {'count s':>8}"
          + (f" {'step GiB':>8}" if args.memory else ""))  # fmt: skip
    print(f"{'floor':18} {floor.kernels:8d} {floor.views:7d} {1.0:8.2f} {0.0:8.1f} {floor.syncs:6d} {'':8}"
          + gib_cell(floor_gib))  # fmt: skip
    rows = [["floor", floor.kernels, floor.views, 1.0, 0.0, floor.syncs, floor_gib]]
    for method in methods:
        try:
            found, _, seconds, gib = count(method)
        except pb.UserError as error:  # a method that needs settings (GLoRA's searched paths)
            print(f"{method:18} not counted: {error}")
            continue
        extra = (found.kernels - floor.kernels) / blocks
        ratio = found.kernels / floor.kernels
        print(
            f"{method:18} {found.kernels:8d} {found.views:7d} {ratio:8.2f} {extra:8.1f} {found.syncs:6d} {seconds:8.1f}"
            + gib_cell(gib)
        )
        if args.top:
            print("    " + ", ".join(f"{name} {n}" for name, n in found.by_op.most_common(args.top)))
        rows.append([method, found.kernels, found.views, round(ratio, 3), round(extra, 1), found.syncs, gib])
    columns = ["method", "kernels", "views", "ratio_to_floor", "kernels_per_block_over_floor", "syncs", "step_gib"]
    write_csv(args.csv, columns, rows)


if __name__ == "__main__":
    main()
