"""The run frame and the generic table every report section renders through."""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field

import pandas as pd

from ..config import Recipe
from ..paths import safe_name
from ..records import RunRecord, unpack_outcomes
from ..registry import METHODS

MISSING = "–"
Stat = tuple[float, float, int]  # mean, std (sample, 0 for one value), count
RUN_COLUMNS = [
    "method", "task", "backbone", "seed", "protocol", "top1", "trainable_params", "trainable_params_with_head",
    "checkpoint_bytes", "peak_memory_bytes", "train_images_per_s", "eval_images_per_s", "wall_seconds", "suite",
    "group", "eval_split", "shots", "split_seed", "class_mask", "pretrained", "run_id", "peak_memory_kind",
    "cached_features", "epochs", "lr", "batch_size", "image_size", "weights_notes", "inference_images_per_s",
    "merged_inference_images_per_s", "data_fingerprint", "data_manifest", "finished_at", "settings", "row",
]  # fmt: skip
# The columns a table row is made of, besides its settings: runs that agree in these and in their settings
# differ in seed alone, and only those share a row.
ROW_KEY = ["suite", "backbone", "protocol", "class_mask", "method"]
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
        masks = set(r.metrics.class_mask.values())
        recipe = r.hparams.recipe if isinstance(r.hparams.recipe, dict) else {}
        inference = r.cost.inference_images_per_s or {}
        row = {
            "method": r.method, "task": r.task, "backbone": r.backbone, "seed": r.seed, "protocol": r.protocol,
            "top1": r.metrics.top1, "trainable_params": r.cost.trainable_params,
            "trainable_params_with_head": r.cost.trainable_params_with_head,
            "checkpoint_bytes": r.cost.checkpoint_bytes, "peak_memory_bytes": r.cost.peak_memory_bytes,
            "train_images_per_s": r.cost.train_images_per_s, "eval_images_per_s": r.cost.eval_images_per_s,
            "wall_seconds": r.cost.seconds.total, "suite": r.suite, "group": r.group or "",
            "eval_split": r.metrics.eval_split, "shots": r.task_variant.get("shots"),
            "split_seed": r.task_variant.get("split_seed"), "class_mask": "subset" if "subset" in masks else ("all" if masks else ""),
            "pretrained": r.pretrained, "run_id": r.run_id, "peak_memory_kind": r.cost.peak_memory_kind,
            "cached_features": bool(r.cost.head_trained_on_cached_features),
            "epochs": recipe.get("epochs"), "lr": recipe.get("lr"), "batch_size": recipe.get("batch_size"),
            "image_size": recipe.get("image_size"), "weights_notes": " ".join(r.notes),
            "inference_images_per_s": inference.get("as_trained"), "merged_inference_images_per_s": inference.get("merged"),
            "data_fingerprint": r.data.get("fingerprint") or "", "data_manifest": r.data.get("manifest") or "",
            "finished_at": r.finished_at, "settings": json.dumps(run_settings(r), sort_keys=True, default=str),
            "outcomes": _outcomes(r),
        }  # fmt: skip
        row.update({f"top1_{name}": value for name, value in r.metrics.targets.items()})
        rows.append(row)
    frame = pd.DataFrame(rows)
    extra = sorted(c for c in frame.columns if c not in RUN_COLUMNS + INTERNAL)
    frame = frame.reindex(columns=RUN_COLUMNS + extra + INTERNAL)
    frame["row"] = row_labels(frame) if len(frame) else []
    return frame


INTERNAL = ["outcomes"]  # frame columns the report computes with but does not write (runs.csv)


def _outcomes(record: RunRecord):
    """(the evaluation list's fingerprint, the per-image outcomes), None for a record without them."""
    bits = unpack_outcomes(record.metrics.outcomes)
    return None if bits is None else (record.metrics.outcomes.get("eval_list", ""), bits)


def _flat(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flat(f"{prefix}.{key}" if prefix else str(key), inner, out)
    else:
        out[prefix] = value


def run_settings(record: RunRecord) -> dict:
    """Everything a run was trained with except its seed and its task's own values: the method's settings
    and the recipe (per-task defaults and the values a tuned run chose per task left out, since they are
    the same request on another task), the input size and the weights. Flat: ``{"epochs": 2, ...}``."""
    settings, chosen = record.hparams, set((record.tuning or {}).get("chosen", {}))
    defaults = settings.task_defaults or {}
    method = {k: v for k, v in (settings.method or {}).items() if k not in chosen and defaults.get(k, object()) != v}
    if record.method in METHODS:
        method = METHODS.get(record.method)().row_settings(method, record.task)
    skipped = {*Recipe.EXECUTION, *chosen, "image_size", "compile"}  # compile: the execution setting before 0.x
    recipe = {k: v for k, v in (settings.recipe or {}).items() if k not in skipped}
    out: dict = {}
    _flat("", {**recipe, **method}, out)
    out["input"] = "x".join(map(str, settings.input_size or [])) or None
    device = str((record.environment or {}).get("device", ""))  # records before the setting: what the device ran
    out["precision"] = settings.precision or ("bf16" if device.startswith("cuda") else "fp32")
    if (settings.execution or "eager") != "eager":  # named only when compiled: earlier records ran eagerly
        out["execution"] = settings.execution
    out["weights"] = record.pretrained + (
        f" {record.backbone_checkpoint_sha256[:8]}" if record.backbone_checkpoint_sha256 else ""
    )
    return out


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 24 else text[:10] + "…" + text[-10:]


def _differing(settings: list[dict]) -> list[str]:
    keys = sorted({k for s in settings for k in s})
    return [k for k in keys if len({json.dumps(s.get(k), sort_keys=True, default=str) for s in settings}) > 1]


def row_labels(frame: pd.DataFrame) -> pd.Series:
    """A table row per method and distinct settings (and per copy of a task's data): the method's name when
    it has one such row, else the name with what differs, e.g. ``linear (epochs 2)`` and ``linear (epochs 10)``.
    Runs of one task that read different copies of the data go to separate rows (``data copy 2``, in the
    order the copies were first used)."""
    labels = pd.Series("", index=frame.index, dtype=object)
    for _, group in frame.groupby(ROW_KEY, dropna=False, sort=False):
        order = group.sort_values("finished_at", kind="stable")
        copies = {}
        for _, run in order.iterrows():
            known = copies.setdefault(run["task"], [])
            if run["data_fingerprint"] and run["data_fingerprint"] not in known:
                known.append(run["data_fingerprint"])
        copy = {i: (copies[r["task"]].index(r["data_fingerprint"]) if r["data_fingerprint"] else 0)
                for i, r in group.iterrows()}  # fmt: skip
        keys = {i: (r["settings"], copy[i]) for i, r in group.iterrows()}
        distinct = list(dict.fromkeys(keys[i] for i in order.index))
        parsed = {text: json.loads(text) for text, _ in distinct}
        differing = _differing(list(parsed.values()))
        for i, run in group.iterrows():
            text, data_copy = keys[i]
            parts = [f"{k} {_short(parsed[text].get(k))}" for k in differing]
            parts += [f"data copy {data_copy + 1}"] if any(c for _, c in distinct) else []
            labels[i] = run["method"] + (f" ({', '.join(parts)})" if len(distinct) > 1 and parts else "")
    return labels


def method_order(methods) -> list[str]:
    registered = METHODS.names()
    return sorted(set(methods), key=lambda m: (registered.index(m) if m in registered else len(registered), m))


def row_order(runs: pd.DataFrame) -> list[tuple[str, str]]:
    """(label, method) of every table row of ``runs``, in the registry's method order, then by label."""
    pairs = set(zip(runs["row"], runs["method"]))
    rank = {m: i for i, m in enumerate(method_order(runs["method"]))}
    return sorted(pairs, key=lambda pair: (rank[pair[1]], pair[0]))


def stats(values: list[float]) -> Stat:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std, len(values)


def format_cell(cell: Stat | None, interval: tuple[float, float] | None = None) -> str:
    """``mean ± h``: h the half-width of the cell's 95% bootstrap interval where it has one, else the std
    over seeds (several seeds), else the mean alone."""
    if cell is None:
        return MISSING
    mean, std, n = cell
    if interval is not None:
        return f"{mean:.1f} ± {(interval[1] - interval[0]) / 2:.1f}"
    return f"{mean:.1f} ± {std:.1f}" if n > 1 else f"{mean:.1f}"


def t_bounds(cell: Stat) -> tuple[float | None, float | None]:
    """The 95% t-interval over seeds of a cell (None, None below two seeds)."""
    from .stats import t_bounds as bounds

    if cell[2] < 2:
        return None, None
    low, high = bounds(*cell)
    return round(low, 4), round(high, 4)


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
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)  # column -> 95% bootstrap interval
    # task -> (evaluation list, each seed's per-image outcomes), where the runs stored them (the rankings)
    outcomes: dict = field(default_factory=dict, repr=False)


@dataclass
class Table:
    """Rows of cells with a title; ours first and the paper's row right after the same method."""

    title: str
    slug: str
    columns: list[str]
    rows: list[Row]
    key: dict[str, str] = field(default_factory=dict)  # suite, backbone, protocol, ... (CSV)
    note: str = ""  # Markdown written by the report itself (text from records escaped where it is put in)
    headline: tuple[str, ...] = ()  # the column(s) a plot takes as the row's overall number, by preference
    summary: tuple[str, ...] = ()  # the columns a bar plot shows
    replicates: dict = field(default_factory=dict, repr=False)  # row label -> task -> bootstrap replicates

    def ours(self) -> dict[str, dict[str, Stat]]:
        """Our rows' cells by label (the method's name unless it has rows of several settings)."""
        return {row.label: row.cells for row in self.rows if row.source == "ours"}

    def display_rows(self) -> list[dict[str, str]]:
        return [
            {
                "method": row.label,
                "params": format_params(row.params),
                **{c: format_cell(row.cells.get(c), row.intervals.get(c)) for c in self.columns},
            }
            for row in self.rows
        ]

    def markdown(self) -> str:
        header = ["method", "params", *self.columns]
        lines = [f"### {escape_markdown(self.title)}", ""] + ([self.note, ""] if self.note else [])
        body = markdown_table(header, [[row[c] for c in header] for row in self.display_rows()])
        return "\n".join(lines) + "\n" + body

    def long_rows(self) -> list[dict]:
        return [
            self._long_row(row, column, cell)
            for row in self.rows
            for column, cell in row.cells.items()
            if column in self.columns
        ]

    def _long_row(self, row: Row, column: str, cell: Stat) -> dict:
        """One cell of the table as a CSV row: its mean, std, count and both 95% intervals."""
        interval = row.intervals.get(column)
        t_low, t_high = t_bounds(cell)
        return {
            **self.key, "table": self.title, "method": row.method, "source": row.source, "column": column,
            "mean": round(cell[0], 4), "std": round(cell[1], 4), "n": cell[2],
            "lower": round(interval[0], 4) if interval else None, "upper": round(interval[1], 4) if interval else None,
            "t_lower": t_low, "t_upper": t_high,
        }  # fmt: skip


def with_paper(
    ours: dict[str, dict[str, Stat]],
    paper: dict[str, dict[str, Stat]],
    params: dict,
    paper_params: dict,
    published: dict[str, list[Row]] | None = None,
    methods: dict[str, str] | None = None,
) -> list[Row]:
    """Our rows (keyed by label; ``methods`` maps a label to its method, else the label is the method), the
    last row of each method followed by the paper's row for it where the paper has one, then by the rows
    other publications report for it."""
    methods = methods or {label: label for label in ours}
    labels = list(ours)
    rows = []
    for position, label in enumerate(labels):
        method = methods[label]
        rows.append(Row(label, ours[label], params.get(label, params.get(method)), "ours", method))
        if any(methods[later] == method for later in labels[position + 1 :]):
            continue
        if method in paper:
            rows.append(Row(f"{method} (paper)", paper[method], paper_params.get(method), "paper", method))
        rows += (published or {}).get(method, [])
    return rows
