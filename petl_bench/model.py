"""The method contract and the model a method produces: ``create_model`` and friends.

A method is a registered :class:`Method` subclass. ``create_model`` builds the backbone, freezes it,
lets the method attach its modules (returning the parameters it trains), and makes the classifier
trainable. Everything the runner, the CLI and user training loops need goes through here.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, ClassVar, Iterable, Mapping

import torch
from torch import nn

from .backbones import PAPER_BACKBONE, VIT, BackboneInfo, build_backbone
from .config import check_bounds, parse_value  # noqa: F401 - parse_value re-exported: its old home
from .errors import UserError
from .registry import METHODS, TASKS, canonical

RECIPE_GRID: Mapping[str, tuple] = {"lr": (1e-3, 1e-2), "weight_decay": (1e-4, 1e-3)}  # every PETL method


@dataclasses.dataclass
class NoConfig:
    """A method without hyperparameters."""


# Bounds of hyperparameters by field name, for every method's config: (lowest, highest, highest excluded);
# a method adds or replaces entries with its ``bounds``. Every number must also be finite.
COMMON_BOUNDS: Mapping[str, tuple] = {
    "dropout": (0.0, 1.0, True), "dim": (1, 8192, False), "rank": (1, 8192, False),
    "super_dim": (1, 8192, False), "tokens": (1, 1000, False), "groups": (1, 8192, False), "bits": (1, 32, False),
}  # fmt: skip


def field_bounds(name: str, declared: Mapping[str, tuple]) -> tuple | None:
    """The bounds of a config field: the method's own, else the common ones (``*_dropout`` as ``dropout``)."""
    if name in declared:
        return declared[name]
    return COMMON_BOUNDS.get("dropout" if name.endswith("_dropout") else name)


class Method:
    """Base class of a PETL method. Subclass, fill the class attributes, implement ``attach``."""

    name: ClassVar[str]
    citation: ClassVar[str] = ""
    trains: ClassVar[str] = ""  # one line: what the method trains besides the classifier
    kinds: ClassVar[tuple[str, ...]] = (VIT,)  # backbone kinds it supports
    Config: ClassVar[type] = NoConfig  # a dataclass of hyperparameters with defaults
    task_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {}  # per-task overrides used by the paper
    trains_head: ClassVar[bool] = True  # False: the classifier stays as built (zero-shot evaluation)
    frozen_encoder_eval: ClassVar[bool] = False  # True: the frozen encoder stays in eval mode in training (VPT)
    head_init: ClassVar[str] = "default"  # the classifier init of the runs behind the method's published numbers
    # The tuned protocol's grid: method hyperparameters, and the recipe axes (None: the shared RECIPE_GRID).
    search_space: ClassVar[Mapping[str, tuple]] = {}
    recipe_grid: ClassVar[Mapping[str, tuple] | None] = None
    # True when the method's code reads frozen Linear/conv weights outside those layers (DoRA's weight norm):
    # then they are not held in the compute dtype during training (engine.frozen_weights_in).
    reads_frozen_weights: ClassVar[bool] = False
    # True: the training step compiles as one graph without breaks (tests/test_compiled.py holds every built-in
    # method to it); False: ``--execution auto`` trains it eagerly on CUDA too.
    compiles: ClassVar[bool] = True
    # Bounds of the config's fields beyond COMMON_BOUNDS: name -> (lowest, highest, highest excluded).
    bounds: ClassVar[Mapping[str, tuple]] = {}
    # Names of the method in published_vtab1k_next.csv (before any " (variant)" or " [source]"); the report
    # prints those rows beside ours.
    published_as: ClassVar[tuple[str, ...]] = ()
    # True: at init the model computes the frozen backbone's logits (zero-initialised branches); False: it
    # does not (prompts, random inits); None: undeclared. The contract test holds every method to its word.
    identity_at_init: ClassVar[bool | None] = None

    # True: a selection stage runs once per task before training (``select``), on the training images only.
    selects: ClassVar[bool] = False

    def select(self, model: "PetlModel", batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The selection stage (methods with ``selects``): choose what the method adapts from ``batches`` of
        (normalised training images, labels) on the model's device, with the model in eval mode and no
        gradients; store the choice in buffers that ``selected_state`` returns."""

    def selected_state(self, model: "PetlModel") -> dict[str, torch.Tensor]:
        """What a selection stage chose, by name inside the backbone (saved and loaded with the trained
        tensors: a checkpoint is the whole of what makes the task's model)."""
        return {}

    # True: training minimises ``training_loss`` instead of the classifier's loss alone (DyT).
    extra_loss: ClassVar[bool] = False

    def training_loss(self, model: "PetlModel", images, labels, criterion, compute) -> torch.Tensor:
        """The loss of one training batch (methods with ``extra_loss``): ``images`` are normalised, ``criterion
        (logits, labels)`` is the recipe's classification loss in fp32, ``compute()`` the recipe's autocast
        context for the forward passes. The engine calls it inside the (compiled) training step."""
        raise NotImplementedError

    def training_passes(self, config: Any) -> int:
        """Forward passes through the network, each with its backward, that one training step makes (the
        plan's compute estimate): one, or more for a ``training_loss`` that runs the model again."""
        return 1

    def is_identity_at_init(self, config: Any) -> bool | None:
        """Whether the method with ``config`` starts as the frozen backbone (see ``identity_at_init``)."""
        return self.identity_at_init

    def attach(self, model: nn.Module, info: BackboneInfo, config: Any) -> Iterable[nn.Parameter]:
        """Add or unfreeze modules on the frozen ``model``; return the parameters to train (head excluded)."""
        raise NotImplementedError

    def check_config(self, config: Any) -> None:
        """Raise UserError when ``config`` cannot run (checked before any training starts)."""

    def config_identity(self, config: Any) -> dict[str, Any]:
        """What identifies a run's method settings (records and run ids); files are resolved to content."""
        return dataclasses.asdict(config)

    merges: ClassVar[bool] = False  # True: what it trains folds into the backbone's own weights (see merge)
    merge_note: ClassVar[str] = "it adds modules that do not fold into the backbone's weights"

    def merge(self, model: "PetlModel") -> None:
        """Fold what the method trained into the backbone's own modules, in place, leaving no module of the
        method's (a method with ``merges = True`` implements this; the others cannot)."""
        raise UserError(f"method '{self.name}' cannot be merged: {self.merge_note}")

    def stored_bytes(self, model: "PetlModel") -> int | None:
        """Bytes of one task's trained state in the method's own storage format, where that is not the
        safetensors checkpoint of its trainable tensors (the binary adapters pack their weights in bits)."""
        return None

    def row_settings(self, identity: dict[str, Any], task: str) -> dict[str, Any]:
        """The settings a report row is keyed by, from a run's recorded ``config_identity`` on ``task``. A
        setting that holds a per-task search's result (its file's content), or a value a per-task table gave,
        differs from task to task although every task made the same request: such a method keeps what was
        asked for and leaves out what it found, so one row holds every task of one request (as per-task
        defaults and tuned choices)."""
        return identity

    def pruned_entries(self, model: "PetlModel") -> int:
        """Entries of the trained tensors that a fixed mask keeps at no effect on the output (E2VPT's pruned
        prompt entries): stored, but not counted as parameters."""
        return 0

    def encoder_eval(self, config: Any) -> bool:
        """Whether the frozen encoder stays in eval mode while training (no drop-path or dropout)."""
        return self.frozen_encoder_eval

    def set_train_mode(self, model: "PetlModel", mode: bool) -> None:
        """Called after ``model.train(mode)`` (and the frozen-encoder rule); for modules of the method's own."""

    def check_pair(self, info: BackboneInfo, config: Any) -> None:
        """A UserError when ``config`` cannot run on this backbone (a size beyond its width, more blocks than
        it has); checked with the other checks before anything trains, so a sweep can leave the pair out."""

    def check_backbone(self, info: BackboneInfo) -> None:
        if info.kind not in self.kinds:
            raise UserError(
                f"method '{self.name}' does not support the {info.kind} backbone '{info.name}'; "
                f"it supports: {', '.join(self.kinds)}"
            )

    def make_config(self, task: str | None = None, **overrides: Any) -> Any:
        """Defaults, then the paper's per-task values for ``task``, then ``overrides`` (strings are parsed)."""
        values = dict(self.task_defaults.get(task_key(task), {})) if task else {}
        values.update(overrides)
        hints = typing.get_type_hints(self.Config)
        known = {f.name for f in dataclasses.fields(self.Config) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(
                f"method '{self.name}' has no hyperparameter {', '.join(repr(u) for u in unknown)}; "
                f"it has: {', '.join(sorted(known)) or '(none)'}"
            )
        config = self.build_config({key: parse_value(v, hints[key], f"{self.name}.{key}") for key, v in values.items()})
        self.check_values(config)
        return config

    def check_values(self, config: Any) -> None:
        """A UserError for a number that is not finite or outside its bounds (before anything is built)."""
        for field in dataclasses.fields(config):
            value = getattr(config, field.name, None)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            bounds = field_bounds(field.name, self.bounds)
            check_bounds(f"{self.name}.{field.name}", value, *(bounds or (-math.inf, None, False)))

    def build_config(self, values: dict[str, Any]) -> Any:
        """The ``Config`` from parsed values (a method whose config checks itself turns its errors into
        UserErrors here)."""
        return self.Config(**values)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return dataclasses.asdict(cls.Config())


def task_key(task: str | None) -> str | None:
    """The registered name of ``task`` (aliases resolved), or its canonical form for unknown tasks."""
    if task is None:
        return None
    return TASKS.resolve(task) if task in TASKS else canonical(task)


class PetlModel(nn.Module):
    """A backbone classifier with a PETL method attached: images -> logits.

    ``model.train()`` applies the method's training-mode rules: VPT and linear probing keep the
    frozen encoder in eval mode (no drop-path or dropout), as the VPT code does.
    """

    def __init__(self, backbone: nn.Module, info: BackboneInfo, method: Method, config: Any):
        super().__init__()
        self.backbone = backbone
        self.info = info
        self.method = method
        self.config = config

    def forward(self, images):
        return self.backbone(images)

    def train(self, mode: bool = True) -> "PetlModel":
        super().train(mode)
        if mode and self.method.encoder_eval(self.config):
            self.backbone.eval()
        self.method.set_train_mode(self, mode)
        return self

    @property
    def head(self) -> nn.Module:
        return self.backbone.get_submodule(self.info.head_path)


HEAD_INITS = ("default", "trunc_normal", "mocov3", "vpt", "zero", "text")


@torch.no_grad()
def vit_linear_init_(modules: list[nn.Module]) -> None:
    """What timm's ``VisionTransformer.init_weights`` (``self.apply(_init_vit_weights)``) does to every
    ``nn.Linear`` in ``modules``: weight trunc_normal(std 0.02, cut at +-2 absolute), bias zero. NOAH
    builds its adapters and LoRA inside the ViT and calls it afterwards, and its ``reset_classifier``
    does the same to the head, so its runs start from this, not from the modules' own init."""
    from timm.layers import trunc_normal_

    for module in modules:
        for linear in (m for m in module.modules() if isinstance(m, nn.Linear)):
            trunc_normal_(linear.weight, std=0.02)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)


@torch.no_grad()
def init_classifier(head: nn.Linear, how: str) -> None:
    """The classifier's initial values. ``default``: PyTorch's Linear init (timm's reset_classifier, the
    Convpass code); ``trunc_normal``: weight trunc_normal(std 0.02), bias 0 (NOAH's reset_classifier);
    ``vpt``: VPT's MLP head, weight kaiming_normal(fan_out, a=0), bias -log(99) (its ``special_bias``);
    ``mocov3``: weight trunc_normal(std 0.01), bias 0 (MoCo v3's, DyT's); ``zero``: weight and bias 0 (ARC's
    ``zero_head``); ``text``: set afterwards from class-name prompts (CLIP)."""
    if how in ("default", "text"):
        return
    if how == "trunc_normal":
        vit_linear_init_([head])
    elif how == "mocov3":
        from timm.layers import trunc_normal_

        trunc_normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)
    elif how == "zero":
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    elif how == "vpt":
        nn.init.kaiming_normal_(head.weight, a=0, mode="fan_out")
        nn.init.constant_(head.bias, -math.log((1 - 0.01) / 0.01))
    else:
        raise UserError(f"unknown classifier init {how!r}; choose from: {', '.join(HEAD_INITS)}")


def attach_method(
    backbone: nn.Module, info: BackboneInfo, method: Method, config: Any, head_init: str | None = None
) -> PetlModel:
    """Check the pair and the settings, freeze ``backbone``, attach ``method``, make the method's parameters
    and the classifier trainable. The classifier is initialised as ``head_init`` says, by default as the
    method's published runs."""
    method.check_backbone(info)
    method.check_values(config)  # bounds and the method's own checks, whoever built the config
    method.check_config(config)
    method.check_pair(info, config)
    backbone.requires_grad_(False)
    for parameter in method.attach(backbone, info, config):
        parameter.requires_grad_(True)
    head = backbone.get_submodule(info.head_path)
    if isinstance(head, nn.Linear) and method.trains_head:
        init_classifier(head, head_init or method.head_init)
    head.requires_grad_(method.trains_head)
    return PetlModel(backbone, info, method, config)


def get_method(name: str) -> Method:
    return METHODS.get(name)()


def create_model(
    method: str,
    backbone: str = PAPER_BACKBONE,
    *,
    num_classes: int,
    pretrained: str = "hub",
    task: str | None = None,
    drop_path_rate: float = 0.1,
    image_size: int | None = None,
    backbone_kwargs: Mapping[str, Any] | None = None,
    **method_overrides: Any,
) -> PetlModel:
    """Build ``backbone`` with ``method`` attached.

    ``task`` applies the method's per-task defaults from the paper (e.g. Convpass scale and conv init);
    keyword arguments override them.
    """
    method_obj = get_method(method)
    config = method_obj.make_config(task, **method_overrides)
    model, info = build_backbone(
        backbone,
        pretrained,
        num_classes=num_classes,
        drop_path_rate=drop_path_rate,
        image_size=image_size,
        **dict(backbone_kwargs or {}),
    )
    return attach_method(model, info, method_obj, config)


def trainable_parameters(model: PetlModel) -> dict[str, nn.Parameter]:
    """What the method trains, classifier included, by name inside the backbone."""
    return {name: p for name, p in model.backbone.named_parameters() if p.requires_grad}


def head_parameter_names(model: PetlModel) -> set[str]:
    return {f"{model.info.head_path}.{name}" for name, _ in model.head.named_parameters()}


def count_trainable(model: PetlModel) -> tuple[int, int]:
    """(trainable parameters without the classifier, with it); entries a method has pruned do not count."""
    params = trainable_parameters(model)
    head = head_parameter_names(model)
    pruned = model.method.pruned_entries(model)
    with_head = sum(p.numel() for p in params.values()) - pruned
    without = sum(p.numel() for name, p in params.items() if name not in head) - pruned
    return without, with_head
