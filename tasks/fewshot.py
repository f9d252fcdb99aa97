"""Few-shot fine-grained classification with NOAH's split lists (FGVC-Aircraft, Food-101, Flowers102,
Oxford Pets, Stanford Cars; 1, 2, 4, 8, 16 shots; split seeds 0, 1, 2).

Layout (NOAH's ``data/few-shot/<dataset>``): ``annotations/train_meta.list.num_shot_{k}.seed_{s}``,
``annotations/val_meta.list``, ``annotations/test_meta.list``; images under ``images/`` (Stanford
Cars: directly in the dataset folder). Lines ``<path> <label>`` split on the last space.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from petl_bench.atomic import write_atomic
from petl_bench.backbones import PAPER_BACKBONE
from petl_bench.config import Recipe
from petl_bench.datasets import Dataset
from petl_bench.install import downloading, link_or_copy
from petl_bench.registry import register_dataset, register_suite, register_task
from petl_bench.task import FileListTask, ListNames, ReportLayout, Suite

SHOTS = (1, 2, 4, 8, 16)
SPLIT_SEEDS = (0, 1, 2)
HOW_TO_GET = (
    "Get it with 'petl-bench data get fewshot' (torchvision's downloaders and NOAH's lists, shipped), or get the "
    "images with CoOp's DATASETS.md and the lists from github.com/ZhangYuanhan-AI/NOAH "
    "(data/few-shot/<dataset>/annotations); layout <root>/few-shot/<dataset>/{annotations/,images/}."
)
CARS_STEPS = (
    "Stanford Cars' original host is gone. Get the archive from a mirror (e.g. the Kaggle dataset "
    "'jessicali9530/stanford-cars-dataset', or the copy CoOp's DATASETS.md points to) and arrange it as "
    "<root>/few-shot/stanford-cars/{cars_test/00001.jpg, cars_train/00001.jpg, ...}; then run "
    "'petl-bench data get stanford-cars' again: it adds NOAH's lists (annotations/) and verifies."
)


@dataclass
class FewShotTask(FileListTask):
    """A dataset with NOAH's few-shot lists; ``variants`` gives one task per (shots, split seed)."""

    shot_choices: tuple[int, ...] = SHOTS
    test_list: str = "annotations/test_meta.list"

    def variants(self, shots=None, split_seeds=None) -> list[FileListTask]:
        out = []
        for shot in shots or self.shot_choices:
            for split_seed in split_seeds or SPLIT_SEEDS:
                train = f"annotations/train_meta.list.num_shot_{shot}.seed_{split_seed}"
                lists = ListNames(train=train, val="annotations/val_meta.list", trainval=train, test=self.test_list)
                out.append(dataclasses.replace(self, lists=lists, variant={"shots": shot, "split_seed": split_seed}))
        return out


# name, NOAH / CoOp folder names, classes, test size, image folder, display name in the paper's Figure 5
DATASETS = [
    ("fs_aircraft", ("fgvc-aircraft", "fgvc_aircraft"), 100, 3_333, "images", "FGVC-Aircraft"),
    ("fs_food101", ("food101", "food-101"), 101, 30_300, "images", "Food-101"),
    ("fs_flowers102", ("oxford-flowers102", "oxford_flowers"), 102, 2_463, "images", "Oxford-Flowers102"),
    ("fs_pets", ("oxford-pets", "oxford_pets"), 37, 3_669, "images", "Oxford-Pets"),
    ("fs_cars", ("stanford-cars", "standford-cars", "stanford_cars"), 196, 8_041, "", "Stanford Cars"),
]
PAPER_NAMES = {name: paper for name, *_, paper in DATASETS}

for name, folders, classes, test_size, image_dir, paper in DATASETS:
    register_task(
        FewShotTask(
            name=name,
            suite="fewshot",
            num_classes=classes,
            aliases=folders,
            parents=("few-shot", "data/few-shot"),
            image_dir=image_dir,
            sizes={"annotations/test_meta.list": test_size},
            how_to_get=HOW_TO_GET,
            description=paper,
        )
    )

register_suite(
    Suite(
        name="fewshot",
        description="few-shot fine-grained classification (NOAH splits), DeiT-style augmentation",
        backbone=PAPER_BACKBONE,
        methods=("vpt_deep", "adapter", "adaptformer", "lora", "convpass"),
        # NOAH's few-shot recipe: lr 5e-3, 100 epochs, RandAugment, mixup 0.8, cutmix 1.0, smoothing 0.1, erasing 0.25
        recipe=Recipe(lr=5e-3, augment="deit", mixup=0.8, cutmix=1.0, label_smoothing=0.1, random_erasing=0.25),
        seeds=(0,),
        report=ReportLayout(
            kind="shots", title="few-shot", paper="paper_fewshot.csv", paper_names=tuple(PAPER_NAMES.items())
        ),
    )
)


def install_lists(noah_name: str, folder: Path) -> None:
    """NOAH's lists for ``noah_name`` (shipped with the package) into ``folder/annotations``."""
    source = files("petl_bench") / "splits" / "few-shot" / noah_name / "annotations"
    target = folder / "annotations"
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if not (target / item.name).is_file():
            write_atomic(target / item.name, item.read_text(encoding="utf-8"))


def host_of(loader) -> str:
    """The host a torchvision dataset class downloads from (its URL attributes), "" when it names none."""
    import re
    import urllib.parse

    text = " ".join(str(v) for klass in loader.__mro__ for k, v in vars(klass).items()
                    if "url" in k.lower() or "resources" in k.lower())  # fmt: skip
    found = re.search(r"https?://[^\s'\"/]+", text)
    return urllib.parse.urlparse(found.group(0)).hostname or "" if found else ""


def torchvision_fetch(noah_name: str, dataset_class: str, images: str):
    """``fetch(root)``: torchvision's downloader into ``<root>/downloads/torchvision`` (checksummed where
    torchvision knows the checksum), NOAH's lists, and ``images/`` linked to the extracted image folder."""

    def fetch(root: Path) -> None:
        import torchvision.datasets

        downloads = root / "downloads" / "torchvision"
        loader = getattr(torchvision.datasets, dataset_class)
        with downloading(f"{dataset_class} with torchvision", host_of(loader)):
            loader(str(downloads), split="test", download=True)
        folder = root / "few-shot" / noah_name
        install_lists(noah_name, folder)
        link_or_copy(downloads / images, folder / "images")

    return fetch


# dataset, task, NOAH folder, torchvision class and its image folder, download size
SOURCES = [
    ("fgvc-aircraft", "fs_aircraft", "fgvc-aircraft", "FGVCAircraft", "fgvc-aircraft-2013b/data/images", "2.8 GB"),
    ("food101", "fs_food101", "food101", "Food101", "food-101/images", "5.0 GB"),
    ("oxford-flowers102", "fs_flowers102", "oxford-flowers102", "Flowers102", "flowers-102/jpg", "0.35 GB"),
    ("oxford-pets", "fs_pets", "oxford-pets", "OxfordIIITPet", "oxford-iiit-pet/images", "0.8 GB"),
]
for name, task, noah_name, dataset_class, images, size in SOURCES:
    register_dataset(
        Dataset(
            name=name,
            suite="fewshot",
            source=f"torchvision.datasets.{dataset_class} (the dataset's own host) + NOAH's lists (shipped)",
            size=f"{size} download + the same extracted (images linked, not copied)",
            tasks=(task,),
            fetch=torchvision_fetch(noah_name, dataset_class, images),
        )
    )


def fetch_cars_lists(root: Path) -> None:
    """Stanford Cars cannot be downloaded; when its images are in place, add NOAH's lists."""
    folder = root / "few-shot" / "stanford-cars"
    if (folder / "cars_test").is_dir():
        install_lists("standford-cars", folder)


register_dataset(
    Dataset(
        name="stanford-cars",
        suite="fewshot",
        source="by hand (the original host is gone) + NOAH's lists (shipped)",
        size="1.9 GB",
        tasks=("fs_cars",),
        steps=CARS_STEPS,
        arrange=fetch_cars_lists,
    )
)
