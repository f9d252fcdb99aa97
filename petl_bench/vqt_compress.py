"""VQT's compression (official andytu28/VQT ``run_vqt_vtab_sparsity.sh``, ``head2toe_sparsity_train.py``,
``src/engine/h2t_sparsity_trainer.py``), as three ordinary ``vqt`` runs per seed on train800val200 -> test:

1. the plain run;
2. ``compress``: the first run's query tokens (``start``; its classifier is dropped and a new one drawn),
   the loss plus ``group_lasso * sum_f ||W_head[:, f]||_2`` (``LRP_COEF`` 1e-4), at half the learning rate;
3. ``featselect``: the first run's query tokens again, a classifier on the ``keep`` share (``KEEP_FRAC`` 0.7)
   of the features whose columns in the second run's classifier have the largest L2 norm (``select``), at
   half the learning rate, without the lasso. The official demo reports this run.

Each is a run of the ledger (skipped once finished, resumed after a crash) whose identity holds the content
of the checkpoints it starts from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import Recipe
from .errors import UserError
from .ledger import run_folder
from .planning import Job, plan
from .runner import run_sweep

STAGES = ("plain", "group lasso", "kept features")


@dataclass
class CompressSettings:
    """The official ``LRP_COEF``, ``KEEP_FRAC`` and the halved learning rate of the later stages."""

    group_lasso: float = 1e-4
    keep: float = 0.7
    lr_factor: float = 0.5

    def __post_init__(self) -> None:  # checked before the first of the runs trains
        if not 0.0 < self.keep < 1.0:
            raise UserError(f"--keep takes a share of the features in (0, 1), got {self.keep}")
        if not self.group_lasso >= 0.0 or not 0.0 < self.lr_factor:
            raise UserError(f"--group-lasso takes a weight >= 0, got {self.group_lasso}")


def run_compression(task, *, backbone: str, pretrained: str, recipe: Recipe, seeds: list[int], data_root,
                    output: Path, device, settings: CompressSettings, progress=None) -> list[list[Job]]:  # fmt: skip
    """The three runs of every seed, in order (each needs the one before); returns them per seed."""

    def job(seed: int, lr: float, values: dict) -> Job:
        return plan(["vqt"], [task], [backbone], [seed], protocol="final", pretrained=pretrained,
                    recipe=recipe.replace(lr=lr), settings={"vqt": values}, data_root=data_root)[0]  # fmt: skip

    def run(stage: str, one: Job) -> str:
        summary = run_sweep([one], output, device=device, progress=progress)
        if summary.failed or summary.busy:
            reason = summary.failed[0][1] if summary.failed else "it is training in another process"
            raise UserError(f"VQT compression stopped at its {stage} run ({one.run_id}): {reason}")
        return str(run_folder(output, one.run_id))

    chains, later = [], recipe.lr * settings.lr_factor
    for seed in seeds:
        plain = job(seed, recipe.lr, {})
        start = run(STAGES[0], plain)
        lasso = job(seed, later, {"start": start, "group_lasso": settings.group_lasso})
        select = run(STAGES[1], lasso)
        kept = job(seed, later, {"start": start, "select": select, "keep": settings.keep})
        run(STAGES[2], kept)
        chains.append([plain, lasso, kept])
    return chains
