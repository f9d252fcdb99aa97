"""GLoRA's search (official Arnav0400/ViT-Slim GLoRA/supernet.py, evolution.py, evolution_utils.py).

1. Supernet: every encoder Linear carries all of GLoRA's tensors and draws a random path at every forward
   (the official ``random.choice(self.configs)``; here each layer's generator is reseeded every epoch, so a
   resumed supernet trains exactly as an uninterrupted one), on ``train800``.
2. Evolution on ``val200`` (never the test images) under a parameter budget: the official searcher (population
   50, top 10, 25 mutations re-drawing each component of each layer with probability 0.2, 25 crossovers taking
   each component from one of two parents, 20 generations, at most 1.00M parameters), through the machinery
   NOAH's search uses (:mod:`petl_bench.search`).
3. The chosen paths are written as a ``glora`` run's ``paths`` file; the CLI retrains them on train800val200
   (the official code evaluates the supernet's tensors instead; see :mod:`petl_bench.methods.glora`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import records, search
from .atomic import write_atomic
from .checkpoints import load_trainable
from .config import Recipe
from .engine import evaluate
from .methods.glora import CHOICES, GLoRAFixedConfig, GLoRALinear, encoder_linears
from .model import Method
from .runner import prepare

log = logging.getLogger(__name__)
PARTS = tuple(CHOICES)  # A, B, C, D, E


@dataclass
class GLoRASearchSettings(search.EvolutionSettings):
    """The official defaults (``--rank 4``, ``--param-limits 1.00``, evolution.py's search settings)."""

    rank: int = 4
    min_budget_m: float = 0.0
    generations: int = 20
    supernet_recipe: Recipe = field(default_factory=lambda: Recipe(epochs=500, lr=1e-4))


class GLoRAProblem:
    """Candidates: one path per encoder Linear, a tuple of (A, B, C, D, E) forms; counted as ``get_param``."""

    label = "GLoRA"

    def __init__(self, shapes: list[tuple[int, int]], rank: int, m_prob: float):
        self.shapes, self.rank, self.m_prob = shapes, rank, m_prob

    def random(self, rng: random.Random) -> tuple:
        return tuple(tuple(rng.choice(CHOICES[part]) for part in PARTS) for _ in self.shapes)

    def mutate(self, rng: random.Random, parent: tuple) -> tuple:
        return tuple(
            tuple(rng.choice(CHOICES[part]) if rng.random() < self.m_prob else form for part, form in zip(PARTS, layer))
            for layer in parent
        )

    def crossover(self, rng: random.Random, first: tuple, second: tuple) -> tuple:
        return tuple(tuple(rng.choice([a, b]) for a, b in zip(x, y)) for x, y in zip(first, second))

    def params(self, candidate: tuple) -> int:
        total = 0
        for (out, inp), (a, b, c, d, e) in zip(self.shapes, candidate):
            scaling = {"lora": self.rank * (out + inp), "vector": out, "constant": 1, "none": 0}
            total += scaling[a] + scaling[b] + {"lora": self.rank * (inp + 1), "vector": inp, "none": 0}[c]
            total += sum({"vector": out, "constant": 1, "none": 0}[form] for form in (d, e))
        return total

    def key(self, candidate: tuple) -> tuple:
        return candidate

    def to_json(self, candidate: tuple) -> list[dict]:
        return [dict(zip(PARTS, layer)) for layer in candidate]

    def from_json(self, value: list[dict]) -> tuple:
        return tuple(tuple(layer[part] for part in PARTS) for layer in value)


class _SupernetMethod(Method):
    """GLoRA's supernet (not registered: the search's own). A random path per forward: trained eagerly."""

    name = "glora_supernet"
    Config = GLoRAFixedConfig
    compiles = False
    reads_frozen_weights = True
    layers: list[GLoRALinear]

    def attach(self, model, info, config):
        self.layers = []
        for name in encoder_linears(model, info.head_path):
            layer = GLoRALinear(model.get_submodule(name), config.rank, None)
            model.set_submodule(name, layer)
            self.layers.append(layer)
        return [p for layer in self.layers for key, p in layer.named_parameters(recurse=False) if key[0] in PARTS]


def run_glora_search(task, *, backbone: str, pretrained: str, data_root: Path | None, output: Path, seed: int,
                     settings: GLoRASearchSettings, device: torch.device, image_size: int | None = None,
                     progress=None) -> Path:  # fmt: skip
    """Supernet training and evolutionary search; returns the chosen paths' JSON file."""
    folder = search.search_folder(output, "glora", task.name, backbone, seed, settings, pretrained)
    paths_file = folder / "paths.json"
    if paths_file.is_file():
        log.info("GLoRA search already finished: %s", paths_file)
        return paths_file
    recipe = dataclasses.replace(settings.supernet_recipe, image_size=image_size or settings.supernet_recipe.image_size)
    method = _SupernetMethod()
    prepared = prepare(method, GLoRAFixedConfig(rank=settings.rank), backbone, pretrained, recipe,
                       task.splits(data_root, "tune"), seed, device, progress)  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)  # after every check: a refused command writes nothing
    layers = method.layers
    if (folder / "supernet.safetensors").is_file():
        load_trainable(prepared.model, folder / "supernet.safetensors")
    else:

        def reseed(epoch: int, step: int) -> None:
            if step == 0:
                for index, layer in enumerate(layers):
                    layer.rng.seed(seed * 100_003 + epoch * 1_009 + index)

        about = {"task": task.name, "backbone": backbone, "seed": seed}
        search.train_supernet(prepared, recipe, folder, about, device, label="GLoRA supernet", before_step=reseed,
                              progress=progress)  # fmt: skip

    def score(candidate: tuple) -> float:
        for layer, forms in zip(layers, candidate):
            layer.chosen = dict(zip(PARTS, forms))
        return evaluate(prepared.model, prepared.evaluation, prepared.normalizer, device, recipe.eval_batch_size)[0]

    problem = GLoRAProblem(
        [(layer.out_features, layer.in_features) for layer in layers], settings.rank, settings.m_prob
    )
    evolution = search.Evolution(settings, problem, score, seed, folder / "search_state.json")
    best = evolution.run(progress)
    result = {
        "paths": problem.to_json(best), "val_top1": evolution._acc(best), "params": problem.params(best),
        "budget_m": settings.budget_m, "rank": settings.rank, "search": dataclasses.asdict(settings), "task": task.name,
        "backbone": backbone, "seed": seed,
        "history": evolution.history, "finished_at": records.now(),
    }  # fmt: skip
    write_atomic(paths_file, json.dumps(result, indent=1))
    return paths_file
