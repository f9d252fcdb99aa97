"""Trainable-only checkpoints: what a method trained plus the classifier, in safetensors.

A checkpoint holds the tensors named as in the backbone (``blocks.0.adapter_attn.adapter_down.weight``,
``head.weight``) and metadata saying which method, hyperparameters and backbone produced it. It
loads into a fresh model built the same way. The official Convpass release format (a torch state
dict of the same names) is read too.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save

from .atomic import write_bytes_atomic
from .errors import UserError
from .model import PetlModel, trainable_parameters
from .tensors import checked_state

FORMAT = "petl-bench-trainable/1"
FORMATS = ("petl-bench", "convpass-official")


def task_state(model: PetlModel) -> dict[str, torch.Tensor]:
    """What makes the task's model from the backbone: the trained tensors and what a selection stage chose."""
    return {**trainable_parameters(model), **model.method.selected_state(model)}


def _tensors(model: PetlModel) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in task_state(model).items()}


def _metadata(model: PetlModel) -> dict[str, str]:
    return {
        "format": FORMAT,
        "method": model.method.name,
        "config": json.dumps(dataclasses.asdict(model.config), sort_keys=True),
        "backbone": model.info.name,
        "num_classes": str(model.head.out_features),
    }


def checkpoint_bytes(model: PetlModel) -> bytes:
    """The checkpoint file's content."""
    return save(_tensors(model), metadata=_metadata(model))


def save_trainable(model: PetlModel, path: str | Path) -> Path:
    """Write the trainable tensors to ``path`` atomically (a crash never leaves a truncated file)."""
    path = Path(path)
    write_bytes_atomic(path, checkpoint_bytes(model))
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def _read(path: Path, format: str, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if format == "petl-bench":
        return read_safetensors(path, expected)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a crafted or broken file: refused, never run
        raise UserError(f"{path} is not a readable checkpoint ({type(error).__name__}: {str(error)[:200]})") from None
    state, _ = checked_state(state, path)
    return {key.removeprefix("module."): value for key, value in state.items()}


def read_safetensors(path: Path, expected: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, checked (floating, finite; integers only where ``expected`` holds
    integers, as a selection's indices); one UserError for any fault."""
    try:
        state = load_file(str(path))
    except Exception as error:  # noqa: BLE001 - SafetensorError, OSError, a crafted header: the same answer
        raise UserError(f"{path} is not a readable safetensors checkpoint: {str(error)[:200]}") from None
    return checked_state(state, path, expected)[0]


def load_trainable(model: PetlModel, path: str | Path, format: str = "petl-bench") -> PetlModel:
    """Load trainable tensors into ``model``; names and shapes must match exactly."""
    path = Path(path)
    if format not in FORMATS:
        raise UserError(f"unknown checkpoint format '{format}'; choose from: {', '.join(FORMATS)}")
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if format == "petl-bench":
        saved_method = read_metadata(path).get("method")
        if saved_method and saved_method != model.method.name:
            raise UserError(f"{path} holds a '{saved_method}' checkpoint, not '{model.method.name}'")
    params = task_state(model)
    state = _read(path, format, params)
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise UserError(
            f"{path} does not match the model: missing {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}"
        )
    with torch.no_grad():
        for name, parameter in params.items():
            if state[name].is_floating_point() != parameter.is_floating_point():
                raise UserError(f"{path}: {name} holds {state[name].dtype} values, the model {parameter.dtype}")
            if state[name].shape != parameter.shape:
                raise UserError(
                    f"{path}: {name} has shape {tuple(state[name].shape)}, expected {tuple(parameter.shape)}"
                )
            parameter.copy_(state[name])
    return model
