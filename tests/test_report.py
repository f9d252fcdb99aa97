"""Reports from synthetic records: missing cells stay missing, averages follow the paper's definitions."""

from __future__ import annotations

import csv

import pytest
from conftest import synthetic_record as record
from tasks_fixture import VTAB_GROUPS

from petl_bench import records
from petl_bench.errors import UserError
from petl_bench.report import MEAN_OF_GROUPS, MEAN_OF_TASKS, accuracy_tables, runs_frame, write_report

ALL_TASKS = [t for tasks in VTAB_GROUPS.values() for t in tasks]


def full_sweep(method: str, seed: int, offset: float, params: int = 1000):
    return [record(method, task, seed, 50.0 + offset + index, params) for index, task in enumerate(ALL_TASKS)]


def test_group_means_and_both_averages(tmp_path):
    runs = full_sweep("convpass", 0, 0.0) + full_sweep("convpass", 1, 2.0)
    write_report(runs, tmp_path)
    plots = sorted(p.name for p in tmp_path.glob("*.png"))
    assert [p.split("__")[0] for p in plots] == ["accuracy_vs_cost", "accuracy_vs_params", "groups", "groups"]
    assert "groups__vtab__backbones.png" in plots
    (table,) = accuracy_tables(runs_frame(runs))
    cells = table.ours()["convpass"]
    natural = [50.0 + i for i in range(7)]
    assert cells["cifar"] == (51.0, pytest.approx(2**0.5), 2)
    assert cells["natural"][0] == pytest.approx(sum(natural) / 7 + 1.0)
    groups = [
        sum(50.0 + i for i in range(7)) / 7,
        sum(50.0 + i for i in range(7, 11)) / 4,
        sum(50.0 + i for i in range(11, 19)) / 8,
    ]
    assert cells[MEAN_OF_GROUPS][0] == pytest.approx(sum(groups) / 3 + 1.0)
    assert cells[MEAN_OF_TASKS][0] == pytest.approx(sum(50.0 + i for i in range(19)) / 19 + 1.0)


def test_missing_cells_are_shown_as_missing_never_invented(tmp_path):
    runs = full_sweep("convpass", 0, 0.0)
    runs = [r for r in runs if r.task != "dmlab"] + [record("lora", "cifar", 0, 40.0)]
    (table,) = accuracy_tables(runs_frame(runs))
    convpass, lora = table.ours()["convpass"], table.ours()["lora"]
    assert "dmlab" not in convpass and "structured" not in convpass, "incomplete group -> no group mean"
    assert "natural" in convpass and MEAN_OF_GROUPS not in convpass and MEAN_OF_TASKS not in convpass
    assert set(lora) == {"cifar"}
    rows = {row["method"]: row for row in table.display_rows()}
    assert rows["convpass"]["dmlab"] == "–" and rows["convpass"]["structured"] == "–"
    assert rows["lora"]["caltech101"] == "–" and rows["lora"]["cifar"] == "40.0"
    # The paper's numbers sit beside ours, where the paper has the cell.
    assert rows["convpass (paper)"]["cifar"] == "72.3" and rows["convpass (paper)"][MEAN_OF_GROUPS] == "76.6"
    assert rows["lora (paper)"]["natural"] == "79.5"
    write_report(runs, tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert "| convpass | 0.001M |" in markdown and "–" in markdown and "(paper)" in markdown
    with open(tmp_path / "accuracy.csv") as handle:
        cells = list(csv.DictReader(handle))
    ours = [
        c for c in cells if c["method"] == "convpass" and c["source"] == "ours" and c["table"].startswith("vtab on")
    ]
    assert (
        not [c for c in ours if c["column"] in ("dmlab", "structured")] and len(ours) == 18 + 2
    )  # tasks, natural, specialized
    assert [c for c in cells if c["source"] == "paper" and c["column"] == "dmlab"], "the paper row keeps its cells"
    with open(tmp_path / "runs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 19 and {"method", "task", "backbone", "seed", "protocol", "top1", "trainable_params"} <= set(
        rows[0]
    )
    # No method has an average, so there is no accuracy-vs-parameters point to plot.
    assert sorted(p.name.split("__")[0] for p in tmp_path.glob("*.png")) == ["groups", "groups"]


def test_protocols_are_never_mixed_in_one_table():
    runs = full_sweep("convpass", 0, 0.0) + [record("convpass", "cifar", 0, 99.0, protocol="paper")]
    tables = accuracy_tables(runs_frame(runs))
    assert sorted(t.key["protocol"] for t in tables) == ["final", "paper"]
    paper_table = next(t for t in tables if t.key["protocol"] == "paper")
    assert paper_table.ours()["convpass"]["cifar"][0] == 99.0 and "caltech101" not in paper_table.ours()["convpass"]


def test_cost_table_and_no_records(tmp_path):
    write_report(full_sweep("linear", 0, 0.0, params=0), tmp_path, ("csv",))
    with open(tmp_path / "cost.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["method"] == "linear" and float(row["peak_memory_mb"]) == 1024.0 and row["runs"] == "19"
    assert not (tmp_path / "report.md").exists()
    with pytest.raises(UserError, match="no finished runs"):
        write_report([], tmp_path)
    with pytest.raises(UserError, match="no results folder"):
        records.load_records(tmp_path / "nowhere")


def test_later_methods_print_beside_their_published_numbers_with_source_and_average_kind(tmp_path):
    runs = full_sweep("fact_tt", 0, 0.0) + [record("bi_lora", "cifar", 0, 60.0), record("ssf", "dtd", 0, 70.0)]
    (table,) = accuracy_tables(runs_frame(runs))
    rows = {row["method"]: row for row in table.display_rows()}
    labels = list(rows)
    # Every FacT-TT row of the reference file follows our row: the paper's two and PETL_Vision's re-run.
    start = labels.index("fact_tt")
    average = "average = mean of group means"
    assert labels[start + 1 : start + 4] == [
        f"fact_tt (published: FacT-TT (r=4); FacT paper; {average})",
        f"fact_tt (published: FacT-TT (r<=16 per task); FacT paper; {average})",
        f"fact_tt (published: FacT-TT (PETL_Vision grid r in 8/16/32) [PETL_Vision re-run]; {average})",
    ]
    paper = rows[labels[start + 1]]
    assert paper["cifar"] == "69.4" and paper[MEAN_OF_GROUPS] == "73.5" and paper["params"] == "0.008M"
    tasks = [69.4, 88.5, 70.6, 98.8, 90.0, 83.3, 53.7, 83.9, 95.1, 81.5, 75.4, 78.2, 69.0, 47.7, 79.0, 75.2, 42.7,
             27.2, 38.7]  # fmt: skip
    assert paper[MEAN_OF_TASKS] == f"{sum(tasks) / 19:.1f}"  # computed: the two averages differ
    # The binary adapters' README prints averages only: no task cell, no computed mean of tasks.
    binary = rows[
        f"bi_lora (published: Bi-LoRA (dim 32, 1-bit); JieShibo/PETL-ViT binary_adapter/README.md; {average})"
    ]
    assert binary[MEAN_OF_GROUPS] == "76.7" and binary["cifar"] == "–" and binary[MEAN_OF_TASKS] == "–"
    assert f"ssf (published: SSF; SSF paper; {average})" in rows
    assert f"ssf (published: SSF [PETL_Vision re-run]; {average})" in rows
    assert not any("RepAdapter" in label for label in labels), "only the methods that ran"
    assert "published_vtab1k_next.csv" in table.note and "best test epoch" in table.note
    write_report(runs, tmp_path)
    assert "(published: FacT-TT (r=4); FacT paper" in (tmp_path / "report.md").read_text()


def with_settings(run, epochs: int, fingerprint: str = "", finished: str = "2026-01-01T00:00:00"):
    run.hparams = records.Settings(recipe={"epochs": epochs, "lr": 1e-3, "workers": 4}, input_size=[224, 224])
    run.data = {"fingerprint": fingerprint or f"data-{run.task}"}
    run.finished_at = finished
    run.run_id += f"__e{epochs}{fingerprint}"
    return run


def test_runs_with_other_settings_are_other_rows_and_aggregates_follow_the_shown_cells():
    """The demo's case: a 10-epoch run of every task, then a 2-epoch run of one task. Before, the one task's
    cell pooled both as if seeds, and the means came from the last run of each seed."""
    ten = [with_settings(r, 10) for r in full_sweep("linear", 0, 0.0)]
    two = with_settings(record("linear", "cifar", 0, 30.0), 2, finished="2026-01-02T00:00:00")
    (table,) = accuracy_tables(runs_frame(ten + [two]))
    rows = table.ours()
    assert set(rows) == {"linear (epochs 10)", "linear (epochs 2)"}
    assert rows["linear (epochs 10)"]["cifar"] == (50.0, 0.0, 1)
    assert rows["linear (epochs 2)"] == {"cifar": (30.0, 0.0, 1)}, "an incomplete row has no aggregate"
    full = rows["linear (epochs 10)"]
    shown = [full[t][0] for t in ALL_TASKS]
    assert full[MEAN_OF_TASKS][0] == pytest.approx(sum(shown) / len(shown))
    for group, tasks in VTAB_GROUPS.items():
        assert full[group][0] == pytest.approx(sum(full[t][0] for t in tasks) / len(tasks))
    assert full[MEAN_OF_GROUPS][0] == pytest.approx(sum(full[g][0] for g in VTAB_GROUPS) / 3)


def test_execution_settings_do_not_split_rows_and_seeds_pool():
    runs = [with_settings(r, 10) for r in full_sweep("linear", 0, 0.0) + full_sweep("linear", 1, 2.0)]
    runs[0].hparams.recipe["workers"] = 8  # how it ran, not what it computed
    (table,) = accuracy_tables(runs_frame(runs))
    assert list(table.ours()) == ["linear"] and table.ours()["linear"]["cifar"] == (51.0, pytest.approx(2**0.5), 2)


def test_aggregate_of_tasks_with_different_seeds_is_the_mean_of_the_cells_without_a_spread():
    runs = [with_settings(r, 10) for r in full_sweep("linear", 0, 0.0)]
    runs.append(with_settings(record("linear", "cifar", 1, 60.0), 10))  # a second seed on one task only
    cells = accuracy_tables(runs_frame(runs))[0].ours()["linear"]
    assert cells["cifar"] == (55.0, pytest.approx(50**0.5), 2)
    shown = [cells[t][0] for t in ALL_TASKS]
    assert cells[MEAN_OF_TASKS] == (pytest.approx(sum(shown) / 19), 0.0, 1)
    assert cells["structured"][2] == 1 and cells["structured"][1] == 0.0


def test_runs_on_another_copy_of_the_data_are_another_row():
    first = [with_settings(r, 10) for r in full_sweep("linear", 0, 0.0)]
    other = with_settings(record("linear", "cifar", 0, 20.0), 10, fingerprint="other", finished="2026-02-01T00:00:00")
    (table,) = accuracy_tables(runs_frame(first + [other]))
    rows = table.ours()
    assert set(rows) == {"linear (data copy 1)", "linear (data copy 2)"}
    assert rows["linear (data copy 2)"] == {"cifar": (20.0, 0.0, 1)}
    assert "MIXED DATA" in table.title


def test_published_rows_only_beside_the_backbone_and_input_size_they_were_published_for():
    def table_for(backbone: str, size: int):
        runs = full_sweep("convpass", 0, 0.0)
        for run in runs:
            run.backbone, run.hparams = backbone, records.Settings(recipe={"image_size": size})
        (table,) = accuracy_tables(runs_frame(runs))
        return table

    same = table_for("vit_base_patch16_224.orig_in21k", 224)
    assert any(row.source == "paper" for row in same.rows) and "No published rows" not in same.note
    for backbone, size in (("vit_small_patch14_dinov2.imgfocus", 56), ("vit_base_patch16_224.orig_in21k", 56)):
        other = table_for(backbone, size)
        assert [row.source for row in other.rows] == ["ours"] and "No published rows" in other.note


def test_a_partial_vtab_run_draws_no_empty_plot_and_names_what_a_plot_leaves_out(tmp_path):
    partial = [record("linear", t, 0, 40.0 + i) for i, t in enumerate(ALL_TASKS[:3])]
    write_report(partial, tmp_path / "partial")
    assert not list((tmp_path / "partial").glob("*.png")), "no group is complete: nothing to draw"
    mixed = full_sweep("convpass", 0, 0.0) + partial
    write_report(mixed, tmp_path / "mixed")
    assert (tmp_path / "mixed" / "groups__vtab__vit_base_patch16_224.orig_in21k__final.png").is_file()


def test_a_per_task_search_result_is_one_row_per_request(tmp_path):
    """NOAH's published subnets, GLoRA's searched paths, E2VPT's importance and Adapter+'s per-task ranks differ
    from task to task while every task made the same request: one row per request, another for another."""
    import json

    from petl_bench.methods.adapter_plus import rank_tables

    assert rank_tables()["dim1-8"]["cifar"] != 3
    searched = []
    for task, budget in (("cifar", 0.64), ("dtd", 0.64), ("cifar", 0.32)):
        path = tmp_path / f"{task}-{budget}.json"
        path.write_text(json.dumps({"prompt": [1], "lora": [2], "adapter": [3], "budget_m": budget, "task": task,
                                    "counter": "noah", "seed": 0, "val_top1": 50.0}))  # fmt: skip
        searched.append(path)
    runs = []
    for index, task in enumerate(("cifar", "dtd")):
        published = record("noah", task, 0, 60.0)
        published.hparams.method = {"subnet": f"vtab:{task}", "subnet_sizes": {"prompt": [index]}, "init": "official"}
        published.hparams.task_defaults = {"subnet": f"vtab:{task}"}
        own = record("noah", task, 0, 61.0)
        own.run_id += "-own"
        own.hparams.method = {"subnet": str(searched[index]), "subnet_sizes": {"prompt": [index]}, "init": "official"}
        glora = record("glora", task, 0, 62.0)
        glora.hparams.method = {"rank": 4, "paths": {"paths": [{"A": "lora"}] * (index + 1), "task": task, "rank": 4,
                                                     "budget_m": 1.0, "seed": 0, "val_top1": 40.0 + index}}  # fmt: skip
        e2vpt = record("e2vpt", task, 0, 63.0)
        e2vpt.hparams.method = {"tokens": 10, "importance": {"kind": "e2vpt-importance", "task": task, "seed": 0,
                                                             "token_importance": [index] * 10}}  # fmt: skip
        plus = record("adapter_plus", task, 0, 64.0)
        plus.hparams.method = {"dim": rank_tables()["dim1-8"][task], "ranks": "dim1-8", "position": "post"}
        runs += [published, own, glora, e2vpt, plus]
    explicit = record("adapter_plus", "cifar", 0, 64.0)
    explicit.run_id += "-explicit"
    explicit.hparams.method = {"dim": 3, "ranks": "dim1-8", "position": "post"}  # an explicit dim (not cifar's)
    runs.append(explicit)
    other = record("noah", "cifar", 0, 59.0)
    other.run_id += "-other"
    other.hparams.method = {"subnet": str(searched[2]), "subnet_sizes": {"prompt": [0]}, "init": "official"}
    frame = runs_frame([*runs, other])
    rows = frame.groupby("row")["task"].apply(sorted).to_dict()
    assert rows["glora"] == ["cifar", "dtd"] and rows["e2vpt"] == ["cifar", "dtd"]
    plus = {label: tasks for label, tasks in rows.items() if label.startswith("adapter_plus")}
    assert sorted(map(len, plus.values())) == [1, 2], "the ranks' table on both tasks; an explicit dim apart"
    noah = {label: tasks for label, tasks in rows.items() if label.startswith("noah")}
    assert sorted(map(len, noah.values())) == [1, 2, 2], "published, searched at 0.64M (both tasks), at 0.32M"
