"""VQT's compression (official andytu28/VQT head2toe_sparsity_train.py, h2t_sparsity_trainer.py): the group
lasso as the official loss term, the kept features as the official top-k of the classifier's column norms,
the query tokens taken from the first run (its classifier not), runs identified by the checkpoints' content,
and the command's three runs per seed."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import TINY_VIT, images, make_task_folder, randomize_trainable, run_cli, tiny_backbone, with_method

import petl_bench as pb
from petl_bench import records
from petl_bench.checkpoints import save_trainable
from petl_bench.data import file_digest
from petl_bench.errors import UserError


def _finished_run(folder, seed: int = 3):
    """A folder holding a trained-looking VQT checkpoint (T = 1 on the tiny ViT), and its model."""
    _, model = with_method("vqt", tiny_backbone(TINY_VIT, num_classes=5), tokens=1)
    randomize_trainable(model, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_trainable(model, folder / records.CHECKPOINT)
    return model


def test_the_group_lasso_is_the_official_term():
    x, y, criterion = images(TINY_VIT), torch.tensor([0, 1, 2]), torch.nn.functional.cross_entropy
    for coefficient in (0.1, 0.0):
        _, model = with_method("vqt", tiny_backbone(TINY_VIT, num_classes=5), tokens=1, group_lasso=coefficient)
        randomize_trainable(model)
        model.eval()  # no query dropout: the same forward twice
        loss = model.method.training_loss(model, x, y, criterion, torch.no_grad)
        lasso = torch.norm(torch.norm(model.head.weight, p=2, dim=0), p=1)  # h2t_sparsity_trainer.py
        torch.testing.assert_close(loss, criterion(model(x), y) + coefficient * lasso)


def test_kept_features_are_the_official_top_k_and_the_queries_start_from_the_first_run(tmp_path):
    first, second = _finished_run(tmp_path / "first", seed=3), _finished_run(tmp_path / "second", seed=4)
    _, model = with_method("vqt", tiny_backbone(TINY_VIT, num_classes=5), tokens=1, start=str(tmp_path / "first"),
                           select=str(tmp_path / "second"), keep=0.7)  # fmt: skip
    features = 32 * (1 + 2 * 1)  # d (1 + L T)
    scores = torch.norm(second.head.weight, p=2, dim=0)
    _, ids = torch.topk(scores, k=int(features * 0.7))
    assert torch.equal(model.head.kept, ids) and model.head.in_features == int(features * 0.7)
    queries = model.backbone.blocks.query_prompt_embeddings
    assert torch.equal(queries, first.backbone.blocks.query_prompt_embeddings), "the first run's query tokens"
    assert model.head.weight.shape != first.head.weight.shape, "a new classifier, not the first run's"
    randomize_trainable(model)
    model.eval()
    x = images(TINY_VIT)
    with torch.no_grad():  # h2t_vit.py: self.head(feats[:, feat_select_ids]) on the normalised, concatenated feats
        tokens = model.backbone.norm(model.backbone.blocks(model.backbone._pos_embed(model.backbone.patch_embed(x))))
        cls = torch.nn.functional.normalize(tokens[:, 0], dim=1)
        outs = [torch.nn.functional.normalize(tokens[:, 17 + i], dim=1) for i in range(2)]  # 1 + 16 patches
        feats = torch.cat([cls, *outs], dim=1)
        expected = torch.nn.functional.linear(feats[:, ids], model.head.weight, model.head.bias)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


def test_compression_settings_are_checked_and_identified_by_content(tmp_path):
    method = pb.METHODS.get("vqt")()
    with pytest.raises(UserError, match="go together"):
        method.check_config(method.make_config(keep=0.5))
    with pytest.raises(UserError, match="no finished run's checkpoint"):
        method.check_config(method.make_config(start=str(tmp_path / "missing")))
    _finished_run(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    same = [method.config_identity(method.make_config(start=str(tmp_path / name))) for name in "ab"]
    assert same[0] == same[1] and same[0]["start"]["checkpoint_sha256"] == file_digest(
        tmp_path / "a" / records.CHECKPOINT
    )


def test_the_compress_command_runs_three_chained_runs_per_seed(monkeypatch, capsys, tmp_path, tiny_plugin):
    task, runs = make_task_folder(tmp_path / "colours"), tmp_path / "runs"
    code, stdout, stderr = run_cli(
        monkeypatch, capsys, "vqt", "compress", "--plugin", str(tiny_plugin), "--task-dir", str(task), "--backbone",
        "tiny_test_vit", "--pretrained", "none", "--batch-size", "8", "--image-size", "16", "--epochs", "1",
        "--seeds", "0,1", "--lr", "0.01", "--output", str(runs),
    )  # fmt: skip
    assert code == 0, stderr
    found = records.load_records(runs)
    assert len(found) == 6 and {r.protocol for r in found} == {"final"}
    for seed in (0, 1):
        runs_of_seed = [r for r in found if r.seed == seed]
        (plain,) = [r for r in runs_of_seed if not r.hparams.method["start"]]
        (lasso,) = [r for r in runs_of_seed if r.hparams.method["group_lasso"]]
        (kept,) = [r for r in runs_of_seed if r.hparams.method["keep"] < 1]
        assert plain.hparams.recipe["lr"] == 0.01 and lasso.hparams.recipe["lr"] == kept.hparams.recipe["lr"] == 0.005
        first = file_digest(runs / plain.run_id / records.CHECKPOINT)
        assert lasso.hparams.method["start"]["checkpoint_sha256"] == first == kept.hparams.method["start"][
            "checkpoint_sha256"
        ]  # fmt: skip
        second = file_digest(runs / lasso.run_id / records.CHECKPOINT)
        assert kept.hparams.method["select"]["checkpoint_sha256"] == second and kept.hparams.method["keep"] == 0.7
    table = " ".join(stdout.split())
    assert table.count("vqt (") == 3, "three rows, each over both seeds"


def test_a_refused_compression_trains_nothing(monkeypatch, capsys, tmp_path, tiny_plugin):
    task, runs = make_task_folder(tmp_path / "colours"), tmp_path / "runs"
    for bad in (["--keep", "1.0"], ["--group-lasso", "-1"]):
        code, _, stderr = run_cli(monkeypatch, capsys, "vqt", "compress", "--plugin", str(tiny_plugin), "--task-dir",
                                  str(task), "--backbone", "tiny_test_vit", "--output", str(runs), *bad)  # fmt: skip
        assert code == 2 and bad[0] in stderr and not runs.exists()
