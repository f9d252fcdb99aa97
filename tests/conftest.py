"""Tiny backbones and helpers shared by the tests (CPU, seconds)."""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from tasks_fixture import VTAB_GROUPS

import petl_bench as pb
from petl_bench import records
from petl_bench.tasks.vtab import VTAB_TASKS

SHARED = Path(__file__).resolve().parents[2] / "shared"
OFFLINE_DATA = SHARED / "offline_data"

# Settings of the methods whose defaults are wide for the tiny test ViT; "noah" (a subnet file) is added by the
# session fixture below.
SMALL = {
    "fact_tt": {"rank": 3},
    "fact_tk": {"rank": 3},
    "bi_adaptformer": {"dim": 4},
    "bi_lora": {"dim": 4},
    "sct": {"channels": 8},
}


@pytest.fixture(scope="session", autouse=True)
def _noah_subnet_for_the_tiny_vit(tmp_path_factory):
    """A NOAH subnet for the two-block test ViT, as ``SMALL["noah"]``."""
    path = tmp_path_factory.mktemp("noah") / "subnet.json"
    path.write_text(json.dumps({"prompt": [10, 10], "lora": [8, 8], "adapter": [8, 8]}))
    SMALL["noah"] = {"subnet": str(path)}
    # GLoRA paths for the 8 Linears of the two-block ViT: every form of every component at least once
    forms = [("lora", "vector", "lora", "vector", "constant"), ("vector", "constant", "vector", "constant", "none"),
             ("constant", "none", "none", "none", "vector"), ("none", "lora", "lora", "vector", "vector")]  # fmt: skip
    paths = [dict(zip("ABCDE", forms[index % 4])) for index in range(8)]
    glora = tmp_path_factory.mktemp("glora") / "paths.json"
    glora.write_text(json.dumps(paths))
    SMALL["glora"] = {"paths": str(glora)}


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
    reference_head = reference.get_submodule(info.head_path)
    if runner.trains_head and reference_head.weight.shape == model.head.weight.shape:
        reference_head.load_state_dict(model.head.state_dict())  # the method's classifier init on both
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


# --- the CLI in this process or another ----------------------------------------------------------------

TINY_RUN = ["--backbone", "tiny_test_vit", "--pretrained", "none", "--batch-size", "8", "--set", "recipe.image_size=16"]


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process; (exit code, stdout, stderr)."""
    from petl_bench import cli

    monkeypatch.setattr(sys, "argv", ["petl-bench", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exit_:
        code = exit_.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def cli_process(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "petl_bench.cli", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# --- synthetic records -----------------------------------------------------------------------------------


def synthetic_record(
    method: str, task: str, seed: int, top1: float, params: int = 1000, suite: str = "vtab", protocol="final"
):
    group = next((g for g, tasks in VTAB_GROUPS.items() if task in tasks), "")
    return records.RunRecord(
        run_id=f"{task}__{method}__s{seed}__{protocol}", method=method, task=task, suite=suite, group=group,
        backbone="vit_base_patch16_224.orig_in21k", pretrained="hub", backbone_checkpoint_sha256=None, seed=seed,
        protocol=protocol, hparams=records.Settings(), metrics=records.Metrics(top1=top1, eval_split="test"),
        cost=records.Costs(trainable_params=params, trainable_params_with_head=params + 10, checkpoint_bytes=4 * params,
                           peak_memory_bytes=2**30, train_images_per_s=100.0, eval_images_per_s=300.0,
                           seconds=records.Seconds(total=60.0)),
        environment={},
    )  # fmt: skip


# --- a VTAB-1K stand-in ------------------------------------------------------------------------------------

ALIASES = {"oxford_iiit_pet": "oxford_pet", "cifar": "cifar100"}  # folder names other copies use


def png(seed: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (seed * 40 % 256, 7, 99)).save(buffer, format="PNG")
    return buffer.getvalue()


def vtab_zip(path: Path, *, short: str | None = None, missing: str | None = None, tasks=None) -> Path:
    """NOAH's layout with the published line counts, each list cycling over three images of its own (train800
    and val200 making up train800val200), an image's label the same wherever it is listed."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bundle:
        for _, name, _, classes, test_size in tasks or VTAB_TASKS:
            folder = f"vtab-1k/{ALIASES.get(name, name)}"
            for split in ("train", "val", "test"):
                for index in range(3):
                    bundle.writestr(f"{folder}/images/{split}{index}.png", png(index))
            sizes = {"train800.txt": 800, "val200.txt": 200, "test.txt": test_size}
            lists = {}
            for list_name, size in sizes.items():
                size -= int(name == short and list_name == "test.txt")
                split = list_name.removesuffix(".txt").rstrip("0123456789")
                lists[list_name] = [f"images/{split}{i % 3}.png {i % 3 % classes}" for i in range(size)]
            if name == missing:
                lists["val200.txt"][5] = f"images/absent.png {5 % classes}"
            lists["train800val200.txt"] = lists["train800.txt"] + lists["val200.txt"]
            for list_name, lines in lists.items():
                bundle.writestr(f"{folder}/{list_name}", "\n".join(lines) + "\n")
    return path
