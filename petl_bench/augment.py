"""Training images decoded and augmented every epoch, for the recipes that augment (few-shot: DeiT's
pipeline with mixup/cutmix; domain generalisation: random resized crop and flip)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from .data import Split, to_rgb
from .errors import UserError

AUGMENTATIONS = ("none", "deit", "crop_flip")


class _AugmentedFiles(torch.utils.data.Dataset):
    def __init__(self, split: Split, transform):
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        with Image.open(self.split.root / self.split.paths[index]) as image:
            return self.transform(to_rgb(image)), self.split.labels[index]


@dataclass
class AugmentedStream:
    """Training batches decoded and augmented every epoch (few-shot and domain generalisation recipes).

    ``deit``: timm's DeiT pipeline (random resized crop, flip, RandAugment, random erasing) as NOAH's
    few-shot runs; ``crop_flip``: random resized crop and horizontal flip (the paper's CLIP runs).
    Optional mixup / cutmix (timm) turn labels into smoothed soft targets.
    """

    split: Split
    size: tuple[int, int]
    augment: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    rand_augment: str = "rand-m9-mstd0.5-inc1"
    random_erasing: float = 0.25
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0
    workers: int = 0
    device: torch.device | str = "cpu"

    def __len__(self) -> int:
        return len(self.split)

    def transform(self):
        from timm.data import create_transform
        from torchvision import transforms

        if self.augment == "deit":
            return create_transform(
                self.size, is_training=True, auto_augment=self.rand_augment, re_prob=self.random_erasing,
                re_mode="pixel", re_count=1, interpolation="bicubic", color_jitter=0.4, mean=self.mean, std=self.std,
            )  # fmt: skip
        if self.augment == "crop_flip":
            return transforms.Compose([
                transforms.RandomResizedCrop(self.size, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(self.mean, self.std),
            ])  # fmt: skip
        raise UserError(f"unknown augmentation '{self.augment}'; choose from: {', '.join(AUGMENTATIONS)}")

    def batches(self, batch_size: int, *, shuffle: bool = False, generator=None, drop_last: bool = False):
        from timm.data import Mixup

        loader = torch.utils.data.DataLoader(
            _AugmentedFiles(self.split, self.transform()), batch_size=batch_size, shuffle=shuffle, generator=generator,
            drop_last=drop_last, num_workers=self.workers, persistent_workers=False,
        )  # fmt: skip
        mix = None
        if self.mixup or self.cutmix:
            mix = Mixup(mixup_alpha=self.mixup, cutmix_alpha=self.cutmix, label_smoothing=self.label_smoothing,
                        num_classes=self.num_classes)  # fmt: skip
        for images, labels in loader:
            images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            if mix is not None and len(labels) % 2 == 0:  # timm's batch mixing pairs samples
                images, labels = mix(images, labels)
            yield images, labels
