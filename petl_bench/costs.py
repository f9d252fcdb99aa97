"""What a run's architecture costs beyond training: its forward FLOPs and its inference speed (as trained
and merged). Both depend on the architecture, not on the task or the seed, so each is measured once per
architecture in a process and shared by the runs of a sweep."""

from __future__ import annotations

import json

import torch

from .data import TensorDataset
from .engine import Recipe, evaluate, forward_flops
from .export import merge
from .model import PetlModel
from .planning import Job

_FLOPS: dict[str, int] = {}


def architecture(job: Job, info) -> str:
    """What a model's cost depends on but a run's task and seed do not: the method and its settings, the
    backbone and the input size."""
    config = json.dumps(job.method_object.config_identity(job.method_config), sort_keys=True, default=str)
    size = "x".join(map(str, info.preprocessing.image_size))
    return f"{job.method} {config} on {job.backbone} at {size}"


def method_flops(model, info, job: Job, device: torch.device, num_classes: int) -> int:
    """The method model's forward FLOPs per image, counted once per architecture and number of classes in a
    process: the tasks and seeds of a sweep share it."""
    key = f"{architecture(job, info)}, {num_classes} classes"
    if key not in _FLOPS:
        _FLOPS[key] = forward_flops(model, info.preprocessing.image_size, device)
    return _FLOPS[key]


def inference_key(job: Job, info, device: torch.device) -> str:
    """What an inference speed depends on: the architecture (method and settings, backbone, input size),
    the device, the batch and the precision; not the task or the seed."""
    return f"{architecture(job, info)}, {device}, batch {job.recipe.eval_batch_size}, {job.recipe.precision}"


INFERENCE_IMAGES = 512  # images timed for the inference throughput


_INFERENCE_SPEEDS: dict[str, dict] = {}


def inference_speeds(model: PetlModel, data: TensorDataset, normalizer, device, recipe: Recipe, key: str) -> dict:
    """Full-model images/s in eval mode on the same images, batch and device: the model as trained and,
    for methods that fold into the backbone, merged (so 'no inference overhead' is measured). Measured
    once per ``key`` (method, its settings, backbone, input size, device, batch, precision) in a process:
    the runs of a sweep over tasks and seeds share the architecture, so they share the measurement."""
    if key not in _INFERENCE_SPEEDS:
        _INFERENCE_SPEEDS[key] = _measure_inference(model, data, normalizer, device, recipe)
    return {**_INFERENCE_SPEEDS[key], "measured_for": key}


def _measure_inference(model: PetlModel, data: TensorDataset, normalizer, device, recipe: Recipe) -> dict:
    subset = TensorDataset(data.images[:INFERENCE_IMAGES], data.labels[:INFERENCE_IMAGES])
    speeds = {"as_trained": evaluate(model, subset, normalizer, device, recipe.eval_batch_size, precision=recipe.precision)[1],
              "merged": None}  # fmt: skip
    if model.method.merges:
        speeds["merged"] = evaluate(
            merge(model), subset, normalizer, device, recipe.eval_batch_size, precision=recipe.precision
        )[1]
    return speeds
