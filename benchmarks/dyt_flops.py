"""DyT: what its training and evaluation code computes against the inference speed-up its paper claims.

The official training and evaluation code (and petl-bench's, which follows it) runs the MLP on every token and
multiplies its output by the dispatcher's mask: no FLOP is saved. The paper's speed-up comes from the official
speed test's gather implementation, which runs the MLP only on the kept tokens. This measures both on the same
model and images: the kept fraction, forward FLOPs per image (torch.utils.flop_counter) and images/s of each
implementation, the frozen ViT's for scale, and the largest logit difference between the two.

    python benchmarks/dyt_flops.py                                          # ViT-B/16 at 224, batch 32, CPU
    python benchmarks/dyt_flops.py --checkpoint runs/<run>/checkpoint.safetensors --images 256

Without ``--checkpoint`` the dispatchers are as initialised (logits near 0: about half the tokens kept); a
trained DyT keeps about its ``target`` (0.5) on average, varying with the image.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import write_csv
from torch.utils.flop_counter import FlopCounterMode

import petl_bench as pb
from petl_bench.methods.dyt import DyTBlock, dyt_forward


def set_gather(model, gather: bool) -> None:
    for module in model.modules():
        if isinstance(module, DyTBlock):
            module.gather = gather


@torch.no_grad()
def measure(model, images: torch.Tensor, batch: int, repeat: int) -> tuple[float, float]:
    """(forward FLOPs per image, images/s, the best of ``repeat`` passes over ``images``)."""
    with FlopCounterMode(display=False) as counter:
        model(images[:batch])
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for chunk in images.split(batch):
            model(chunk)
        best = min(best, time.perf_counter() - start)
    return counter.get_total_flops() / batch, len(images) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vit_base_patch16_224")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--checkpoint", type=Path, help="a trained DyT run's checkpoint (default: as initialised)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    model = pb.create_model("dyt", args.backbone, num_classes=100, pretrained="none", image_size=args.image_size)
    if args.checkpoint:
        pb.load_trainable(model, args.checkpoint)
    model = model.to(device).eval()
    frozen = pb.create_model("linear", args.backbone, num_classes=100, pretrained="none", image_size=args.image_size)
    frozen = frozen.to(device).eval()
    size = model.info.preprocessing.image_size
    images = torch.randn(args.images, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        logits, masks = dyt_forward(model, images[: args.batch_size], complete=False)
        set_gather(model, True)
        difference = (model(images[: args.batch_size]) - logits).abs().max().item()
    kept = masks.float().mean().item()
    rows = []
    for name, net, gather in (("frozen ViT", frozen, False), ("DyT masked (trains, evaluates)", model, False),
                              ("DyT gathered (speed test)", model, True)):  # fmt: skip
        set_gather(model, gather)
        flops, speed = measure(net, images, args.batch_size, args.repeat)
        rows.append([name, flops / 1e9, speed])
    print(f"{args.backbone} at {size[0]}px, batch {args.batch_size}, {device}; kept fraction of patch tokens "
          f"{kept:.3f}; largest logit difference gathered vs masked {difference:.2e}")  # fmt: skip
    print(f"{'implementation':32} {'GFLOPs/img':>10} {'img/s':>8}")
    for name, gflops, speed in rows:
        print(f"{name:32} {gflops:10.2f} {speed:8.1f}")
    write_csv(args.csv, ["implementation", "gflops_per_image", "images_per_second"], rows)


if __name__ == "__main__":
    main()
