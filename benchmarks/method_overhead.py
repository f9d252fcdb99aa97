"""Train-step time of every method relative to the floor.

The floor is the same frozen backbone with only the classifier trainable but gradients propagated to
the input (``images.requires_grad_()``): the backward pass through every block that any method
adapting block 0 must pay. Target: every method but VPT within 1.10x of the floor; VPT runs
``tokens`` extra tokens through every block, and the printout shows that ratio beside its time.

    python benchmarks/method_overhead.py --device cuda                       # ViT-B/16, batch 64
    python benchmarks/method_overhead.py --backbone vit_small_patch14_dinov2 --image-size 56 --batch-size 32
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import write_csv

import petl_bench as pb
from petl_bench.engine import autocast, parameter_groups

SKIP = {"zero_shot"}  # trains nothing
PEFT_TUNERS = ("lora", "dora", "vera", "loha", "lokr", "ia3", "boft")  # with the default targets (qkv, proj, fc1, fc2)


def _has_peft() -> bool:
    try:
        import peft  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


class NoahStyleLoRA(torch.nn.Module):
    """NOAH's Attention LoRA written out as its forward does it (benchmark only): the qkv projection,
    then ``F.linear(F.linear(dropout(x), A), B)`` added to it. Measures what NOAH's own LoRA pays."""

    def __init__(self, qkv: torch.nn.Linear, rank: int = 8, dropout: float = 0.1):
        super().__init__()
        self.qkv = qkv
        self.a = torch.nn.Parameter(torch.randn(rank, qkv.in_features) * 0.02)
        self.b = torch.nn.Parameter(torch.randn(qkv.out_features, rank) * 0.02)
        self.drop = torch.nn.Dropout(dropout)

    def forward(self, x):
        delta = torch.nn.functional.linear(torch.nn.functional.linear(self.drop(x), self.a), self.b)
        return self.qkv(x) + delta


def noah_style_lora(args) -> pb.PetlModel:
    model = build("linear", args)
    model.method.frozen_encoder_eval = False
    for block in model.backbone.blocks:
        block.attn.qkv = NoahStyleLoRA(block.attn.qkv)
    return model


DIAGNOSTICS = {  # rows that explain a ratio, not methods
    "lora dropout=0": lambda args: pb.create_model("lora", args.backbone, num_classes=100, pretrained="none",
                                                   image_size=args.image_size, dropout=0.0),
    "NOAH-style lora": noah_style_lora,
}  # fmt: skip


def build(method: str, args) -> pb.PetlModel:
    overrides = {"task": "cifar"} if method == "noah" else {}  # NOAH needs a subnet: the published CIFAR-100 one
    return pb.create_model(
        method, args.backbone, num_classes=100, pretrained="none", image_size=args.image_size, **overrides
    )


def step_seconds(model: torch.nn.Module, args, device: torch.device, input_grad: bool) -> float:
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, "all"), lr=1e-3)
    size = model.info.preprocessing.image_size
    images = torch.randn(args.batch_size, 3, *size, device=device)
    labels = torch.randint(0, 100, (args.batch_size,), device=device)
    times = []
    for index in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        x = images.clone().requires_grad_(input_grad)
        with autocast(device):
            loss = torch.nn.functional.cross_entropy(model(x).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index >= args.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=pb.PAPER_BACKBONE)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    methods = args.methods.split(",") if args.methods else [m for m in pb.METHODS.names() if m not in SKIP]
    if not args.methods:
        methods += [f"peft:{name}" for name in PEFT_TUNERS if _has_peft()]

    floor_model = build("linear", args)
    floor_model.method.frozen_encoder_eval = False  # the floor runs the backbone in training mode like the others
    floor = step_seconds(floor_model, args, device, input_grad=True)
    tokens = 1 + floor_model.info.grids[0][0] * floor_model.info.grids[0][1] if floor_model.info.grids else None
    del floor_model
    rows = [["floor", floor, 1.0]]
    print(f"{args.backbone} on {device}, batch {args.batch_size}, median of {args.steps} steps")
    print(f"{'method':16} {'step s':>9} {'x floor':>8}  note")
    print(f"{'floor':16} {floor:9.4f} {1.0:8.3f}  head only, gradients to the input")
    for method in methods:
        model = build(method, args)
        seconds = step_seconds(model, args, device, input_grad=False)
        ratio = seconds / floor
        note = ""
        if method.startswith("vpt") and tokens:
            extra = model.config.tokens
            note = f"{tokens}+{extra} tokens: {(tokens + extra) / tokens:.2f}x the sequence"
        elif method == "noah" and tokens:
            extra = max(p.shape[1] for p in model.backbone.blocks.prompts.values())
            note = f"{tokens}+up to {extra} prompt tokens (NOAH appends prompts like VPT)"
        elif method == "full":
            note = "not a PETL method: weight gradients for every layer"
        elif method == "linear":
            note = "no backward pass through the encoder at all"
        elif ratio > 1.10:
            note = "over the 1.10x target"
        rows.append([method, seconds, ratio])
        print(f"{method:16} {seconds:9.4f} {ratio:8.3f}  {note}")
        del model
    if "lora" in methods:
        for name, make in DIAGNOSTICS.items():
            seconds = step_seconds(make(args), args, device, input_grad=False)
            rows.append([name, seconds, seconds / floor])
            print(f"{name:16} {seconds:9.4f} {seconds / floor:8.3f}  diagnostic")
    write_csv(args.csv, ["method", "step_seconds", "ratio_to_floor"], rows)


if __name__ == "__main__":
    main()
