"""Effective init: what every method's tensors hold when training starts, against the official runs'.

NOAH's code re-initialises every nn.Linear (adapters, LoRA A and B) to trunc_normal(0.02) with zero
bias after building them, and its classifier likewise; VPT's code (the source of the full, linear,
BitFit and VPT rows) uses a kaiming_normal(fan_out) head with bias -log(99); the Convpass code keeps
PyTorch's Linear default for the head. Statistics are checked on tensors of thousands of values.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_backbone

import petl_bench as pb

WIDE = dict(name="vit_tiny_patch16_224", image_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3)
CLASSES = 100
XAVIER_ADAPTER = math.sqrt(2 / (192 + 8))


def _model(method: str, **overrides):
    backbone = tiny_backbone(WIDE, num_classes=CLASSES)
    runner = pb.METHODS.get(method)()
    return pb.attach_method(*backbone, runner, runner.make_config(**overrides))


def _tensors(model, fragment: str) -> torch.Tensor:
    found = [p.detach().flatten() for n, p in model.backbone.named_parameters() if fragment in n]
    assert found, fragment
    return torch.cat(found)


def _normal(values: torch.Tensor, std: float, tolerance: float = 0.1) -> None:
    assert abs(values.mean().item()) < 3 * std / math.sqrt(values.numel()) + 1e-7
    assert values.std().item() == pytest.approx(std, rel=tolerance)


def _zero(values: torch.Tensor) -> None:
    assert values.abs().max().item() == 0


HEADS = {
    "trunc_normal": lambda w, b: (_normal(w, 0.02), _zero(b)),
    "vpt": lambda w, b: (_normal(w, math.sqrt(2 / CLASSES)), torch.testing.assert_close(b, torch.full_like(b, -math.log(99)))),
    "default": lambda w, b: (_normal(w, 1 / math.sqrt(3 * 192)), _normal(b, 1 / math.sqrt(3 * 192), 0.35)),
}  # fmt: skip
EXPECTED_HEAD = {
    "full": "default", "linear": "default", "bitfit": "default", "vpt_shallow": "default", "vpt_deep": "default",
    "adapter": "trunc_normal",
    "lora": "trunc_normal", "noah": "trunc_normal", "adaptformer": "default", "convpass": "default",
    "convpass_attn": "default", "ssf": "trunc_normal",
}  # fmt: skip


@pytest.mark.parametrize("method", sorted(EXPECTED_HEAD))
def test_the_classifier_starts_as_in_the_runs_behind_the_published_numbers(method, tmp_path):
    overrides = {"subnet": _subnet_file(tmp_path)} if method == "noah" else {}
    model = _model(method, **overrides)
    HEADS[EXPECTED_HEAD[method]](model.head.weight.detach().flatten(), model.head.bias.detach())


def _subnet_file(tmp_path) -> str:
    path = tmp_path / "subnet.json"
    path.write_text(json.dumps({"prompt": [10, 10], "lora": [8, 8], "adapter": [8, 8]}))
    return str(path)


def test_adapter_official_and_module_init():
    official = _model("adapter")
    for part in ("adapter_mlp.down.weight", "adapter_mlp.up.weight"):
        _normal(_tensors(official, part), 0.02)
    for part in ("adapter_mlp.down.bias", "adapter_mlp.up.bias"):
        _zero(_tensors(official, part))
    module = _model("adapter", init="module")
    _normal(_tensors(module, "adapter_mlp.up.weight"), XAVIER_ADAPTER)
    assert 0 < _tensors(module, "adapter_mlp.up.bias").abs().max() < 1e-4


@pytest.mark.parametrize("method", ["houlsby_adapter", "pfeiffer_adapter"])
def test_sequential_adapters_official_init_is_timms_linear_init_and_module_init_is_declared(method):
    """PETL_Vision's init_weights re-initialises the adapters' projections after their declared init."""
    sites = ("adapter_attn", "adapter_mlp") if method == "houlsby_adapter" else ("adapter_mlp",)
    official = _model(method)
    for site in sites:
        for part in ("down.weight", "up.weight"):
            values = _tensors(official, f"{site}.{part}")
            _normal(values, 0.02)
        for part in ("down.bias", "up.bias"):
            _zero(_tensors(official, f"{site}.{part}"))
    module = _model(method, init="module")
    down = _tensors(module, "adapter_mlp.down.weight")
    assert down.abs().max().item() <= math.sqrt(6 / (192 + 8))  # xavier_uniform, in both declared inits
    _normal(down, XAVIER_ADAPTER)
    if method == "houlsby_adapter":  # xavier: random up, N(0, 1e-6) biases
        _normal(_tensors(module, "adapter_mlp.up.weight"), XAVIER_ADAPTER)
        assert 0 < _tensors(module, "adapter_mlp.up.bias").abs().max() < 1e-4
    else:  # lora_xavier: up and biases zero
        for part in ("up.weight", "up.bias", "down.bias"):
            _zero(_tensors(module, f"adapter_mlp.{part}"))


def test_lora_official_init_is_not_the_identity_and_module_init_is():
    official = _model("lora")
    _normal(_tensors(official, "lora.down.weight"), 0.02)
    _normal(_tensors(official, "lora.up.weight"), 0.02)
    module = _model("lora", init="module")
    _zero(_tensors(module, "lora.up.weight"))
    _normal(_tensors(module, "lora.down.weight"), 1 / math.sqrt(3 * 192))  # kaiming_uniform(a=sqrt(5))


def test_noah_official_init_every_linear_trunc_normal_prompts_xavier(tmp_path):
    model = _model("noah", subnet=_subnet_file(tmp_path))
    for part in ("lora.down.weight", "lora.up.weight", "adapter_mlp.down.weight", "adapter_mlp.up.weight"):
        _normal(_tensors(model, part), 0.02, tolerance=0.15)
    _zero(_tensors(model, "adapter_mlp.down.bias"))
    _zero(_tensors(model, "adapter_mlp.up.bias"))
    prompts = _tensors(model, "blocks.prompts.")  # xavier on (1, 100, d) at the super size, then sliced
    _normal(prompts, math.sqrt(2 / (100 * 192 + 192)), tolerance=0.15)
    module = _model("noah", subnet=_subnet_file(tmp_path), init="module")
    _zero(_tensors(module, "lora.up.weight"))


def test_convpass_adaptformer_and_vpt_module_inits():
    convpass = _model("convpass")
    _normal(_tensors(convpass, "adapter_down.weight"), XAVIER_ADAPTER)
    _zero(_tensors(convpass, "adapter_up.weight"))
    _zero(_tensors(convpass, "adapter_up.bias"))
    adaptformer = _model("adaptformer")
    _normal(_tensors(adaptformer, "adapter_mlp.down.weight"), 1 / math.sqrt(3 * 192))
    _zero(_tensors(adaptformer, "adapter_mlp.up.weight"))
    vpt = _model("vpt_deep", tokens=50)
    bound = math.sqrt(6 / (3 * 8 * 8 + 192))
    prompts = _tensors(vpt, "blocks.prompts.")
    assert prompts.abs().max() <= bound
    _normal(prompts, bound / math.sqrt(3))


def test_vpt_head_init_on_request():
    backbone, info = tiny_backbone(WIDE, num_classes=CLASSES)
    runner = pb.METHODS.get("linear")()
    model = pb.attach_method(backbone, info, runner, runner.make_config(), head_init="vpt")
    HEADS["vpt"](model.head.weight.detach().flatten(), model.head.bias.detach())


def test_head_init_can_be_overridden_and_is_recorded(tmp_path):
    from petl_bench.engine import Recipe
    from petl_bench.planning import plan
    from petl_bench.task import FileListTask

    task = FileListTask(name="t", suite="custom", num_classes=3)
    (lora,) = plan(["lora"], [task], ["x"], [0], protocol="final", pretrained="none", recipe=Recipe())
    (convpass,) = plan(["convpass"], [task], ["x"], [0], protocol="final", pretrained="none", recipe=Recipe())
    (forced,) = plan(["lora"], [task], ["x"], [0], protocol="final", pretrained="none",
                     recipe=Recipe(head_init="default"))  # fmt: skip
    assert lora.recipe.head_init == "trunc_normal" and convpass.recipe.head_init == "default"
    assert forced.recipe.head_init == "default" and forced.run_id != lora.run_id
    assert lora.identity()["method_config"]["init"] == "official"


# --- training-time fidelity (prompt dropout, BitFit's encoder) ---------------------------------------------


@pytest.mark.parametrize("method", ["vpt_deep", "noah"])
def test_prompt_dropout_draws_a_mask_per_image(method, tmp_path):
    overrides = {"subnet": _subnet_file(tmp_path), "prompt_dropout": 0.5} if method == "noah" else {"dropout": 0.5}
    model = _model(method, **overrides)
    x = torch.randn(1, 3, 32, 32).expand(2, -1, -1, -1).contiguous()
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(x)
    assert not torch.allclose(out[0], out[1]), "two copies of one image get different prompt masks"
    model.eval()
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out[0], out[1])


@pytest.mark.parametrize("encoder_eval,draws", [(True, False), (False, True)])
def test_bitfit_trains_with_the_encoder_in_eval_mode_by_default(encoder_eval, draws):
    model = _model("bitfit", encoder_eval=encoder_eval)  # built with drop_path 0.1
    model.train()
    x = torch.randn(2, 3, 32, 32)
    state = torch.get_rng_state()
    model(x)
    assert (not torch.equal(state, torch.get_rng_state())) == draws
