"""The tuned protocol: search every method on train800 -> val200, retrain the winner, test once.

Stage 1 trains every configuration of a method's grid (its declared ``search_space`` crossed with its
recipe grid) under the ``tune`` protocol with the first seed; stage 2 retrains, for each (method,
task, backbone), the configuration with the best val200 top-1 (ties: the first in grid order) under
the ``tuned`` protocol (train800val200 -> test) with every seed. Both stages are ordinary runs in the
run-folder ledger, so a rerun skips what is finished and any executor can run them: a
:class:`TuneSpec` rebuilds the jobs of a stage (or of a halving rung) from plain values and the
records already written.

``search="halving"``: successive halving over the same grid. Rung r trains the survivors of rung
r - 1 for ``epochs / 3**(rungs - 1 - r)`` epochs and keeps the best third; the last rung runs the full
schedule. The winner is the best of the last rung.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import records
from .engine import Recipe
from .errors import UserError
from .model import RECIPE_GRID, get_method, parse_value
from .registry import METHODS
from .runner import Job, SweepSpec, parse_settings, plan

SEARCHES = ("grid", "halving")
TUNED = "tuned"
HALVING_KEEP = 3  # keep the best 1/3 at each rung, rungs three times longer


def method_grid(method: str, overrides: dict[str, dict[str, tuple]] | None = None) -> dict[str, tuple]:
    """The axes a method is tuned over, ``{"lr": (...), "scale": (...)}``: its recipe grid and search
    space, with ``--grid`` overrides (``recipe`` scope for every method, the method's own scope)."""
    runner = get_method(method)
    overrides = overrides or {}
    recipe_axes = dict(RECIPE_GRID if runner.recipe_grid is None else runner.recipe_grid)
    if runner.recipe_grid != {}:  # a method with nothing to train keeps its empty grid
        recipe_axes.update(overrides.get("recipe", {}))
    axes = {**recipe_axes, **runner.search_space}
    axes.update(overrides.get(runner.name, {}))
    return axes


def grid_points(axes: dict[str, tuple]) -> list[dict[str, Any]]:
    """Every configuration, in grid order (the product of the axes in declaration order)."""
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*(axes[n] for n in names))]


def parse_grid(items: list[str], methods: list[str]) -> dict[str, dict[str, tuple]]:
    """``["convpass.scale=0.1,1,10", "recipe.lr=1e-3,5e-3"]`` -> typed axes per scope; a UserError for an
    unknown method, an unknown key or a value that does not parse, before any training."""
    grid: dict[str, dict[str, tuple]] = {}
    for item in items:
        scope_key, sep, values = item.partition("=")
        scope, dot, key = scope_key.strip().partition(".")
        if not sep or not dot or not key or not values.strip():
            raise UserError(f"--grid expects SCOPE.KEY=V1,V2,... (e.g. convpass.scale=0.1,1,10), got {item!r}")
        scope = "recipe" if scope == "recipe" else METHODS.resolve(scope)
        types = typing.get_type_hints(Recipe)
        if scope != "recipe":
            types.update(typing.get_type_hints(get_method(scope).Config))
        if key not in types or key in Recipe.EXECUTION:
            raise UserError(f"--grid {item!r}: {scope} has no setting {key!r} to tune")
        parsed = tuple(parse_value(v.strip(), types[key], f"{scope}.{key}") for v in values.split(","))
        grid.setdefault(scope, {})[key] = parsed
    for scope in grid:
        if scope != "recipe" and scope not in methods:
            raise UserError(f"--grid names method '{scope}', which this tuning does not run ({', '.join(methods)})")
    return grid


@dataclass
class TuneSpec(SweepSpec):
    """A tuning stage as plain values: stage 1 (``rung`` for halving) or stage 2, rebuilt from the
    records under ``output`` by any process or SLURM task."""

    grid: list[str] = field(default_factory=list)
    search: str = "grid"
    stage: int = 1
    rung: int = 0
    output: str = "results/runs"

    def base_jobs(self) -> list[Job]:
        """The sweep's jobs as ``run`` would plan them (every seed, the spec's protocol)."""
        return SweepSpec.jobs(dataclasses.replace(self, protocol="final"))

    def rungs(self) -> int:
        if self.search == "grid":
            return 1
        sizes = [len(points) for points, _ in self._groups().values()]
        return max(1, max((math.ceil(math.log(n, HALVING_KEEP)) for n in sizes if n > 1), default=0) + 1)

    def _groups(self) -> dict[tuple[str, str, str], tuple[list[dict], Job]]:
        """(method, task, backbone) -> (its grid points, one base job)."""
        if self.search not in SEARCHES:
            raise UserError(f"unknown search '{self.search}'; choose from: {', '.join(SEARCHES)}")
        base = self.base_jobs()
        methods = sorted({job.method for job in base})
        grid = parse_grid(self.grid, methods)
        groups = {}
        for job in base:
            key = (job.method, job.task.key, job.backbone)
            if key not in groups:
                groups[key] = (grid_points(method_grid(job.method, grid)), job)
        return groups

    def jobs(self) -> list[Job]:
        if self.stage == 1:
            return [job for _, jobs in self.stage_one(self.rung).items() for _, job in jobs]
        return self.stage_two()

    def _point_jobs(self, base: Job, points: list[dict], seeds: list[int], protocol: str, epochs: int | None):
        settings = parse_settings(self.settings)
        out = []
        for point in points:
            scoped = {**settings.get(base.method, {}), **{k: str(v) for k, v in point.items()}}
            if epochs is not None:
                scoped["epochs"] = str(epochs)
            (job,) = plan([base.method], [base.task], [base.backbone], [seeds[0]], protocol=protocol,
                          pretrained=base.pretrained, recipe=base.recipe, settings={**settings, base.method: scoped},
                          data_root=base.data_root)  # fmt: skip
            out.append((point, job))
        return out

    def _rung_epochs(self, base: Job, rung: int, rungs: int) -> int | None:
        if self.search == "grid" or rung == rungs - 1:
            return None
        return max(1, base.recipe.epochs // HALVING_KEEP ** (rungs - 1 - rung))

    def stage_one(self, rung: int | None = None) -> dict[tuple, list[tuple[dict, Job]]]:
        """Per (method, task, backbone): the (configuration, job) pairs of stage 1 at ``rung`` (the
        survivors of the rungs before it, read from their records)."""
        rungs = self.rungs()
        rung = rungs - 1 if rung is None else rung
        stage: dict[tuple, list[tuple[dict, Job]]] = {}
        for key, (points, base) in self._groups().items():
            survivors = points
            for earlier in range(rung):
                scored = self._scores(self._point_jobs(base, survivors, self.seeds or [base.seed], "tune",
                                                       self._rung_epochs(base, earlier, rungs)))  # fmt: skip
                if any(score is None for _, _, score in scored):
                    raise UserError(f"halving rung {earlier} of {key[0]} on {key[1]} has not finished; run it first")
                ranked = sorted(range(len(scored)), key=lambda i: (-scored[i][2], i))
                keep = max(1, math.ceil(len(scored) / HALVING_KEEP))
                survivors = [scored[i][0] for i in sorted(ranked[:keep])]
            seeds = self.seeds or [base.seed]
            stage[key] = self._point_jobs(base, survivors, seeds, "tune", self._rung_epochs(base, rung, rungs))
        return stage

    def _scores(self, pairs: list[tuple[dict, Job]]) -> list[tuple[dict, Job, float | None]]:
        out = []
        for point, job in pairs:
            path = Path(self.output) / job.run_id / records.RECORD
            try:
                out.append((point, job, records.read_record(path).metrics["top1"]))
            except ValueError:
                out.append((point, job, None))
        return out

    def stage_two(self) -> list[Job]:
        """The winners, retrained under ``tuned`` with every seed, each carrying its selection."""
        jobs = []
        base_by_key = {key: base for key, (_, base) in self._groups().items()}
        all_points = {key: points for key, (points, _) in self._groups().items()}
        seeds = list(dict.fromkeys(job.seed for job in self.base_jobs()))
        for key, pairs in self.stage_one().items():
            scored = self._scores(pairs)
            done = [(i, point, job, score) for i, (point, job, score) in enumerate(scored) if score is not None]
            if len(done) < len(scored):  # choosing among part of the grid would not be the same effort
                raise UserError(
                    f"stage 1 of {key[0]} on {key[1]} ({key[2]}) has {len(scored) - len(done)} of {len(scored)} "
                    f"configurations unfinished (failed or still running); finish stage 1 first"
                )
            index, point, _, best = min(done, key=lambda item: (-item[3], item[0]))
            base = base_by_key[key]
            tuning = self._selection(key, point, best, scored, len(all_points[key]))
            for job in self._stage_two_jobs(base, point, seeds):
                jobs.append(dataclasses.replace(job, tuning=tuning))
        return jobs

    def _stage_two_jobs(self, base: Job, point: dict, seeds: list[int]) -> list[Job]:
        settings = parse_settings(self.settings)
        scoped = {**settings.get(base.method, {}), **{k: str(v) for k, v in point.items()}}
        return plan([base.method], [base.task], [base.backbone], seeds, protocol=TUNED, pretrained=base.pretrained,
                    recipe=base.recipe, settings={**settings, base.method: scoped}, data_root=base.data_root)  # fmt: skip

    def _selection(self, key, point, best, scored, grid_size) -> dict:
        stage_one = [records.read_record(Path(self.output) / job.run_id / records.RECORD)
                     for _, job, score in scored if score is not None]  # fmt: skip
        seconds = sum(r.cost["seconds"]["total"] for r in stage_one)
        images = sum(r.metrics.get("train_images", 0) * r.hparams.get("recipe", {}).get("epochs", 0)
                     + r.metrics.get("eval_images", 0) for r in stage_one)  # fmt: skip
        search = "successive halving" if self.search == "halving" else "grid search"
        return {
            "selection": f"chosen on val200 among {grid_size} configurations ({search}, seed {stage_one[0].seed})",
            "search": self.search,
            "chosen": {k: v for k, v in point.items()},
            "chosen_val_top1": best,
            "configurations": [
                {"values": dict(p), "val_top1": score, "run_id": job.run_id} for p, job, score in scored
            ],
            "search_cost": {"runs": len(stage_one), "seconds": seconds, "images": images},
        }
