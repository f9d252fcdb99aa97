"""Build a backbone by name and pretrained source -> (model, BackboneInfo).

Names are timm model names (``vit_base_patch16_224.orig_in21k``), open_clip model names prefixed
with ``open_clip:`` (``open_clip:ViT-B-16-quickgelu``), or names registered with
:func:`petl_bench.registry.register_backbone`. Pretrained sources are ``hub`` (download through
timm / open_clip), ``none`` (random init), or a local file (``.npz`` in the original Google ViT
format, ``.pth``/``.pt``, ``.safetensors``). The returned model maps images to logits; its classifier
is a fresh ``nn.Linear`` with PyTorch's default init, as the Convpass code's ``reset_classifier``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import timm
import torch
from torch import nn

from .config import PAPER_BACKBONE
from .errors import UserError
from .hub import require_hub
from .registry import BACKBONES, canonical
from .tensors import checked_state

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPEN_CLIP_PREFIX = "open_clip:"
LOCAL_WEIGHT_SUFFIXES = (".npz", ".pth", ".pt", ".bin", ".safetensors")

# Kinds: what methods may assume about the block list.
VIT, SWIN, CONVNEXT, CLIP, OTHER = "vit", "swin", "convnext", "clip", "other"


@dataclass(frozen=True)
class Preprocessing:
    """How images are turned into the backbone's input."""

    image_size: tuple[int, int]
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class BackboneInfo:
    """What a method needs to know about a backbone, without inspecting it itself."""

    name: str
    kind: str
    block_paths: list[str]  # qualified module names of the residual blocks, input to output
    widths: list[int]  # token width of each block
    grids: list[tuple[int, int]]  # patch-token grid each block sees (rows, cols)
    num_prefix_tokens: int  # cls and register tokens in front of the patch tokens
    patch_size: tuple[int, int]
    num_features: int  # width of the feature the classifier reads
    head_path: str  # qualified name of the classifier nn.Linear
    preprocessing: Preprocessing
    pretrained: str  # where the weights came from
    checkpoint_sha256: str | None = None
    blocks_path: str | None = None  # the nn.Sequential holding the blocks (ViT), for prompt methods
    notes: str = ""
    encode_text: Callable[[list[str]], torch.Tensor] | None = field(default=None, repr=False)  # CLIP text tower
    logit_scale: float = 1.0  # CLIP's learned temperature (exp), for zero-shot classifiers

    def describe(self) -> dict:
        """A JSON-friendly summary for run records."""
        return {
            "name": self.name,
            "kind": self.kind,
            "depth": len(self.block_paths),
            "widths": sorted(set(self.widths)),
            "grids": sorted({tuple(g) for g in self.grids}),
            "num_prefix_tokens": self.num_prefix_tokens,
            "patch_size": list(self.patch_size),
            "image_size": list(self.preprocessing.image_size),
            "pretrained": self.pretrained,
            "checkpoint_sha256": self.checkpoint_sha256,
            "notes": self.notes,
        }


@dataclass(frozen=True)
class BackboneSource:
    """A registered backbone: a timm architecture plus a way to obtain its weights locally."""

    name: str
    timm_name: str
    weights: Callable[[], Path] | None = None  # returns a local weight file, creating it if needed
    notes: str = ""
    model_kwargs: dict = field(default_factory=dict)


def build_backbone(
    name: str,
    pretrained: str | Path = "hub",
    *,
    num_classes: int = 0,
    drop_path_rate: float = 0.0,
    image_size: int | None = None,
    **model_kwargs,
) -> tuple[nn.Module, BackboneInfo]:
    """Create a backbone classifier and describe it. ``model_kwargs`` go to the model constructor."""
    if name.startswith(OPEN_CLIP_PREFIX):
        from .clip import build_open_clip

        return build_open_clip(name, pretrained, num_classes, image_size, **model_kwargs)
    source = BACKBONES.get(name) if name in BACKBONES else None
    timm_name = source.timm_name if source else name
    if source is None and not timm.is_model(timm_name):
        registered = ", ".join(BACKBONES.names())
        raise UserError(
            f"unknown backbone '{name}'; choose a timm model name (timm.list_models()), "
            f"'{OPEN_CLIP_PREFIX}<open_clip model>', or a registered backbone: {registered}"
        )
    if canonical(name) == "vit_base_patch16_224_in21k":
        log.warning(
            "'%s' resolves to the AugReg weights in timm>=0.9; the Convpass paper used %s",
            name,
            PAPER_BACKBONE,
        )
    with preserved_rng():  # a one-time download or conversion must not shift the run's random streams
        weights, source_label = _resolve_weights(pretrained, source)
    kwargs = dict(source.model_kwargs if source else {})
    kwargs.update(model_kwargs, num_classes=num_classes, drop_path_rate=drop_path_rate)
    if image_size:  # an asked-for size replaces a registered backbone's native one
        kwargs.pop("img_size", None)
    try:
        model = _create_timm(timm_name, weights == "hub", image_size, kwargs)
    except (OSError, RuntimeError, ValueError) as error:
        if weights == "hub":
            raise UserError(
                f"could not load pretrained weights for '{name}' from the hub ({type(error).__name__}: "
                f"{error}); pass a local file with --pretrained PATH, or --pretrained none"
            ) from error
        raise UserError(f"could not build backbone '{name}': {error}") from error
    note = load_local_weights(model, weights) if isinstance(weights, Path) else ""
    if num_classes:
        model.reset_classifier(num_classes)
    info = describe_timm(model, name, source_label)
    if image_size and info.preprocessing.image_size != (image_size, image_size):  # fully convolutional models
        info.preprocessing = dataclasses.replace(info.preprocessing, image_size=(image_size, image_size))
    if isinstance(weights, Path):
        info.checkpoint_sha256 = file_sha256(weights)
    if source:
        info.notes = source.notes
    if note:
        info.notes = "; ".join(n for n in (info.notes, note) if n)
    return model, info


@contextlib.contextmanager
def preserved_rng():
    """Run a block without changing torch's, numpy's or Python's global random state, so that what
    happens only on a cold cache (weights converted or downloaded once) cannot change a seeded run."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


HUB_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def check_hub_reachable(name: str, timeout: float = 5.0) -> None:
    """A UserError within seconds when ``name``'s pretrained weights are not in the Hugging Face cache
    and the hub cannot be reached (offline, timm would retry for about a minute, logging every try)."""
    if name.startswith(OPEN_CLIP_PREFIX) or name in BACKBONES:
        return
    try:
        cfg = timm.models.get_pretrained_cfg(name)
        from huggingface_hub import try_to_load_from_cache
    except (RuntimeError, ImportError):
        return
    if cfg is None or not cfg.hf_hub_id:
        return
    repo = cfg.hf_hub_id
    if any(isinstance(try_to_load_from_cache(repo, filename), str) for filename in HUB_FILES):
        return
    advice = "pass a local weights file with --pretrained PATH, or --pretrained none for random weights"
    require_hub(f"the weights of '{name}' ({repo})", advice)


def _create_timm(name: str, pretrained: bool, image_size: int | None, kwargs: dict) -> nn.Module:
    """timm.create_model with ``img_size`` for the models that take one (ViT, Swin); convolutional
    models (ConvNeXt) take any input size and get none."""
    if image_size:
        try:
            return timm.create_model(name, pretrained=pretrained, img_size=image_size, **kwargs)
        except TypeError as error:
            if "img_size" not in str(error):
                raise
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def _resolve_weights(pretrained: str | Path, source: BackboneSource | None) -> tuple[None | str | Path, str]:
    """-> (None | 'hub' | local Path, label for records)."""
    text = str(pretrained)
    if text.lower() == "none":
        return None, "none"
    if text.lower() == "hub":
        if source is not None:
            if source.weights is None:
                raise UserError(f"backbone '{source.name}' has no pretrained weights; use --pretrained none")
            path = source.weights()
            return path, f"{source.name} ({path.name})"
        return "hub", "hub"
    path = Path(text).expanduser()
    if not path.is_file():
        raise UserError(f"pretrained weights file not found: {path} (use 'hub', 'none' or a path to an existing file)")
    if path.suffix not in LOCAL_WEIGHT_SUFFIXES:
        raise UserError(f"unsupported weights file {path}; expected one of {', '.join(LOCAL_WEIGHT_SUFFIXES)}")
    return path, str(path)


def load_local_weights(model: nn.Module, path: Path) -> str:
    """Load a local checkpoint into a timm model; every tensor but the classifier must be present.

    ``.npz`` files in the original Google ViT format go through timm's own converter; state dicts
    (``.pth``, ``.safetensors``) through the architecture's timm checkpoint filter, which converts
    original layouts and resamples position embeddings to the model's grid.
    """
    import sys

    from timm.models import load_state_dict

    if path.suffix == ".npz":
        if not hasattr(model, "load_pretrained"):
            raise UserError(f"{path}: .npz checkpoints are only understood for timm ViT models")
        try:
            model.load_pretrained(str(path))
        except (KeyError, ValueError, RuntimeError) as error:
            raise UserError(f"{path} does not match the architecture: {error}") from error
        loaded = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        checked_state(loaded, path)  # NaN or inf in the file: refused here too
        return ""
    try:
        state = load_state_dict(str(path), weights_only=True)
    except Exception as error:  # noqa: BLE001 - whatever the file holds, the answer is the same
        raise UserError(
            f"{path} is not a readable checkpoint of tensors ({type(error).__name__}: {str(error)[:200]})"
        ) from None
    state, note = checked_state(state, path, expected=model.state_dict())
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as error:  # noqa: BLE001
            raise UserError(f"{path} does not match the architecture ({type(error).__name__}: {error})") from None
    head_path = _module_path(model, model.get_classifier())
    head_keys = {f"{head_path}.weight", f"{head_path}.bias"}
    state = {key: value for key, value in state.items() if key not in head_keys}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise UserError(f"{path} does not match the architecture: {error}") from error
    missing = [key for key in result.missing_keys if key not in head_keys]
    if missing or result.unexpected_keys:
        raise UserError(
            f"{path} does not match the architecture: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {result.unexpected_keys[:5]}"
        )
    return note


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def _module_path(model: nn.Module, target: nn.Module) -> str:
    for path, module in model.named_modules():
        if module is target:
            return path
    raise ValueError("module not found in model")


def _timm_preprocessing(model: nn.Module, image_size: tuple[int, int]) -> Preprocessing:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return Preprocessing(
        image_size=image_size,
        interpolation=cfg.get("interpolation", "bicubic"),
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
    )


def describe_timm(model: nn.Module, name: str, pretrained: str) -> BackboneInfo:
    """Describe a timm ViT, Swin or ConvNeXt (other timm models get kind 'other')."""
    from timm.models.convnext import ConvNeXt
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    head_path = _module_path(model, model.get_classifier())
    common = dict(name=name, pretrained=pretrained, head_path=head_path, num_features=model.num_features)
    if isinstance(model, VisionTransformer):
        return _vit_info(model, common)
    if isinstance(model, SwinTransformer):
        return _blocks_info(model, SWIN, "SwinTransformerBlock", tuple(model.patch_embed.img_size), common)
    size = tuple((getattr(model, "pretrained_cfg", {}) or {}).get("input_size", (3, 224, 224))[1:])
    if isinstance(model, ConvNeXt):
        return _blocks_info(model, CONVNEXT, "ConvNeXtBlock", size, common)
    return BackboneInfo(kind=OTHER, block_paths=[], widths=[], grids=[], num_prefix_tokens=0, patch_size=(0, 0),
                        preprocessing=_timm_preprocessing(model, size), **common)  # fmt: skip


def _vit_info(model: nn.Module, common: dict) -> BackboneInfo:
    from timm.models.vision_transformer import Block

    grid, patch = tuple(model.patch_embed.grid_size), tuple(model.patch_embed.patch_size)
    plain_blocks = all(type(block) is Block for block in model.blocks)
    return BackboneInfo(
        kind=VIT if plain_blocks else OTHER,
        block_paths=[f"blocks.{i}" for i in range(len(model.blocks))],
        widths=[model.embed_dim] * len(model.blocks),
        grids=[grid] * len(model.blocks),
        num_prefix_tokens=model.num_prefix_tokens,
        patch_size=patch,
        preprocessing=_timm_preprocessing(model, (grid[0] * patch[0], grid[1] * patch[1])),
        blocks_path="blocks",
        **common,
    )


def _blocks_info(model: nn.Module, kind: str, block_type: str, size: tuple, common: dict) -> BackboneInfo:
    """A hierarchical backbone (Swin: its blocks' widths and token grids; ConvNeXt: widths, 4x4 stem)."""
    paths, widths, grids = [], [], []
    for path, module in model.named_modules():
        if type(module).__name__ == block_type:
            paths.append(path)
            widths.append(module.dim if kind == SWIN else module.conv_dw.in_channels)
            if kind == SWIN:
                grids.append(tuple(module.input_resolution))
    patch = tuple(model.patch_embed.patch_size) if kind == SWIN else (4, 4)
    return BackboneInfo(kind=kind, block_paths=paths, widths=widths, grids=grids, num_prefix_tokens=0,
                        patch_size=patch, preprocessing=_timm_preprocessing(model, size), **common)  # fmt: skip


def classifier_input(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """images -> what the classifier reads, so that ``model(x) == head(classifier_input(model)(x))``."""
    return lambda images: model.forward_head(model.forward_features(images), pre_logits=True)
