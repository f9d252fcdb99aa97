"""NOAH's search pipeline: supernet training, evolutionary search, retraining the winner.

1. Supernet: every block carries prompts, LoRA and an adapter at the super size; each training step
   uses a random subnet from the search space (NOAH's ``sample_configs``), on ``train800``.
2. Evolution on ``val200`` under a parameter budget (NOAH's ``EvolutionSearcher``): a random
   population, then per generation the top-k by validation accuracy breed mutations (per module
   type with probability ``m_prob``: a new depth with probability ``s_prob``, new sizes for added
   blocks) and crossovers (each module type's list from one parent), topped up with random legal
   candidates. Candidates over the budget or already evaluated are not legal.
3. Retrain the best subnet from the pretrained backbone on ``train800val200`` (a normal ``noah`` run).

Each stage writes its result into the search folder and is skipped when that file exists; the
supernet saves its training state as it goes, the evolution its state after every generation.
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
from .errors import UserError
from .methods.noah import SUPER_DIM, NoahConfig, Subnet, Supernet
from .model import Method
from .runner import prepare

log = logging.getLogger(__name__)


@dataclass
class SearchSpace:
    """NOAH's VTAB-1K space (``supernet-B_prompt_VTAB.yaml``): sizes {1, 5, 10}, depths {3, 6, 9, 12}."""

    sizes: tuple[int, ...] = (1, 5, 10)
    depths: tuple[int, ...] = (3, 6, 9, 12)


@dataclass
class SearchSettings(search.EvolutionSettings):
    """Budget and evolution settings (NOAH's defaults; ``generations`` as in its VTAB script)."""

    budget_m: float = 0.64  # parameter limit in millions
    counter: str = "noah"  # "noah": NOAH's own counter (dead prompt parameters included); "effective"
    s_prob: float = 0.4
    supernet_recipe: Recipe = field(default_factory=lambda: Recipe(epochs=500, lr=5e-4))
    space: SearchSpace = field(default_factory=SearchSpace)


def random_subnet(rng: random.Random, space: SearchSpace, depth: int) -> Subnet:
    """Per module type: a depth, then a random size for each of the first ``depth`` blocks."""
    lists = []
    for _ in range(3):
        used = rng.choice([d for d in space.depths if d <= depth] or [depth])
        lists.append(tuple(rng.choice(space.sizes) for _ in range(used)) + (0,) * (depth - used))
    return Subnet(*lists)


def _depth_of(sizes: tuple[int, ...]) -> int:
    return next((index for index, size in enumerate(sizes) if size == 0), len(sizes))


def mutate(rng: random.Random, parent: Subnet, space: SearchSpace, m_prob: float, s_prob: float) -> Subnet:
    """NOAH's mutation: per module type, with probability m_prob maybe change the depth (s_prob);
    blocks added by a deeper depth get random sizes, a shallower depth truncates."""
    lists = []
    for sizes in (parent.prompt, parent.lora, parent.adapter):
        if rng.random() < m_prob:
            current = _depth_of(sizes)
            new = (
                rng.choice([d for d in space.depths if d <= len(sizes)] or [len(sizes)])
                if rng.random() < s_prob
                else current
            )
            if new > current:
                sizes = (
                    sizes[:current]
                    + tuple(rng.choice(space.sizes) for _ in range(new - current))
                    + (0,) * (len(sizes) - new)
                )
            else:
                sizes = sizes[:new] + (0,) * (len(sizes) - new)
        lists.append(tuple(sizes))
    return Subnet(*lists)


def crossover(rng: random.Random, first: Subnet, second: Subnet) -> Subnet:
    """NOAH's crossover: each module type's whole list from one of the parents."""
    return Subnet(*(rng.choice([a, b]) for a, b in zip(dataclasses.astuple(first), dataclasses.astuple(second))))


class NoahProblem:
    """NOAH's candidates: subnets of the search space, counted by NOAH's counter or the effective one."""

    label = "NOAH"

    def __init__(self, settings: SearchSettings, depth: int, width: int):
        self.settings, self.depth, self.width = settings, depth, width
        if settings.counter not in ("noah", "effective"):
            raise UserError(f"unknown NOAH budget counter '{settings.counter}'; choose noah or effective")

    def random(self, rng: random.Random) -> Subnet:
        return random_subnet(rng, self.settings.space, self.depth)

    def mutate(self, rng: random.Random, parent: Subnet) -> Subnet:
        return mutate(rng, parent, self.settings.space, self.settings.m_prob, self.settings.s_prob)

    def crossover(self, rng: random.Random, first: Subnet, second: Subnet) -> Subnet:
        return crossover(rng, first, second)

    def params(self, subnet: Subnet) -> int:
        if self.settings.counter == "noah":
            return subnet.noah_counted_params(self.width, SUPER_DIM)
        return subnet.effective_params(self.width)

    def key(self, subnet: Subnet) -> tuple:
        return dataclasses.astuple(subnet)

    def to_json(self, subnet: Subnet) -> dict:
        return subnet.to_dict()

    def from_json(self, value: dict) -> Subnet:
        return Subnet.from_dict(value)


class Evolution(search.Evolution):
    """NOAH's evolutionary search (the shared one over NOAH's subnets)."""

    def __init__(self, settings: SearchSettings, depth: int, width: int, score, seed: int, state: Path | None = None):
        super().__init__(settings, NoahProblem(settings, depth, width), score, seed, state)


class _SupernetMethod(Method):
    """Attaches the full NOAH supernet and keeps its handles (not registered: the search's own)."""

    name = "noah_supernet"
    Config = NoahConfig
    supernet: Supernet

    def attach(self, model, info, config):
        self.supernet = Supernet(model, info, config)
        return self.supernet.parameters()


def train_supernet(prepared, supernet, recipe, folder: Path, task: str, backbone: str, seed: int, settings, device,
                   progress=None) -> None:  # fmt: skip
    """Train the supernet: a random subnet of the search space every step, NOAH's sampler reseeded every epoch."""
    depth, sampler = len(prepared.model.info.block_paths), random.Random()

    def sample(epoch: int, step: int) -> None:
        if step == 0:  # NOAH reseeds its sampler every epoch
            sampler.seed(seed * 100_003 + epoch)
        supernet.select(random_subnet(sampler, settings.space, depth))

    about = {"task": task, "backbone": backbone, "seed": seed}
    search.train_supernet(
        prepared, recipe, folder, about, device, label="NOAH supernet", before_step=sample, progress=progress
    )


def run_search(
    task,
    *,
    backbone: str,
    pretrained: str,
    data_root: Path | None,
    output: Path,
    seed: int,
    settings: SearchSettings,
    device: torch.device,
    image_size: int | None = None,
    progress=None,
) -> Path:
    """Supernet training and evolutionary search; returns the winning subnet's JSON file."""
    folder = search.search_folder(output, "noah", task.name, backbone, seed, settings, pretrained)
    subnet_file = folder / "subnet.json"
    if subnet_file.is_file():
        log.info("NOAH search already finished: %s", subnet_file)
        return subnet_file
    data = task.splits(data_root, "tune")
    recipe = dataclasses.replace(settings.supernet_recipe, image_size=image_size or settings.supernet_recipe.image_size)
    method = _SupernetMethod()
    prepared = prepare(method, NoahConfig(), backbone, pretrained, recipe, data, seed, device, progress)
    folder.mkdir(parents=True, exist_ok=True)  # after every check: a refused command writes nothing
    model, info, supernet = prepared.model, prepared.model.info, method.supernet
    val, normalizer = prepared.evaluation, prepared.normalizer

    weights = folder / "supernet.safetensors"
    if weights.is_file():
        load_trainable(model, weights)
    else:
        train_supernet(prepared, method.supernet, recipe, folder, task.name, backbone, seed, settings, device, progress)

    def score(subnet: Subnet) -> float:
        supernet.select(subnet)
        return evaluate(model, val, normalizer, device, recipe.eval_batch_size)[0]

    evolution = Evolution(settings, len(info.block_paths), info.widths[0], score, seed, folder / "search_state.json")
    best = evolution.run(progress)
    result = {
        **best.to_dict(),
        "val_top1": evolution._acc(best),
        "effective_params": best.effective_params(info.widths[0]),
        "noah_counted_params": best.noah_counted_params(info.widths[0], SUPER_DIM),
        "budget_m": settings.budget_m,
        "counter": settings.counter,
        "search": dataclasses.asdict(settings),
        "task": task.name,
        "backbone": backbone,
        "seed": seed,
        "history": evolution.history,
        "finished_at": records.now(),
    }
    write_atomic(subnet_file, json.dumps(result, indent=1))
    return subnet_file
