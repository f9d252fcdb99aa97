"""GLoRA's search: the official operators over per-layer paths, counts consistent with the built model,
scoring on val (never test), a deterministic and reusable search, the chosen paths retrained by the CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import TINY_VIT, make_task_folder, run_cli, tiny_backbone

import petl_bench as pb
from petl_bench import glora_search, records
from petl_bench.glora_search import GLoRAProblem, GLoRASearchSettings, run_glora_search
from petl_bench.methods.glora import CHOICES, encoder_linears


def _problem() -> GLoRAProblem:
    backbone, info = tiny_backbone(TINY_VIT)
    shapes = [(backbone.get_submodule(n).out_features, backbone.get_submodule(n).in_features)
              for n in encoder_linears(backbone, info.head_path)]  # fmt: skip
    return GLoRAProblem(shapes, rank=4, m_prob=0.2)


def test_the_problems_count_is_the_built_models_and_its_operators_are_the_official_ones(tmp_path):
    problem, rng = _problem(), random.Random(0)
    first, second = problem.random(rng), problem.random(rng)
    assert len(first) == 8 and all(form in CHOICES[part] for layer in first for part, form in zip("ABCDE", layer))
    paths = tmp_path / "paths.json"
    paths.write_text(json.dumps(problem.to_json(first)))
    runner = pb.METHODS.get("glora")()
    model = pb.attach_method(*tiny_backbone(TINY_VIT), runner, runner.make_config(paths=str(paths)))
    assert pb.count_trainable(model)[0] == problem.params(first)
    assert problem.from_json(problem.to_json(first)) == first
    unchanged = GLoRAProblem(problem.shapes, 4, m_prob=0.0)
    assert unchanged.mutate(rng, first) == first, "m_prob 0: a mutation keeps every component"
    child = problem.crossover(rng, first, second)
    assert all(c in (a, b) for x, y, z in zip(first, second, child) for a, b, c in zip(x, y, z))


@pytest.mark.slow
def test_search_scores_val_only_is_deterministic_reused_and_retrained(monkeypatch, capsys, tmp_path, tiny_plugin):
    pb.load_plugin(tiny_plugin)
    from petl_bench.task import folder_task

    task = folder_task(make_task_folder(tmp_path / "colours", train=40, test=20))
    settings = GLoRASearchSettings(
        budget_m=0.01, population=6, select=2, mutation=2, crossover=2, generations=2,
        supernet_recipe=pb.engine.Recipe(epochs=2, batch_size=8, warmup_epochs=1, image_size=16),
    )  # fmt: skip
    scored = []
    evaluate = glora_search.evaluate

    def counting(model, data, *args, **kwargs):
        scored.append(len(data))
        return evaluate(model, data, *args, **kwargs)

    monkeypatch.setattr(glora_search, "evaluate", counting)
    found = []
    for output in ("a", "b"):
        paths_file = run_glora_search(task, backbone="tiny_test_vit", pretrained="none", data_root=None,
                                      output=tmp_path / output, seed=0, settings=settings,
                                      device=torch.device("cpu"))  # fmt: skip
        found.append(json.loads(paths_file.read_text()))
    validation = len(task.splits(None, "tune").eval)
    assert set(scored) == {validation} and validation < 40, "every candidate is scored on val, never on test"
    assert found[0]["paths"] == found[1]["paths"] and found[0]["val_top1"] == found[1]["val_top1"]
    assert found[0]["params"] <= 10_000 and len(found[0]["history"]) == 2
    scored.clear()
    assert run_glora_search(task, backbone="tiny_test_vit", pretrained="none", data_root=None, output=tmp_path / "b",
                            seed=0, settings=settings, device=torch.device("cpu")) == paths_file  # fmt: skip
    assert not scored, "a finished search is reused"
    code, _, stderr = run_cli(
        monkeypatch, capsys, "run", "--plugin", str(tiny_plugin), "--task-dir", str(task.location), "--methods",
        "glora", "--epochs", "1", "--set", f"glora.paths={paths_file}", "--output", str(tmp_path / "runs"),
        "--backbone", "tiny_test_vit", "--pretrained", "none", "--batch-size", "8", "--set", "recipe.image_size=16",
    )  # fmt: skip
    assert code == 0, stderr
    (record,) = records.load_records(tmp_path / "runs")
    assert record.cost.trainable_params == found[1]["params"]
    assert record.hparams.method["paths"] == found[1], "the paths' content identifies the run, not the file name"


def test_the_glora_search_command_prints_what_it_found(monkeypatch, capsys, tmp_path, tiny_plugin):
    task = make_task_folder(tmp_path / "colours")
    code, stdout, stderr = run_cli(
        monkeypatch, capsys, "glora", "search", "--plugin", str(tiny_plugin), "--task-dir", str(task),
        "--backbone", "tiny_test_vit", "--pretrained", "none", "--batch-size", "8", "--image-size", "16",
        "--supernet-epochs", "1", "--population", "3", "--select", "2", "--mutation", "1", "--crossover", "1",
        "--generations", "1", "--budget", "0.01", "--no-retrain", "--output", str(tmp_path / "runs"),
    )  # fmt: skip
    assert code == 0, stderr
    assert "paths of 8 layers: val top-1" in " ".join(stdout.split())
    assert list((tmp_path / "runs" / "glora-search").glob("*/paths.json")) and not records.load_records(
        tmp_path / "runs"
    ), "--no-retrain: the search only"


def test_a_malformed_paths_file_is_one_error_before_anything_trains(monkeypatch, capsys, tmp_path, tiny_plugin):
    task, bad = make_task_folder(tmp_path / "colours"), tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    code, _, stderr = run_cli(
        monkeypatch, capsys, "run", "--plugin", str(tiny_plugin), "--task-dir", str(task), "--methods", "linear,glora",
        "--set", f"glora.paths={bad}", "--backbone", "tiny_test_vit", "--pretrained", "none", "--batch-size", "8",
        "--set", "recipe.image_size=16", "--epochs", "1", "--output", str(tmp_path / "runs"),
    )  # fmt: skip
    assert code == 2 and "is not a GLoRA configuration" in stderr
    assert not (tmp_path / "runs").exists(), "nothing trained, nothing written"


def test_paths_searched_on_another_backbone_are_one_error_before_anything_trains(
    monkeypatch, capsys, tmp_path, tiny_plugin
):
    task, paths = make_task_folder(tmp_path / "colours"), tmp_path / "paths.json"
    layer = {"A": "lora", "B": "vector", "C": "none", "D": "constant", "E": "none"}
    paths.write_text(json.dumps({"paths": [layer] * 8, "backbone": "vit_base_patch16_224.orig_in21k"}))
    code, _, stderr = run_cli(
        monkeypatch, capsys, "run", "--plugin", str(tiny_plugin), "--task-dir", str(task), "--methods", "linear,glora",
        "--set", f"glora.paths={paths}", "--backbone", "tiny_test_vit", "--pretrained", "none", "--batch-size", "8",
        "--set", "recipe.image_size=16", "--epochs", "1", "--output", str(tmp_path / "runs"),
    )  # fmt: skip
    assert code == 2 and "searched on vit_base_patch16_224.orig_in21k" in stderr and "tiny_test_vit" in stderr
    assert not (tmp_path / "runs").exists(), "nothing trained, nothing written"
