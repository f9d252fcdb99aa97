"""Few-shot fine-grained classification with NOAH's split lists (FGVC-Aircraft, Food-101, Flowers102,
Oxford Pets, Stanford Cars; 1, 2, 4, 8, 16 shots; split seeds 0, 1, 2).

Layout (NOAH's ``data/few-shot/<dataset>``): ``annotations/train_meta.list.num_shot_{k}.seed_{s}``,
``annotations/val_meta.list``, ``annotations/test_meta.list``; images under ``images/`` (Stanford
Cars: directly in the dataset folder). Lines ``<path> <label>`` split on the last space.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from petl_bench.backbones import PAPER_BACKBONE
from petl_bench.engine import Recipe
from petl_bench.registry import register_suite, register_task
from petl_bench.task import FileListTask, ListNames, Suite

SHOTS = (1, 2, 4, 8, 16)
SPLIT_SEEDS = (0, 1, 2)
HOW_TO_GET = (
    "Get the images with CoOp's DATASETS.md and the split lists from github.com/ZhangYuanhan-AI/NOAH "
    "(data/few-shot/<dataset>/annotations); layout <root>/<dataset>/{annotations/,images/}."
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
    )
)
