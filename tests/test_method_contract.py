"""The contract every registered method meets, checked for each name the registry holds (as timm tests
every registered model): a new method gets these checks without editing a list."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import SMALL, TINY_SWIN, TINY_VIT, images, randomize_trainable, tiny_backbone

import petl_bench as pb
from petl_bench.errors import UserError


def _built(method: str, spec: dict, tmp_path, backbone=None):
    runner = pb.METHODS.get(method)()
    overrides = dict(SMALL.get(method, {}))
    backbone, info = backbone or tiny_backbone(spec)
    config = runner.make_config(None, **overrides)
    return runner, info, pb.attach_method(backbone, info, runner, config)


@pytest.mark.parametrize("method", pb.METHODS.names())
def test_a_method_attaches_trains_only_its_tensors_round_trips_and_merges(method, tmp_path):
    if "vit" not in pb.METHODS.get(method).kinds:
        pytest.skip("a CLIP-only method that trains nothing (zero-shot): tests/test_families.py")
    runner, info, model = _built(method, TINY_VIT, tmp_path)
    trained = pb.trainable_parameters(model)
    head = {f"{info.head_path}.weight", f"{info.head_path}.bias"}
    assert head <= set(trained) or not runner.trains_head
    assert all(p.requires_grad == (n in trained) for n, p in model.backbone.named_parameters()), "trainable = declared"
    without, with_head = pb.count_trainable(model)
    assert with_head == sum(p.numel() for p in trained.values()) and without <= with_head
    randomize_trainable(model)
    x = images(TINY_VIT)
    model.eval()
    path = pb.save_trainable(model, tmp_path / "t.safetensors")
    _, _, again = _built(method, TINY_VIT, tmp_path)
    pb.load_trainable(again, path)
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
        if runner.merges:
            merged = pb.merge(model)
            assert (merged(x) - model(x)).abs().max() <= 1e-4
        else:
            with pytest.raises(UserError, match="cannot be merged"):
                pb.merge(model)


@pytest.mark.parametrize("method", pb.METHODS.names())
def test_an_unsupported_backbone_is_one_user_error(method, tmp_path):
    runner = pb.METHODS.get(method)()
    if "swin" in runner.kinds:
        pytest.skip("supports Swin")
    backbone, info = tiny_backbone(TINY_SWIN)
    with pytest.raises(UserError, match=f"method '{method}' does not support the swin backbone"):
        pb.attach_method(backbone, info, runner, runner.make_config(None, **SMALL.get(method, {})))


@pytest.mark.parametrize("method", pb.METHODS.names())
def test_a_method_starts_as_the_frozen_backbone_exactly_when_it_says_so(method, tmp_path):
    runner = pb.METHODS.get(method)()
    overrides = {**SMALL.get(method, {})}
    declared = runner.is_identity_at_init(runner.make_config(None, **overrides))
    if declared is None or "vit" not in runner.kinds:
        pytest.skip("declares nothing (identity_at_init is None)" if declared is None else "not a ViT method")
    backbone, info = tiny_backbone(TINY_VIT, init_values=1e-1)
    reference = copy.deepcopy(backbone).eval()
    _, _, model = _built(method, TINY_VIT, tmp_path, backbone=(backbone, info))
    x = images(TINY_VIT)
    model.eval()
    with torch.no_grad():
        same = torch.allclose(model(x), reference(x), rtol=0, atol=1e-6)
    assert same == declared, f"{method} declares identity_at_init={declared}"


def test_every_built_in_method_declares_whether_it_starts_as_the_backbone():
    undeclared = [name for name in pb.METHODS.names() if not name.startswith("peft:")
                  and pb.METHODS.get(name)().is_identity_at_init(pb.METHODS.get(name)().make_config(None)) is None
                  and "vit" in pb.METHODS.get(name).kinds]  # fmt: skip
    assert not undeclared, undeclared
