"""Deploy a trained method: fold it into the backbone (``merge``), write it out, load it back.

``merge(model)`` returns the plain timm / open_clip model (no wrapper module left) whose logits equal
the trained model's in eval mode; methods that cannot fold (a nonlinear adapter, extra tokens) say so.
``export_run`` writes a run either merged (the whole model's state dict, loadable without the
pretrained weights) or as its trainable-only checkpoint, each with a JSON file beside it saying the
backbone, method, task, classes and preprocessing; ``load_exported`` rebuilds the model from the two.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from . import atomic, records
from .atomic import atomic_path, write_atomic
from .backbones import build_backbone
from .checkpoints import load_trainable, read_safetensors
from .engine import seed_everything
from .errors import UserError
from .model import PetlModel, attach_method, get_method

FORMAT = "petl-bench-export/1"
MERGE_TOLERANCE = 1e-4


def merge(model: PetlModel) -> nn.Module:
    """A copy of ``model``'s backbone with the method folded into its weights, in eval mode."""
    folded = copy.deepcopy(model).eval()
    folded.method.merge(folded)
    return folded.backbone


@torch.no_grad()
def merge_difference(model: PetlModel, merged: nn.Module, size: tuple[int, int], seed: int = 0) -> float:
    """Max |logit difference| between the model as trained and merged, eval mode, on random images."""
    generator = torch.Generator().manual_seed(seed)
    device = next(merged.parameters()).device
    images = torch.randn(4, 3, *size, generator=generator).to(device)
    was_training = model.training
    model.eval()
    difference = float((model(images) - merged(images)).abs().max())
    model.train(was_training)
    return difference


def rebuild(run_dir: Path) -> tuple[PetlModel, records.RunRecord]:
    """The model of a finished run: its backbone and pretrained weights, method, config and checkpoint."""
    try:
        record = records.read_record(run_dir / records.RECORD)
    except ValueError as error:  # missing, unreadable or invalid
        raise UserError(f"{run_dir} holds no finished run (no valid {records.RECORD}: {error})") from None
    source = record.hparams.pretrained_source
    if source is None:
        raise UserError(f"{run_dir}: the record does not say where its backbone weights came from (rerun it)")
    checkpoint = run_dir / records.CHECKPOINT
    recipe = record.hparams.recipe
    model = trained_model(
        record.method, record.hparams.method, record.backbone, source, checkpoint, seed=record.seed,
        num_classes=int(record.hparams.num_classes or _checkpoint_classes(checkpoint)),
        image_size=recipe.get("image_size"), head_init=recipe.get("head_init"), drop_path=recipe.get("drop_path", 0.0),
    )  # fmt: skip
    return model, record


def trained_model(
    method: str, config_values: dict, backbone: str, pretrained: str, checkpoint: Path, *, seed: int,
    num_classes: int, image_size: int | None, head_init: str | None, drop_path: float = 0.0,
) -> PetlModel:  # fmt: skip
    """The backbone with the method attached as the run built it (its seed first, so a random
    ``--pretrained none`` backbone is rebuilt exactly) and the trainable checkpoint loaded, in eval mode."""
    method_obj = get_method(method)
    fields = {f.name for f in dataclasses.fields(method_obj.Config)}
    config = method_obj.make_config(None, **{k: v for k, v in config_values.items() if k in fields})
    seed_everything(seed)
    network, info = build_backbone(backbone, pretrained, num_classes=num_classes, image_size=image_size,
                                   drop_path_rate=drop_path)  # fmt: skip
    model = attach_method(network, info, method_obj, config, head_init)
    return load_trainable(model, checkpoint).eval()


def _checkpoint_classes(path: Path) -> int:
    from .checkpoints import read_metadata

    return int(read_metadata(path)["num_classes"])


def describe(model: PetlModel, record: records.RunRecord, merged: bool) -> dict:
    normalization = record.hparams.normalization
    return {
        "format": FORMAT,
        "merged": merged,
        "backbone": record.backbone,
        "pretrained": record.hparams.pretrained_source,
        "method": record.method,
        "method_config": record.hparams.method,
        "head_init": record.hparams.recipe.get("head_init"),
        "task": record.task,
        "task_variant": record.task_variant,
        "num_classes": model.head.out_features,
        "class_names": record.hparams.class_names,
        "preprocessing": {
            "image_size": list(model.info.preprocessing.image_size),
            "interpolation": model.info.preprocessing.interpolation,
            "mean": normalization.get("mean"),
            "std": normalization.get("std"),
        },
        "seed": record.seed,  # a --pretrained none backbone is rebuilt from it
        "run_id": record.run_id,
        "top1": record.metrics.top1,
        "eval_split": record.metrics.eval_split,
    }


def export_run(run_dir: Path, out: Path, merged: bool = False, force: bool = False) -> tuple[Path, Path]:
    """Write ``out`` (safetensors) and ``out.json``; merged: the whole folded model, checked to give the
    trained model's logits within ``MERGE_TOLERANCE``. An existing export is replaced only with ``force``."""
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out} must end in .safetensors")
    atomic.check_writable(out.parent, "--out")
    existing = [path for path in (out, out.with_suffix(".json")) if path.exists()]
    if existing and not force:
        raise UserError(f"{existing[0]} exists; pass --force to overwrite it")
    model, record = rebuild(run_dir)
    if merged:
        folded = merge(model)
        difference = merge_difference(model, folded, model.info.preprocessing.image_size)
        if difference > MERGE_TOLERANCE:
            raise UserError(f"merging {record.method} changed the logits by {difference:.2e}; not exported")
    with atomic_path(out, mode=0o666) as temporary:  # the permissions a new file gets (0644 under the usual umask)
        if merged:
            state = {k: v.detach().contiguous() for k, v in folded.state_dict().items()}
            save_file(state, str(temporary), metadata={"format": FORMAT, "merged": "true"})
        else:
            shutil.copyfile(run_dir / records.CHECKPOINT, temporary)
    sidecar = out.with_suffix(".json")
    write_atomic(sidecar, json.dumps(describe(model, record, merged), indent=2))
    return out, sidecar


def load_exported(path: str | Path) -> nn.Module:
    """The model written by :func:`export_run`, in eval mode: a plain backbone when merged (no pretrained
    weights needed), else the backbone with the method attached and its checkpoint loaded."""
    path = Path(path)
    sidecar = path.with_suffix(".json")
    if not path.is_file() or not sidecar.is_file():
        raise UserError(f"an export is two files: {path} and {sidecar}")
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{sidecar} is not a readable description: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{sidecar} is not a {FORMAT} description")
    try:
        size, classes = int(meta["preprocessing"]["image_size"][0]), int(meta["num_classes"])
        merged, backbone = bool(meta["merged"]), str(meta["backbone"])
        if not merged:
            method, config, seed = str(meta["method"]), dict(meta["method_config"]), int(meta["seed"])
            pretrained = str(meta["pretrained"])
    except (KeyError, TypeError, IndexError, ValueError) as error:
        raise UserError(f"{sidecar} lacks or garbles a field ({type(error).__name__}: {error})") from None
    if merged:
        network, _ = build_backbone(backbone, "none", num_classes=classes, image_size=size)
        try:
            network.load_state_dict(read_safetensors(path), strict=True)
        except RuntimeError as error:
            raise UserError(f"{path} does not match {backbone}: {str(error)[:200]}") from None
        return network.eval()
    return trained_model(method, config, backbone, pretrained, path, seed=seed,
                         num_classes=classes, image_size=size, head_init=meta.get("head_init"))  # fmt: skip
