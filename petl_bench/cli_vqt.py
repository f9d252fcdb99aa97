"""``petl-bench vqt compress``: VQT's compression of its classifier's features from the command line (the
three runs per seed are :mod:`petl_bench.vqt_compress`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import typer

from . import records
from .cli_noah import TaskTarget
from .cli_sweep import integers, print_tables, progress_bars, with_options

vqt_app = typer.Typer(help="VQT: compress the classifier's features (group lasso, keep the strongest, retrain).")


@dataclass
class CompressOptions(TaskTarget):
    """VQT's compression settings (the official defaults)."""

    lr: Optional[float] = typer.Option(None, help="Learning rate of the plain run (default: the suite's); "
                                                  "the later runs take half of it, as officially.")  # fmt: skip
    keep: float = typer.Option(0.7, help="Share of the classifier's features kept (official KEEP_FRAC: 0.7).")
    group_lasso: float = typer.Option(1e-4, help="Group-lasso weight of the second run (official LRP_COEF: 1e-4).")
    seeds: Optional[str] = typer.Option(None, help="Seeds, each its own three runs (default: --seed; the "
                                                   "official five: 42,44,82,100,800).")  # fmt: skip


@vqt_app.command("compress")
@with_options(CompressOptions)
def compress_command(*, options: CompressOptions) -> None:
    """Per seed: a plain VQT run; a run from its query tokens with a group lasso on the classifier's columns;
    a run from its query tokens with a classifier on the features whose columns were strongest."""
    from .vqt_compress import CompressSettings, run_compression

    target = options.target()
    recipe = target.recipe.replace(**({"lr": options.lr} if options.lr is not None else {}))
    settings = CompressSettings(group_lasso=options.group_lasso, keep=options.keep)
    with progress_bars() as progress:
        chains = run_compression(
            target.task, backbone=target.backbone, pretrained=options.pretrained, recipe=recipe,
            seeds=integers(options.seeds, "--seeds") or [options.seed], data_root=target.data_root,
            output=options.output, device=target.device, settings=settings, progress=progress,
        )  # fmt: skip
    ids = {job.run_id for chain in chains for job in chain}
    print_tables([r for r in records.load_records(options.output) if r.run_id in ids])
