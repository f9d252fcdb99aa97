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
import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import paths, records
from .atomic import write_atomic
from .checkpoints import load_trainable, save_trainable
from .config import Recipe
from .engine import evaluate, fit
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
class SearchSettings:
    """Budget and evolution settings (NOAH's defaults; ``generations`` as in its VTAB script)."""

    budget_m: float = 0.64  # parameter limit in millions
    counter: str = "noah"  # "noah": NOAH's own counter (dead prompt parameters included); "effective"
    population: int = 50
    select: int = 10
    mutation: int = 25
    crossover: int = 25
    m_prob: float = 0.2
    s_prob: float = 0.4
    generations: int = 15
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


class Evolution:
    """NOAH's evolutionary search with a memory of evaluated candidates (resumable by generation)."""

    def __init__(self, settings: SearchSettings, depth: int, width: int, score, seed: int, state: Path | None = None):
        self.settings = settings
        self.depth = depth
        self.width = width
        self.score = score  # Subnet -> validation top-1
        self.state = state
        self.rng = random.Random(seed)
        self.accuracy: dict[tuple, float] = {}
        self.candidates: list[Subnet] = []
        self.top: list[Subnet] = []
        self.generation = 0
        self.history: list[dict] = []
        if state is not None and state.is_file():
            self._load(state)

    def params(self, subnet: Subnet) -> int:
        if self.settings.counter == "noah":
            return subnet.noah_counted_params(self.width, SUPER_DIM)
        if self.settings.counter == "effective":
            return subnet.effective_params(self.width)
        raise UserError(f"unknown NOAH budget counter '{self.settings.counter}'; choose noah or effective")

    def _legal(self, subnet: Subnet) -> bool:
        key = dataclasses.astuple(subnet)
        if key in self.accuracy or self.params(subnet) > self.settings.budget_m * 1e6:
            return False
        self.accuracy[key] = self.score(subnet)
        return True

    def _fill(self, make, wanted: int, attempts: int) -> list[Subnet]:
        found: list[Subnet] = []
        while len(found) < wanted and attempts > 0:
            attempts -= 1
            subnet = make()
            if self._legal(subnet):
                found.append(subnet)
        return found

    def _random_fill(self) -> None:
        missing = self.settings.population - len(self.candidates)
        space, depth = self.settings.space, self.depth
        self.candidates += self._fill(
            lambda: random_subnet(self.rng, space, depth), missing, 100 * self.settings.population
        )
        if not self.top and not self.candidates:
            raise UserError(f"no subnet of the search space fits the budget of {self.settings.budget_m}M parameters")

    def run(self, progress=None) -> Subnet:
        s = self.settings
        if self.generation == 0 and not self.candidates:
            self._random_fill()
        task = progress.add_task("NOAH evolution", total=s.generations, completed=self.generation) if progress else None
        while self.generation < s.generations:
            ranked = sorted({dataclasses.astuple(c): c for c in self.top + self.candidates}.values(), key=self._key)
            self.top = ranked[: s.select]
            best = self.top[0]
            self.history.append({"generation": self.generation, "best_val_top1": self._acc(best),
                                 "best_params": self.params(best), "evaluated": len(self.accuracy)})  # fmt: skip
            mutations = self._fill(lambda: mutate(self.rng, self.rng.choice(self.top), s.space, s.m_prob, s.s_prob),
                                   s.mutation, 10 * s.mutation)  # fmt: skip
            crossovers = self._fill(lambda: crossover(self.rng, self.rng.choice(self.top), self.rng.choice(self.top)),
                                    s.crossover, 10 * s.crossover)  # fmt: skip
            self.candidates = mutations + crossovers
            self._random_fill()
            self.generation += 1
            if self.state is not None:
                self._save(self.state)
            if progress:  # the best so far, this generation's children included (what the pick would be)
                leader = min(self.top + self.candidates, key=self._key)
                progress.update(task, advance=1, description=f"NOAH evolution: best val {self._acc(leader):.2f}")
        ranked = sorted({dataclasses.astuple(c): c for c in self.top + self.candidates}.values(), key=self._key)
        return ranked[0]

    def _acc(self, subnet: Subnet) -> float:
        return self.accuracy[dataclasses.astuple(subnet)]

    def _key(self, subnet: Subnet):
        return (-self._acc(subnet), self.params(subnet), dataclasses.astuple(subnet))

    def _save(self, path: Path) -> None:
        state = {
            "generation": self.generation,
            "rng": _jsonable(self.rng.getstate()),
            "accuracy": [[list(map(list, key)), acc] for key, acc in self.accuracy.items()],
            "candidates": [c.to_dict() for c in self.candidates],
            "top": [c.to_dict() for c in self.top],
            "history": self.history,
        }
        write_atomic(path, json.dumps(state))

    def _load(self, path: Path) -> None:
        state = json.loads(path.read_text())
        self.generation = state["generation"]
        self.rng.setstate(_tuples(state["rng"]))
        self.accuracy = {tuple(tuple(part) for part in key): acc for key, acc in state["accuracy"]}
        self.candidates = [Subnet.from_dict(c) for c in state["candidates"]]
        self.top = [Subnet.from_dict(c) for c in state["top"]]
        self.history = state["history"]


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


class _SupernetMethod(Method):
    """Attaches the full NOAH supernet and keeps its handles (not registered: the search's own)."""

    name = "noah_supernet"
    Config = NoahConfig
    supernet: Supernet

    def attach(self, model, info, config):
        self.supernet = Supernet(model, info, config)
        return self.supernet.parameters()


def search_folder(output: Path, task: str, backbone: str, seed: int, settings: SearchSettings, pretrained: str) -> Path:
    identity = json.dumps([task, backbone, seed, pretrained, dataclasses.asdict(settings)], sort_keys=True, default=str)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:10]
    return output / "noah-search" / f"{paths.safe_name(task)}__{paths.safe_name(backbone)}__s{seed}__{digest}"


def train_supernet(prepared, supernet, recipe, folder: Path, task: str, backbone: str, seed: int, settings, device,
                   progress=None) -> None:  # fmt: skip
    """Train the supernet (a random subnet of the search space every step, NOAH's sampler reseeded every
    epoch) and write its weights and log into ``folder``."""
    model, depth, sampler = prepared.model, len(prepared.model.info.block_paths), random.Random()

    def sample(epoch: int, step: int) -> None:
        if step == 0:  # NOAH reseeds its sampler every epoch
            sampler.seed(seed * 100_003 + epoch)
        supernet.select(random_subnet(sampler, settings.space, depth))

    bar = progress.add_task("NOAH supernet", total=recipe.epochs) if progress else None
    result = fit(
        model, prepared.train, None, prepared.normalizer, recipe, device=device, seed=seed, before_step=sample,
        on_epoch=(lambda e: progress.update(bar, advance=1, description=f"NOAH supernet: loss {e.loss:.3f}")) if progress else None,
        resume=folder / "supernet_resume.pt",
    )  # fmt: skip
    save_trainable(model, folder / "supernet.safetensors")
    (folder / "supernet_resume.pt").unlink(missing_ok=True)
    write_atomic(folder / "supernet.json", json.dumps({
        "task": task, "backbone": backbone, "seed": seed, "recipe": dataclasses.asdict(recipe),
        "epochs": [dataclasses.asdict(e) for e in result.epochs], "train_seconds": result.train_seconds,
        "finished_at": records.now(),
    }, indent=1))  # fmt: skip


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
    folder = search_folder(output, task.name, backbone, seed, settings, pretrained)
    subnet_file = folder / "subnet.json"
    if subnet_file.is_file():
        log.info("NOAH search already finished: %s", subnet_file)
        return subnet_file
    folder.mkdir(parents=True, exist_ok=True)
    data = task.splits(data_root, "tune")
    recipe = dataclasses.replace(settings.supernet_recipe, image_size=image_size or settings.supernet_recipe.image_size)
    method = _SupernetMethod()
    prepared = prepare(method, NoahConfig(), backbone, pretrained, recipe, data, seed, device, progress)
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
        "task": task.name,
        "backbone": backbone,
        "seed": seed,
        "history": evolution.history,
        "finished_at": records.now(),
    }
    write_atomic(subnet_file, json.dumps(result, indent=1))
    return subnet_file
