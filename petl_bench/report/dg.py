"""Domain generalisation: one row per method with the source (ImageNet) and each target, zero-shot
CLIP included as the ``zero_shot`` method, beside the paper's Table 2."""

from __future__ import annotations

from importlib.resources import files

import pandas as pd

from .table import PAPER_METHODS, Stat, Table, row_order, slug, stats, with_paper

TARGET_AVERAGE = "target average"


def _paper(layout, source: str) -> dict[str, dict[str, Stat]]:
    if not layout.paper:
        return {}
    table = pd.read_csv(files("petl_bench.reference") / layout.paper)
    rows = {}
    for _, line in table.iterrows():
        method = PAPER_METHODS.get(line["method"])
        if method:
            cells = {c: (float(line[c]), 0.0, 1) for c in [source, *layout.targets]}
            rows[method] = cells | {TARGET_AVERAGE: (float(line["target_avg_computed"]), 0.0, 1)}
    return rows


def dg_tables(frame: pd.DataFrame, suite: str, layout) -> list[Table]:
    """Per backbone, protocol and class mask: a row per method with the source task and each target."""
    tables = []
    targets_all = list(layout.targets)
    for (backbone, protocol, mask), runs in frame.groupby(["backbone", "protocol", "class_mask"], sort=True):
        source = layout.source or str(runs["task"].iloc[0])
        columns = [source, *targets_all, TARGET_AVERAGE]
        cells, methods = {}, {}
        for label, method in row_order(runs):
            chosen = runs[runs["row"] == label]
            methods[label] = method
            row = {source: stats(list(chosen["top1"]))}
            targets = {t: chosen[f"top1_{t}"] for t in targets_all if f"top1_{t}" in chosen}
            row |= {t: stats(list(v.dropna())) for t, v in targets.items() if v.notna().any()}
            if len(targets) == len(targets_all):
                complete = pd.concat(targets.values(), axis=1).dropna()
                if len(complete):
                    row[TARGET_AVERAGE] = stats(list(complete.mean(axis=1)))
            cells[label] = row
        params = runs.groupby("row")["trainable_params"].mean().to_dict()
        convention = (
            "A and R: their 200 classes" if mask == "subset" else "A and R: all 1000 logits (NOAH's convention)"
        )
        tables.append(
            Table(
                title=f"{layout.title or suite} on {backbone}, protocol '{protocol}' ({convention})",
                slug=slug(suite, backbone, protocol, mask),
                columns=columns,
                rows=with_paper(cells, _paper(layout, source), params, {}, methods=methods),
                key={"suite": suite, "backbone": backbone, "protocol": protocol, "class_mask": mask},
                note="Source: 16-shot ImageNet; zero_shot is zero-shot CLIP. (paper): the Convpass paper's Table 2.",
                summary=tuple(columns),
            )
        )
    return tables
