"""``petl-bench glora search``: GLoRA's supernet training, evolutionary search on val and retraining of the
chosen paths, from the command line (the search itself is :mod:`petl_bench.glora_search`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import typer

from .cli_noah import SearchTarget
from .cli_sweep import with_options

glora_app = typer.Typer(help="GLoRA: supernet training, evolutionary search of every layer's path, retraining.")


@dataclass
class GLoRASearchOptions(SearchTarget):
    """GLoRA's search settings (the official defaults)."""

    rank: int = typer.Option(4, help="LoRA rank of the A, B, C paths (official --rank: 4).")
    budget: float = typer.Option(1.0, help="Parameter limit in millions (official --param-limits: 1.00).")
    min_budget: float = typer.Option(0.0, help="Lower parameter limit in millions (official --min-param-limits).")
    supernet_epochs: int = typer.Option(500, help="Supernet training epochs (official: 500).")
    supernet_lr: float = typer.Option(1e-4, help="Supernet learning rate (official: 1e-4).")
    population: int = typer.Option(50, help="Candidates per generation (official: 50).")
    select: int = typer.Option(10, help="Parents kept per generation (official: 10).")
    mutation: int = typer.Option(25, help="Children made by mutation per generation (official: 25).")
    crossover: int = typer.Option(25, help="Children made by crossover per generation (official: 25).")
    m_prob: float = typer.Option(0.2, help="Probability that a mutation re-draws a component of a layer (0.2).")
    generations: int = typer.Option(20, help="Generations of the evolutionary search (official: 20).")

    def settings(self, recipe):
        from .glora_search import GLoRASearchSettings

        return GLoRASearchSettings(
            rank=self.rank, budget_m=self.budget, min_budget_m=self.min_budget, population=self.population,
            select=self.select, mutation=self.mutation, crossover=self.crossover, m_prob=self.m_prob,
            generations=self.generations,
            supernet_recipe=recipe.replace(epochs=self.supernet_epochs, lr=self.supernet_lr),
        )  # fmt: skip


def _paths_line(found: dict, path: Path) -> str:
    return (f"paths of {len(found['paths'])} layers: val top-1 {found['val_top1']:.2f}, {found['params']:,} "
            f"parameters; written to {path}")  # fmt: skip


@glora_app.command("search")
@with_options(GLoRASearchOptions)
def glora_search_command(*, options: GLoRASearchOptions) -> None:
    """Train a GLoRA supernet on train, search every layer's path on val under a budget, retrain on train+val."""
    from .glora_search import run_glora_search

    options.run(run_glora_search, options.settings, _paths_line, "glora",
                lambda path: {"paths": str(path), "rank": str(options.rank)})  # fmt: skip
