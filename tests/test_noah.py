"""NOAH: sliced modules, the published subnets' parameter counts, the evolutionary search."""

from __future__ import annotations

import copy
import json
import math
import random
from importlib.resources import files

import pytest
import torch
from conftest import TINY_RUN, TINY_VIT, images, make_task_folder, randomize_trainable, run_cli, tiny_backbone
from tasks_fixture import VTAB_GROUPS

import petl_bench as pb
from petl_bench import records
from petl_bench.errors import UserError
from petl_bench.methods.building_blocks import Bottleneck
from petl_bench.methods.lora import FusedQKVLoRA
from petl_bench.methods.noah import (
    SUPER_DIM,
    NoahConfig,
    SlicedAdapter,
    SlicedLoRA,
    Subnet,
    Supernet,
    published_subnets,
)
from petl_bench.noah_search import (
    Evolution,
    SearchSettings,
    SearchSpace,
    crossover,
    mutate,
    random_subnet,
    run_search,
)  # fmt: skip


def supernet_model(seed: int = 0):
    backbone, info = tiny_backbone(TINY_VIT, seed=seed)
    reference = copy.deepcopy(backbone).eval()
    backbone.requires_grad_(False)
    supernet = Supernet(backbone, info, NoahConfig())
    return reference, backbone.eval(), supernet


def test_a_subnet_of_all_zeros_is_the_frozen_backbone():
    reference, model, supernet = supernet_model()
    with torch.no_grad():
        for parameter in supernet.parameters():
            parameter.normal_()
    supernet.select(Subnet((0, 0), (0, 0), (0, 0)))
    with torch.no_grad():
        torch.testing.assert_close(model(images(TINY_VIT)), reference(images(TINY_VIT)), rtol=0, atol=0)


def test_sliced_modules_equal_fresh_modules_of_the_sliced_size():
    torch.manual_seed(0)
    qkv = torch.nn.Linear(32, 96)
    sliced = SlicedLoRA(qkv, SUPER_DIM, dropout=0.0)
    with torch.no_grad():
        sliced.lora.up.weight.normal_()
    sliced.rank = 5
    fresh = FusedQKVLoRA(qkv, 5, dropout=0.0)
    with torch.no_grad():
        fresh.lora.down.weight.copy_(sliced.lora.down.weight[:5])
        fresh.lora.up.weight.copy_(sliced.lora.up.weight[:, :5])
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(sliced(x), fresh(x), rtol=0, atol=0)

    adapter = SlicedAdapter(32, SUPER_DIM, torch.nn.GELU(), dropout=0.0)
    adapter.dim = 10
    plain = Bottleneck(32, 10, torch.nn.GELU(), dropout=0.0)
    with torch.no_grad():
        plain.down.weight.copy_(adapter.down.weight[:10])
        plain.down.bias.copy_(adapter.down.bias[:10])
        plain.up.weight.copy_(adapter.up.weight[:, :10])
        plain.up.bias.copy_(adapter.up.bias)
    torch.testing.assert_close(adapter(x), plain(x), rtol=0, atol=0)


def test_selected_supernet_equals_the_shrunk_retrain_model():
    _, model, supernet = supernet_model()
    with torch.no_grad():
        for parameter in supernet.parameters():
            parameter.normal_(std=0.05)
    subnet = Subnet((3, 1), (2, 0), (0, 4))
    supernet.select(subnet)
    with torch.no_grad():
        selected = model(images(TINY_VIT))
    supernet.shrink()
    with torch.no_grad():
        torch.testing.assert_close(model(images(TINY_VIT)), selected, rtol=0, atol=1e-6)
    assert sum(p.numel() for p in supernet.parameters()) == subnet.effective_params(32)
    assert model.blocks.blocks[1].block.attn.qkv.__class__ is torch.nn.Linear, "rank 0: no LoRA module left"
    assert model.blocks.blocks[0].adapter_mlp is None and set(model.blocks.prompts) == {"0", "1"}


def test_prompts_are_appended_and_replace_the_previous_blocks_prompts():
    _, model, supernet = supernet_model()
    supernet.select(Subnet((2, 3), (0, 0), (0, 0)))
    blocks = model.blocks
    x = torch.randn(2, 17, 32)
    first = blocks.blocks[0](torch.cat([x, blocks.prompts["0"][:, :2].expand(2, -1, -1)], dim=1))
    second = blocks.blocks[1](torch.cat([first[:, :-2], blocks.prompts["1"][:, :3].expand(2, -1, -1)], dim=1))
    torch.testing.assert_close(blocks(x), second[:, :-3])


def test_modules_are_initialised_at_super_size_then_sliced():
    backbone, info = pb.build_backbone("vit_base_patch16_224", "none", num_classes=10, depth=1)
    runner = pb.METHODS.get("noah")()
    supernet = Supernet(backbone, info, runner.make_config())
    supernet.select(Subnet((1,), (1,), (1,)))
    supernet.shrink()
    adapter = backbone.blocks.blocks[0].adapter_mlp
    # xavier bound at super size 100: sqrt(6 / (768 + 100)), not sqrt(6 / (768 + 1))
    assert adapter.down.weight.abs().max() <= math.sqrt(6 / (768 + 100))
    prompt = backbone.blocks.prompts["0"]
    assert prompt.shape == (1, 1, 768) and prompt.abs().max() <= math.sqrt(6 / (100 * 768 + 768))


def test_published_subnets_give_the_papers_parameter_counts():
    published = published_subnets()
    assert len(published) == 19
    data = json.loads((files("petl_bench.methods") / "noah_subnets.json").read_text())
    base, info = pb.build_backbone(pb.PAPER_BACKBONE, "none", num_classes=10)
    runner = pb.METHODS.get("noah")()
    counts = {}
    for task in published:
        model = pb.attach_method(copy.deepcopy(base), copy.deepcopy(info), runner, runner.make_config(task))
        counts[task] = pb.count_trainable(model)[0]
        assert counts[task] == data["subnets"][task]["effective_params"] == published[task].effective_params(768), task
    assert sum(counts.values()) / 19 == pytest.approx(360_134, abs=1)
    group_means = [sum(counts[t] for t in tasks) / len(tasks) for tasks in VTAB_GROUPS.values()]
    assert round(sum(group_means) / 3 / 1e6, 4) == 0.3615, "the Convpass paper's 0.36M"
    noah_counted = [published[t].noah_counted_params(768) for t in published]
    assert round(sum(noah_counted) / 19 / 1e6, 4) == 0.4425, "NOAH's own counter (0.43M in the NOAH paper)"


def test_params_cli_shows_the_per_task_noah_count(monkeypatch, capsys):
    code, stdout, _ = run_cli(
        monkeypatch, capsys, "params", "--methods", "noah", "--task", "cifar100", "--format", "csv"
    )
    assert code == 0 and stdout.splitlines()[1].startswith("noah,vit_base_patch16_224.orig_in21k,320330,")
    code, _, stderr = run_cli(monkeypatch, capsys, "params", "--methods", "noah", "--format", "csv")
    assert code == 2 and "noah needs a subnet" in stderr


def test_mutation_and_crossover_follow_noah():
    space = SearchSpace(sizes=(1, 5, 10), depths=(3, 6, 9, 12))
    rng = random.Random(0)
    parent = random_subnet(rng, space, 12)
    for sizes in (parent.prompt, parent.lora, parent.adapter):
        depth = next((i for i, s in enumerate(sizes) if s == 0), 12)
        assert depth in space.depths and all(s in space.sizes for s in sizes[:depth]) and not any(sizes[depth:])
    assert mutate(rng, parent, space, m_prob=0.0, s_prob=1.0) == parent
    assert mutate(rng, parent, space, m_prob=1.0, s_prob=0.0) == parent, "NOAH mutates sizes only through depth"
    for _ in range(20):
        child = mutate(rng, parent, space, m_prob=1.0, s_prob=1.0)
        for old, new in zip((parent.prompt, parent.lora, parent.adapter), (child.prompt, child.lora, child.adapter)):
            kept = min(
                next((i for i, s in enumerate(new) if s == 0), 12), next((i for i, s in enumerate(old) if s == 0), 12)
            )
            assert new[:kept] == old[:kept]
    other = random_subnet(rng, space, 12)
    for _ in range(10):
        child = crossover(rng, parent, other)
        for mine, a, b in zip((child.prompt, child.lora, child.adapter), (parent.prompt, parent.lora, parent.adapter),
                              (other.prompt, other.lora, other.adapter)):  # fmt: skip
            assert mine in (a, b), "each module type's list comes whole from one parent"


def _synthetic_score(subnet: Subnet) -> float:
    return float(sum(subnet.prompt) * 0.5 + sum(subnet.lora) - sum(subnet.adapter) * 0.25)


def test_evolution_respects_the_budget_is_deterministic_and_resumes(tmp_path):
    settings = SearchSettings(budget_m=0.25, population=12, select=4, mutation=6, crossover=6, generations=4)
    first = Evolution(settings, 12, 768, _synthetic_score, seed=1).run()
    again = Evolution(settings, 12, 768, _synthetic_score, seed=1).run()
    assert first == again
    assert first.noah_counted_params(768) <= 0.25e6

    class Stop(Exception):
        pass

    calls = {"n": 0}

    def stop_in_generation_3(subnet):
        calls["n"] += 1
        if calls["n"] > 12 + 2 * 12 + 5:
            raise Stop
        return _synthetic_score(subnet)

    state = tmp_path / "state.json"
    with pytest.raises(Stop):
        Evolution(settings, 12, 768, stop_in_generation_3, seed=1, state=state).run()
    assert json.loads(state.read_text())["generation"] == 2
    resumed = Evolution(settings, 12, 768, _synthetic_score, seed=1, state=state).run()
    assert resumed == first


def test_an_impossible_budget_is_a_clear_error():
    settings = SearchSettings(budget_m=0.0001, population=4, select=2, mutation=1, crossover=1, generations=1)
    with pytest.raises(UserError, match="no NOAH candidate of the search space fits the budget"):
        Evolution(settings, 12, 768, _synthetic_score, seed=0).run()


@pytest.mark.slow
def test_search_on_a_tiny_backbone_and_task_is_deterministic_and_retrains(monkeypatch, capsys, tmp_path, tiny_plugin):
    pb.load_plugin(tiny_plugin)
    from petl_bench.task import folder_task

    task = folder_task(make_task_folder(tmp_path / "colours"))
    settings = SearchSettings(
        budget_m=0.0045, population=6, select=2, mutation=2, crossover=2, generations=2,
        supernet_recipe=pb.engine.Recipe(epochs=2, batch_size=8, warmup_epochs=1, lr=5e-4, image_size=16),
        space=SearchSpace(sizes=(1, 2, 4), depths=(1, 2)),
    )  # fmt: skip

    def search(output):
        return run_search(task, backbone="tiny_test_vit", pretrained="none", data_root=None, output=output, seed=0,
                          settings=settings, device=torch.device("cpu"))  # fmt: skip

    found = []
    for output in ("a", "b"):
        subnet_file = search(tmp_path / output)
        found.append(json.loads(subnet_file.read_text()))
        assert (subnet_file.parent / "supernet.json").is_file() and (subnet_file.parent / "search_state.json").is_file()
    keys = ("prompt", "lora", "adapter", "val_top1", "noah_counted_params")
    assert [found[0][k] for k in keys] == [found[1][k] for k in keys]
    assert found[0]["noah_counted_params"] <= 4500
    assert len(found[0]["history"]) == 2
    before = subnet_file.stat().st_mtime_ns
    assert search(tmp_path / "b") == subnet_file and subnet_file.stat().st_mtime_ns == before, (
        "a finished search is reused"
    )
    code, _, stderr = run_cli(
        monkeypatch, capsys, "run", "--plugin", str(tiny_plugin), "--task-dir", str(task.location), "--methods", "noah",
        "--epochs", "2", "--set", f"noah.subnet={subnet_file}", "--output", str(tmp_path / "runs"), *TINY_RUN,
    )  # fmt: skip
    assert code == 0, stderr
    (record,) = records.load_records(tmp_path / "runs")
    assert record.hparams.method["subnet_sizes"]["prompt"] == found[1]["prompt"]
    assert record.cost.trainable_params == found[1]["effective_params"]


def test_noah_trains_exactly_its_modules_and_round_trips(tmp_path):
    subnet_file = tmp_path / "subnet.json"
    subnet_file.write_text(json.dumps(Subnet((2, 1), (1, 3), (4, 0)).to_dict()))
    runner = pb.METHODS.get("noah")()

    def fresh():
        return pb.attach_method(*tiny_backbone(TINY_VIT, seed=4), runner, runner.make_config(subnet=str(subnet_file)))

    model = fresh()
    trainable = set(pb.trainable_parameters(model))
    intended = {n for n, _ in model.backbone.named_parameters()
                if ".adapter_mlp." in n or ".attn.qkv.lora." in n or n.startswith("blocks.prompts.") or n.startswith("head.")}  # fmt: skip
    assert trainable == intended and len(intended) == 2 + 2 * 2 + 4 + 2  # prompts, LoRA A and B, one adapter, head
    randomize_trainable(model)
    model.train()
    model(images(TINY_VIT)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pb.trainable_parameters(model).values())
    path = pb.save_trainable(model.eval(), tmp_path / "noah.safetensors")
    restored = pb.load_trainable(fresh().eval(), path)
    with torch.no_grad():
        torch.testing.assert_close(restored(images(TINY_VIT)), model(images(TINY_VIT)), rtol=0, atol=0)
