"""Domain generalisation: one row per method with the source (ImageNet) and each target, zero-shot
CLIP included as the ``zero_shot`` method, beside the paper's Table 2."""

from __future__ import annotations

from importlib.resources import files

import pandas as pd

from .table import PAPER_METHODS, Stat, Table, row_order, slug, stats, with_paper

TARGETS = ["imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
COLUMNS = ["imagenet", *TARGETS, "target average"]


def _paper() -> dict[str, dict[str, Stat]]:
    table = pd.read_csv(files("petl_bench.reference") / "paper_domain_generalization.csv")
    rows = {}
    for _, line in table.iterrows():
        method = PAPER_METHODS.get(line["method"])
        if method:
            cells = {c: (float(line[c]), 0.0, 1) for c in ["imagenet", *TARGETS]}
            rows[method] = cells | {"target average": (float(line["target_avg_computed"]), 0.0, 1)}
    return rows


def dg_tables(frame: pd.DataFrame) -> list[Table]:
    tables = []
    dg = frame[frame["suite"] == "dg"]
    for (backbone, protocol, mask), runs in dg.groupby(["backbone", "protocol", "class_mask"], sort=True):
        cells, methods = {}, {}
        for label, method in row_order(runs):
            chosen = runs[runs["row"] == label]
            methods[label] = method
            row = {"imagenet": stats(list(chosen["top1"]))}
            targets = {t: chosen[f"top1_{t}"] for t in TARGETS if f"top1_{t}" in chosen}
            row |= {t: stats(list(v.dropna())) for t, v in targets.items() if v.notna().any()}
            if len(targets) == len(TARGETS):
                complete = pd.concat(targets.values(), axis=1).dropna()
                if len(complete):
                    row["target average"] = stats(list(complete.mean(axis=1)))
            cells[label] = row
        params = runs.groupby("row")["trainable_params"].mean().to_dict()
        convention = (
            "A and R: their 200 classes" if mask == "subset" else "A and R: all 1000 logits (NOAH's convention)"
        )
        tables.append(
            Table(
                title=f"domain generalisation on {backbone}, protocol '{protocol}' ({convention})",
                slug=slug("dg", backbone, protocol, mask),
                columns=COLUMNS,
                rows=with_paper(cells, _paper(), params, {}, methods=methods),
                key={"suite": "dg", "backbone": backbone, "protocol": protocol, "class_mask": mask},
                note="Source: 16-shot ImageNet; zero_shot is zero-shot CLIP. (paper): the Convpass paper's Table 2.",
                summary=tuple(COLUMNS),
            )
        )
    return tables
