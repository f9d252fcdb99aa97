"""Every method: exactly the intended parameters train, zero-init methods leave the backbone unchanged,
parameter counts equal the spec's formulas, and the forward passes follow the spec's equations."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_SWIN, TINY_VIT, images, randomize_trainable, tiny_backbone, with_method

import petl_bench as pb
from petl_bench.errors import UserError
from petl_bench.methods.building_blocks import AdaptedBlock, QuickGELU, Tap

ALL_METHODS = [
    "full",
    "linear",
    "bitfit",
    "vpt_shallow",
    "vpt_deep",
    "adapter",
    "adaptformer",
    "lora",
    "convpass",
    "convpass_attn",
]
# Methods whose effective init leaves the backbone's function unchanged. NOAH's LoRA (the default,
# init="official") does not: its B is trunc_normal, as in NOAH's runs; init="module" zeroes it.
ZERO_INIT = [
    ("convpass", {}), ("convpass_attn", {}), ("adaptformer", {}), ("lora", {"init": "module"}),
    ("lora", {"variant": "qv"}),
]  # fmt: skip

# What each method trains, named independently of the implementation (the head always trains).
INTENDED = {
    "full": lambda name: True,
    "linear": lambda name: False,
    "bitfit": lambda name: name.endswith("bias"),
    "vpt_shallow": lambda name: name.startswith("blocks.prompts."),
    "vpt_deep": lambda name: name.startswith("blocks.prompts."),
    "adapter": lambda name: ".adapter_mlp." in name,
    "adaptformer": lambda name: ".adapter_mlp." in name,
    "lora": lambda name: ".attn.qkv.lora" in name,
    "convpass": lambda name: ".adapter_attn." in name or ".adapter_mlp." in name,
    "convpass_attn": lambda name: ".adapter_attn." in name,
}


@pytest.mark.parametrize("method", ALL_METHODS)
def test_exactly_the_intended_parameters_train_and_get_gradients(method):
    _, model = with_method(method, tiny_backbone(TINY_VIT))
    trainable = set(pb.trainable_parameters(model))
    expected = {n for n, _ in model.backbone.named_parameters() if INTENDED[method](n) or n.startswith("head.")}
    assert trainable == expected
    model.train()
    model(images(TINY_VIT)).logsumexp(-1).sum().backward()
    for name, parameter in model.backbone.named_parameters():
        assert (parameter.grad is not None) == (name in expected), name
    randomize_trainable(model)
    model.zero_grad(set_to_none=True)
    model.eval()
    model(images(TINY_VIT)).logsumexp(-1).sum().backward()
    for name in expected:
        assert model.backbone.get_parameter(name).grad.abs().sum() > 0, f"{name} gets no gradient"


@pytest.mark.parametrize("method,overrides", ZERO_INIT)
@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"reg_tokens": 4},  # cls + 4 registers
        {"image_size": 56},  # a 7x7 grid
        {"init_values": 1e-5},  # LayerScale
        {"class_token": False, "global_pool": "avg"},
    ],
    ids=["plain", "registers", "grid7x7", "layerscale", "no-cls"],
)
def test_zero_initialised_methods_reproduce_the_frozen_backbone(method, overrides, variant):
    reference, model = with_method(method, tiny_backbone(TINY_VIT, **variant), **overrides)
    x = images(variant.get("image_size", TINY_VIT["image_size"]))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-6)
        randomize_trainable(model)
        assert not torch.allclose(model(x), reference(x), atol=1e-3)


@pytest.mark.parametrize("method", ["adapter", "vpt_shallow", "vpt_deep", "lora"])
def test_methods_that_are_not_identity_at_init_change_the_logits(method):
    # NOAH's adapter has a xavier (non-zero) up-projection; prompts enter the attention.
    reference, model = with_method(method, tiny_backbone(TINY_VIT))
    x = images(TINY_VIT)
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(x), reference(x), atol=1e-4)


def _vit_block_parts(block):
    attn = lambda y: block.ls1(block.attn(y))  # noqa: E731
    mlp = lambda y: block.ls2(block.mlp(y))  # noqa: E731
    return block.norm1, attn, block.drop_path1, block.norm2, mlp, block.drop_path2


def _reference_forward(method: str, block, side_attn, side_mlp, scale, x):
    """The spec's equations (methods.md §4, §6, §7), written out for one timm 1.0 block."""
    norm1, attn, dp1, norm2, mlp, dp2 = _vit_block_parts(block)
    if method == "convpass":
        y = norm1(x)
        x = x + dp1(attn(y)) + dp1(side_attn(y)) * scale
        y = norm2(x)
        return x + dp2(mlp(y)) + dp2(side_mlp(y)) * scale
    x = x + dp1(attn(norm1(x)))
    if method == "adapter":
        h = dp2(mlp(norm2(x)))
        return x + h + side_mlp(h)
    if method == "adaptformer":
        return x + dp2(mlp(norm2(x))) + scale * side_mlp(x)
    raise ValueError(method)


@pytest.mark.parametrize("method", ["convpass", "adapter", "adaptformer"])
def test_block_equations_with_drop_path_and_dropout_active(method):
    overrides = {} if method == "adapter" else {"scale": 3.0}
    _, model = with_method(method, tiny_backbone(TINY_VIT, drop_path_rate=0.5), **overrides)
    randomize_trainable(model)
    model.train()
    wrapped = model.backbone.blocks[1]
    x = torch.randn(4, 17, 32)
    torch.manual_seed(7)
    ours = wrapped(x)
    torch.manual_seed(7)
    theirs = _reference_forward(method, wrapped.block, wrapped.adapter_attn, wrapped.adapter_mlp, wrapped.scale, x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.manual_seed(8)
    assert not torch.equal(wrapped(x), ours), "drop-path / dropout should be active in training"


def test_adapted_block_without_sides_is_the_timm_block_also_in_training():
    backbone, info = tiny_backbone(TINY_VIT, drop_path_rate=0.5)
    block = backbone.blocks[1]
    wrapped = AdaptedBlock(block, info.kind, Tap.NORM, drop_path_side=True).train()
    x = torch.randn(4, 17, 32)
    torch.manual_seed(3)
    expected = block(x)
    torch.manual_seed(3)
    torch.testing.assert_close(wrapped(x), expected, rtol=0, atol=0)


def _official_convpass(module, x, grid, prefix):
    """Official Convpass.forward (convpass/vtab/convpass.py) with the 14x14 grid and 1 cls token generalised."""
    batch, _, _ = x.shape
    dim = module.adapter_down.out_features
    a = module.act(module.adapter_down(x))
    patches = a[:, prefix:].reshape(batch, grid[0], grid[1], dim).permute(0, 3, 1, 2)
    patches = module.adapter_conv(patches).permute(0, 2, 3, 1).reshape(batch, grid[0] * grid[1], dim)
    tokens = []
    for index in range(prefix):
        token = a[:, index : index + 1].reshape(batch, 1, 1, dim).permute(0, 3, 1, 2)
        tokens.append(module.adapter_conv(token).permute(0, 2, 3, 1).reshape(batch, 1, dim))
    a = module.act(torch.cat([*tokens, patches], dim=1))
    return module.adapter_up(module.dropout(a))


@pytest.mark.parametrize("grid,prefix", [((14, 14), 1), ((7, 7), 1), ((4, 6), 5)])
def test_conv_bypass_matches_the_official_module(grid, prefix):
    from petl_bench.methods.convpass import ConvBypass

    torch.manual_seed(0)
    module = ConvBypass(24, 8, grid, prefix, xavier_init=True, dropout=0.1).eval()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_()
    x = torch.randn(2, prefix + grid[0] * grid[1], 24)
    torch.testing.assert_close(module(x), _official_convpass(module, x, grid, prefix))
    # The cls token sees only the centre tap of the 3x3 kernel.
    a = module.act(module.adapter_down(x[:, :1]))
    centre = a @ module.adapter_conv.weight[:, :, 1, 1].T + module.adapter_conv.bias
    expected = module.adapter_up(module.act(centre))
    torch.testing.assert_close(module(x)[:, :1], expected)


@pytest.mark.parametrize("grid,prefix", [((14, 14), 1), ((4, 6), 5)])
def test_conv_bypass_gradients_equal_the_official_modules_in_fp32(grid, prefix):
    """One convolution for patches and prefix tokens: the same output and gradients (input and every
    parameter) as the official per-token convolutions, within 1e-6 of each tensor's largest magnitude
    (the conv's weight and bias gradients sum the prefix and patch positions in one pass instead of two:
    fp32 rounding; everything else is bitwise equal)."""
    from petl_bench.methods.convpass import ConvBypass

    torch.manual_seed(1)
    module = ConvBypass(24, 8, grid, prefix, xavier_init=True, dropout=0.0).train()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_()
    x = torch.randn(3, prefix + grid[0] * grid[1], 24, requires_grad=True)
    weights = torch.randn(3, prefix + grid[0] * grid[1], 24)
    grads = []
    for forward in (module, lambda x: _official_convpass(module, x, grid, prefix)):
        out = forward(x)
        grads.append((out, *torch.autograd.grad((out * weights).sum(), [x, *module.parameters()])))
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6 * theirs.abs().max().item())


def test_convpass_init_identity_or_xavier():
    from petl_bench.methods.convpass import ConvBypass

    identity = ConvBypass(16, 8, (4, 4), 1, xavier_init=False, dropout=0.1)
    kernel = identity.adapter_conv.weight.detach()
    assert torch.equal(kernel[:, :, 1, 1], torch.eye(8))
    assert kernel.abs().sum() == 8
    xavier = ConvBypass(16, 8, (4, 4), 1, xavier_init=True, dropout=0.1)
    bound = math.sqrt(6 / (72 + 72))
    assert xavier.adapter_conv.weight.abs().max() <= bound and xavier.adapter_conv.weight.std() > bound / 4
    for module in (identity, xavier):
        assert module.adapter_up.weight.abs().sum() == 0 and module.adapter_up.bias.abs().sum() == 0
        assert module.adapter_down.bias.abs().sum() == 0 and module.adapter_conv.bias.abs().sum() == 0


def test_adapter_and_adaptformer_init():
    _, adapter = with_method("adapter", tiny_backbone(TINY_VIT), init="module")
    side = adapter.backbone.blocks[0].adapter_mlp
    assert side.up.weight.abs().sum() > 0, "NOAH's adapter up-projection is xavier, not zero"
    assert side.down.bias.abs().max() < 1e-4 and side.down.bias.abs().max() > 0
    assert isinstance(side.act, QuickGELU)
    _, adaptformer = with_method("adaptformer", tiny_backbone(TINY_VIT))
    side = adaptformer.backbone.blocks[0].adapter_mlp
    assert isinstance(side.act, torch.nn.ReLU)
    assert side.up.weight.abs().sum() == 0 and side.down.bias.abs().sum() == 0
    assert adaptformer.backbone.blocks[0].scale == 0.1


def test_lora_fused_qkv_equation():
    _, model = with_method("lora", tiny_backbone(TINY_VIT))
    randomize_trainable(model)
    wrapped = model.backbone.blocks[0].attn.qkv.eval()
    x = torch.randn(2, 17, 32)
    a, b = wrapped.lora.down.weight, wrapped.lora.up.weight
    assert b.shape == (96, 8), "one up matrix onto q, k and v"
    torch.testing.assert_close(wrapped(x), wrapped.qkv(x) + x @ a.T @ b.T)


def test_lora_qv_variant_leaves_keys_alone():
    _, model = with_method("lora", tiny_backbone(TINY_VIT), variant="qv", scale=2.0)
    randomize_trainable(model)
    wrapped = model.backbone.blocks[0].attn.qkv.eval()
    x = torch.randn(2, 17, 32)
    delta = wrapped(x) - wrapped.qkv(x)
    q_delta = 2.0 * x @ wrapped.lora_q.down.weight.T @ wrapped.lora_q.up.weight.T
    torch.testing.assert_close(delta[..., :32], q_delta)
    assert delta[..., 32:64].abs().max() == 0


def test_vpt_deep_replaces_prompts_and_pools_the_cls_token():
    reference, model = with_method("vpt_deep", tiny_backbone(TINY_VIT), tokens=3)
    model.eval()
    blocks = reference.blocks
    prompted = model.backbone.blocks
    x = torch.randn(2, 17, 32)
    expected = x
    for index, block in enumerate(blocks):
        prompt = prompted.prompts[str(index)].expand(2, -1, -1)
        keep = expected[:, 1:] if index == 0 else expected[:, 1 + 3 :]
        expected = block(torch.cat([expected[:, :1], prompt, keep], dim=1))
    expected = torch.cat([expected[:, :1], expected[:, 4:]], dim=1)
    torch.testing.assert_close(prompted(x), expected)


def test_vpt_init_bound_and_frozen_encoder_in_eval_mode():
    backbone, info = pb.build_backbone("vit_base_patch16_224", "none", num_classes=3)
    runner = pb.METHODS.get("vpt_deep")()
    model = pb.attach_method(backbone, info, runner, runner.make_config(tokens=2))
    prompts = torch.cat([p for p in model.backbone.blocks.prompts.values()])
    assert prompts.abs().max() <= 0.0625 and prompts.abs().max() > 0.05
    model.train()
    assert not model.backbone.blocks.blocks[0].training, "the frozen encoder stays in eval mode"
    assert model.backbone.blocks.dropout.training and model.backbone.blocks.dropout.p == 0.1


@pytest.mark.parametrize("depth,width,heads,image,patch", [(2, 32, 2, 32, 8), (3, 48, 3, 56, 8), (1, 64, 4, 48, 16)])
def test_parameter_counts_equal_the_formulas(depth, width, heads, image, patch):
    spec = dict(TINY_VIT, depth=depth, embed_dim=width, num_heads=heads, image_size=image, patch_size=patch)
    h, r, l = 8, 8, 4
    convpass_module = (2 * h + 1) * width + 9 * h * h + 2 * h
    expected = {
        "linear": 0,
        "bitfit": depth * 11 * width + 2 * width,
        "adapter": depth * (2 * h * width + h + width),
        "adaptformer": depth * (2 * h * width + h + width),
        "lora": depth * (r * width + r * 3 * width),
        "convpass": 2 * depth * convpass_module,
        "convpass_attn": depth * convpass_module,
        "vpt_shallow": l * width,
        "vpt_deep": depth * l * width,
    }
    for method, count in expected.items():
        overrides = {"tokens": l} if method.startswith("vpt") else {}
        backbone = tiny_backbone(spec, num_classes=7)
        total = sum(p.numel() for n, p in backbone[0].named_parameters() if not n.startswith("head."))
        _, model = with_method(method, backbone, **overrides)
        assert pb.count_trainable(model) == (count, count + 7 * (width + 1)), method
    _, model = with_method("full", tiny_backbone(spec, num_classes=7))
    assert pb.count_trainable(model)[0] == total


def test_paper_parameter_counts_on_vit_b16():
    expected = {
        "full": 85_798_656, "linear": 0, "bitfit": 102_912, "adapter": 156_768, "adaptformer": 156_768,
        "lora": 294_912, "convpass": 327_552, "convpass_attn": 163_776,
    }  # fmt: skip
    for method, count in expected.items():
        model = pb.create_model(method, num_classes=100, pretrained="none")
        assert pb.count_trainable(model)[0] == count, method
    for tokens in (1, 10):
        deep = pb.create_model("vpt_deep", num_classes=100, pretrained="none", tokens=tokens)
        shallow = pb.create_model("vpt_shallow", num_classes=100, pretrained="none", tokens=tokens)
        assert pb.count_trainable(deep)[0] == 9216 * tokens
        assert pb.count_trainable(shallow)[0] == 768 * tokens


def test_convpass_on_swin_blocks():
    reference, model = with_method("convpass", tiny_backbone(TINY_SWIN))
    x = images(TINY_SWIN)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-6)
    info = model.info
    h = 8
    expected = sum(2 * ((2 * h + 1) * c + 9 * h * h + 2 * h) for c in info.widths)
    assert pb.count_trainable(model)[0] == expected
    assert info.grids == [(14, 14), (14, 14), (7, 7), (7, 7)]
    randomize_trainable(model)
    with torch.no_grad():
        assert not torch.allclose(model(x), reference(x), atol=1e-3)


def test_swin_convpass_equation_on_nhwc_tokens():
    _, model = with_method("convpass", tiny_backbone(TINY_SWIN, drop_path_rate=0.5), scale=2.0)
    randomize_trainable(model)
    model.train()
    wrapped = model.backbone.layers[0].blocks[1]  # a shifted-window block
    block, x = wrapped.block, torch.randn(2, 14, 14, 16)
    torch.manual_seed(5)
    ours = wrapped(x)
    torch.manual_seed(5)
    y = block.norm1(x)
    expected = x + block.drop_path1(block._attn(y)) + block.drop_path1(wrapped.adapter_attn(y)) * 2.0
    y = block.norm2(expected)
    expected = expected + block.drop_path2(block.mlp(y)) + block.drop_path2(wrapped.adapter_mlp(y)) * 2.0
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_convpass_on_an_open_clip_visual_transformer(tiny_clip_name):
    torch.manual_seed(0)
    backbone = pb.build_backbone(tiny_clip_name, "none", num_classes=4)
    reference, model = with_method("convpass", backbone)
    x = images(32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-6)
        randomize_trainable(model)
        assert not torch.allclose(model(x), reference(x), atol=1e-3)
    assert model.info.kind == "clip" and model.info.grids[0] == (4, 4)
    assert pb.count_trainable(model)[0] == 2 * 2 * ((2 * 8 + 1) * 32 + 9 * 64 + 16)


@pytest.mark.parametrize(
    "method,spec",
    [
        ("vpt_deep", TINY_SWIN),
        ("adapter", TINY_SWIN),
        ("adaptformer", TINY_SWIN),
        ("lora", "clip"),
        ("convpass", "convnext"),
    ],
)
def test_unsupported_pairs_fail_with_a_clear_error(method, spec, tiny_clip_name):
    if spec == "clip":
        backbone = pb.build_backbone(tiny_clip_name, "none", num_classes=2)
    elif spec == "convnext":
        backbone = pb.build_backbone("convnext_atto", "none", num_classes=2)
    else:
        backbone = tiny_backbone(spec)
    runner = pb.METHODS.get(method)()
    with pytest.raises(UserError, match=rf"method '{method}' does not support the \w+ backbone .* it supports: vit"):
        pb.attach_method(*backbone, runner, runner.make_config())


def test_task_defaults_and_overrides():
    runner = pb.METHODS.get("convpass")()
    assert runner.make_config("cifar").scale == 0.1 and runner.make_config("cifar").xavier_init is False
    assert runner.make_config("cifar100").scale == 0.1, "VTAB aliases resolve"
    assert runner.make_config("svhn").scale == 100 and runner.make_config("svhn").xavier_init is True
    assert runner.make_config("svhn", scale="10").scale == 10.0, "explicit values (CLI strings too) win"
    attn = pb.METHODS.get("convpass_attn")()
    assert attn.make_config("caltech101").scale == 100 and attn.make_config("cifar").xavier_init is True
    with pytest.raises(UserError, match="has no hyperparameter 'bogus'"):
        runner.make_config(bogus=1)
    with pytest.raises(UserError, match="cannot read convpass.xavier_init='maybe'"):
        runner.make_config(xavier_init="maybe")
    assert pb.METHODS.get("vpt_deep")().make_config("dmlab").tokens == 100


def test_registered_names_and_hyphen_aliases():
    assert set(ALL_METHODS) <= set(pb.METHODS.names())
    assert pb.METHODS.get("convpass-attn") is pb.METHODS.get("convpass_attn")
    with pytest.raises(UserError, match="unknown method 'nope'; choose from: .*convpass"):
        pb.METHODS.get("nope")
