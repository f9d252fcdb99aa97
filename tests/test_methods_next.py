"""The later methods (spec methods-next.md): SSF, FacT-TT/TK, RepAdapter, DiffFit, LayerNorm tuning, Houlsby and
Pfeiffer adapters, Bi-AdaptFormer and Bi-LoRA. Counts, trained tensors, identity at init, the equations written out
independently, folding, checkpoints, and the backbone kinds each declares."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL, TINY_SWIN, TINY_VIT, images, randomize_trainable, tiny_backbone, with_method

import petl_bench as pb
from petl_bench.errors import UserError
from petl_bench.methods.binary import QLinear, normal_codes

NEW = ["ssf", "fact_tt", "fact_tk", "repadapter", "repadapter_attn", "difffit", "ln_tune", "houlsby_adapter", "pfeiffer_adapter",
       "bi_adaptformer", "bi_lora"]  # fmt: skip
IDENTITY_AT_INIT = [
    "fact_tt",
    "fact_tk",
    "repadapter",
    "repadapter_attn",
    "difffit",
    "ln_tune",
    "pfeiffer_adapter/module",
]
NOT_IDENTITY = ["ssf", "houlsby_adapter", "pfeiffer_adapter", "bi_adaptformer", "bi_lora"]
FOLDS = ["ssf", "fact_tt", "fact_tk", "repadapter", "repadapter_attn", "difffit", "ln_tune", "bi_lora"]
DOES_NOT_FOLD = ["houlsby_adapter", "pfeiffer_adapter", "bi_adaptformer"]
SSF_SITES = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


def is_layer_norm(name: str) -> bool:
    return any(part in name for part in ("norm1.", "norm2.")) or name.startswith("norm.")


# What each method trains (the head always trains), named independently of the implementation.
INTENDED = {
    "ssf": lambda n: n.endswith(("ssf_scale", "ssf_shift")),
    "fact_tt": lambda n: n.startswith("fact."),
    "fact_tk": lambda n: n.startswith("fact."),
    "repadapter": lambda n: ".adapter.conv_" in n,
    "repadapter_attn": lambda n: ".attn.qkv.adapter.conv_" in n,
    "difffit": lambda n: n.endswith("bias") or is_layer_norm(n) or n.endswith(".gamma"),
    "ln_tune": is_layer_norm,
    "houlsby_adapter": lambda n: ".adapter_attn." in n or ".adapter_mlp." in n,
    "pfeiffer_adapter": lambda n: ".adapter_mlp." in n,
    "bi_adaptformer": lambda n: ".adapter_mlp." in n,
    "bi_lora": lambda n: ".attn.qkv.lora_" in n,
}


def test_counts_on_vit_b16_equal_the_spec():
    expected = {
        ("ssf", ()): 205_824, ("fact_tt", ()): 8_448, ("fact_tt", (("rank", 8),)): 21_504,
        ("fact_tt", (("rank", 16),)): 61_440, ("fact_tk", ()): 13_952, ("fact_tk", (("rank", 16),)): 30_976,
        ("fact_tk", (("rank", 32),)): 86_528, ("repadapter", ()): 239_808, ("repadapter_attn", ()): 119_904, ("difffit", ()): 140_544,
        ("ln_tune", ()): 38_400, ("houlsby_adapter", ()): 313_536, ("houlsby_adapter", (("dim", 32),)): 1_198_848,
        ("pfeiffer_adapter", ()): 156_768, ("pfeiffer_adapter", (("dim", 64),)): 1_189_632,
        ("bi_adaptformer", ()): 589_824, ("bi_adaptformer", (("dim", 1),)): 18_432, ("bi_lora", ()): 1_179_648,
        ("bi_lora", (("dim", 1),)): 36_864,
    }  # fmt: skip
    for (method, overrides), count in expected.items():
        model = pb.create_model(method, num_classes=100, pretrained="none", **dict(overrides))
        assert pb.count_trainable(model)[0] == count, (method, overrides)


def test_binary_checkpoint_bytes_equal_the_official_files():
    # lora/cifar-bit1-dim32.bin is 455,440 bytes: 147,840 of packed adapters + the fp32 head for 100 classes.
    for method, dim, adapters in [("bi_lora", 32, 147_840), ("bi_lora", 1, 4_992), ("bi_adaptformer", 32, 73_920)]:
        model = pb.create_model(method, num_classes=100, pretrained="none", dim=dim)
        assert model.method.stored_bytes(model) == adapters + 769 * 100 * 4, (method, dim)
    fp32 = pb.create_model("bi_lora", num_classes=100, pretrained="none", dim=1, bits=32)
    assert fp32.method.stored_bytes(fp32) is None  # nothing packed: the safetensors checkpoint is the size


def test_fact_per_task_mean_counts_equal_the_paper():
    # The paper averages the per-task counts over the group means: 0.037M (TT) and 0.069M (TK).
    groups = {}
    for task in pb.TASKS.names():
        info = pb.TASKS.get(task)
        if info.suite == "vtab":
            groups.setdefault(info.group, []).append(task)
    formulas = {"fact_tt": lambda r: 1536 * r + 144 * r * r, "fact_tk": lambda r: 1536 * r + 144 * r + r**3}
    for method, paper in [("fact_tt", 36_649), ("fact_tk", 69_333)]:
        runner = pb.METHODS.get(method)()
        means = [
            sum(formulas[method](runner.make_config(t).rank) for t in tasks) / len(tasks) for tasks in groups.values()
        ]
        assert round(sum(means) / len(means)) == paper


@pytest.mark.parametrize("depth,width", [(2, 32), (3, 48)])
def test_counts_equal_the_formulas_on_small_vits(depth, width):
    spec = dict(TINY_VIT, depth=depth, embed_dim=width, num_heads=2)
    h, r = 8, 3
    expected = {
        "ssf": depth * 2 * (width + 3 * width + width + width + 4 * width + width) + 4 * width,
        "fact_tt": 2 * width * r + depth * 12 * r * r,
        "fact_tk": 2 * width * r + r**3 + 12 * depth * r,
        "repadapter": depth * 2 * (width * h + h + width * h // 2 + width),
        "repadapter_attn": depth * (width * h + h + width * h // 2 + width),
        "difffit": depth * (11 * width + 2 * width + 2 * width) + 3 * width,
        "ln_tune": depth * 4 * width + 2 * width,
        "houlsby_adapter": depth * 2 * (2 * width * h + h + width),
        "pfeiffer_adapter": depth * (2 * width * h + h + width),
        "bi_adaptformer": depth * 2 * width * 4,
        "bi_lora": depth * 4 * width * 4,
    }
    for method, count in expected.items():
        _, model = with_method(method, tiny_backbone(spec, num_classes=7), **SMALL.get(method, {}))
        assert pb.count_trainable(model) == (count, count + 7 * (width + 1)), method


@pytest.mark.parametrize("method", NEW)
def test_exactly_the_intended_tensors_train_and_get_gradients(method):
    _, model = with_method(method, tiny_backbone(TINY_VIT), **SMALL.get(method, {}))
    trainable = set(pb.trainable_parameters(model))
    expected = {n for n, _ in model.backbone.named_parameters() if INTENDED[method](n) or n.startswith("head.")}
    assert trainable == expected
    randomize_trainable(model)
    model.train()
    model(images(TINY_VIT)).logsumexp(-1).sum().backward()
    for name, parameter in model.backbone.named_parameters():
        assert (parameter.grad is not None) == (name in expected), name
        if name in expected:
            assert parameter.grad.abs().sum() > 0, f"{name} gets no gradient"


@pytest.mark.parametrize("method", IDENTITY_AT_INIT)
def test_zero_initialised_methods_reproduce_the_frozen_backbone(method):
    method, _, init = method.partition("/")
    overrides = {**SMALL.get(method, {}), **({"init": init} if init else {})}
    reference, model = with_method(method, tiny_backbone(TINY_VIT, init_values=1e-1), **overrides)
    x = images(TINY_VIT)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-6)
        randomize_trainable(model)
        assert not torch.allclose(model(x), reference(x), atol=1e-3)


@pytest.mark.parametrize("method", NOT_IDENTITY)
def test_methods_that_are_not_identity_at_init_change_the_logits(method):
    reference, model = with_method(method, tiny_backbone(TINY_VIT), **SMALL.get(method, {}))
    x = images(TINY_VIT)
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(x), reference(x), atol=1e-5)


def test_ssf_init_and_equations():
    reference, model = with_method("ssf", tiny_backbone(TINY_VIT))
    scales = torch.cat([m.ssf_scale for n, m in model.backbone.named_modules() if hasattr(m, "ssf_scale")])
    assert abs(scales.mean().item() - 1) < 0.01 and abs(scales.std().item() - 0.02) < 0.005
    model.eval()
    affine = {n: m for n, m in model.backbone.named_modules() if hasattr(m, "ssf_scale")}

    def ssf(site, t, channel_dim=-1):
        scale, shift = affine[site].ssf_scale, affine[site].ssf_shift
        if channel_dim == 1:
            scale, shift = scale[:, None, None], shift[:, None, None]
        return t * scale + shift

    def block_forward(i, block, x):
        p = f"blocks.{i}."
        y = ssf(p + "norm1", block.norm1(x))
        b, n, c = y.shape
        qkv = ssf(p + "attn.qkv", block.attn.qkv(y)).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b, n, c)
        x = x + ssf(p + "attn.proj", block.attn.proj(a))
        y = ssf(p + "norm2", block.norm2(x))
        hidden = F.gelu(ssf(p + "mlp.fc1", block.mlp.fc1(y)))
        return x + ssf(p + "mlp.fc2", block.mlp.fc2(hidden))

    vit = reference
    x = images(TINY_VIT)
    with torch.no_grad():
        tokens = ssf("patch_embed.proj", vit.patch_embed.proj(x), channel_dim=1).flatten(2).transpose(1, 2)
        tokens = torch.cat([vit.cls_token.expand(len(x), -1, -1), tokens], dim=1) + vit.pos_embed
        for i, block in enumerate(vit.blocks):
            tokens = block_forward(i, block, tokens)
        logits = vit.head(ssf("norm", vit.norm(tokens))[:, 0])
        torch.testing.assert_close(model(x), logits, rtol=0, atol=1e-5)


CAST_TOGETHER = ["ssf", "difffit", "convpass", "convpass_attn", "adapter", "adaptformer", "houlsby_adapter",
                 "pfeiffer_adapter"]  # fmt: skip


@pytest.mark.parametrize("method", CAST_TOGETHER)
def test_cast_together_is_bitwise_casting_each_tensor(method):
    """Under bf16 autocast the trained tensors of these methods are cast to bf16 in one ``cat`` per forward
    pass (``CastTogether``: SSF's and DiffFit's per-channel tensors, the side branches' Linears and convs): the
    logits and every gradient are bitwise those of casting each tensor at its use, in training mode, over two
    steps (the second pass casts the updated tensors, not the first pass's copies)."""

    def run(together: bool):
        _, model = with_method(method, tiny_backbone(TINY_VIT))
        randomize_trainable(model)
        if not together:  # every site casts its own tensors, as before
            for module in model.backbone.modules():
                if isinstance(module.__dict__.get("together"), tuple):
                    module.__dict__["together"] = None
        trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
        optimizer = torch.optim.SGD(trained.values(), lr=0.1)
        torch.manual_seed(0)  # the same dropout and drop-path draws (casting draws nothing)
        steps = []
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model.train()(images(TINY_VIT))
            optimizer.zero_grad()
            logits.float().square().mean().backward()
            steps.append((logits, {n: p.grad.clone() for n, p in trained.items()}))
            optimizer.step()
        return steps

    for (logits, grads), (each_logits, each_grads) in zip(run(True), run(False)):
        assert logits.dtype == torch.bfloat16 and torch.equal(logits, each_logits)
        assert grads.keys() == each_grads.keys() and all(torch.equal(grads[n], each_grads[n]) for n in grads)
    _, model = with_method(method, tiny_backbone(TINY_VIT))
    assert any(isinstance(getattr(m, "together", None), tuple) for m in model.backbone.modules()), "the path is used"


def fact_reference(method, factors, block_index, scale, attn_input, proj_input, fc1_input, fc2_input):
    """The official code's FacT deltas (row vectors multiplied from the right), for one block in eval mode."""
    u, v = factors.u.weight.t(), factors.v.weight.t()  # x @ u: d -> r; @ v: r -> d
    r = u.shape[1]
    if method == "fact_tt":
        cores = factors.cores[block_index]
        q, k, vv, o = (getattr(cores, n).weight.t() for n in ("q", "k", "v", "o"))
        f1, f2t = cores.fc1.weight.t(), cores.fc2.weight.t()
    else:
        m = factors.c @ factors.p[:, 12 * block_index : 12 * block_index + 12]
        q, k, vv, o = (m[:, :, j] for j in range(4))
        f1 = m[:, :, 4:8].reshape(r, 4 * r)
        f2t = m[:, :, 8:12].reshape(r, 4 * r).t()
    qkv = torch.cat([(attn_input @ u @ w) @ v for w in (q, k, vv)], dim=-1) * scale
    proj = (proj_input @ u @ o) @ v * scale
    b, n, _ = fc1_input.shape
    fc1 = ((fc1_input @ u @ f1).reshape(b, n, 4, r) @ v).reshape(b, n, -1) * scale
    fc2 = ((fc2_input.reshape(b, n, 4, -1) @ u).reshape(b, n, 4 * r) @ f2t) @ v * scale
    return qkv, proj, fc1, fc2


@pytest.mark.parametrize("method", ["fact_tt", "fact_tk"])
def test_fact_equations_as_the_official_code(method):
    _, model = with_method(method, tiny_backbone(TINY_VIT), rank=3, scale=2.5)
    randomize_trainable(model)
    model.eval()
    block = model.backbone.blocks[1]
    x = torch.randn(2, 17, 32)
    hidden = torch.randn(2, 17, 128)
    with torch.no_grad():
        qkv, proj, fc1, fc2 = fact_reference(method, model.backbone.fact, 1, 2.5, x, x, x, hidden)
        torch.testing.assert_close(block.attn.qkv(x), block.attn.qkv.linear(x) + qkv, rtol=0, atol=1e-5)
        torch.testing.assert_close(block.attn.proj(x), block.attn.proj.linear(x) + proj, rtol=0, atol=1e-5)
        torch.testing.assert_close(block.mlp.fc1(x), block.mlp.fc1.linear(x) + fc1, rtol=0, atol=1e-5)
        torch.testing.assert_close(block.mlp.fc2(hidden), block.mlp.fc2.linear(hidden) + fc2, rtol=0, atol=1e-5)


def test_fact_init_and_shared_factors():
    _, model = with_method("fact_tk", tiny_backbone(TINY_VIT), rank=3)
    factors = model.backbone.fact
    assert torch.count_nonzero(factors.v.weight) == 0
    assert factors.c.abs().max() <= math.sqrt(3) / 3 and factors.c.abs().max() > 0.3
    shared = {id(m.factors) for m in model.backbone.modules() if hasattr(m, "slot")}
    assert shared == {id(factors)}, "every wrapped Linear uses the one set of factors"


def test_repadapter_equation_as_the_official_conv1d_code():
    _, model = with_method("repadapter", tiny_backbone(TINY_VIT), scale=0.7)
    randomize_trainable(model)
    model.eval()
    wrapped = model.backbone.blocks[0].attn.qkv
    adapter = wrapped.adapter
    assert adapter.conv_B.weight.shape == (32, 4, 1)
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        t = x.transpose(1, 2)  # the official code runs Conv1d on (B, C, N)
        hidden = F.conv1d(t, adapter.conv_A.weight, adapter.conv_A.bias)
        up = F.conv1d(hidden, adapter.conv_B.weight, adapter.conv_B.bias, groups=2)
        expected = wrapped.linear((t + up * 0.7).transpose(1, 2))
        torch.testing.assert_close(wrapped(x), expected, rtol=0, atol=1e-5)


def test_difffit_and_sequential_adapter_equations_in_training():
    for method, overrides in (("difffit", {}), ("houlsby_adapter", {"scale": 1.7})):
        _, model = with_method(method, tiny_backbone(TINY_VIT, drop_path_rate=0.5), **overrides)
        randomize_trainable(model)
        model.train()
        wrapped = model.backbone.blocks[1]
        x = torch.randn(4, 17, 32)
        torch.manual_seed(7)
        ours = wrapped(x)
        torch.manual_seed(7)
        if method == "difffit":  # x + gamma1 * DP(attn(norm1 x)); x + gamma2 * DP(mlp(norm2 x))
            b = wrapped
            x1 = x + b.ls1.gamma * b.drop_path1(b.attn(b.norm1(x)))
            theirs = x1 + b.ls2.gamma * b.drop_path2(b.mlp(b.norm2(x1)))
        else:  # PETL_Vision "sequential after": x + DP(h + s A(h)), h = DP(branch(norm x))
            b, a1, a2 = wrapped.block, wrapped.adapter_attn, wrapped.adapter_mlp
            h = b.drop_path1(b.attn(b.norm1(x)))
            x1 = x + b.drop_path1(h + 1.7 * a1.up(a1.dropout(torch.relu(a1.down(h)))))
            h = b.drop_path2(b.mlp(b.norm2(x1)))
            theirs = x1 + b.drop_path2(h + 1.7 * a2.up(a2.dropout(torch.relu(a2.down(h)))))
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_pfeiffer_and_houlsby_declared_inits():
    _, houlsby = with_method("houlsby_adapter", tiny_backbone(TINY_VIT), init="module")
    _, pfeiffer = with_method("pfeiffer_adapter", tiny_backbone(TINY_VIT), init="module")
    h_up = houlsby.backbone.blocks[0].adapter_mlp.up
    p_side = pfeiffer.backbone.blocks[0].adapter_mlp
    assert h_up.weight.abs().max() <= math.sqrt(6 / (32 + 8)) and h_up.weight.abs().max() > 0.1
    assert h_up.bias.abs().max() < 1e-5 and torch.count_nonzero(h_up.bias) > 0
    assert torch.count_nonzero(p_side.up.weight) == 0 and torch.count_nonzero(p_side.down.bias) == 0
    assert pfeiffer.backbone.blocks[0].adapter_attn is None
    with pytest.raises(UserError, match="choose from: xavier, lora_xavier"):
        with_method("pfeiffer_adapter", tiny_backbone(TINY_VIT), adapter_init="zero")
    with pytest.raises(UserError, match="choose from: official, module"):
        with_method("pfeiffer_adapter", tiny_backbone(TINY_VIT), init="xavier")


def test_quantiser_codes_and_straight_through_gradient():
    codes, thresholds = normal_codes(1)
    torch.testing.assert_close(codes, torch.tensor([-0.6745, 0.6745]), atol=1e-4, rtol=0)
    codes, thresholds = normal_codes(2)
    torch.testing.assert_close(codes, torch.tensor([-1.2657, -0.3778, 0.3778, 1.2657]), atol=1e-4, rtol=0)
    torch.testing.assert_close(thresholds, torch.tensor([-0.8217, 0.0, 0.8217]), atol=1e-4, rtol=0)
    layer = QLinear(16, 8, bits=1)
    w = layer.weight
    mean, std = w.mean(), w.std()
    expected = torch.where(w > mean, 0.6745, -0.6745) * std + mean  # the official forward, written out
    torch.testing.assert_close(layer.effective_weight(), expected, atol=1e-4, rtol=0)
    # Straight-through: Q(z) is a constant plus z - z.detach(), with z = (w - mean) / (std + 1e-5) and the mean
    # and std in the graph.
    x = torch.randn(5, 16)
    layer(x).sum().backward()
    reference = w.detach().clone().requires_grad_(True)
    m, s = reference.mean(), reference.std()
    z = (reference - m) / (s + 1e-5)
    codes = torch.where(z.detach() > 0, 0.6745, -0.6745)
    F.linear(x, (codes + z - z.detach()) * s + m).sum().backward()
    torch.testing.assert_close(layer.weight.grad, reference.grad, atol=1e-5, rtol=1e-4)


def test_binary_adapter_inits_and_bits():
    _, model = with_method("bi_lora", tiny_backbone(TINY_VIT), dim=4)
    branch = model.backbone.blocks[0].attn.qkv.lora_q
    assert isinstance(branch.up, QLinear) and branch.up.bias is None
    assert 0 < branch.up.weight.abs().max() <= 0.002
    assert branch.down.weight.abs().max() <= 1 / math.sqrt(32)
    _, full = with_method("bi_adaptformer", tiny_backbone(TINY_VIT), dim=4, bits=32)
    side = full.backbone.blocks[0].adapter_mlp
    assert type(side.up) is torch.nn.Linear and torch.count_nonzero(side.up.weight) == 0
    with pytest.raises(UserError, match="bits is 3"):
        with_method("bi_lora", tiny_backbone(TINY_VIT), bits=3)


@pytest.mark.parametrize("method", FOLDS)
def test_folding_gives_the_same_logits(method):
    _, model = with_method(method, tiny_backbone(TINY_VIT, init_values=0.5), **SMALL.get(method, {}))
    randomize_trainable(model)
    if method == "ssf":  # scales around 1, as trained
        with torch.no_grad():
            for name, p in pb.trainable_parameters(model).items():
                if name.endswith("ssf_scale"):
                    p.add_(1.0)
    merged = pb.merge(model)
    assert not any(type(m).__module__.startswith("petl_bench") for m in merged.modules()), "no wrapper left"
    plain, _ = tiny_backbone(TINY_VIT, init_values=0.5)
    assert set(merged.state_dict()) == set(plain.state_dict()), "the merged model is a plain timm ViT"
    x = images(TINY_VIT)
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(x), plain(x), atol=1e-2), "the method tensors must matter"
        assert (model(x) - merged(x)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("method", DOES_NOT_FOLD)
def test_non_linear_adapters_refuse_to_fold(method):
    _, model = with_method(method, tiny_backbone(TINY_VIT), **SMALL.get(method, {}))
    with pytest.raises(UserError, match=f"method '{method}' cannot be merged"):
        pb.merge(model)


@pytest.mark.parametrize("method", NEW)
def test_checkpoints_round_trip(method, tmp_path):
    _, model = with_method(method, tiny_backbone(TINY_VIT), **SMALL.get(method, {}))
    randomize_trainable(model)
    path = pb.save_trainable(model, tmp_path / "trainable.safetensors")
    _, fresh = with_method(method, tiny_backbone(TINY_VIT), **SMALL.get(method, {}))
    pb.load_trainable(fresh, path)
    x = images(TINY_VIT)
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


KINDS = [("repadapter", TINY_SWIN), ("ln_tune", TINY_SWIN), ("houlsby_adapter", TINY_SWIN),
         ("pfeiffer_adapter", TINY_SWIN)]  # fmt: skip


@pytest.mark.parametrize("method,spec", KINDS, ids=[m for m, _ in KINDS])
def test_methods_run_on_the_other_kinds_they_declare(method, spec):
    reference, model = with_method(method, tiny_backbone(spec))
    randomize_trainable(model)
    model.train()
    model(images(spec)).logsumexp(-1).sum().backward()
    grads = [p.grad for p in pb.trainable_parameters(model).values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    if method == "repadapter":
        merged = pb.merge(model)
        model.eval()
        with torch.no_grad():
            assert (model(images(spec)) - merged(images(spec))).abs().max() <= 1e-4


@pytest.mark.parametrize("method", ["ln_tune", "houlsby_adapter", "pfeiffer_adapter"])
def test_methods_on_an_open_clip_visual_transformer(method, tiny_clip_name):
    backbone, info = pb.build_backbone(tiny_clip_name, "none", num_classes=5)
    _, model = with_method(method, (backbone, info))
    randomize_trainable(model)
    model.train()
    model(images(32)).logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in pb.trainable_parameters(model).values())


def test_layer_norm_tuning_on_convnext_trains_its_layer_norms():
    backbone, info = pb.build_backbone(
        "convnext_atto", "none", num_classes=5, dims=(8, 16, 24, 32), depths=(1, 1, 1, 1)
    )
    _, model = with_method("ln_tune", (backbone, info))
    norms = {n for n, m in model.backbone.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    expected = {f"{n}.{p}" for n in norms for p in ("weight", "bias")} | {"head.fc.weight", "head.fc.bias"}
    assert set(pb.trainable_parameters(model)) == expected
    assert len(norms) == 4 + 1 + 3 + 1  # one per block, the stem, the three downsamples, the head
    model.train()
    model(images(32)).logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in pb.trainable_parameters(model).values())


@pytest.mark.parametrize("method", ["ssf", "fact_tt", "difffit", "bi_lora"])
def test_vit_only_methods_refuse_other_backbones(method):
    with pytest.raises(UserError, match=f"method '{method}' does not support the swin backbone"):
        with_method(method, tiny_backbone(TINY_SWIN))


def test_fact_refuses_an_mlp_that_is_not_four_times_the_width():
    with pytest.raises(UserError, match="needs an MLP of 4 x the width"):
        with_method("fact_tt", tiny_backbone(TINY_VIT, mlp_ratio=2.0))


def test_official_per_task_settings_are_the_defaults():
    assert pb.METHODS.get("fact_tt")().make_config("svhn").rank == 16
    assert pb.METHODS.get("fact_tk")().make_config("dtd").scale == 0.01
    assert pb.METHODS.get("repadapter")().make_config("caltech101").scale == 5
    assert pb.METHODS.get("repadapter_attn")().make_config("caltech101").scale == 10
    assert pb.METHODS.get("bi_lora")().make_config("eurosat").scale == 10
    assert pb.METHODS.get("bi_adaptformer")().make_config("eurosat").scale == 1
    for method in NEW:
        runner = pb.METHODS.get(method)()
        assert runner.merges == (method in FOLDS), method


@pytest.mark.parametrize("method", ["bi_adaptformer", "bi_lora"])
def test_bi_head_is_a_one_bit_bias_free_classifier(method):
    model = pb.create_model(method, num_classes=100, pretrained="none", bihead=True)
    assert isinstance(model.head, QLinear) and model.head.bias is None and model.head.bits == 1
    adapters = {"bi_adaptformer": 589_824, "bi_lora": 1_179_648}[method]
    assert pb.count_trainable(model) == (adapters, adapters + 768 * 100)
    packed = {"bi_adaptformer": 73_920, "bi_lora": 147_840}[method]
    assert model.method.stored_bytes(model) == packed + 768 * 100 // 8 + 8  # the head packed as well


def test_bi_lora_with_bi_head_folds_to_a_plain_model():
    runner = pb.METHODS.get("bi_lora")()
    model = pb.attach_method(*tiny_backbone(TINY_VIT), runner, runner.make_config(dim=4, bihead=True))
    randomize_trainable(model)
    merged = pb.merge(model)
    assert not any(type(m).__module__.startswith("petl_bench") for m in merged.modules())
    x = images(TINY_VIT)
    model.eval()
    with torch.no_grad():
        assert (model(x) - merged(x)).abs().max().item() <= 1e-4


def test_fact_tk_computes_its_core_once_per_pass_and_equals_the_per_block_product():
    """The Tucker core C @ P is formed once per forward pass and sliced per block: the same logits and
    gradients as forming each block's C @ P[:, 12 i : 12 i + 12] in each Linear (within float rounding)."""
    import copy

    _, model = with_method("fact_tk", tiny_backbone(TINY_VIT), rank=3)
    randomize_trainable(model)
    x = images(TINY_VIT)
    per_block = copy.deepcopy(model)
    for hook in per_block.backbone.fact.__dict__["hooks"]:
        hook.remove()  # no pass-wide product: every Linear forms its block's core itself
    model.eval(), per_block.eval()
    logits, reference = model(x), per_block(x)
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-6)
    logits.square().sum().backward()
    reference.square().sum().backward()
    for (name, a), (_, b) in zip(pb.trainable_parameters(model).items(), pb.trainable_parameters(per_block).items()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
    from petl_bench.opcount import count_step

    once, each = (count_step(m.train(), 2, (32, 32), 5, dtype=None) for m in (model, per_block))
    assert once.kernels < each.kernels and once.by_op["bmm"] < each.by_op["bmm"] + each.by_op["mm"]


@pytest.mark.parametrize("method", ["ssf", "difffit"])
def test_per_channel_scales_act_in_the_activation_dtype(method):
    """Under bf16 autocast a scale (and shift) is cast to the dtype of what it scales: its output has the
    wrapped module's dtype (bf16 after a Linear, fp32 after a LayerNorm), never promoted to fp32."""
    _, model = with_method(method, tiny_backbone(TINY_VIT))
    randomize_trainable(model)
    model.eval()
    pairs, hooks = [], []
    for module in model.backbone.modules():
        if type(module).__name__ in ("ScaleShift", "ScaledOutput"):
            inner = module.module if hasattr(module, "module") else module.layer_scale
            seen = {}
            hooks.append(inner.register_forward_hook(lambda m, a, out, seen=seen: seen.update(inner=out.dtype)))
            hooks.append(
                module.register_forward_hook(lambda m, a, out, seen=seen: pairs.append((seen["inner"], out.dtype)))
            )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(images(TINY_VIT))
    for hook in hooks:
        hook.remove()
    assert pairs and all(inner == out for inner, out in pairs), pairs
    assert any(inner == torch.bfloat16 for inner, _ in pairs)


def test_stacked_quantisers_give_the_per_matrix_values_and_gradients():
    """Bi-LoRA's four and Bi-AdaptFormer's two quantised matrices per block are de-quantised in one stacked
    pass: outputs and every gradient equal (bitwise) the per-matrix QLinear path."""
    import functools

    from petl_bench.methods.binary import StackedBottleneck, StackedQVLoRA, projection, quantized_low_rank
    from petl_bench.methods.building_blocks import Bottleneck
    from petl_bench.methods.lora import QVLoRA

    torch.manual_seed(0)
    lora = StackedQVLoRA(
        torch.nn.Linear(64, 192), 8, 0.0, 0.5, branch=functools.partial(quantized_low_rank, 64, 8, 0.0, 1)
    )
    adapter = StackedBottleneck(64, 8, torch.nn.ReLU(), 0.0, linear=projection(2))
    for stacked, plain in ((lora, QVLoRA.forward), (adapter, Bottleneck.forward)):
        params = [p for p in stacked.parameters() if p.requires_grad]
        with torch.no_grad():
            for p in params:
                p.normal_()
        x, weights = torch.randn(3, 5, 64, requires_grad=True), torch.randn(3, 5, 64 if stacked is adapter else 192)
        results = []
        for y in (stacked(x), plain(stacked, x)):
            results.append((y, *torch.autograd.grad((y * weights).sum(), [x, *params])))
        for ours, theirs in zip(*results):
            assert torch.equal(ours, theirs)
