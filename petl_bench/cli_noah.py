"""``petl-bench noah search``: NOAH's supernet training, evolutionary search on val and retraining of
the winner, from the command line (the search itself is :mod:`petl_bench.noah_search`). :class:`SearchTarget`
holds what every supernet search command shares (GLoRA's too): the task, backbone, seed, retraining."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from . import records
from .cli_sweep import O_DATA_ROOT, PluginOption, integers, print_tables, progress_bars, with_options
from .errors import UserError
from .output import console

noah_app = typer.Typer(help="NOAH: supernet training, evolutionary search and retraining of the winner.")


@dataclass
class TaskTarget:
    """The options of a command that trains on one task: what it runs on, where, and where results go."""

    task: Optional[str] = typer.Option(None, help="A registered task (e.g. a VTAB-1K task or demo_digits).")
    task_dir: Optional[Path] = typer.Option(None, "--task-dir", help="Or a folder with train/val/test lists.")
    backbone: Optional[str] = typer.Option(None, help="Backbone (default: the task's suite's).")
    pretrained: str = typer.Option("hub", help="hub, none, or a weights file.")
    data_root: Optional[Path] = O_DATA_ROOT
    seed: int = typer.Option(0, help="Seed of what this command trains (a search, its runs).")
    epochs: Optional[int] = typer.Option(None, help="Epochs of the runs (default: the suite's recipe).")
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size (default: the suite's recipe).")
    image_size: Optional[int] = typer.Option(None, help="Input size (default: the suite's or the backbone's).")
    output: Path = typer.Option(Path("results/runs"), help="Run folders; searches go to OUTPUT/<method>-search/.")
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N].")
    plugin: Optional[list[Path]] = PluginOption

    def target(self) -> "Searched":
        """The task, its backbone and recipe, the device and the data root (plugins loaded, options checked)."""
        from . import planning, registry, runner
        from .paths import data_root_from

        for path in self.plugin or []:
            registry.load_plugin(path)
        if (self.task is None) == (self.task_dir is None):
            raise UserError("give exactly one of --task or --task-dir")
        overrides = {"epochs": self.epochs, "batch_size": self.batch_size, "image_size": self.image_size}
        chosen, backbone, recipe = planning.one_task(self.task, self.task_dir, self.backbone, overrides)
        return Searched(None, chosen, backbone, recipe, runner.pick_device(self.device), data_root_from(self.data_root))


@dataclass
class SearchTarget(TaskTarget):
    """The options every supernet search shares: the task target, and whether its result is retrained."""

    retrain: bool = typer.Option(True, help="Retrain the search's result on train+val and test it.")

    def searched(self, search, settings_of) -> "Searched":
        """Run ``search`` (its settings from the task's recipe) on the chosen task; what it found, and where."""
        found = self.target()
        with progress_bars() as progress:
            file = search(
                found.task, backbone=found.backbone, pretrained=self.pretrained, data_root=found.data_root,
                output=self.output, seed=self.seed, settings=settings_of(found.recipe), device=found.device,
                image_size=found.recipe.image_size, progress=progress,
            )  # fmt: skip
        return dataclasses.replace(found, file=file)

    def run(self, search, settings_of, describe: Callable[[dict, Path], str], method: str,
            method_settings: Callable[[Path], dict]) -> None:  # fmt: skip
        """Run ``search``, print what it found, then retrain it as a normal ``method`` run with
        ``method_settings(result file)``."""
        from . import planning, runner

        searched = self.searched(search, settings_of)
        console.print(describe(json.loads(searched.file.read_text()), searched.file))
        if not self.retrain:
            return
        jobs = planning.plan(
            [method], [searched.task], [searched.backbone], [self.seed], protocol="final", pretrained=self.pretrained,
            recipe=searched.recipe, settings={method: method_settings(searched.file)}, data_root=searched.data_root,
        )  # fmt: skip
        with progress_bars() as progress:
            runner.run_sweep(jobs, self.output, device=searched.device, progress=progress)
        print_tables([r for r in records.load_records(self.output) if r.run_id == jobs[0].run_id])


@dataclass
class Searched:
    """What a search command's search found (its result file, None before it ran), on what, and where."""

    file: Optional[Path]
    task: Any
    backbone: str
    recipe: Any
    device: Any
    data_root: Optional[Path]


@dataclass
class SearchOptions(SearchTarget):
    """NOAH's search settings (its defaults; ``generations`` as in its VTAB script)."""

    budget: float = typer.Option(0.64, help="Parameter limit in millions (NOAH's --param-limits).")
    counter: str = typer.Option(
        "noah", help="Budget counter: noah (NOAH's, dead prompt parameters included) or effective."
    )
    supernet_epochs: int = typer.Option(500, help="Supernet training epochs (NOAH: 500).")
    supernet_lr: float = typer.Option(5e-4, help="Supernet learning rate (NOAH: 5e-4).")
    population: int = typer.Option(50, help="Candidate subnets per generation (NOAH: 50).")
    select: int = typer.Option(10, help="Parents kept per generation (top-k).")
    mutation: int = typer.Option(25, help="Children made by mutation per generation (NOAH: 25).")
    crossover: int = typer.Option(25, help="Children made by crossover per generation (NOAH: 25).")
    m_prob: float = typer.Option(0.2, help="Probability that a mutation changes a module's depth (NOAH: 0.2).")
    s_prob: float = typer.Option(0.4, help="Probability that a mutation changes a block's size (NOAH: 0.4).")
    generations: int = typer.Option(15, help="Generations of the evolutionary search (NOAH: 15).")
    sizes: str = typer.Option("1,5,10", help="Candidate prompt lengths / LoRA ranks / adapter widths.")
    depths: str = typer.Option("3,6,9,12", help="Candidate numbers of blocks carrying each module type.")

    def settings(self, recipe):
        from .noah_search import SearchSettings, SearchSpace

        space = SearchSpace(tuple(integers(self.sizes, "--sizes")), tuple(integers(self.depths, "--depths")))
        return SearchSettings(
            budget_m=self.budget, counter=self.counter, population=self.population, select=self.select,
            mutation=self.mutation, crossover=self.crossover, m_prob=self.m_prob, s_prob=self.s_prob,
            generations=self.generations, space=space,
            supernet_recipe=recipe.replace(epochs=self.supernet_epochs, lr=self.supernet_lr),
        )  # fmt: skip


def _subnet_line(found: dict, path: Path) -> str:
    return (
        f"subnet: prompt {found['prompt']}, lora {found['lora']}, adapter {found['adapter']}; "
        f"val top-1 {found['val_top1']:.2f}, {found['effective_params']:,} effective parameters "
        f"({found['noah_counted_params']:,} by NOAH's counter); written to {path}"
    )


@noah_app.command("search")
@with_options(SearchOptions)
def noah_search_command(*, options: SearchOptions) -> None:
    """Train a NOAH supernet on train, search a subnet on val under a budget, retrain it on train+val."""
    from .noah_search import run_search

    options.run(run_search, options.settings, _subnet_line, "noah", lambda path: {"subnet": str(path)})
