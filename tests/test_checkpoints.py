"""Trainable-only checkpoints round-trip; the official Convpass release format imports."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VIT, images, randomize_trainable, tiny_backbone

import petl_bench as pb
from petl_bench.errors import UserError

METHODS = ["linear", "bitfit", "vpt_deep", "adapter", "adaptformer", "lora", "convpass", "convpass_attn", "full"]


def fresh(method, **overrides):
    backbone = tiny_backbone(TINY_VIT, seed=5)
    runner = pb.METHODS.get(method)()
    return pb.attach_method(*backbone, runner, runner.make_config(**overrides)).eval()


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_reproduces_the_logits(tmp_path, method):
    trained = fresh(method)
    randomize_trainable(trained, seed=21)
    path = pb.save_trainable(trained, tmp_path / "run.safetensors")
    assert path.stat().st_size == len(pb.checkpoint_bytes(trained))
    restored = pb.load_trainable(fresh(method), path)
    with torch.no_grad():
        torch.testing.assert_close(restored(images(TINY_VIT)), trained(images(TINY_VIT)), rtol=0, atol=0)
    assert set(pb.trainable_parameters(restored)) == set(pb.trainable_parameters(trained))


def test_checkpoint_holds_only_the_trainable_tensors_and_metadata(tmp_path):
    from safetensors import safe_open

    model = fresh("convpass", scale=10.0)
    path = pb.save_trainable(model, tmp_path / "c.safetensors")
    with safe_open(str(path), "pt") as handle:
        assert set(handle.keys()) == set(pb.trainable_parameters(model))
        metadata = handle.metadata()
    assert metadata["method"] == "convpass" and '"scale": 10.0' in metadata["config"]


def test_loading_into_another_method_or_shape_fails_clearly(tmp_path):
    path = pb.save_trainable(fresh("convpass"), tmp_path / "c.safetensors")
    with pytest.raises(UserError, match="holds a 'convpass' checkpoint, not 'lora'"):
        pb.load_trainable(fresh("lora"), path)
    other = pb.save_trainable(fresh("lora", rank=4), tmp_path / "l4.safetensors")
    with pytest.raises(UserError, match="has shape"):
        pb.load_trainable(fresh("lora"), other)


def test_official_convpass_release_format(tmp_path):
    model = fresh("convpass")
    generator = torch.Generator().manual_seed(0)
    official = {}
    for i in range(TINY_VIT["depth"]):
        for bypass in ("adapter_attn", "adapter_mlp"):
            prefix = f"blocks.{i}.{bypass}."
            official[prefix + "adapter_down.weight"] = torch.randn(8, 32, generator=generator)
            official[prefix + "adapter_down.bias"] = torch.randn(8, generator=generator)
            official[prefix + "adapter_conv.weight"] = torch.randn(8, 8, 3, 3, generator=generator)
            official[prefix + "adapter_conv.bias"] = torch.randn(8, generator=generator)
            official[prefix + "adapter_up.weight"] = torch.randn(32, 8, generator=generator)
            official[prefix + "adapter_up.bias"] = torch.randn(32, generator=generator)
    official["head.weight"] = torch.randn(5, 32, generator=generator)
    official["head.bias"] = torch.randn(5, generator=generator)
    path = tmp_path / "cifar.pt"
    torch.save({f"module.{k}": v for k, v in official.items()}, path)
    pb.load_trainable(model, path, format="convpass-official")
    for name, tensor in official.items():
        torch.testing.assert_close(model.backbone.get_parameter(name), tensor, rtol=0, atol=0)
    del official["head.bias"]
    torch.save(official, path)
    with pytest.raises(UserError, match=r"missing \['head.bias'\]"):
        pb.load_trainable(fresh("convpass"), path, format="convpass-official")


def test_create_model_api_applies_task_defaults_and_overrides():
    model = pb.create_model(
        "convpass", TINY_VIT["name"], num_classes=100, pretrained="none", task="cifar", scale=10,
        image_size=32, backbone_kwargs=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2),
    )  # fmt: skip
    assert model.config.scale == 10 and model.config.xavier_init is False
    assert model.backbone.blocks[0].scale == 10
    assert isinstance(pb.trainable_parameters(model)["head.weight"], torch.nn.Parameter)
