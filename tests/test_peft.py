"""Hugging Face PEFT tuners as methods: attach, train, count, round-trip, identity at init, merge."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_RUN, TINY_SWIN, TINY_VIT, images, make_task_folder, run_cli, tiny_backbone, with_method

import petl_bench as pb
from petl_bench.errors import UserError
from petl_bench.methods.peft_tuners import resolved

peft = pytest.importorskip("peft")

TUNERS = ["peft:lora", "peft:dora", "peft:vera", "peft:loha", "peft:lokr", "peft:ia3", "peft:boft"]


def _train_step(model, spec) -> None:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    loss = model(images(spec)).logsumexp(-1).sum()
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("spec", [TINY_VIT, TINY_SWIN], ids=["vit", "swin"])
@pytest.mark.parametrize("method", TUNERS)
def test_a_peft_tuner_attaches_trains_round_trips_and_merges(method, spec, tmp_path):
    backbone = tiny_backbone(spec)
    reference, model = with_method(method, backbone)
    x = images(spec)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-5)  # PEFT's tuners start as identity
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuner_params = {f"{n}.{p}" for n, m in model.backbone.named_modules() if isinstance(m, BaseTunerLayer)
                    for p, _ in m.named_parameters() if not p.startswith("base_layer")}  # fmt: skip
    head = {f"{model.info.head_path}.weight", f"{model.info.head_path}.bias"}
    assert set(pb.trainable_parameters(model)) == tuner_params | head, "exactly the tuner's tensors and the head"
    _train_step(model, spec)
    counted, _ = pb.count_trainable(model)
    fresh = copy.deepcopy(tiny_backbone(spec)[0])
    peft_model = peft.get_peft_model(fresh, resolved(model.config, model.info.kind))
    assert counted == peft_model.get_nb_trainable_parameters()[0], "the count is PEFT's own"
    path = pb.save_trainable(model, tmp_path / "t.safetensors")
    _, again = with_method(method, tiny_backbone(spec))
    pb.load_trainable(again, path)
    model.eval(), again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
        merged = pb.merge(model)
        assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
        assert (merged(x) - model(x)).abs().max() <= 1e-4
        assert (model(x) - reference(x)).abs().max() > 1e-4, "the training step changed something"


@pytest.mark.parametrize("method", TUNERS)
def test_peft_tuners_on_an_open_clip_visual_tower(tiny_clip_name, method):
    backbone = pb.build_backbone(tiny_clip_name, "none", num_classes=3)
    reference, model = with_method(method, backbone)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-5)
    assert len(pb.trainable_parameters(model)) > 2, "the tuner's tensors train besides the head"
    _train_step(model, {"image_size": 32})
    merged = pb.merge(model)
    with torch.no_grad():
        assert (merged(x) - model.eval()(x)).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "setting,message",
    [
        ("peft:lora.bogus=1", "method 'peft:lora' has no hyperparameter 'bogus'"),
        ("peft:lora.use_dora=maybe", "cannot read peft:lora.use_dora='maybe' as bool"),
        ("peft:lora.layers_pattern=blocks", "PEFT rejects peft:lora"),
    ],
)
def test_peft_settings_are_checked_before_training(monkeypatch, capsys, tmp_path, tiny_plugin, setting, message):
    task, out = make_task_folder(tmp_path / "colours"), tmp_path / "runs"
    code, _, stderr = run_cli(monkeypatch, capsys, "run", "--plugin", str(tiny_plugin), "--task-dir", str(task),
                              "--methods", "peft:lora", "--output", str(out), *TINY_RUN, "--set", setting)  # fmt: skip
    assert code == 2 and message in " ".join(stderr.split()) and "Traceback" not in stderr, stderr


def test_unknown_tuner_and_a_run_recording_the_peft_config(monkeypatch, capsys, tmp_path, tiny_plugin):
    with pytest.raises(UserError, match="unknown PEFT tuner 'nope'"):
        pb.METHODS.get("peft:nope")
    task, out = make_task_folder(tmp_path / "colours"), tmp_path / "runs"
    code, stdout, stderr = run_cli(monkeypatch, capsys, "run", "--plugin", str(tiny_plugin), "--task-dir", str(task),
                                   "--methods", "peft:dora", "--epochs", "1", "--output", str(out), *TINY_RUN,
                                   "--set", "peft:dora.r=4")  # fmt: skip
    assert code == 0, stderr
    (record,) = pb.records.load_records(out)
    assert record.method == "peft:dora" and record.hparams.method["use_dora"] is True
    assert record.hparams.method["r"] == 4 and record.hparams.method["peft_type"] == "LORA"
    code, stdout, _ = run_cli(monkeypatch, capsys, "methods")
    assert "peft:TYPE" in stdout and f"PEFT {peft.__version__}" in stdout


# Settings for the 32-wide test ViT where a tuner's defaults assume a wider model (ViT-B's 768 is fine).
SMALL_MODEL = {
    "c3a": {"block_size": 8}, "miss": {"r": 8}, "road": {"group_size": 8}, "shira": {"r": 2},
    "vblora": {"vector_length": 8}, "waveft": {"n_frequency": 64},
}  # fmt: skip


@pytest.mark.parametrize("tuner", __import__("petl_bench.methods.peft_tuners", fromlist=["listing"]).listing())
def test_every_listed_tuner_attaches_counts_as_peft_and_trains(tuner):
    method = f"peft:{tuner}"
    backbone = tiny_backbone(TINY_VIT)
    reference, model = with_method(method, backbone, **SMALL_MODEL.get(tuner, {}))
    counted, _ = pb.count_trainable(model)
    peft_model = peft.get_peft_model(copy.deepcopy(reference), resolved(model.config, model.info.kind))
    own = peft_model.get_nb_trainable_parameters()[0]
    assert 0 < counted == own, (tuner, counted, own)
    frozen = {name for name, _ in reference.named_parameters() if not name.startswith("head.")}
    trained = set(pb.trainable_parameters(model))
    assert not trained & frozen and not any(".base_layer." in name for name in trained), "the backbone stays frozen"
    x = images(TINY_VIT)
    before = model.eval()(x).detach()
    _train_step(model, TINY_VIT)
    after = model.eval()(x).detach()
    assert torch.isfinite(after).all() and (after - before).abs().max() > 0


def test_ln_tuning_trains_the_layer_norms():
    _, model = with_method("peft:ln_tuning", tiny_backbone(TINY_VIT))
    depth, width = 2, 32
    assert pb.count_trainable(model)[0] == (2 * depth + 1) * 2 * width


@pytest.mark.parametrize("tuner", ["adaption_prompt", "xlora", "trainable_tokens", "poly"])
def test_language_model_tuners_are_refused_with_the_reason(tuner):
    from petl_bench.methods.peft_tuners import listing

    assert tuner not in listing()
    with pytest.raises(UserError, match="does not apply to vision backbones: it "):
        pb.METHODS.get(f"peft:{tuner}")
