"""Train-step time of every method relative to the floor.

The floor is the same frozen backbone with only the classifier trainable but gradients propagated to
the input (``images.requires_grad_()``): the backward pass through every block that any method
adapting block 0 must pay. Target: every method but VPT within 1.10x of the floor; VPT runs
``tokens`` extra tokens through every block, and the printout shows that ratio beside its time.

    python benchmarks/method_overhead.py --device cuda                       # ViT-B/16, batch 64
    python benchmarks/method_overhead.py --device cuda --execution eager,compiled --budget-seconds 200
    python benchmarks/method_overhead.py --backbone vit_small_patch14_dinov2 --image-size 56 --batch-size 32

Each step is the training loop's own (``engine.train_step``: autocast, fused AdamW, frozen weights held in
the compute dtype, compiled or eager). The floor line also gives images/s and the share of the GPU's dense
bf16 peak (``--peak-tflops``; a training step counted as three forward passes). On CUDA each method's line
ends with the most memory its eager steps allocated at once (``op_count.py --memory`` estimates the same on
a CPU; ``--runs-per-gpu`` is chosen from that estimate).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import write_csv

import petl_bench as pb
from petl_bench.config import Recipe
from petl_bench.data import Normalizer
from petl_bench.engine import adamw, forward_flops, frozen_weights_in, parameter_groups, precision_of, train_step

SKIP = {"zero_shot"}  # trains nothing
PEFT_TUNERS = ("lora", "dora", "vera", "loha", "lokr", "ia3", "boft")  # with the default targets (qkv, proj, fc1, fc2)


def _has_peft() -> bool:
    try:
        import peft  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


def build(method: str, args) -> pb.PetlModel:
    overrides = {"task": "cifar"} if method == "noah" else {}  # NOAH needs a subnet: the published CIFAR-100 one
    return pb.create_model(
        method, args.backbone, num_classes=100, pretrained="none", image_size=args.image_size, **overrides
    )


def step_seconds(model: torch.nn.Module, args, device: torch.device, input_grad: bool, execution: str) -> float:
    """Median seconds of the training loop's step (after ``args.warmup`` steps: compilation included there).
    On CUDA the most bytes allocated at once over the steps go to ``PEAKS`` (to set beside the fake-tensor
    estimate, ``op_count.py --memory``)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = model.to(device).train()
    recipe = Recipe(batch_size=args.batch_size, execution=execution)
    optimizer = adamw(parameter_groups(model, "all"), recipe, device)
    step = train_step(model, Normalizer((0.5,) * 3, (0.5,) * 3).to(device), optimizer, recipe, device)
    size = model.info.preprocessing.image_size
    images = torch.randn(args.batch_size, 3, *size, device=device)
    labels = torch.randint(0, 100, (args.batch_size,), device=device)
    times = []
    compute = torch.bfloat16 if precision_of(device) == "bf16" else None
    with frozen_weights_in(model, compute):
        for index in range(args.warmup + args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            step(images.clone().requires_grad_(input_grad), labels)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if index >= args.warmup:
                times.append(time.perf_counter() - start)
    if device.type == "cuda":
        PEAKS.append(torch.cuda.max_memory_allocated(device))
    return statistics.median(times)


PEAKS: list[int] = []  # CUDA: the peak bytes of each step_seconds call, in order


def peak_share(model, args, device, seconds: float) -> str:
    """The floor's images/s and, on a GPU, its share of the dense bf16 peak (3 forward passes per step)."""
    flops = forward_flops(model, model.info.preprocessing.image_size, torch.device("cpu")) * 3 * args.batch_size
    rate = args.batch_size / seconds
    share = (
        f", {100 * flops / seconds / (args.peak_tflops * 1e12):.0f}% of {args.peak_tflops:g} TFLOP/s"
        if device.type == "cuda"
        else ""
    )
    return f"{rate:,.0f} img/s{share}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=pb.PAPER_BACKBONE)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    parser.add_argument("--execution", default="eager", help="eager, compiled, or eager,compiled (one column each)")
    parser.add_argument("--budget-seconds", type=float, default=None, help="stop measuring a column after this")
    parser.add_argument("--peak-tflops", type=float, default=989.4, help="dense bf16 peak (H100/H200 SXM: 989.4)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    executions = args.execution.split(",")
    methods = args.methods.split(",") if args.methods else [m for m in pb.METHODS.names() if m not in SKIP]
    if not args.methods:
        methods += [f"peft:{name}" for name in PEFT_TUNERS if _has_peft()]
    floor_model = build("linear", args)
    floor_model.method.frozen_encoder_eval = False  # the floor runs the backbone in training mode like the others
    floors = {e: step_seconds(floor_model, args, device, True, e) for e in executions}
    tokens = 1 + floor_model.info.grids[0][0] * floor_model.info.grids[0][1] if floor_model.info.grids else None
    print(f"{args.backbone} on {device}, batch {args.batch_size}, median of {args.steps} steps")
    for execution, seconds in floors.items():
        print(f"floor ({execution}): {seconds:.4f} s, {peak_share(floor_model, args, device, seconds)}")
    del floor_model
    rows = [["floor", *[v for e in executions for v in (floors[e], 1.0)], None]]
    print(f"{'method':16} " + " ".join(f"{e + ' s':>12} {'x floor':>8}" for e in executions) + "  note")
    started = {e: time.monotonic() for e in executions}
    for method in methods:
        try:
            build(method, args)
        except pb.UserError as error:  # a method that needs settings (GLoRA's searched paths)
            print(f"{method:16} not timed: {error}")
            continue
        cells, peak = [], None
        for execution in executions:
            over = args.budget_seconds and time.monotonic() - started[execution] > args.budget_seconds
            seconds = None if over else step_seconds(build(method, args), args, device, False, execution)
            cells += [seconds, seconds / floors[execution] if seconds else None]
            peak = PEAKS[-1] / 2**30 if seconds and execution == "eager" and PEAKS else peak
        rows.append([method, *cells, peak])
        shown = " ".join(
            "   not timed (budget)" if s is None else f"{s:12.4f} {r:8.3f}" for s, r in zip(cells[::2], cells[1::2])
        )
        memory = f"  eager peak {peak:.2f} GiB" if peak is not None else ""
        print(f"{method:16} {shown}  {note(method, args, tokens)}{memory}")
    header = [f"{e}_{k}" for e in executions for k in ("step_seconds", "ratio_to_floor")]
    write_csv(args.csv, ["method", *header, "eager_peak_gib"], rows)


def note(method: str, args, tokens: int | None) -> str:
    if method.startswith("vpt") and tokens:
        extra = build(method, args).config.tokens
        return f"{tokens}+{extra} tokens: {(tokens + extra) / tokens:.2f}x the sequence"
    if method == "noah" and tokens:
        return "appends up to 10 prompt tokens (NOAH's CIFAR-100 subnet)"
    return {"full": "not a PETL method: weight gradients for every layer",
            "linear": "no backward pass through the encoder at all"}.get(method, "")  # fmt: skip


if __name__ == "__main__":
    main()
