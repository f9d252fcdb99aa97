"""The shape of the code base: records written by earlier versions still read and report identically,
modules and functions stay short enough to read at once, and no module imports from a layer above it."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

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
    for name in ("report.md", "accuracy.csv", "cost.csv", "runs.csv"):
        assert (tmp_path / "report" / name).read_text() == (OLD / "report" / name).read_text(), name
