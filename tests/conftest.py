"""Tiny backbones and helpers shared by the tests (CPU, seconds)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import petl_bench as pb

SHARED = Path(__file__).resolve().parents[2] / "shared"
OFFLINE_DATA = SHARED / "offline_data"

TINY_VIT = dict(name="vit_tiny_patch16_224", image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
TINY_SWIN = dict(
    name="swin_tiny_patch4_window7_224", image_size=56, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=7
)
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PETL_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_clip_name(tmp_path_factory) -> str:
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip_configs")
    (folder / "petl-tiny-clip.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(folder)
    return "open_clip:petl-tiny-clip"


def tiny_backbone(spec: dict, num_classes: int = 5, seed: int = 0, **overrides):
    """A randomly initialised tiny backbone, the same for the same seed."""
    kwargs = {"drop_path_rate": 0.1, **spec, **overrides}
    name = kwargs.pop("name")
    torch.manual_seed(seed)
    return pb.build_backbone(name, "none", num_classes=num_classes, **kwargs)


def with_method(method: str, backbone_and_info, task: str | None = None, **overrides):
    """(frozen reference copy, model with ``method`` attached) built on one backbone."""
    backbone, info = backbone_and_info
    reference = copy.deepcopy(backbone).eval()
    runner = pb.METHODS.get(method)()
    model = pb.attach_method(backbone, info, runner, runner.make_config(task, **overrides))
    if runner.trains_head:  # the method's classifier init applies to both: compare what the method adds
        reference.get_submodule(info.head_path).load_state_dict(model.head.state_dict())
    return reference, model


def images(spec_or_size, batch: int = 3, seed: int = 1) -> torch.Tensor:
    size = spec_or_size["image_size"] if isinstance(spec_or_size, dict) else spec_or_size
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator)


def randomize_trainable(model, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in pb.trainable_parameters(model).values():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


TINY_PLUGIN = """
import petl_bench as pb

for name, architecture, kwargs in [
    ("tiny_test_vit", "vit_tiny_patch16_224", dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)),
    ("tiny_test_swin", "swin_tiny_patch4_window7_224", dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2))),
    ("tiny_test_convnext", "convnext_atto", dict(dims=(8, 16, 24, 32), depths=(1, 1, 1, 1))),
]:
    pb.register_backbone(pb.BackboneSource(name, architecture, model_kwargs=kwargs), name=name)
"""


@pytest.fixture(scope="session")
def tiny_plugin(tmp_path_factory) -> Path:
    """A plugin file registering tiny ViT, Swin and ConvNeXt backbones (``tiny_test_*``) for CLI runs."""
    path = tmp_path_factory.mktemp("plugin") / "tiny_plugin.py"
    path.write_text(TINY_PLUGIN)
    return path


def make_task_folder(folder: Path, train: int = 40, test: int = 20, classes: int = 4, size: int = 16) -> Path:
    """A learnable task in NOAH's layout: each class is a colour, with noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (classes, 3))
    lines = {"train": [], "test": []}
    for split, count in (("train", train), ("test", test)):
        (folder / "images" / split).mkdir(parents=True)
        for index in range(count):
            label = index % classes
            pixels = np.clip(colours[label] + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / "images" / split / f"{index:06d}.jpg")
            lines[split].append(f"images/{split}/{index:06d}.jpg {label}")
    (folder / "train800val200.txt").write_text("\n".join(lines["train"]) + "\n")
    (folder / "train800.txt").write_text("\n".join(lines["train"][: train * 4 // 5]) + "\n")
    (folder / "val200.txt").write_text("\n".join(lines["train"][train * 4 // 5 :]) + "\n")
    (folder / "test.txt").write_text("\n".join(lines["test"]) + "\n")
    return folder
