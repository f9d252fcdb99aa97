"""What a new user meets: the same number whatever the cache holds, plans before work, output in logs."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import make_task_folder

import petl_bench as pb
from petl_bench import records
from petl_bench.engine import Recipe
from petl_bench.runner import plan, run_sweep
from petl_bench.task import folder_task

TINY = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)


def _drawing_weights(path):
    """A weight source that, like the demo backbone's one-time conversion, draws random numbers the
    first time (building and checking a model) and then caches its file."""

    def weights():
        if not path.exists():
            from safetensors.torch import save_file

            torch.randn(1000), np.random.rand(10), random.random()
            model = pb.build_backbone("vit_tiny_patch16_224", "none", image_size=16, **TINY)[0]
            save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("head")}, path)
        return path

    return weights


def test_the_same_run_gives_the_same_record_on_a_cold_and_a_warm_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PETL_BENCH_CACHE", str(tmp_path / "cold-cache"))
    name = "cold_warm_test_vit"
    if name not in pb.BACKBONES:
        source = pb.BackboneSource(name, "vit_tiny_patch16_224", _drawing_weights(tmp_path / "w.safetensors"),
                                   model_kwargs=TINY)  # fmt: skip
        pb.register_backbone(source, name=name)
    task = folder_task(make_task_folder(tmp_path / "colours"))
    jobs = plan(["linear", "lora"], [task], [name], [0], protocol="final", pretrained="hub",
                recipe=Recipe(epochs=3, batch_size=8, image_size=16))  # fmt: skip
    cold = run_sweep(jobs, tmp_path / "cold", device=torch.device("cpu"))
    assert not list((tmp_path / "cold-cache").rglob(".*tmp*"))
    warm = run_sweep(jobs, tmp_path / "warm", device=torch.device("cpu"))
    for first, second in zip(cold.finished, warm.finished):
        assert first.run_id == second.run_id
        assert first.metrics["top1"] == second.metrics["top1"]
        losses = [
            [line for line in (out / r.run_id / records.EPOCH_LOG).read_text().splitlines()]
            for out, r in ((tmp_path / "cold", first), (tmp_path / "warm", second))
        ]
        assert [line.split('"loss": ')[1].split(",")[0] for line in losses[0]] == [
            line.split('"loss": ')[1].split(",")[0] for line in losses[1]
        ], f"{first.method}: the epoch losses differ between a cold and a warm cache"


@pytest.mark.parametrize("epochs,warmup", [(100, 10), (5, 1), (10, 1), (30, 3), (1, 0)])
def test_warmup_is_ten_percent_of_the_schedule_and_keeps_the_paper_identity(epochs, warmup):
    assert Recipe(epochs=epochs).warmup == warmup
    assert Recipe(epochs=7, warmup_epochs=2).warmup == 2
    paper = Recipe().identity()
    assert paper["warmup_epochs"] == 10 and "warmup_fraction" not in paper
