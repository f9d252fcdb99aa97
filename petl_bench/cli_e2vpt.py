"""``petl-bench e2vpt prune``: E2VPT's pruning and rewinding from the command line. The importance stage is
:mod:`petl_bench.e2vpt_prune`; the rewind grid and the final runs are ``petl-bench tune``'s two stages."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from .cli_noah import SearchTarget
from .cli_sweep import integers, run_tune, with_options
from .config import check_bounds
from .errors import UserError
from .output import console

e2vpt_app = typer.Typer(help="E2VPT: importance of its prompt masks, the rewind grid on val, the final runs.")

OFFICIAL_PERCENTS = "10,20,30,40,50,60,70,80,90"


@dataclass
class PruneOptions(SearchTarget):
    """E2VPT's pruning settings (the official defaults)."""

    lr: Optional[float] = typer.Option(
        None, help="Learning rate of every stage (default: the suite's; officially the one val200 chose unpruned)."
    )
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="Weight decay (default: the suite's).")
    tokens: Optional[int] = typer.Option(None, help="Visual prompt tokens p (default: the task's official p, else 10).")
    kv_tokens: Optional[int] = typer.Option(None, help="Key-value prompt tokens m (default: the task's, else 5).")
    pieces: int = typer.Option(16, help="Pieces per prompt token (official CLS_TOKEN_P_PIECES_NUM: 16).")
    percents: str = typer.Option(OFFICIAL_PERCENTS, help="Pruning levels in % of the tokens and of the pieces.")
    min_tokens: int = typer.Option(1, help="Tokens always kept (official MIN_NUMBER_CLS_TOKEN: 1).")
    min_pieces: int = typer.Option(4, help="Pieces always kept per token (official MIN_NUMBER_CLS_TOKEN_PIECE: 4).")
    seeds: Optional[str] = typer.Option(
        None, help="Seeds of the final runs (default: --seed; the official five: 42,44,82,100,800)."
    )

    def settings(self, recipe):
        from .e2vpt_prune import PruneSettings
        from .model import get_method

        sizes = {k: v for k, v in {"tokens": self.tokens, "kv_tokens": self.kv_tokens}.items() if v is not None}
        config = get_method("e2vpt").make_config(self.task, **sizes)
        percents = tuple(integers(self.percents, "--percents"))
        for label, value, low, high in (("--pieces", self.pieces, 1, None), ("--min-tokens", self.min_tokens, 0,
                                        config.tokens), ("--min-pieces", self.min_pieces, 0, self.pieces)):  # fmt: skip
            check_bounds(label, value, low, high, False)
        if not percents or any(not 0 < p < 100 for p in percents):
            raise UserError(f"--percents takes percentages between 0 and 100, got {self.percents!r}")
        changes = {k: v for k, v in {"lr": self.lr, "weight_decay": self.weight_decay}.items() if v is not None}
        return PruneSettings(tokens=config.tokens, kv_tokens=config.kv_tokens, pieces=self.pieces,
                             min_tokens=self.min_tokens, min_pieces=self.min_pieces, percents=percents,
                             recipe=recipe.replace(**changes))  # fmt: skip

    def rewind_spec(self, searched, found: dict):
        """The rewind grid and the final runs as a ``tune`` of ``e2vpt`` with the importance file."""
        from .e2vpt_prune import rewind_grid
        from .tuning import TuneSpec

        overrides = {"epochs": self.epochs, "batch_size": self.batch_size, "image_size": self.image_size}
        seeds = integers(self.seeds, "--seeds") or [self.seed]
        return TuneSpec(
            methods="e2vpt", tasks=[self.task] if self.task else [], task_dirs=[str(self.task_dir)] if self.task_dir
            else [], backbones=[searched.backbone], seeds=seeds, pretrained=self.pretrained,
            recipe_overrides={k: v for k, v in overrides.items() if v is not None},
            settings=[f"e2vpt.importance={searched.file}"], data_root=str(self.data_root) if self.data_root else None,
            plugins=[str(p) for p in self.plugin or []], output=str(self.output),
            grid=rewind_grid(found, found["recipe"]["lr"], found["recipe"]["weight_decay"]),
        )  # fmt: skip


def _importance_line(found: dict, path: Path) -> str:
    order = sorted(range(len(found["token_importance"])), key=lambda i: found["token_importance"][i])
    return (
        f"importance of {found['tokens']} prompt tokens x {len(found['piece_importance'][0])} pieces over "
        f"{found['train_images']} training images (tokens, least important first: {order}); rewind levels: "
        f"{found['token_levels']} tokens x {found['piece_levels']} pieces masked; written to {path}"
    )


def _tune_line(spec) -> str:
    """The ``petl-bench tune`` command the rewind stage is, for a user who stopped before it."""
    words = ["petl-bench", "tune", "--methods", "e2vpt", "--backbone", spec.backbones[0], "--seeds",
             ",".join(map(str, spec.seeds)), "--pretrained", spec.pretrained, "--output", spec.output]  # fmt: skip
    words += ["--tasks", spec.tasks[0]] if spec.tasks else ["--task-dir", spec.task_dirs[0]]
    for key, value in spec.recipe_overrides.items():
        words += [f"--{key.replace('_', '-')}", str(value)]
    words += [w for item in spec.settings for w in ("--set", item)] + [w for g in spec.grid for w in ("--grid", g)]
    words += [w for p in spec.plugins for w in ("--plugin", p)]
    words += ["--data-root", spec.data_root] if spec.data_root else []
    return shlex.join(words)


@e2vpt_app.command("prune")
@with_options(PruneOptions)
def prune_command(*, options: PruneOptions) -> None:
    """Train E2VPT with its token and piece masks on train and measure their importance; then retrain every
    pruning level from scratch on train, choose on val (tune's stage 1), retrain it on train+val and test it."""
    from .e2vpt_prune import run_importance
    from .executors import Execution

    searched = options.searched(run_importance, options.settings)
    found = json.loads(searched.file.read_text())
    console.print(_importance_line(found, searched.file), highlight=False)
    spec = options.rewind_spec(searched, found)
    if not options.retrain:
        console.print(f"the rewind grid and the final runs: {_tune_line(spec)}", highlight=False, soft_wrap=True)
        return
    run_tune(spec, Execution(options.output, options.device))
