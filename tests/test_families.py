"""Few-shot, CLIP domain generalisation and backbone baselines: one command each on tiny stand-ins,
and their reports, with the real NOAH split lists where the tests need real layouts."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import OFFLINE_DATA, make_task_folder, run_cli
from conftest import synthetic_record as record
from PIL import Image

import petl_bench as pb
from petl_bench import records
from petl_bench.clip import init_classifier_from_text
from petl_bench.errors import UserError
from petl_bench.report import write_report

SPLITS = OFFLINE_DATA / "noah_fewshot_splits" / "data" / "few-shot"
needs_splits = pytest.mark.skipif(not SPLITS.is_dir(), reason="../shared/offline_data/noah_fewshot_splits is absent")


def stand_in_images(root: Path, lines: list[str], size: int = 8) -> None:
    """Write a small image for every listed path, coloured by its label (the pixels are not real)."""
    for line in lines:
        path, label = line.rsplit(" ", 1)
        target = root / path
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(int(label))
        colour = rng.integers(0, 256, 3)
        pixels = np.clip(colour + np.random.default_rng(len(path)).normal(0, 20, (size, size, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(target)


def test_zero_shot_classifier_equals_open_clip_zero_shot(tiny_clip_name):
    import open_clip

    names = ["cat", "dog", "airplane", "tree", "red car"]
    torch.manual_seed(0)
    model, info = pb.build_backbone(tiny_clip_name, "none", num_classes=len(names))
    init_classifier_from_text(model, info, names, "a photo of a {}.")
    torch.manual_seed(0)
    clip = open_clip.create_model(tiny_clip_name.split(":", 1)[1])
    torch.testing.assert_close(clip.visual.conv1.weight, model.visual.conv1.weight)
    tokenizer = open_clip.get_tokenizer(tiny_clip_name.split(":", 1)[1])
    x = torch.randn(4, 3, 32, 32)
    model.eval(), clip.eval()
    with torch.no_grad():
        image = clip.encode_image(x, normalize=True)
        text = clip.encode_text(tokenizer([f"a photo of a {n}." for n in names]), normalize=True)
        expected = clip.logit_scale.exp() * image @ text.T
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.head.bias, torch.zeros(len(names)))
    init_classifier_from_text(model, info, names, "simple7")  # open_clip's 7-template ensemble
    with torch.no_grad():
        ensemble = torch.stack([clip.encode_text(tokenizer([t(n) for n in names]), normalize=True)
                                for t in open_clip.SIMPLE_IMAGENET_TEMPLATES]).mean(0)  # fmt: skip
        expected = clip.logit_scale.exp() * image @ torch.nn.functional.normalize(ensemble, dim=-1).T
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="needs a '{}'"):
        init_classifier_from_text(model, info, names, "a photo")


@needs_splits
@pytest.mark.parametrize("name,folder", [("fs_aircraft", "fgvc-aircraft"), ("fs_food101", "food101"),
                                         ("fs_flowers102", "oxford-flowers102"), ("fs_pets", "oxford-pets"),
                                         ("fs_cars", "standford-cars")])  # fmt: skip
def test_real_split_lists_parse_and_missing_images_fail_clearly(tmp_path, name, folder):
    task = pb.TASKS.get(name)
    (tmp_path / "few-shot").mkdir()
    (tmp_path / "few-shot" / folder).symlink_to(SPLITS / folder)
    variants = task.variants([1, 16], [2])
    assert [v.variant for v in variants] == [{"shots": 1, "split_seed": 2}, {"shots": 16, "split_seed": 2}]
    with pytest.raises(UserError, match=r"images listed in .*num_shot_1.seed_2 are missing: .* and \d+ more"):
        variants[0].splits(tmp_path, "final")


@needs_splits
def test_fewshot_suite_end_to_end_with_the_real_pets_lists(monkeypatch, capsys, caplog, tmp_path, tiny_plugin):
    root = tmp_path / "data" / "few-shot" / "oxford-pets"
    shutil.copytree(SPLITS / "oxford-pets" / "annotations", root / "annotations")
    lists = ["train_meta.list.num_shot_1.seed_0", "train_meta.list.num_shot_2.seed_0", "test_meta.list"]
    stand_in_images(
        root / "images", [line for name in lists for line in (root / "annotations" / name).read_text().splitlines()]
    )
    out = tmp_path / "runs"
    caplog.set_level(logging.WARNING)
    code, stdout, stderr = run_cli(
        monkeypatch, capsys, "run", "--plugin", str(tiny_plugin), "--suite", "fewshot", "--tasks", "fs_pets",
        "--shots", "1,2", "--split-seeds", "0", "--methods", "linear,convpass", "--data-root", str(tmp_path / "data"),
        "--backbone", "tiny_test_vit", "--pretrained", "none", "--epochs", "2", "--batch-size", "8",
        "--set", "recipe.image_size=16", "--set", "recipe.workers=0", "--set", "recipe.warmup_epochs=0",
        "--output", str(out),
    )  # fmt: skip
    assert code == 0, stderr
    assert "num_shot_1.seed_0 repeats lines: 74 lines, 37 unique" in caplog.text, "NOAH's duplicated 1-shot Pets list"
    found = records.load_records(out)
    assert sorted((r.method, r.task_variant["shots"]) for r in found) == [
        ("convpass", 1),
        ("convpass", 2),
        ("linear", 1),
        ("linear", 2),
    ]
    assert all(r.metrics.eval_images == 3669 and r.hparams.recipe["augment"] == "deit" for r in found)
    assert all(r.hparams.recipe["mixup"] == 0.8 and r.hparams.recipe["lr"] == 5e-3 for r in found)
    report = tmp_path / "report"
    assert run_cli(monkeypatch, capsys, "report", "--results", str(out), "--out", str(report))[0] == 0
    markdown = (report / "report.md").read_text()
    assert "few-shot Oxford-Pets on tiny_test_vit" in markdown and "| 1-shot | 2-shot |" in markdown
    assert "convpass (paper)" in markdown, "Figure 5's numbers beside ours"
    assert list(report.glob("fewshot__*.png"))


def imagenet_stand_in(root: Path) -> None:
    """NOAH's ImageNet layout with a handful of classes, and the four targets (A and R on subsets)."""

    def write(folder: Path, list_path: str, entries: list[tuple[str, int]], image_dir: str = "") -> None:
        (folder / list_path).parent.mkdir(parents=True, exist_ok=True)
        lines = [f"{path} {label}" for path, label in entries]
        (folder / list_path).write_text("\n".join(lines) + "\n")
        stand_in_images(folder / image_dir, lines, size=12)

    classes = [0, 1, 2, 3, 5, 8]
    train = [(f"n{c:08d}/n{c:08d}_{i}.JPEG", c) for c in classes for i in range(2)]
    write(root / "imagenet", "annotations/train_meta.list.num_shot_16.seed_0", train, "train")
    write(
        root / "imagenet",
        "annotations/val_meta.list",
        [(f"ILSVRC2012_val_{c}_{i}.JPEG", c) for c in classes for i in range(2)],
        "val",
    )
    for target, subset in [
        ("imagenet-v2", classes),
        ("imagenet-sketch", classes),
        ("imagenet-a", [1, 3, 5]),
        ("imagenet-r", [0, 2, 8]),
    ]:
        write(root / target, "annotations/val_meta.list", [(f"{c}/{i}.jpg", c) for c in subset for i in range(2)])


def test_dg_suite_end_to_end_with_a_tiny_clip(monkeypatch, capsys, tmp_path, tiny_clip_name):
    imagenet_stand_in(tmp_path / "data")
    out = tmp_path / "runs"
    common = ["run", "--suite", "dg", "--data-root", str(tmp_path / "data"), "--backbone", tiny_clip_name,
              "--pretrained", "none", "--split-seeds", "0", "--epochs", "1", "--batch-size", "4",
              "--set", "recipe.workers=0", "--output", str(out)]  # fmt: skip
    code, stdout, stderr = run_cli(monkeypatch, capsys, *common)
    assert code == 0, stderr
    found = {r.method: r for r in records.load_records(out)}
    assert set(found) == {"zero_shot", "linear", "convpass"}
    for r in found.values():
        assert set(r.metrics.targets) == {"imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"}
        assert r.metrics.class_mask["imagenet_a"] == "subset" and r.metrics.class_mask["imagenet_v2"] == "all"
    assert found["zero_shot"].cost.trainable_params_with_head == 0
    assert found["convpass"].hparams.recipe["head_init"] == "text" and found["convpass"].hparams.recipe["lr"] == 1e-5
    code, _, stderr = run_cli(monkeypatch, capsys, *common, "--methods", "zero_shot", "--set", "recipe.class_mask=all")
    assert code == 0, stderr
    report = tmp_path / "report"
    assert run_cli(monkeypatch, capsys, "report", "--results", str(out), "--out", str(report))[0] == 0
    markdown = (report / "report.md").read_text()
    assert "A and R: their 200 classes" in markdown and "A and R: all 1000 logits" in markdown
    assert "zero_shot (paper) | – | 66.7 | 60.8 | 46.1 | 47.8 | 74.0 |" in markdown


def test_zero_shot_outside_the_dg_recipe_is_refused(monkeypatch, capsys, tmp_path, tiny_clip_name):
    task = make_task_folder(tmp_path / "colours")
    code, _, stderr = run_cli(monkeypatch, capsys, "run", "--task-dir", str(task), "--methods", "zero_shot",
                              "--backbone", tiny_clip_name, "--pretrained", "none", "--output", str(tmp_path / "r"))  # fmt: skip
    assert code == 2 and "needs recipe.head_init=text" in stderr


def test_backbone_baselines_in_one_command(monkeypatch, capsys, tmp_path, tiny_plugin):
    for name in ("cifar", "dmlab"):
        make_task_folder(tmp_path / "vtab" / name, train=16, test=8)
    out = tmp_path / "runs"
    code, stdout, stderr = run_cli(
        monkeypatch, capsys, "run", "--plugin", str(tiny_plugin), "--suite", "vtab", "--tasks", "cifar,dmlab",
        "--data-root", str(tmp_path / "vtab"), "--backbones", "tiny_test_vit,tiny_test_swin,tiny_test_convnext",
        "--methods", "full,linear,convpass", "--pretrained", "none", "--epochs", "1", "--batch-size", "8",
        "--set", "recipe.image_size=56", "--output", str(out),
    )  # fmt: skip
    assert code == 0, stderr
    assert "left out (cannot run): convpass on tiny_test_convnext / cifar" in " ".join(stdout.split())
    found = {(r.backbone, r.method) for r in records.load_records(out)}
    assert len(found) == 8 and ("tiny_test_swin", "convpass") in found and ("tiny_test_convnext", "full") in found
    report = tmp_path / "report"
    assert run_cli(monkeypatch, capsys, "report", "--results", str(out), "--out", str(report))[0] == 0
    assert "### VTAB-1K by backbone" in (report / "report.md").read_text()


def test_backbone_table_sits_beside_the_papers_table_3(tmp_path):
    from tasks_fixture import VTAB_GROUPS

    runs = []
    for backbone in ("swin_base_patch4_window7_224.ms_in22k", "vit_base_patch16_224.orig_in21k"):
        for index, task in enumerate(t for tasks in VTAB_GROUPS.values() for t in tasks):
            run = record("convpass", task, 0, 60.0 + index)
            run.backbone, run.run_id = backbone, run.run_id + backbone
            runs.append(run)
    write_report(runs, tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert "| swin_base_patch4_window7_224.ms_in22k / convpass |" in markdown
    assert "| Swin-B / Convpass (paper) | – | 83.1 | 87.2 | 64.1 | 78.1 |" in markdown
    assert "| ViT-B/16 / Convpass (paper) | – | 81.7 | 85.3 | 62.7 | 76.6 |" in markdown
    with open(tmp_path / "runs.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 38
