"""The machinery the supernet searches share (NOAH's, GLoRA's): the evolutionary search of AutoFormer's
``EvolutionSearcher`` that both official codes use, over a method's own candidates, and supernet training.

A search problem (:class:`Problem`) says what a candidate is: how to draw one at random, mutate one, cross
two, count its parameters and write it as JSON. :class:`Evolution` does the rest: a random population, then
per generation the top-k by validation accuracy breed mutations and crossovers, topped up with random legal
candidates; a candidate outside the parameter limits or already evaluated is not legal. Its state is saved
after every generation, so an interrupted search resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path
from typing import Any, Callable, Hashable, Protocol

from . import paths, records
from .atomic import write_atomic
from .checkpoints import save_trainable
from .config import Recipe
from .engine import fit
from .errors import UserError


class Problem(Protocol):
    """What a candidate of a search is (NOAH: a subnet; GLoRA: one path per layer)."""

    label: str  # for progress bars: "NOAH", "GLoRA"

    def random(self, rng: random.Random) -> Any: ...
    def mutate(self, rng: random.Random, parent: Any) -> Any: ...
    def crossover(self, rng: random.Random, first: Any, second: Any) -> Any: ...
    def params(self, candidate: Any) -> int: ...
    def key(self, candidate: Any) -> Hashable: ...  # nested tuples of plain values
    def to_json(self, candidate: Any) -> Any: ...
    def from_json(self, value: Any) -> Any: ...


@dataclasses.dataclass
class EvolutionSettings:
    """What every supernet search sets (AutoFormer's searcher, as NOAH and GLoRA configure it); a search's
    own settings extend these. A lower parameter limit (GLoRA's ``min_budget_m``) is optional, so NOAH's
    settings, and the digests of its search folders, stay as they were."""

    budget_m: float = 1.0  # the most parameters a candidate may have, in millions
    population: int = 50
    select: int = 10
    mutation: int = 25
    crossover: int = 25
    m_prob: float = 0.2  # the mutation probability (each problem says of what)
    generations: int = 15
    supernet_recipe: Recipe = dataclasses.field(default_factory=lambda: Recipe(epochs=500))


class Evolution:
    """The evolutionary search with a memory of evaluated candidates (resumable by generation). ``settings``
    needs the fields of :class:`EvolutionSettings`; ``score`` maps a candidate to its validation top-1."""

    def __init__(self, settings, problem: Problem, score: Callable[[Any], float], seed: int, state: Path | None = None):
        self.settings, self.problem, self.score, self.state = settings, problem, score, state
        self.rng = random.Random(seed)
        self.accuracy: dict[Hashable, float] = {}
        self.candidates: list = []
        self.top: list = []
        self.generation = 0
        self.history: list[dict] = []
        if state is not None and state.is_file():
            self._load(state)

    def params(self, candidate) -> int:
        return self.problem.params(candidate)

    def _legal(self, candidate) -> bool:
        key, params = self.problem.key(candidate), self.params(candidate)
        low = getattr(self.settings, "min_budget_m", 0.0) * 1e6
        if key in self.accuracy or params > self.settings.budget_m * 1e6 or params < low:
            return False
        self.accuracy[key] = self.score(candidate)
        return True

    def _fill(self, make, wanted: int, attempts: int) -> list:
        found: list = []
        while len(found) < wanted and attempts > 0:
            attempts -= 1
            candidate = make()
            if self._legal(candidate):
                found.append(candidate)
        return found

    def _random_fill(self) -> None:
        missing = self.settings.population - len(self.candidates)
        self.candidates += self._fill(lambda: self.problem.random(self.rng), missing, 100 * self.settings.population)
        if not self.top and not self.candidates:
            raise UserError(
                f"no {self.problem.label} candidate of the search space fits the budget of {self.settings.budget_m}M "
                "parameters"
            )

    def _ranked(self) -> list:
        unique = {self.problem.key(c): c for c in self.top + self.candidates}
        return sorted(unique.values(), key=self._key)

    def _generation(self) -> None:
        s, rng = self.settings, self.rng
        self.top = self._ranked()[: s.select]
        best = self.top[0]
        self.history.append({"generation": self.generation, "best_val_top1": self._acc(best),
                             "best_params": self.params(best), "evaluated": len(self.accuracy)})  # fmt: skip
        mutations = self._fill(lambda: self.problem.mutate(rng, rng.choice(self.top)), s.mutation, 10 * s.mutation)
        crossovers = self._fill(lambda: self.problem.crossover(rng, rng.choice(self.top), rng.choice(self.top)),
                                s.crossover, 10 * s.crossover)  # fmt: skip
        self.candidates = mutations + crossovers
        self._random_fill()
        self.generation += 1

    def run(self, progress=None):
        """The best candidate after ``generations`` generations (highest accuracy, then fewest parameters)."""
        if self.generation == 0 and not self.candidates:
            self._random_fill()
        label = f"{self.problem.label} evolution"
        bar = progress.add_task(label, total=self.settings.generations, completed=self.generation) if progress else None
        while self.generation < self.settings.generations:
            self._generation()
            if self.state is not None:
                self._save(self.state)
            if progress:  # the best so far, this generation's children included (what the pick would be)
                leader = min(self.top + self.candidates, key=self._key)
                progress.update(bar, advance=1, description=f"{label}: best val {self._acc(leader):.2f}")
        return self._ranked()[0]

    def _acc(self, candidate) -> float:
        return self.accuracy[self.problem.key(candidate)]

    def _key(self, candidate):
        return (-self._acc(candidate), self.params(candidate), self.problem.key(candidate))

    def _save(self, path: Path) -> None:
        state = {
            "generation": self.generation,
            "rng": _jsonable(self.rng.getstate()),
            "accuracy": [[_jsonable(key), acc] for key, acc in self.accuracy.items()],
            "candidates": [self.problem.to_json(c) for c in self.candidates],
            "top": [self.problem.to_json(c) for c in self.top],
            "history": self.history,
        }
        write_atomic(path, json.dumps(state))

    def _load(self, path: Path) -> None:
        state = json.loads(path.read_text())
        self.generation = state["generation"]
        self.rng.setstate(_tuples(state["rng"]))
        self.accuracy = {_tuples(key): acc for key, acc in state["accuracy"]}
        self.candidates = [self.problem.from_json(c) for c in state["candidates"]]
        self.top = [self.problem.from_json(c) for c in state["top"]]
        self.history = state["history"]


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def search_folder(output: Path, kind: str, task: str, backbone: str, seed: int, settings, pretrained: str) -> Path:
    """``OUTPUT/<kind>-search/<task>__<backbone>__s<seed>__<digest of everything that defines the search>``."""
    identity = json.dumps([task, backbone, seed, pretrained, dataclasses.asdict(settings)], sort_keys=True, default=str)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:10]
    return output / f"{kind}-search" / f"{paths.safe_name(task)}__{paths.safe_name(backbone)}__s{seed}__{digest}"


def train_supernet(prepared, recipe, folder: Path, about: dict, device, *, label: str, before_step=None,
                   progress=None, stem: str = "supernet") -> None:  # fmt: skip
    """Train a supernet (``before_step(epoch, step)`` picks the candidate of each step, if the supernet does
    not draw its own), or any model a search starts from, and write its weights and log into ``folder``
    (``<stem>.safetensors``, ``<stem>.json``); its state is saved as it goes (``<stem>_resume.pt``)."""
    model = prepared.model
    bar = progress.add_task(label, total=recipe.epochs) if progress else None
    result = fit(
        model, prepared.train, None, prepared.normalizer, recipe, device=device, seed=about["seed"],
        before_step=before_step, resume=folder / f"{stem}_resume.pt",
        on_epoch=(lambda e: progress.update(bar, advance=1, description=f"{label}: loss {e.loss:.3f}"))
        if progress else None,
    )  # fmt: skip
    save_trainable(model, folder / f"{stem}.safetensors")
    (folder / f"{stem}_resume.pt").unlink(missing_ok=True)
    write_atomic(folder / f"{stem}.json", json.dumps({
        **about, "recipe": dataclasses.asdict(recipe), "epochs": [dataclasses.asdict(e) for e in result.epochs],
        "train_seconds": result.train_seconds, "finished_at": records.now(),
    }, indent=1))  # fmt: skip
