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
from typing import Any, Callable

from . import records
from .config import Recipe, parse_value
from .errors import UserError
from .model import RECIPE_GRID, get_method
from .planning import Job, SweepSpec, parse_settings, plan
from .registry import METHODS

SEARCHES = ("grid", "halving")
TUNED = "tuned"
HALVING_KEEP = 3  # keep the best 1/3 at each rung, rungs three times longer


def method_grid(method: str, overrides: dict[str, dict[str, tuple]] | None = None) -> dict[str, tuple]:
    """The axes a method is tuned over, ``{"lr": (...), "scale": (...)}``: its recipe grid and search
    space, with ``--grid`` overrides (``recipe`` scope for every method, the method's own scope)."""
    method_obj = get_method(method)
    overrides = overrides or {}
    recipe_axes = dict(RECIPE_GRID if method_obj.recipe_grid is None else method_obj.recipe_grid)
    if method_obj.recipe_grid != {}:  # a method with nothing to train keeps its empty grid
        recipe_axes.update(overrides.get("recipe", {}))
    axes = {**recipe_axes, **method_obj.search_space}
    axes.update(overrides.get(method_obj.name, {}))
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
            tunable = ", ".join(sorted(k for k in types if k not in Recipe.EXECUTION and not k.isupper()))
            raise UserError(f"--grid {item!r}: {scope} has no setting {key!r} to tune; settings: {tunable}")
        parsed = tuple(parse_value(v.strip(), types[key], f"{scope}.{key}") for v in values.split(","))
        grid.setdefault(scope, {})[key] = tuple(dict.fromkeys(parsed))  # a value given twice is one configuration
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

    def axes(self, methods: list[str]) -> dict[str, dict[str, tuple]]:
        """Each method's tuning axes: its grid with the ``--grid`` overrides (checked)."""
        grid = parse_grid(self.grid, methods)
        return {method: method_grid(method, grid) for method in methods}

    def groups(self) -> dict[tuple[str, str, str], tuple[list[dict], Job]]:
        """(method, task, backbone) -> (its grid points, one base job)."""
        if self.search not in SEARCHES:
            raise UserError(f"unknown search '{self.search}'; choose from: {', '.join(SEARCHES)}")
        base = self.base_jobs()
        points = {method: grid_points(axes) for method, axes in self.axes(sorted({j.method for j in base})).items()}
        groups = {}
        for job in base:
            groups.setdefault((job.method, job.task.key, job.backbone), (points[job.method], job))
        return groups

    def grid_rows(self) -> list[dict]:
        """Every method's grid, its configurations and stage-1 runs (for ``tune --dry-run``)."""
        groups = self.groups()
        methods = sorted({key[0] for key in groups})
        rows = []
        for method, axes in self.axes(methods).items():
            pairs = sum(1 for key in groups if key[0] == method)
            configurations = len(grid_points(axes))
            rows.append({"method": method, "grid": "; ".join(f"{k}={','.join(map(str, v))}" for k, v in axes.items()),
                         "configurations": configurations, "stage-1 runs": configurations * pairs})  # fmt: skip
        return rows

    def rungs(self, groups: dict | None = None) -> int:
        if self.search == "grid":
            return 1
        sizes = [len(points) for points, _ in (groups or self.groups()).values()]
        return max(1, max((math.ceil(math.log(n, HALVING_KEEP)) for n in sizes if n > 1), default=0) + 1)

    def jobs(self) -> list[Job]:
        if self.stage == 1:
            return [job for _, jobs in self.stage_one(self.rung).items() for _, job in jobs]
        return self.stage_two()

    def _configured(self, base: Job, point: dict, seeds: list[int], protocol: str, epochs: int | None = None):
        """The jobs of ``base`` with the configuration ``point`` (and ``epochs``), one per seed."""
        settings = parse_settings(self.settings)
        scoped = {**settings.get(base.method, {}), **point}  # typed grid values: parsed once, from --grid
        if epochs is not None:
            scoped["epochs"] = epochs
        return plan([base.method], [base.task], [base.backbone], seeds, protocol=protocol, pretrained=base.pretrained,
                    recipe=base.recipe, settings={**settings, base.method: scoped}, data_root=base.data_root)  # fmt: skip

    def _point_jobs(self, base: Job, points: list[dict], seed: int, epochs: int | None) -> list[tuple[dict, Job]]:
        """Stage-1 jobs, each carrying its configuration (shown by ``--dry-run``, logged, recorded)."""
        return [
            (point, dataclasses.replace(self._configured(base, point, [seed], "tune", epochs)[0],
                                        tuning={"configuration": dict(point)}))
            for point in points
        ]  # fmt: skip

    def _rung_epochs(self, base: Job, rung: int, rungs: int) -> int | None:
        if self.search == "grid" or rung == rungs - 1:
            return None
        return max(1, base.recipe.epochs // HALVING_KEEP ** (rungs - 1 - rung))

    def stage_one(self, rung: int | None = None, groups: dict | None = None) -> dict[tuple, list[tuple[dict, Job]]]:
        """Per (method, task, backbone): the (configuration, job) pairs of stage 1 at ``rung`` (the
        survivors of the rungs before it, read from their records)."""
        groups = groups or self.groups()
        rungs = self.rungs(groups)
        rung = rungs - 1 if rung is None else rung
        stage: dict[tuple, list[tuple[dict, Job]]] = {}
        for key, (points, base) in groups.items():
            seed = (self.seeds or [base.seed])[0]
            survivors = points
            for earlier in range(rung):
                scored = self._scored(self._point_jobs(base, survivors, seed, self._rung_epochs(base, earlier, rungs)))
                if any(record is None for _, _, record in scored):
                    raise UserError(f"halving rung {earlier} of {key[0]} on {key[1]} has not finished; run it first")
                ranked = sorted(range(len(scored)), key=lambda i: (-scored[i][2].metrics.top1, i))
                keep = max(1, math.ceil(len(scored) / HALVING_KEEP))
                survivors = [scored[i][0] for i in sorted(ranked[:keep])]
            stage[key] = self._point_jobs(base, survivors, seed, self._rung_epochs(base, rung, rungs))
        return stage

    def _scored(self, pairs: list[tuple[dict, Job]]) -> list[tuple[dict, Job, records.RunRecord | None]]:
        """Each (configuration, job) with its record, None while it has none (or an invalid one)."""
        out = []
        for point, job in pairs:
            try:
                out.append((point, job, records.read_record(Path(self.output) / job.run_id / records.RECORD)))
            except ValueError:
                out.append((point, job, None))
        return out

    def stage_two(self) -> list[Job]:
        """The winners, retrained under ``tuned`` with every seed, each carrying its selection."""
        groups = self.groups()
        seeds = list(dict.fromkeys(base.seed for base in self.base_jobs()))
        jobs = []
        for key, pairs in self.stage_one(groups=groups).items():
            scored = self._scored(pairs)
            missing = sum(record is None for _, _, record in scored)
            if missing:  # choosing among part of the grid would not be the same effort
                raise UserError(
                    f"stage 1 of {key[0]} on {key[1]} ({key[2]}) has {missing} of {len(scored)} "
                    f"configurations unfinished (failed or still running); finish stage 1 first"
                )
            best = min(range(len(scored)), key=lambda i: (-scored[i][2].metrics.top1, i))
            points, base = groups[key]
            tuning = self._selection(scored, best, len(points))
            jobs += [
                dataclasses.replace(job, tuning=tuning) for job in self._configured(base, scored[best][0], seeds, TUNED)
            ]
        return jobs

    def choice_rows(self, jobs: list[Job] | None = None) -> list[dict]:
        """The configuration stage 1 chose for each (method, task, backbone), with its val200 top-1."""
        chosen = {}
        for job in jobs if jobs is not None else self.stage_two():
            values = ", ".join(f"{k}={v}" for k, v in job.tuning["chosen"].items())
            chosen[(job.method, job.task.key, job.backbone)] = {
                "method": job.method, "task": job.task.key, "backbone": job.backbone, "chosen": values or "-",
                "val200 top-1": f"{job.tuning['chosen_val_top1']:.1f}", "of": len(job.tuning["configurations"]),
            }  # fmt: skip
        return list(chosen.values())

    def _selection(self, scored: list, best: int, grid_size: int) -> dict:
        """How stage 2's configuration was chosen: every configuration's val200 top-1, and the cost."""
        stage_one = [record for _, _, record in scored]
        seconds = sum(r.cost.seconds.total for r in stage_one)
        images = sum((r.metrics.train_images or 0) * r.hparams.recipe.get("epochs", 0)
                     + (r.metrics.eval_images or 0) for r in stage_one)  # fmt: skip
        search = "successive halving" if self.search == "halving" else "grid search"
        return {
            "selection": f"chosen on val200 among {grid_size} configurations ({search}, seed {stage_one[0].seed})",
            "search": self.search,
            "chosen": dict(scored[best][0]),
            "chosen_val_top1": scored[best][2].metrics.top1,
            "configurations": [
                {"values": dict(p), "val_top1": r.metrics.top1, "run_id": job.run_id} for p, job, r in scored
            ],
            "search_cost": {"runs": len(stage_one), "seconds": seconds, "images": images},
        }


@dataclass
class Tuned:
    """What :func:`run_tuned` did: each stage it ran, as (title, outcome), and why it stopped early (None
    when stage 2 ran): ``dry run``, ``submitted`` (stage 1 went to SLURM), ``busy`` (another process is
    training part of stage 1) or ``search only``."""

    stages: list[tuple[str, Any]] = field(default_factory=list)
    stopped: str | None = None


def stage_title(rung: int, rungs: int) -> str:
    return f"stage 1{f', rung {rung + 1}/{rungs}' if rungs > 1 else ''} (train800 -> val200)"


STAGE_TWO = "stage 2 (train800val200 -> test, every seed)"


def run_tuned(
    spec: TuneSpec, execute: Callable[[TuneSpec, str], Any], *, dry_run: bool = False, search_only: bool = False,
    on_chosen: Callable[[TuneSpec], None] | None = None,
) -> Tuned:  # fmt: skip
    """The tuned protocol from the first stage-1 rung to stage 2. ``execute(stage_spec, title)`` checks
    and runs one stage as any sweep (returning an :class:`executors.Outcome`, or None for a dry run);
    ``on_chosen(spec)`` is called between the stages, when the choices are known. A dry run lists stage 1
    (its first rung: later rungs depend on earlier results) and stops; stage 2 needs every stage-1 run."""
    tuned, rungs = Tuned(), spec.rungs()
    for rung in range(rungs):
        title = stage_title(rung, rungs)
        if dry_run and rung:
            continue
        outcome = execute(dataclasses.replace(spec, stage=1, rung=rung), title)
        tuned.stages.append((title, outcome))
        if dry_run:
            continue
        if outcome.summary is None:
            tuned.stopped = "submitted"
            return tuned
        if outcome.summary.busy:
            tuned.stopped = "busy"
            return tuned
    if dry_run:
        tuned.stopped = "dry run"
        return tuned
    if on_chosen:
        on_chosen(spec)
    if search_only:
        tuned.stopped = "search only"
        return tuned
    tuned.stages.append((STAGE_TWO, execute(dataclasses.replace(spec, stage=2), STAGE_TWO)))
    return tuned
