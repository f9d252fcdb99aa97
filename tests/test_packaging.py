"""The README's set-up lines are what CI runs; the package installs methods and tasks as subpackages."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_set_up_lines():
    block = re.search(r"## Set up\n\n```\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    install, test = block.strip().splitlines()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install in ci and test in ci


def test_installed_package_imports_methods_and_tasks():
    import petl_bench.methods
    import petl_bench.tasks

    assert Path(petl_bench.methods.__file__).parent.name == "methods"
    assert Path(petl_bench.tasks.__file__).parent.name == "tasks"


@pytest.mark.slow
def test_wheel_contains_methods_tasks_and_reference_data(tmp_path):
    pytest.importorskip("build")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        check=True, capture_output=True,
    )  # fmt: skip
    wheel = next(tmp_path.glob("petl_bench-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "petl_bench/methods/convpass.py" in names
    assert "petl_bench/tasks/vtab.py" in names
    assert "petl_bench/reference/paper_vtab1k.csv" in names
    assert not any(name.startswith(("methods/", "tasks/")) for name in names), "no top-level 'methods' package"
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        check=True, capture_output=True,
    )  # fmt: skip
    probe = "import petl_bench, petl_bench.methods, petl_bench.tasks; print(petl_bench.methods.__file__, len(petl_bench.METHODS.names()))"
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.startswith(str(target)) and int(result.stdout.split()[1]) >= 10
