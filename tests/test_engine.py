"""The training recipe: schedule, weight-decay scope, seeds."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_VIT, tiny_backbone

import petl_bench as pb
from petl_bench.data import Normalizer, TensorDataset
from petl_bench.engine import Recipe, fit, lr_at_epoch, parameter_groups
from petl_bench.errors import UserError


def test_schedule_is_the_papers_warmup_and_cosine():
    recipe = Recipe()
    lrs = [lr_at_epoch(recipe, epoch) for epoch in range(100)]
    # Warm-up from 1e-6 over epochs 0-9 (the official scheduler.step(ep) after each epoch runs
    # epochs 0 and 1 at the initial value, epoch e at lr(e - 1)).
    assert lrs[0] == lrs[1] == 1e-6
    assert lrs[2] == pytest.approx(1e-6 + (1e-3 - 1e-6) / 10)
    assert all(a < b for a, b in zip(lrs[1:10], lrs[2:11]))
    # Cosine from (just below) 1e-3 towards 1e-5, reached at the end.
    assert lrs[11] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 10 / 100)))
    assert all(a > b for a, b in zip(lrs[11:], lrs[12:]))
    assert lrs[-1] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 98 / 100)))
    assert 1e-5 < lrs[-1] < 1.1e-5


def test_schedule_matches_timm_cosine_scheduler_stepped_per_epoch():
    from timm.scheduler import CosineLRScheduler

    recipe = Recipe(epochs=30, warmup_epochs=4, lr=5e-3, warmup_lr=1e-7, min_lr=1e-6)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=recipe.lr)
    scheduler = CosineLRScheduler(optimizer, t_initial=30, warmup_t=4, warmup_lr_init=1e-7, lr_min=1e-6)
    for epoch in range(30):
        assert lr_at_epoch(recipe, epoch) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)
        scheduler.step(epoch)


def test_weight_decay_scopes():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    assert len(parameter_groups(model, "all")) == 1 and len(parameter_groups(model, "all")[0]["params"]) == 4
    decayed, skipped = parameter_groups(model, "skip_1d")
    assert len(decayed["params"]) == 1 and len(skipped["params"]) == 3 and skipped["weight_decay"] == 0.0
    with pytest.raises(UserError):
        parameter_groups(model, "some")


def test_recipe_overrides_parse_strings_and_reject_unknown_settings():
    recipe = Recipe().replace(lr="5e-4", epochs="7", drop_last="false", image_size="56")
    assert (recipe.lr, recipe.epochs, recipe.drop_last, recipe.image_size) == (5e-4, 7, False, 56)
    with pytest.raises(UserError, match="unknown recipe setting nope"):
        Recipe().replace(nope=1)


def _tiny_fit(seed: int):
    torch.manual_seed(seed)
    backbone = tiny_backbone(TINY_VIT, num_classes=3, seed=seed)
    runner = pb.METHODS.get("convpass")()
    model = pb.attach_method(*backbone, runner, runner.make_config(xavier_init=True))
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randint(0, 256, (24, 3, 32, 32), generator=generator, dtype=torch.uint8), torch.arange(24) % 3
    )
    recipe = Recipe(epochs=3, batch_size=8, warmup_epochs=1, eval_batch_size=10)
    normalizer = Normalizer((0.5,) * 3, (0.5,) * 3)
    return fit(model, data, data, normalizer, recipe, device=torch.device("cpu"), seed=seed), model


def test_seeds_control_everything_random():
    first, model_a = _tiny_fit(0)
    second, model_b = _tiny_fit(0)
    assert [e.loss for e in first.epochs] == [e.loss for e in second.epochs]
    for (name, a), b in zip(pb.trainable_parameters(model_a).items(), pb.trainable_parameters(model_b).values()):
        assert torch.equal(a, b), name
    third, _ = _tiny_fit(1)
    assert [e.loss for e in third.epochs] != [e.loss for e in first.epochs]
    assert len(first.epochs) == 3 and first.epochs[-1].top1 is not None and first.epochs[0].top1 is None


def test_an_interrupted_fit_resumes_to_exactly_the_uninterrupted_result(tmp_path):
    def setup():
        torch.manual_seed(0)
        backbone = tiny_backbone(TINY_VIT, num_classes=3, seed=0)
        runner = pb.METHODS.get("lora")()
        model = pb.attach_method(*backbone, runner, runner.make_config())
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (24, 3, 32, 32), generator=generator, dtype=torch.uint8)
        return model, TensorDataset(images, torch.arange(24) % 3)

    recipe = Recipe(epochs=5, batch_size=8, warmup_epochs=1, eval_batch_size=12)
    normalizer = Normalizer((0.5,) * 3, (0.5,) * 3)
    cpu = torch.device("cpu")
    model, data = setup()
    expected = fit(model, data, data, normalizer, recipe, device=cpu, seed=3)

    class Killed(Exception):
        pass

    def kill_after_epoch_2(entry):
        if entry.epoch == 2:
            raise Killed

    state = tmp_path / "resume.pt"
    model, data = setup()
    with pytest.raises(Killed):
        fit(model, data, data, normalizer, recipe, device=cpu, seed=3, on_epoch=kill_after_epoch_2, resume=state,
            checkpoint_seconds=0)  # fmt: skip
    assert state.is_file()
    model, data = setup()  # a fresh process: same init, state from the file
    replayed = []
    resumed = fit(model, data, data, normalizer, recipe, device=cpu, seed=3, resume=state, on_epoch=replayed.append)
    assert [e.epoch for e in replayed] == [0, 1, 2, 3, 4]
    assert [e.loss for e in resumed.epochs] == [e.loss for e in expected.epochs]
    assert resumed.top1 == expected.top1


def test_execution_settings_do_not_change_a_runs_identity():
    from petl_bench.planning import plan
    from petl_bench.task import FileListTask

    task = FileListTask(name="t", suite="custom", num_classes=3)

    def run_id(**changes):
        (job,) = plan(["lora"], [task], ["tiny"], [0], protocol="final", pretrained="none", recipe=Recipe(**changes))
        return job.run_id

    assert run_id() == run_id(workers=16, eval_batch_size=512, cache_features=False)
    # compiled steps draw dropout from inductor's generator on CUDA: an explicit execution is part of the identity
    assert run_id() != run_id(execution="compiled") and run_id(execution="eager") != run_id(execution="compiled")
    assert run_id() != run_id(lr=5e-4) and run_id() != run_id(augment="deit")
