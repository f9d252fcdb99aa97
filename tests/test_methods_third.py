"""The third batch of methods (spec: ../shared/spec/methods-third.md): Adapter+ and ARC. Counts on ViT-B/16
equal the spec's, the equations written out give the same outputs, inits are the official ones, ARC folds
exactly. (Identity at init, the trained set, checkpoints and merging: the contract test, for every method.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import TINY_VIT, images, randomize_trainable, tiny_backbone, with_method

import petl_bench as pb
from petl_bench.methods.adapter_plus import AdapterPlusBlock, rank_tables
from petl_bench.methods.building_blocks import AdaptedInput


def vit_b_count(method: str, **overrides) -> int:
    model = pb.create_model(method, pb.PAPER_BACKBONE, num_classes=10, pretrained="none", **overrides)
    return pb.count_trainable(model)[0]


@pytest.mark.parametrize(
    "method,overrides,expected",
    [
        ("adapter_plus", {}, 165_984),  # 12 (1537 r + 1536), r = 8
        ("adapter_plus", {"dim": 1}, 36_876),
        ("adapter_plus", {"dim": 32}, 608_640),
        ("arc", {}, 96_432),  # 1560 r + 18,432, r = 50
        ("arc_attn", {}, 48_216),  # 780 r + 9,216
    ],
)
def test_counts_on_vit_b16_equal_the_spec(method, overrides, expected):
    assert vit_b_count(method, **overrides) == expected


def test_adapter_plus_per_task_ranks_give_the_specs_19_task_means():
    method = pb.METHODS.get("adapter_plus")()
    tasks = [name for name, task in pb.TASKS.items() if task.suite == "vtab"]
    for table, mean in (("dim1-4", 75_705), ("dim1-8", 122_301), ("dim1-32", 231_023)):
        assert set(rank_tables()[table]) == set(tasks)
        ranks = [method.make_config(task, ranks=table).dim for task in tasks]
        assert round(sum(12 * (1537 * r + 1536) for r in ranks) / len(tasks)) == mean
    assert method.make_config("svhn", ranks="dim1-32").dim == 16 and method.make_config("svhn").dim == 8
    assert method.make_config("svhn", ranks="dim1-32", dim=3).dim == 3, "an explicit dim wins"


def test_adapter_plus_post_is_the_block_output_plus_the_scaled_bottleneck():
    reference, model = with_method("adapter_plus", tiny_backbone(TINY_VIT), drop_path=0.0)
    randomize_trainable(model)
    wrapped = model.backbone.blocks[0]
    assert isinstance(wrapped, AdapterPlusBlock)
    adapter, x = wrapped.adapter, torch.randn(2, 17, 32)
    model.eval()
    with torch.no_grad():
        z = reference.blocks[0](x)
        expected = z + adapter.scaling * adapter.up(torch.nn.functional.gelu(adapter.down(z)))
        torch.testing.assert_close(wrapped(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("position", ["pre", "intermediate", "parallel"])
def test_adapter_plus_positions_follow_the_official_block(position):
    reference, model = with_method("adapter_plus", tiny_backbone(TINY_VIT), drop_path=0.0, position=position)
    randomize_trainable(model)
    block, wrapped = reference.blocks[0], model.backbone.blocks[0]
    delta, x = wrapped.adapter, torch.randn(2, 17, 32)
    model.eval()
    with torch.no_grad():
        y = x + block.attn(block.norm1(x))
        if position == "pre":
            y = y + delta(y)
            expected = y + block.mlp(block.norm2(y))
        else:
            h = block.mlp(block.norm2(y))
            expected = y + h + delta(h if position == "intermediate" else y)
        torch.testing.assert_close(wrapped(x), expected, rtol=0, atol=1e-6)


def test_adapter_plus_inits():
    _, model = with_method("adapter_plus", tiny_backbone(TINY_VIT, embed_dim=192, num_heads=3), dim=64)
    adapters = [block.adapter for block in model.backbone.blocks]
    for layer in [a.down for a in adapters] + [a.up for a in adapters]:
        weight = layer.weight.detach()
        assert weight.abs().max() <= 0.02 and 0.006 < weight.std() < 0.01  # trunc_normal(0.01) cut at +-0.02
        assert torch.equal(layer.bias.detach(), torch.zeros_like(layer.bias))
    assert all(torch.equal(a.scaling.detach(), torch.ones(192)) for a in adapters)
    _, lora = with_method("adapter_plus", tiny_backbone(TINY_VIT), init="lora")
    assert all(not block.adapter.up.weight.any() for block in lora.backbone.blocks)


def test_arc_shares_one_projection_per_kind_and_its_inits_are_the_official_ones():
    _, model = with_method("arc", tiny_backbone(TINY_VIT), dim=6)
    att = [b.attn.qkv.adapter for b in model.backbone.blocks]
    mlp = [b.mlp.fc1.adapter for b in model.backbone.blocks]
    assert all(a.shared is model.backbone.arc_att_down_projection for a in att)
    assert all(a.shared is model.backbone.arc_mlp_down_projection for a in mlp)
    assert all(not a.adapter_rescale.any() and not a.adapter_bias.any() for a in att)
    bound = math.sqrt(6 / 7)
    assert all(a.adapter_rescale.abs().max() <= bound and a.adapter_rescale.any() for a in mlp)
    names = set(pb.trainable_parameters(model))
    assert sum(".down_projection" in n or "_down_projection" in n for n in names) == 2


def test_arc_is_the_official_equation_and_folds_exactly():
    reference, model = with_method("arc", tiny_backbone(TINY_VIT), dim=6)
    randomize_trainable(model)
    model.eval()
    wrapped = model.backbone.blocks[1].mlp.fc1
    assert isinstance(wrapped, AdaptedInput)
    z = torch.randn(2, 17, 32)
    adapter = wrapped.adapter
    with torch.no_grad():
        u, lam, beta = adapter.shared.weight, adapter.adapter_rescale, adapter.adapter_bias
        expected = reference.blocks[1].mlp.fc1(z + (z @ (u * lam)) @ u.t() + beta)
        torch.testing.assert_close(wrapped(z), expected, rtol=0, atol=1e-5)
        x = images(TINY_VIT)
        merged = pb.merge(model)
        assert (merged(x) - model(x)).abs().max() <= 1e-4
        assert not any("arc" in name or "adapter" in name for name, _ in merged.named_parameters())


def test_adapter_plus_prints_beside_its_published_rows_with_source_and_average_kind():
    from conftest import synthetic_record

    from petl_bench.report import accuracy_tables, runs_frame

    tasks = [name for name, task in pb.TASKS.items() if task.suite == "vtab"]
    runs = [synthetic_record("adapter_plus", task, 0, 75.0) for task in tasks]
    (table,) = accuracy_tables(runs_frame(runs))
    labels = [row["method"] for row in table.display_rows()]
    average = "average = mean of group means"
    source = "visinf/adapter_plus assets/params_accuracy.png"
    assert f"adapter_plus (published: Adapter+ (r=8); {source}; {average})" in labels
    assert f"adapter_plus (published: Adapter+ opt. (dim1-8 per-task r); {source}; {average})" in labels
    assert labels[0] == "adapter_plus" and "arc" not in " ".join(labels), "ours first; only the methods that ran"


def test_dtl_counts_and_the_per_task_kernels_give_the_specs_mean():
    assert vit_b_count("dtl") == 36_864 and vit_b_count("dtl_plus") == 43_776
    method = pb.METHODS.get("dtl_plus")()
    tasks = [name for name, task in pb.TASKS.items() if task.suite == "vtab"]
    kernels = [method.make_config(task).kernel for task in tasks]
    assert round(sum(36_864 + 768 * k * k for k in kernels) / len(tasks)) == 50_728


@pytest.mark.parametrize("method", ["dtl", "dtl_plus"])
def test_dtl_side_network_and_head_follow_the_official_forward(method):
    reference, model = with_method(method, tiny_backbone(TINY_VIT, depth=4), beta=3.0)
    randomize_trainable(model)
    side = model.backbone.blocks
    x = images(TINY_VIT)
    model.eval()
    with torch.no_grad():
        tokens = reference.norm_pre(reference._pos_embed(reference.patch_embed(x)))
        summed = 0
        for index, block in enumerate(reference.blocks):
            summed = summed + tokens @ side.lora_A[index].weight.t() @ side.lora_B[index].weight.t()
            tokens = block(tokens)
            if index >= 2:  # half of the 4 blocks get the side network
                g = summed * torch.sigmoid(3.0 * summed)
                if method == "dtl_plus":
                    patches = g[:, 1:].transpose(1, 2).reshape(len(x), 32, 4, 4)
                    conv = torch.nn.functional.conv2d(patches, side.lora_fusion.weight, padding="same", groups=32)
                    g = torch.cat([g[:, :1], conv.flatten(2).transpose(1, 2)], dim=1)
                tokens = tokens + g
        expected = model.backbone.head(reference.norm(tokens[:, 1:].mean(1)))  # mean of patch tokens, then the norm
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
    assert not any(up.weight.any() for up in pb.create_model(method, "vit_tiny_patch16_224", num_classes=3,
                   pretrained="none").backbone.blocks.lora_B), "B starts at zero"  # fmt: skip


def _official_salient_channels(reference, batches, top_n: int) -> list[np.ndarray]:
    """The official getSalientChannels (showlab/SCT train_model_sct.py, ``sct_attn``) on a frozen copy: hooks
    keep each ``blocks.i.norm2`` input's patch tokens; per class the L2 norm over samples and tokens; the mean
    over the classes present; the channels above ``sort(score)[width - 1 - topN]``."""
    kept: list[list[torch.Tensor]] = [[] for _ in reference.blocks]
    hooks = [
        block.norm2.register_forward_hook(lambda m, i, o, index=index: kept[index].append(i[0][:, 1:, :]))
        for index, block in enumerate(reference.blocks)
    ]
    labels = []
    with torch.no_grad():
        for x, y in batches:
            reference(x)
            labels.append(y.numpy())
    for hook in hooks:
        hook.remove()
    labels = np.concatenate(labels)
    chosen = []
    for features in (torch.cat(k) for k in kept):
        norms = torch.stack([torch.norm(features[labels == c], 2, dim=(0, 1)) for c in np.unique(labels)])
        score = norms.mean(0).numpy()
        chosen.append(np.argwhere(score > np.sort(score)[len(score) - 1 - top_n]).squeeze())
    return chosen


def _labelled_batches(classes: int = 5, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(6, 3, 32, 32, generator=generator), torch.randint(0, classes - 1, (6,), generator=generator))
        for _ in range(3)
    ]  # fmt: skip  (class 4 never appears: the mean is over the classes present)


def test_sct_selection_is_the_official_rule_on_the_frozen_stream():
    assert vit_b_count("sct") == 111_744 and vit_b_count("sct", channels=32) == 12_672  # 12 (K^2 + K)
    reference, model = with_method("sct", tiny_backbone(TINY_VIT, depth=3), channels=8)
    randomize_trainable(model)  # the maps are switched off while the stream is read: their values do not matter
    batches = _labelled_batches()
    model.eval()
    with torch.no_grad():
        model.method.select(model, iter(batches))
    expected = _official_salient_channels(reference, batches, 8)
    for block, official in zip(model.backbone.blocks, expected):
        assert block.sct_attn.channels.tolist() == official.tolist()
    assert not all(block.sct_attn.recording for block in model.backbone.blocks), "the maps are on again"


def test_sct_map_adds_w_x_s_plus_b_to_the_salient_channels_of_the_stream():
    reference, model = with_method("sct", tiny_backbone(TINY_VIT), channels=8)
    randomize_trainable(model)
    block, x = model.backbone.blocks[0], torch.randn(2, 17, 32)
    channels = torch.tensor([1, 4, 5, 9, 12, 20, 30, 31])
    block.sct_attn.channels.copy_(channels)
    model.eval()
    with torch.no_grad():
        frozen = reference.blocks[0]
        y = x + frozen.attn(frozen.norm1(x))
        linear = block.sct_attn.adapt_linear
        y[..., channels] += y[..., channels] @ linear.weight.T + linear.bias
        expected = y + frozen.mlp(frozen.norm2(y))
        torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-6)


def test_sct_checkpoints_carry_the_selection_and_refuse_float_indices(tmp_path):
    from safetensors.torch import load_file, save_file

    _, model = with_method("sct", tiny_backbone(TINY_VIT), channels=8)
    model.eval()
    with torch.no_grad():
        model.method.select(model, iter(_labelled_batches()))
    randomize_trainable(model)
    path = pb.save_trainable(model, tmp_path / "sct.safetensors")
    _, fresh = with_method("sct", tiny_backbone(TINY_VIT, seed=5), channels=8)
    fresh.backbone.load_state_dict(model.backbone.state_dict(), strict=False)  # the same frozen weights
    pb.load_trainable(fresh.eval(), path)
    for ours, theirs in zip(model.backbone.blocks, fresh.backbone.blocks):
        assert torch.equal(ours.sct_attn.channels, theirs.sct_attn.channels)
    torch.testing.assert_close(fresh(images(TINY_VIT)), model(images(TINY_VIT)), rtol=0, atol=0)
    state = load_file(str(path))
    state["blocks.0.sct_attn.channels"] = state["blocks.0.sct_attn.channels"].float()
    save_file(state, str(tmp_path / "bad.safetensors"), metadata={"method": "sct"})
    with pytest.raises(pb.UserError, match="channels holds torch.float32"):
        pb.load_trainable(fresh, tmp_path / "bad.safetensors")


def test_an_sct_run_selects_from_the_training_images_only(monkeypatch, capsys, tmp_path, tiny_plugin):
    from conftest import TINY_RUN, make_task_folder, run_cli

    from petl_bench.methods.sct import SCT

    seen = []
    original = SCT.select

    def counting(self, model, batches):
        batches = list(batches)
        seen.append(sum(len(labels) for _, labels in batches))
        original(self, model, iter(batches))

    monkeypatch.setattr(SCT, "select", counting)
    task = make_task_folder(tmp_path / "colours", train=40, test=20)
    code, _, stderr = run_cli(monkeypatch, capsys, "run", "--plugin", str(tiny_plugin), "--task-dir", str(task),
                              "--methods", "sct", "--set", "sct.channels=4", "--epochs", "1",
                              "--output", str(tmp_path / "runs"), *TINY_RUN)  # fmt: skip
    assert code == 0, stderr
    assert seen == [40], "one selection pass over the 40 training images, never the 20 test images"


def _official_dyt_block(frozen, block, x, complete=False):
    """The official DyT ``Block.forward`` in eval mode, written out on the frozen block and our modules."""
    y = x + frozen.attn(frozen.norm1(x))
    soft = block.mlp_token_select.mlp_head(y[:, 1:]).sigmoid()
    mask = torch.cat([torch.ones(len(y), 1, 1), (soft > 0.5).float() - soft + soft], dim=1)
    adapter = block.adaptmlp
    adapted = adapter.up_proj(torch.relu(adapter.down_proj(y))) * adapter.scale
    mlp = frozen.mlp(frozen.norm2(y))
    return y + (mlp if complete else mask * mlp) + adapted, mask[:, 1:]


def test_dyt_counts_block_equation_and_forward():
    from petl_bench.methods.dyt import dyt_forward

    assert vit_b_count("dyt") == 313_548 and vit_b_count("dyt", bottleneck=8) == 165_996  # 12 (1537 b + 1537)
    reference, model = with_method("dyt", tiny_backbone(TINY_VIT), bottleneck=4)
    randomize_trainable(model)
    x, tokens = images(TINY_VIT), torch.randn(3, 17, 32)
    model.eval()
    with torch.no_grad():
        for complete in (False, True):
            ours, mask = model.backbone.blocks[0].run(tokens, complete)
            expected, official_mask = _official_dyt_block(
                reference.blocks[0], model.backbone.blocks[0], tokens, complete
            )
            torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
            assert (mask is None) == complete
        assert 0 < official_mask.mean() < 1, "the randomised dispatcher keeps some tokens and skips others"
        logits, masks = dyt_forward(model, x, complete=False)
        assert torch.equal(logits, model(x)) and masks.shape == (3, 2, 16, 1)
        for block in model.backbone.blocks:  # the official speed test's gather implementation: the same logits
            block.gather = True
        torch.testing.assert_close(model(x), logits, rtol=0, atol=1e-6)
    head = pb.create_model("dyt", "vit_tiny_patch16_224", num_classes=3, pretrained="none").head
    assert head.bias.abs().max() == 0 and 0.005 < head.weight.std() < 0.015, "MoCo v3's trunc_normal(0.01) head"


@pytest.mark.parametrize("distill", [True, False])
def test_dyt_training_loss_is_the_official_sum_of_terms(distill):
    from torch.nn import functional as F

    from petl_bench.methods.dyt import dyt_forward

    _, model = with_method("dyt", tiny_backbone(TINY_VIT), bottleneck=4, distill=distill)
    randomize_trainable(model)
    x, labels = images(TINY_VIT), torch.tensor([0, 2, 4])
    model.eval()  # deterministic masks: the loss's composition is what is checked
    with torch.no_grad():
        loss = model.method.training_loss(model, x, labels, F.cross_entropy, torch.enable_grad)
        student, masks = dyt_forward(model, x, complete=False)
        teacher, _ = dyt_forward(model, x, complete=True)
    expected = F.cross_entropy(student, labels) + 2 * (masks.mean() - 0.5) ** 2
    if distill:  # KL(teacher || student), batch mean, and the teacher's own CE
        p = F.softmax(teacher, -1)
        expected += F.cross_entropy(teacher, labels) + (p * (p.log() - F.log_softmax(student, -1))).sum() / 3
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    assert not torch.equal(student, teacher), "the teacher runs every token through the MLP"


def test_dyt_dispatchers_learn_through_the_straight_through_mask():
    _, model = with_method("dyt", tiny_backbone(TINY_VIT), bottleneck=4, distill=False, dropout=0.0)
    randomize_trainable(model)
    model.train()
    loss = model.method.training_loss(model, images(TINY_VIT), torch.tensor([0, 1, 2]),
                                      torch.nn.functional.cross_entropy, torch.enable_grad)  # fmt: skip
    loss.backward()
    for block in model.backbone.blocks:
        assert block.mlp_token_select.mlp_head.weight.grad.abs().sum() > 0, "the hard mask passes the soft gradient"


def _official_vqt(frozen, queries, head, x):
    """The official Head2ToeEncoder / Head2ToeVisionTransformer forward (eval mode) on the frozen timm ViT:
    per block the queries' attention reads keys and values from the original tokens only."""
    from torch.nn import functional as F

    tokens = frozen.norm_pre(frozen._pos_embed(frozen.patch_embed(x)))
    outputs = []
    for block, q_i in zip(frozen.blocks, queries):
        h = torch.cat([q_i.expand(len(x), -1, -1), tokens], dim=1)
        y = block.norm1(h)
        heads, dim = block.attn.num_heads, block.attn.head_dim
        q, k, v = block.attn.qkv(y).reshape(len(x), h.shape[1], 3, heads, dim).permute(2, 0, 3, 1, 4)
        t = len(q_i)
        scores = (q @ k[:, :, t:].transpose(-1, -2) / math.sqrt(dim)).softmax(-1)
        h = h + block.attn.proj((scores @ v[:, :, t:]).transpose(1, 2).reshape(h.shape))
        h = h + block.mlp(block.norm2(h))
        outputs.append(h[:, :t])
        tokens = h[:, t:]
    feats = [frozen.norm(tokens)[:, 0]] + [o.reshape(len(x), -1) for o in outputs]
    return F.linear(torch.cat([F.normalize(f) for f in feats], dim=1), head.weight, head.bias)


def test_vqt_counts_per_task_tokens_and_the_official_forward():
    assert vit_b_count("vqt") == 9_216 and vit_b_count("vqt", tokens=10) == 92_160  # L d T
    model = pb.create_model("vqt", pb.PAPER_BACKBONE, num_classes=100, pretrained="none")
    assert pb.count_trainable(model)[1] - 9_216 == (768 * 13 + 1) * 100, "a classifier of d (1 + L T) inputs"
    method = pb.METHODS.get("vqt")()
    assert method.make_config("svhn").tokens == 20 and method.make_config("smallnorb_ele").tokens == 10
    reference, model = with_method("vqt", tiny_backbone(TINY_VIT), tokens=2)
    randomize_trainable(model)
    x = images(TINY_VIT)
    model.eval()
    with torch.no_grad():
        expected = _official_vqt(reference, model.backbone.blocks.query_prompt_embeddings, model.head, x)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
    model.train()
    assert model.backbone.blocks.prompt_dropout.training and not model.backbone.blocks.blocks[0].training


def test_e2vpt_counts_and_key_value_prompts_follow_the_official_attention():
    method = pb.METHODS.get("e2vpt")()
    tasks = [name for name, task in pb.TASKS.items() if task.suite == "vtab"]
    configs = [method.make_config(task) for task in tasks]
    assert round(sum(9_216 * (c.tokens + c.kv_tokens) for c in configs) / len(tasks)) == 137_755
    assert vit_b_count("e2vpt", task="caltech101") == 340_992 and vit_b_count("e2vpt") == 9_216 * 15
    reference, model = with_method("e2vpt", tiny_backbone(TINY_VIT), tokens=3, kv_tokens=2)
    randomize_trainable(model)
    wrapped, frozen = model.backbone.blocks.blocks[0].attn, reference.blocks[0].attn
    x = torch.randn(2, 20, 32)
    model.eval()
    with torch.no_grad():
        q, k, v = frozen.qkv(x).reshape(2, 20, 3, 2, 16).permute(2, 0, 3, 1, 4)
        phi = wrapped.kv_prompt.expand(2, -1, -1, -1)  # the same tensor in front of the keys and the values
        keys, values = torch.cat([phi, k], dim=2), torch.cat([phi, v], dim=2)
        scores = (q @ keys.transpose(-1, -2) / 4.0).softmax(-1)
        expected = frozen.proj((scores @ values).transpose(1, 2).reshape(2, 20, 32))
        torch.testing.assert_close(wrapped(x), expected, rtol=0, atol=1e-6)
        assert model(images(TINY_VIT)).shape == (3, 5)
    model.train()
    assert model.backbone.blocks.dropout.training and not wrapped.training, "the encoder stays in eval mode"


def _official_glora(layer, path, rank):
    """The official SuperScalableLinear.forward (GLoRA/layer.py) for one path, on our layer's tensors (a fixed
    path allocates only the tensors it uses: the official supernet's slices of them)."""

    def factor(name, form):
        if form == "none":
            return 0.0
        down = getattr(layer, f"{name}d")
        if form == "lora":
            return down[:, :rank] @ getattr(layer, f"{name}u")[:rank, :]
        return down[:, 0].unsqueeze(1) if form == "vector" else down[0, 0]

    def shift(name, form):
        return 0.0 if form == "none" else (getattr(layer, name) if form == "vector" else getattr(layer, name)[0])

    a, b, c = factor("A", path["A"]), factor("B", path["B"]), factor("C", path["C"])
    weight = layer.weight + layer.weight * a + b
    bias = layer.bias + layer.bias * shift("D", path["D"]) + shift("E", path["E"])
    prompt = (layer.weight @ c).squeeze() if path["C"] != "none" else 0.0
    return lambda x: torch.nn.functional.linear(x, weight, bias + prompt)


def test_glora_paths_follow_the_official_layer_count_as_get_param_and_fold_exactly():
    import json as _json

    from conftest import SMALL

    from petl_bench.methods.glora import GLoRALinear

    assert pb.count_trainable(pb.create_model("glora_fixed", pb.PAPER_BACKBONE, num_classes=10,
                                              pretrained="none"))[0] == 1_603_776  # fmt: skip
    reference, model = with_method("glora", tiny_backbone(TINY_VIT), **SMALL["glora"])
    paths = _json.loads(open(SMALL["glora"]["paths"]).read())
    layers = [m for m in model.backbone.modules() if isinstance(m, GLoRALinear)]
    assert len(layers) == 8 and [layer.path for layer in layers] == paths
    expected_count = 0
    for layer, path in zip(layers, paths):  # the official get_param per component
        o, i = layer.out_features, layer.in_features
        size = {"lora": 4 * (o + i), "vector": o, "constant": 1, "none": 0}
        expected_count += size[path["A"]] + size[path["B"]]
        expected_count += {"lora": 4 * (i + 1), "vector": i, "none": 0}[path["C"]]
        expected_count += sum({"vector": o, "constant": 1, "none": 0}[path[k]] for k in "DE")
    assert pb.count_trainable(model)[0] == expected_count
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images(TINY_VIT)), reference(images(TINY_VIT))), "every path starts as the backbone"
        randomize_trainable(model)
        for layer, path in zip(layers, paths):
            x_in = torch.randn(2, 17, layer.in_features)
            torch.testing.assert_close(layer(x_in), _official_glora(layer, path, 4)(x_in), rtol=0, atol=1e-6)
            torch.testing.assert_close(layer.folded()(x_in), layer(x_in), rtol=0, atol=1e-5)


def _official_mona(module, x, hw):
    """The official ``Mona.forward`` / ``MonaOp.forward`` (swin_transformer_mona.py) on (B, N, C) tokens."""
    from torch.nn import functional as F

    h = module.project1(module.norm(x) * module.gamma + x * module.gammax)
    b, n, c = h.shape
    image = h.reshape(b, *hw, c).permute(0, 3, 1, 2)
    op = module.adapter_conv
    image = (op.conv1(image) + op.conv2(image) + op.conv3(image)) / 3.0 + image
    image = image + op.projector(image)
    h = image.permute(0, 2, 3, 1).reshape(b, n, c)
    return x + module.project2(module.dropout(F.gelu(h)))


def test_mona_counts_official_module_on_swin_and_the_declared_vit_port():
    from conftest import TINY_SWIN

    assert vit_b_count("mona") == 2_684_928  # 24 modules of 111,872
    reference, model = with_method("mona", tiny_backbone(TINY_SWIN))
    randomize_trainable(model)
    model.eval()
    block = model.backbone.get_submodule(model.info.block_paths[0])
    frozen = reference.get_submodule(model.info.block_paths[0])
    x = torch.randn(2, 14, 14, 16)
    with torch.no_grad():  # the official Swin block: Mona after the attention add and after the MLP add
        y = x + frozen._attn(frozen.norm1(x))
        y = _official_mona(block.my_module_1, y.reshape(2, 196, 16), (14, 14))
        y = _official_mona(block.my_module_2, y + frozen.mlp(frozen.norm2(y)), (14, 14)).reshape(2, 14, 14, 16)
        torch.testing.assert_close(block(x), y, rtol=0, atol=1e-5)
    _, vit = with_method("mona", tiny_backbone(TINY_VIT))
    randomize_trainable(vit)
    module, tokens = vit.backbone.blocks[0].my_module_1.eval(), torch.randn(2, 17, 32)
    with torch.no_grad():  # the convs see the patch grid; the cls token goes around them (the declared choice)
        ours, cls = module(tokens), tokens[:, :1]
        torch.testing.assert_close(ours[:, 1:], _official_mona(module, tokens[:, 1:], (4, 4)), rtol=0, atol=1e-5)
        projected = module.project1(module.norm(cls) * module.gamma + cls * module.gammax)
        expected = cls + module.project2(torch.nn.functional.gelu(projected))
        torch.testing.assert_close(ours[:, :1], expected, rtol=0, atol=1e-6)


def test_params_prints_the_specs_vit_b16_counts_for_the_third_batch(monkeypatch, capsys, tmp_path):
    import json as _json

    from conftest import run_cli

    vector = dict.fromkeys("ABCDE", "vector")
    paths = tmp_path / "all_vector.json"
    paths.write_text(_json.dumps([vector] * 48))  # the spec's all-vector GLoRA: 396,288
    methods = "adapter_plus,dtl,dtl_plus,sct,arc,arc_attn,glora,glora_fixed,dyt,vqt,e2vpt,mona"
    code, stdout, stderr = run_cli(monkeypatch, capsys, "params", "--methods", methods, "--format", "csv",
                                   "--set", f"glora.paths={paths}")  # fmt: skip
    assert code == 0, stderr
    counts = {line.split(",")[0]: int(line.split(",")[2]) for line in stdout.splitlines()[1:] if line}
    assert counts == {
        "adapter_plus": 165_984, "dtl": 36_864, "dtl_plus": 43_776, "sct": 111_744, "arc": 96_432,
        "arc_attn": 48_216, "glora": 396_288, "glora_fixed": 1_603_776, "dyt": 313_548, "vqt": 9_216,
        "e2vpt": 138_240, "mona": 2_684_928,
    }  # fmt: skip
    code, _, stderr = run_cli(monkeypatch, capsys, "params", "--methods", "glora")
    assert code == 2 and "glora needs its searched paths" in stderr
