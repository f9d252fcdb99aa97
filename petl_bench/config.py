"""Settings and their values: the training recipe, reading a value given as text into a field's type,
and the bounds check. Imports nothing above the errors module, so that tasks and the planning code can use
a recipe without importing the training loop."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from .errors import UserError

# The backbone of the Convpass paper's tables (and of the published VTAB-1K numbers): the default backbone.
PAPER_BACKBONE = "vit_base_patch16_224.orig_in21k"


def parse_value(value: Any, annotation: Any, label: str) -> Any:
    """Coerce a CLI string to the dataclass field's type (``X | None`` accepts "none"); other values pass."""
    if not isinstance(value, str):
        return value
    members = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    if members:
        if value.strip().lower() == "none" and type(None) in members:
            return None
        annotation = next(member for member in members if member is not type(None))
    try:
        if annotation is bool:
            lowered = value.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return lowered in ("true", "1", "yes")
        if annotation in (int, float):
            return annotation(value)
    except ValueError:
        raise UserError(f"cannot read {label}={value!r} as {annotation.__name__}") from None
    return value


def check_bounds(label: str, value, low, high, high_excluded: bool) -> None:
    """A UserError unless ``value`` is None or a finite number within [low, high] (or [low, high))."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{label} must be a finite number, got {value!r}")
    above = high is not None and (value >= high if high_excluded else value > high)
    if value < low or above:
        span = f">= {low}" if high is None else f"in [{low}, {high}{')' if high_excluded else ']'}"
        raise UserError(f"{label} must be {span}, got {value!r}")


@dataclass
class Recipe:
    """Training hyperparameters (defaults: the Convpass paper's VTAB-1K recipe)."""

    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: int | None = None  # None: warmup_fraction of the epochs (10 at the paper's 100)
    warmup_fraction: float = 0.1
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    drop_path: float = 0.1
    label_smoothing: float = 0.0
    drop_last: bool = True
    eval_every: int = 10  # paper protocol: test after epochs 9, 19, ..., as the official code
    eval_batch_size: int = 0  # 0: as large as memory allows (CUDA: from 1024, halved on out-of-memory; CPU: 256)
    image_size: int | None = None  # None: the backbone's native input size
    normalization: str = "imagenet"  # "imagenet" mean/std (the paper, for every backbone) or "backbone"
    weight_decay_scope: str = "all"  # "all" trainable tensors (Convpass) or "skip_1d" (NOAH / timm)
    augment: str = "none"  # "none" (cached resize), "deit" (NOAH few-shot), "crop_flip" (the paper's CLIP runs)
    rand_augment: str = "rand-m9-mstd0.5-inc1"  # with augment="deit"
    random_erasing: float = 0.25  # with augment="deit"
    mixup: float = 0.0  # mixup alpha (timm), soft targets smoothed by label_smoothing
    cutmix: float = 0.0  # cutmix alpha (timm)
    workers: int = 4  # decoding processes for augmented training data
    class_mask: str = "subset"  # targets covering part of the classes (ImageNet-A/-R): "subset" logits or "all"
    cache_features: bool = True  # linear probing without augmentation: train the head on features computed once
    execution: str = (
        "auto"  # training step "compiled" (torch.compile, CUDA graphs) or "eager"; "auto": compiled on CUDA
    )
    precision: str = "auto"  # "bf16" autocast, "fp32", or "auto": bf16 on CUDA, fp32 elsewhere (records say which)
    head_init: str | None = None  # None: the method's; "default" (PyTorch Linear), "vpt", "trunc_normal" (std 0.02,
    # zero bias: NOAH's reset_classifier) or "text" (CLIP: class-name prompts, zero-shot)
    prompt_template: str = "a photo of a {}."  # head_init="text": CoOp's single template, or "openai80" / "simple7"

    # How a run executes, not what it computes: recorded, but not part of a run's identity.
    EXECUTION: typing.ClassVar[tuple[str, ...]] = ("eval_batch_size", "workers", "cache_features")
    CHOICES: typing.ClassVar[dict[str, tuple[str, ...]]] = {
        "normalization": ("imagenet", "backbone"),
        "weight_decay_scope": ("all", "skip_1d"),
        "augment": ("none", "deit", "crop_flip"),
        "class_mask": ("subset", "all"),
        "head_init": (None, "default", "trunc_normal", "mocov3", "vpt", "zero", "text"),
        "precision": ("auto", "bf16", "fp32"),
        "execution": ("auto", "eager", "compiled"),
    }
    # name -> (smallest allowed, largest allowed, whether the largest is excluded); None: no bound.
    BOUNDS: typing.ClassVar[dict[str, tuple]] = {
        "epochs": (1, None, False), "batch_size": (1, None, False), "eval_every": (1, None, False),
        "eval_batch_size": (0, None, False), "workers": (0, None, False), "warmup_epochs": (0, None, False),
        "image_size": (1, None, False), "lr": (0.0, None, False), "weight_decay": (0.0, None, False),
        "warmup_lr": (0.0, None, False), "min_lr": (0.0, None, False), "warmup_fraction": (0.0, 1.0, False),
        "drop_path": (0.0, 1.0, True), "label_smoothing": (0.0, 1.0, True), "random_erasing": (0.0, 1.0, False),
        "mixup": (0.0, None, False), "cutmix": (0.0, None, False),
    }  # fmt: skip

    def __post_init__(self) -> None:
        for name, choices in self.CHOICES.items():
            if getattr(self, name) not in choices:
                shown = ", ".join(str(c) for c in choices if c is not None)
                raise UserError(f"recipe.{name} is {getattr(self, name)!r}; choose from: {shown}")
        for name, bounds in self.BOUNDS.items():
            check_bounds(f"recipe.{name}", getattr(self, name), *bounds)

    @property
    def warmup(self) -> int:
        """Warm-up epochs: ``warmup_epochs`` when set, else ``warmup_fraction`` of ``epochs`` rounded down
        (10 at the paper's 100; 0 at 5, where the official stepping would spend 2 of 5 epochs at 1e-6)."""
        if self.warmup_epochs is not None:
            return self.warmup_epochs
        return int(math.floor(self.warmup_fraction * self.epochs + 1e-9))

    def identity(self) -> dict:
        """The settings that decide a run's result (the execution settings left out). The warm-up is
        identified by its resolved length, so the paper's 100-epoch recipe keeps the identity it had
        when the warm-up was a fixed 10 epochs."""
        identity = {k: v for k, v in dataclasses.asdict(self).items() if k not in self.EXECUTION}
        identity["warmup_epochs"] = self.warmup
        del identity["warmup_fraction"]
        if identity["head_init"] is None:  # unresolved (the runner resolves it per method): the old default
            identity["head_init"] = "default"
        for name in ("precision", "execution"):  # the default keeps the identity runs had before the setting
            if identity[name] == "auto":
                del identity[name]
        return identity

    def replace(self, **changes) -> "Recipe":
        """A copy with ``changes`` applied (CLI strings are parsed to the field types)."""
        types = typing.get_type_hints(Recipe)
        unknown = sorted(set(changes) - set(types))
        if unknown:
            settings = [f.name for f in dataclasses.fields(Recipe)]
            raise UserError(f"unknown recipe setting {', '.join(unknown)}; settings: {', '.join(settings)}")
        return dataclasses.replace(self, **{k: parse_value(v, types[k], f"recipe.{k}") for k, v in changes.items()})
