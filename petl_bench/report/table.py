"""The run frame and the generic table every report section renders through."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

import pandas as pd

from ..records import RunRecord, safe_name
from ..registry import METHODS

MISSING = "–"
Stat = tuple[float, float, int]  # mean, std (sample, 0 for one value), count
RUN_COLUMNS = [
    "method", "task", "backbone", "seed", "protocol", "top1", "trainable_params", "trainable_params_with_head",
    "checkpoint_bytes", "peak_memory_bytes", "train_images_per_s", "eval_images_per_s", "wall_seconds", "suite",
    "group", "eval_split", "shots", "split_seed", "class_mask", "pretrained", "run_id", "peak_memory_kind",
    "cached_features", "epochs", "lr", "batch_size", "image_size", "weights_notes", "inference_images_per_s",
    "merged_inference_images_per_s", "data_fingerprint", "data_manifest",
]  # fmt: skip
# Method names in the paper's tables -> registered names.
PAPER_METHODS = {
    "Full": "full", "Linear": "linear", "VPT": "vpt_deep", "Adapter": "adapter", "AdaptFormer": "adaptformer",
    "LoRA": "lora", "NOAH": "noah", "Convpass_attn": "convpass_attn", "Convpass": "convpass",
    "ZS CLIP": "zero_shot", "LP CLIP": "linear", "Convpass_CLIP": "convpass",
}  # fmt: skip


def runs_frame(records: list[RunRecord]) -> pd.DataFrame:
    """One row per run (top1 in percent); domain-generalisation targets as ``top1_<target>`` columns."""
    rows = []
    for r in records:
        masks = set(r.metrics.get("class_mask", {}).values())
        recipe = r.hparams.get("recipe", {}) if isinstance(r.hparams.get("recipe"), dict) else {}
        inference = r.cost.get("inference_images_per_s") or {}
        row = {
            "method": r.method, "task": r.task, "backbone": r.backbone, "seed": r.seed, "protocol": r.protocol,
            "top1": r.metrics["top1"], "trainable_params": r.cost["trainable_params"],
            "trainable_params_with_head": r.cost["trainable_params_with_head"],
            "checkpoint_bytes": r.cost["checkpoint_bytes"], "peak_memory_bytes": r.cost["peak_memory_bytes"],
            "train_images_per_s": r.cost["train_images_per_s"], "eval_images_per_s": r.cost["eval_images_per_s"],
            "wall_seconds": r.cost["seconds"]["total"], "suite": r.suite, "group": r.group or "",
            "eval_split": r.metrics["eval_split"], "shots": r.task_variant.get("shots"),
            "split_seed": r.task_variant.get("split_seed"), "class_mask": "subset" if "subset" in masks else ("all" if masks else ""),
            "pretrained": r.pretrained, "run_id": r.run_id, "peak_memory_kind": r.cost.get("peak_memory_kind", ""),
            "cached_features": bool(r.cost.get("head_trained_on_cached_features", False)),
            "epochs": recipe.get("epochs"), "lr": recipe.get("lr"), "batch_size": recipe.get("batch_size"),
            "image_size": recipe.get("image_size"), "weights_notes": " ".join(r.notes),
            "inference_images_per_s": inference.get("as_trained"), "merged_inference_images_per_s": inference.get("merged"),
            "data_fingerprint": r.data.get("fingerprint") or "", "data_manifest": r.data.get("manifest") or "",
        }  # fmt: skip
        row.update({f"top1_{name}": value for name, value in r.metrics.get("targets", {}).items()})
        rows.append(row)
    frame = pd.DataFrame(rows)
    extra = sorted(c for c in frame.columns if c not in RUN_COLUMNS)
    return frame.reindex(columns=RUN_COLUMNS + extra)


def method_order(methods) -> list[str]:
    registered = METHODS.names()
    return sorted(set(methods), key=lambda m: (registered.index(m) if m in registered else len(registered), m))


def stats(values: list[float]) -> Stat:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std, len(values)


def format_cell(cell: Stat | None) -> str:
    if cell is None:
        return MISSING
    mean, std, n = cell
    return f"{mean:.1f} ± {std:.1f}" if n > 1 else f"{mean:.1f}"


def format_params(count: float | None) -> str:
    return MISSING if count is None or pd.isna(count) else f"{count / 1e6:.3f}M"


def escape_markdown(text: str) -> str:
    """Text from records as inert Markdown: no HTML, no links or images, no table breaks, one line."""
    text = html.escape(str(text), quote=False)
    for char in "\\|[]`":
        text = text.replace(char, "\\" + char)
    return " ".join(text.split())


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table with one header row; every cell escaped."""
    lines = ["| " + " | ".join(map(escape_markdown, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(escape_markdown, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value):
    """A CSV cell a spreadsheet will not run: text starting like a formula gets a leading apostrophe
    (numbers, negative ones included, are left alone)."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def csv_safe_frame(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.map(csv_safe)


def slug(*parts: str) -> str:
    return "__".join(safe_name(str(p)) for p in parts)


@dataclass
class Row:
    label: str
    cells: dict[str, Stat]
    params: float | None = None
    source: str = "ours"  # or "paper"
    method: str = ""


@dataclass
class Table:
    """Rows of cells with a title; ours first and the paper's row right after the same method."""

    title: str
    slug: str
    columns: list[str]
    rows: list[Row]
    key: dict[str, str] = field(default_factory=dict)  # suite, backbone, protocol, ... (CSV)
    note: str = ""
    headline: tuple[str, ...] = ()  # the column(s) a plot takes as the row's overall number, by preference
    summary: tuple[str, ...] = ()  # the columns a bar plot shows

    def ours(self) -> dict[str, dict[str, Stat]]:
        return {row.method: row.cells for row in self.rows if row.source == "ours"}

    def display_rows(self) -> list[dict[str, str]]:
        return [
            {
                "method": row.label,
                "params": format_params(row.params),
                **{c: format_cell(row.cells.get(c)) for c in self.columns},
            }
            for row in self.rows
        ]

    def markdown(self) -> str:
        header = ["method", "params", *self.columns]
        lines = [f"### {escape_markdown(self.title)}", ""] + ([escape_markdown(self.note), ""] if self.note else [])
        body = markdown_table(header, [[row[c] for c in header] for row in self.display_rows()])
        return "\n".join(lines) + "\n" + body

    def long_rows(self) -> list[dict]:
        return [
            {
                **self.key,
                "table": self.title,
                "method": row.method,
                "source": row.source,
                "column": column,
                "mean": round(cell[0], 4),
                "std": round(cell[1], 4),
                "n": cell[2],
            }  # fmt: skip
            for row in self.rows
            for column, cell in row.cells.items()
            if column in self.columns
        ]


def with_paper(
    ours: dict[str, dict[str, Stat]],
    paper: dict[str, dict[str, Stat]],
    params: dict,
    paper_params: dict,
    published: dict[str, list[Row]] | None = None,
) -> list[Row]:
    """Our rows, each followed by the paper's row for the same method where the paper has one, then by the
    rows other publications report for it."""
    rows = []
    for method, cells in ours.items():
        rows.append(Row(method, cells, params.get(method), "ours", method))
        if method in paper:
            rows.append(Row(f"{method} (paper)", paper[method], paper_params.get(method), "paper", method))
        rows += (published or {}).get(method, [])
    return rows
