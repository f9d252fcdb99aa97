"""The shape of the code base: records written by earlier versions still read and report identically,
modules and functions stay short enough to read at once, and no module imports from a layer above it."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pandas as pd
import pytest

from petl_bench import records
from petl_bench.report import write_report

ROOT = Path(__file__).resolve().parents[1]
OLD = Path(__file__).parent / "data" / "records_v1"  # written by petl-bench before typed records (schema 1)


def test_records_of_schema_1_read_and_report_identically(tmp_path):
    shutil.copytree(OLD / "runs", tmp_path / "runs")
    found = records.load_records(tmp_path / "runs")
    assert len(found) == 4 and {r.schema_version for r in found} == {1}
    assert all(isinstance(r.metrics, records.Metrics) and isinstance(r.cost.seconds, records.Seconds) for r in found)
    write_report(found, tmp_path / "report", ("md", "csv"))
    for name in ("report.md", "cost.csv", "runs.csv"):
        assert (tmp_path / "report" / name).read_text() == (OLD / "report" / name).read_text(), name
    # accuracy.csv gained interval columns since (lower/upper: bootstrap, none without per-image outcomes;
    # t_lower/t_upper over seeds): every column it had is as it was.
    now = pd.read_csv(tmp_path / "report" / "accuracy.csv")
    before = pd.read_csv(OLD / "report" / "accuracy.csv")
    pd.testing.assert_frame_equal(now[before.columns], before)
    assert now["lower"].isna().all() and now["t_lower"].notna().any()


# Layers, lowest first: a module imports only from its own layer or below (methods and tasks are the
# package's petl_bench.methods / petl_bench.tasks). The package root only re-exports (lazily).
LAYERS = [
    {"errors", "version"},
    {"paths", "atomic", "config", "registry", "tensors", "hub", "progress"},
    {"records", "data"},
    {"augment", "ledger", "datasets", "install", "task"},
    {"backbones", "clip", "model", "checkpoints", "demo_backbone", "engine", "training_state", "methods", "tasks"},
    {"opcount", "export", "planning", "report"},
    {"runner", "costs", "capacity", "tuning", "search"},
    {"executors", "noah_search", "glora_search", "e2vpt_prune", "vqt_compress"},
    {"output", "cli", "cli_data", "cli_sweep", "cli_noah", "cli_glora", "cli_e2vpt", "cli_vqt", "__init__"},
]
LAYER = {name: rank for rank, names in enumerate(LAYERS) for name in names}
SOURCES = {"petl_bench": ROOT / "petl_bench", "methods": ROOT / "methods", "tasks": ROOT / "tasks"}
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 450, 60


def _modules():
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            yield package, parts, path


def _top(package: str, parts: tuple[str, ...]) -> str:
    """The name a module has in the layers: its top-level module of petl_bench (methods, tasks, report)."""
    return package if package != "petl_bench" else parts[0]


def _imported(package: str, parts: tuple[str, ...], tree: ast.AST):
    """The petl_bench modules ``tree`` imports, by their layer names (function-level imports included)."""
    here = ["petl_bench", *(["methods"] if package == "methods" else ["tasks"] if package == "tasks" else []), *parts]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level]
                target = [*base, *(node.module.split(".") if node.module else [])]
            else:
                target = (node.module or "").split(".")
            if target[0] != "petl_bench":
                continue
            if len(target) == 1:  # from petl_bench import x / from . import x
                for alias in node.names:
                    yield alias.name
            else:
                yield target[1]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                names = alias.name.split(".")
                if names[0] == "petl_bench":
                    yield names[1] if len(names) > 1 else "__init__"


def test_no_module_imports_from_a_layer_above_it():
    upward = []
    for package, parts, path in _modules():
        name = _top(package, parts)
        assert name in LAYER, f"{path} has no layer in tests/test_layout.py"
        for target in set(_imported(package, parts, ast.parse(path.read_text()))):
            if target in LAYER and LAYER[target] > LAYER[name]:
                upward.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not upward, upward


@pytest.mark.parametrize("package", sorted(SOURCES))
def test_modules_and_functions_are_short_enough_to_read_at_once(package):
    long = []
    for _, _, path in (m for m in _modules() if m[0] == package):
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, long
