"""E2VPT's pruning and rewinding (spec methods-third.md §7.4; official ChengHan111/E2VPT): the levels, the
masked tokens and pieces and the importance as the official code computes them, the masks where the official
model puts them, pruned runs identified by the importance's content, and the command's three stages (the
importance on the training images, the rewind grid chosen on val, the final runs on train+val -> test)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import TINY_VIT, images, make_task_folder, randomize_trainable, run_cli, tiny_backbone, with_method

import petl_bench as pb
from petl_bench import records
from petl_bench.e2vpt_prune import _MaskedE2VPT, mask_importance
from petl_bench.errors import UserError
from petl_bench.methods.e2vpt import IMPORTANCE_KIND, E2VPTConfig, MaskedPromptedBlocks, lowest, mask_levels

OFFICIAL_PERCENTS = [10, 20, 30, 40, 50, 60, 70, 80, 90]


def _official_counts(total: int, minimum: int) -> list[int]:
    """Trainer.determine_mask_sequence, then the counts named by the files the official loop writes
    (``total_masked`` summed over the sequence: a repeated count overwrites its file)."""
    numbers = []
    for prune_percent in OFFICIAL_PERCENTS:
        n_to_mask = int(total * prune_percent / 100)
        if minimum > 0:
            if n_to_mask > total - minimum:
                n_to_mask = total - minimum
                numbers.append(n_to_mask)
                break
        numbers.append(n_to_mask)
    numbers = sorted(numbers)
    sequence = numbers[:]
    for idx in range(1, len(numbers)):
        sequence[idx] = numbers[idx] - numbers[idx - 1]
    files, total_masked = set(), 0
    for n_to_mask in sequence:
        total_masked += n_to_mask
        files.add(total_masked)
    return sorted(files)


def _official_masked(scores: list[float], sequence: list[int]) -> list[set]:
    """Trainer.what_tokens_to_mask applied cumulatively (one set grown level by level, reverse=False)."""
    to_mask, out = set(), []
    for n_to_mask in sequence:
        ranked = [s for s, _ in sorted([(i, scores[i]) for i in range(len(scores))], key=lambda x: x[1])]
        for token in [t for t in ranked if t not in to_mask][:n_to_mask]:
            to_mask.add(token)
        out.append(set(to_mask))
    return out


@pytest.mark.parametrize("total", [1, 4, 5, 10, 16, 32, 50])
def test_levels_are_the_official_mask_files(total):
    assert mask_levels(total, 1) == _official_counts(total, 1)
    assert mask_levels(16, 4) == _official_counts(16, 4) == [1, 3, 4, 6, 8, 9, 11, 12]
    assert mask_levels(10, 1) == list(range(10)[1:]) and mask_levels(5, 1) == [0, 1, 2, 3, 4]


def test_the_masked_tokens_are_the_official_cumulative_choice_ties_included():
    rng = random.Random(0)
    for _ in range(50):
        scores = [rng.choice([-0.5, -0.1, 0.0, 0.1, 0.3]) + (rng.random() if rng.random() < 0.5 else 0.0)
                  for _ in range(12)]  # fmt: skip
        counts = [1, 3, 4, 6, 8, 9, 11]
        sequence = [counts[0]] + [b - a for a, b in zip(counts, counts[1:])]
        for count, official in zip(counts, _official_masked(scores, sequence)):
            assert set(lowest(scores, count)) == official


def _importance_file(path, tokens: int, pieces: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    found = {
        "kind": IMPORTANCE_KIND, "tokens": tokens, "kv_tokens": 2,
        "token_importance": torch.randn(tokens, generator=generator).tolist(),
        "piece_importance": torch.randn(tokens, pieces, generator=generator).tolist(),
    }  # fmt: skip
    path.write_text(json.dumps(found))
    return found


def test_masks_multiply_every_blocks_prompts_as_the_official_repeat(tmp_path):
    found = _importance_file(tmp_path / "importance.json", tokens=4)
    _, model = with_method("e2vpt", tiny_backbone(TINY_VIT), tokens=4, kv_tokens=2,
                           importance=str(tmp_path / "importance.json"), prune_tokens=2, prune_pieces=5)  # fmt: skip
    randomize_trainable(model)
    blocks = model.backbone.blocks
    assert isinstance(blocks, MaskedPromptedBlocks)
    token = torch.ones(4)
    token[lowest(found["token_importance"], 2)] = 0
    piece = torch.ones(4, 16)
    for row, scores in enumerate(found["piece_importance"]):
        piece[row, lowest(scores, 5)] = 0
    for index in range(2):
        raw = blocks.prompts[str(index)]
        # vit_prompt_VK.py: prompt * piece_mask.repeat((1, d / 16)), then * token_mask.view(-1, 1).repeat(1, d)
        expected = raw * piece.repeat((1, 32 // 16)).repeat(1, 1, 1)
        expected = expected * token.view(-1, 1).repeat(1, 32).repeat(1, 1, 1)
        torch.testing.assert_close(blocks.prompt(index), expected, rtol=0, atol=0)
    masked = lowest(found["token_importance"], 2)
    assert blocks.prompt(0)[0, masked].abs().sum() == 0, "a masked token stays, as a zero vector"
    assert {n for n in pb.trainable_parameters(model) if "mask" in n or "token" in n.split(".")[-1]} == set()


def test_masked_entries_get_no_gradient_and_the_run_trains_the_unpruned_tensors(tmp_path):
    _importance_file(tmp_path / "importance.json", tokens=3)
    _, pruned = with_method("e2vpt", tiny_backbone(TINY_VIT), tokens=3, kv_tokens=2,
                            importance=str(tmp_path / "importance.json"), prune_tokens=1, prune_pieces=4)  # fmt: skip
    _, plain = with_method("e2vpt", tiny_backbone(TINY_VIT), tokens=3, kv_tokens=2)
    assert set(pb.trainable_parameters(pruned)) == set(pb.trainable_parameters(plain))
    pruned.train()
    pruned(images(TINY_VIT)).sum().backward()
    masks = pruned.backbone.blocks.masks
    zero = (masks.piece.repeat(1, 2) * masks.token[:, None]) == 0
    for index in range(2):
        grad = pruned.backbone.blocks.prompts[str(index)].grad[0]
        assert grad[zero].abs().sum() == 0 and grad[~zero].abs().sum() > 0


def test_pruned_entries_are_not_counted_as_parameters(tmp_path):
    _importance_file(tmp_path / "importance.json", tokens=4)
    settings = dict(tokens=4, kv_tokens=2, importance=str(tmp_path / "importance.json"))
    _, plain = with_method("e2vpt", tiny_backbone(TINY_VIT), tokens=4, kv_tokens=2)
    _, pruned = with_method("e2vpt", tiny_backbone(TINY_VIT), **settings, prune_tokens=1, prune_pieces=5)
    _, unpruned = with_method("e2vpt", tiny_backbone(TINY_VIT), **settings)
    stored = pb.count_trainable(plain)
    per_block = 32 * 1 + (4 - 1) * 5 * (32 // 16)  # a masked token's d entries, then 5 pieces of d / 16 in the rest
    assert pb.count_trainable(pruned) == (stored[0] - 2 * per_block, stored[1] - 2 * per_block)
    assert pb.count_trainable(unpruned) == stored


def test_pruning_settings_are_checked_before_anything_trains(tmp_path):
    method = pb.METHODS.get("e2vpt")()
    with pytest.raises(UserError, match="need the masks' importance"):
        method.check_config(method.make_config(prune_tokens=2))
    _importance_file(tmp_path / "importance.json", tokens=4)
    with pytest.raises(UserError, match="is of 4 visual prompt tokens"):
        method.check_config(method.make_config(tokens=10, importance=str(tmp_path / "importance.json")))
    with pytest.raises(UserError, match="at most 3 of its 4 tokens"):
        method.check_config(method.make_config(tokens=4, importance=str(tmp_path / "importance.json"), prune_tokens=4))
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(UserError, match="malformed"):
        method.check_config(method.make_config(importance=str(tmp_path / "bad.json")))


def test_importance_is_the_official_mean_of_the_masks_gradients_over_batches():
    backbone, info = tiny_backbone(TINY_VIT)
    model = pb.attach_method(backbone, info, _MaskedE2VPT(), E2VPTConfig(tokens=3, kv_tokens=2), "zero")
    randomize_trainable(model)
    batches = [(images(TINY_VIT, batch=4, seed=s), torch.tensor([0, 1, 2, 3]) % model.head.out_features)
               for s in range(3)]  # fmt: skip
    token, piece = mask_importance(model, iter(batches))
    # Trainer.calculate_importance: eval mode; per batch zero_grad, backward, optimizer.step() at lr 0 (the
    # scheduler's warm-up step 0), summing the masks' .grad; divided by the number of batches.
    masks = model.backbone.blocks.masks
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trained, lr=0.0, momentum=0.9, weight_decay=1e-4)
    before = [p.detach().clone() for p in trained]
    model.eval()
    token_sum, piece_sum = torch.zeros(3), torch.zeros(3, 16)
    for x, y in batches:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        token_sum += masks.token.grad
        piece_sum += masks.piece.grad
    assert all(torch.equal(a, b) for a, b in zip(before, trained)), "lr 0: the official step moves nothing"
    torch.testing.assert_close(torch.tensor(token), token_sum / 3, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.tensor(piece), piece_sum / 3, rtol=1e-5, atol=1e-7)
    assert torch.tensor(piece).abs().sum() > 0


def test_a_pruned_run_is_identified_by_the_importance_not_the_file_name(tmp_path):
    method = pb.METHODS.get("e2vpt")()
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    _importance_file(first, 4, seed=0)
    _importance_file(second, 4, seed=1)
    ids = [method.config_identity(method.make_config(tokens=4, importance=str(f), prune_tokens=1))
           for f in (first, second)]  # fmt: skip
    assert ids[0]["importance"] != ids[1]["importance"] and "token_importance" in ids[0]["importance"]


TINY = ["--backbone", "tiny_test_vit", "--pretrained", "none", "--batch-size", "8", "--image-size", "16"]


def test_the_prune_command_measures_rewinds_on_val_and_retrains_the_choice(monkeypatch, capsys, tmp_path, tiny_plugin):
    task, runs = make_task_folder(tmp_path / "colours"), tmp_path / "runs"
    args = [
        "e2vpt",
        "prune",
        "--plugin",
        str(tiny_plugin),
        "--task-dir",
        str(task),
        *TINY,
        "--epochs",
        "1",
        "--tokens",
        "4",
        "--kv-tokens",
        "1",
        "--percents",
        "25,50",
        "--min-pieces",
        "12",
        "--output",
        str(runs),
    ]
    code, stdout, stderr = run_cli(monkeypatch, capsys, *args)
    assert code == 0, stderr
    (importance_file,) = (runs / "e2vpt-search").glob("*/importance.json")
    found = json.loads(importance_file.read_text())
    assert found["train_images"] == 32, "the importance reads train800 only (not val200, never test)"
    assert found["token_levels"] == [1, 2] and found["piece_levels"] == [4]
    run_records = records.load_records(runs)
    rewinds = [r for r in run_records if r.protocol == "tune"]
    (final,) = [r for r in run_records if r.protocol == "tuned"]
    assert {(r.hparams.method["prune_tokens"], r.hparams.method["prune_pieces"]) for r in rewinds} == {(2, 4), (1, 4)}
    assert {r.metrics.eval_split for r in rewinds} == {"val200"} and final.metrics.eval_split == "test"
    best = max(r.metrics.top1 for r in rewinds)
    chosen = max(r.hparams.method["prune_tokens"] for r in rewinds if r.metrics.top1 == best)
    assert final.hparams.method["prune_tokens"] == chosen, "the best val top-1; a tie: more masked tokens"
    assert final.hparams.method["importance"]["token_importance"] == found["token_importance"]
    kept = 2 * (32 * (4 - chosen) - (4 - chosen) * 4 * 2)  # blocks x (kept tokens' entries - 4 pieces of 2 each)
    assert final.cost.trainable_params == 2 * 2 * 1 * 16 + kept, "kv prompts (blocks x heads x m x head dim) + kept"
    code, stdout, _ = run_cli(monkeypatch, capsys, *args, "--no-retrain")
    assert code == 0 and "petl-bench tune --methods e2vpt" in stdout and "e2vpt.prune_tokens=2,1" in stdout
    assert len(records.load_records(runs)) == len(run_records), "the importance reused, nothing retrained"


def test_a_refused_prune_is_one_error_and_writes_nothing(monkeypatch, capsys, tmp_path, tiny_plugin):
    task, runs = make_task_folder(tmp_path / "colours"), tmp_path / "runs"
    for bad, message in ((["--pieces", "7"], "need a width divisible by 7"), (["--percents", "0,50"], "--percents")):
        code, _, stderr = run_cli(monkeypatch, capsys, "e2vpt", "prune", "--plugin", str(tiny_plugin), "--task-dir",
                                  str(task), *TINY, "--epochs", "1", "--output", str(runs), *bad)  # fmt: skip
        assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1
        assert not runs.exists()
