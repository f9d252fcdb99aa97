"""``petl-bench glora search``: GLoRA's supernet training, evolutionary search on val and retraining of the
chosen paths, from the command line (the search itself is :mod:`petl_bench.glora_search`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from . import records
from .cli_sweep import O_DATA_ROOT, PluginOption, print_tables, progress_bars, with_options
from .errors import UserError
from .output import console

glora_app = typer.Typer(help="GLoRA: supernet training, evolutionary search of every layer's path, retraining.")


@dataclass
class GLoRASearchOptions:
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


@glora_app.command("search")
@with_options(GLoRASearchOptions)
def glora_search_command(
    task: Optional[str] = typer.Option(None, help="A registered task (e.g. a VTAB-1K task or demo_digits)."),
    task_dir: Optional[Path] = typer.Option(None, "--task-dir", help="Or a folder with train/val/test lists."),
    backbone: Optional[str] = typer.Option(None, help="Backbone (default: the task's suite's)."),
    pretrained: str = typer.Option("hub", help="hub, none, or a weights file."),
    data_root: Optional[Path] = O_DATA_ROOT,
    seed: int = typer.Option(0, help="Seed of the supernet, the search and the retrain."),
    epochs: Optional[int] = typer.Option(None, help="Retrain epochs (default: the suite's recipe)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size (default: the suite's recipe)."),
    image_size: Optional[int] = typer.Option(None, help="Input size (default: the suite's or the backbone's)."),
    retrain: bool = typer.Option(True, help="Retrain the chosen paths on train+val and test them."),
    output: Path = typer.Option(Path("results/runs"), help="Run folders; the search goes to OUTPUT/glora-search/."),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]."),
    plugin: Optional[list[Path]] = PluginOption,
    *, options: GLoRASearchOptions,
) -> None:  # fmt: skip
    """Train a GLoRA supernet on train, search every layer's path on val under a budget, retrain on train+val."""
    from . import planning, registry, runner
    from .glora_search import run_glora_search
    from .paths import data_root_from

    for path in plugin or []:
        registry.load_plugin(path)
    if (task is None) == (task_dir is None):
        raise UserError("give exactly one of --task or --task-dir")
    overrides = {"epochs": epochs, "batch_size": batch_size, "image_size": image_size}
    chosen, backbone, recipe = planning.one_task(task, task_dir, backbone, overrides)
    target, root = runner.pick_device(device), data_root_from(data_root)
    with progress_bars() as progress:
        paths_file = run_glora_search(
            chosen, backbone=backbone, pretrained=pretrained, data_root=root, output=output, seed=seed,
            settings=options.settings(recipe), device=target, image_size=recipe.image_size, progress=progress,
        )  # fmt: skip
    found = json.loads(paths_file.read_text())
    console.print(f"paths of {len(found['paths'])} layers: val top-1 {found['val_top1']:.2f}, "
                  f"{found['params']:,} parameters; written to {paths_file}")  # fmt: skip
    if not retrain:
        return
    jobs = planning.plan(
        ["glora"], [chosen], [backbone], [seed], protocol="final", pretrained=pretrained, recipe=recipe,
        settings={"glora": {"paths": str(paths_file), "rank": str(options.rank)}}, data_root=root,
    )  # fmt: skip
    with progress_bars() as progress:
        runner.run_sweep(jobs, output, device=target, progress=progress)
    print_tables([r for r in records.load_records(output) if r.run_id == jobs[0].run_id])
