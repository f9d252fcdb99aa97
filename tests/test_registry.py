"""Registries: plugins from a file and from an installed package's entry point."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import TINY_VIT, tiny_backbone

import petl_bench as pb
from petl_bench.errors import UserError
from petl_bench.registry import Registry

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_plugin_example() -> str:
    """The Python block of the README's 'Add a method in one file' section."""
    section = README.read_text().split("## Add a method in one file", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_is_the_shipped_example_file():
    shipped = (README.parent / "examples" / "partial_tuning.py").read_text()
    assert readme_plugin_example().strip() in shipped


def test_plugin_file_registers_a_method_usable_from_the_cli(tmp_path):
    plugin = tmp_path / "norm_plugin.py"
    plugin.write_text(readme_plugin_example())
    result = subprocess.run(
        [sys.executable, "-m", "petl_bench.cli", "params", "--plugin", str(plugin), "--methods", "partial_tuning,linear",
         "--backbone", "vit_base_patch16_224", "--format", "csv"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = dict(line.split(",")[:3:2] for line in result.stdout.splitlines()[1:])
    block = 4 * 768 + (3 * 768 * 768 + 3 * 768) + (768 * 768 + 768) + (768 * 3072 + 3072) + (3072 * 768 + 768)
    assert rows == {"partial_tuning": str(block + 2 * 768), "linear": "0"}


def test_plugin_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="plugin file not found"):
        pb.load_plugin(tmp_path / "missing.py")
    broken = tmp_path / "broken.py"
    broken.write_text("raise ImportError('needs a package that is not installed')\n")
    with pytest.raises(UserError, match="broken.py failed to load: ImportError: needs a package"):
        pb.load_plugin(broken)


def test_entry_point_group_registers_third_party_methods(tmp_path, monkeypatch):
    (tmp_path / "third_party_petl.py").write_text(
        textwrap.dedent(
            """
            import petl_bench as pb

            class HeadOnly(pb.Method):
                name = "third_party_head_only"
                trains = "nothing"
                def attach(self, model, info, config):
                    return []
            """
        )
    )
    dist = tmp_path / "third_party_petl-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: third-party-petl\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[petl_bench.methods]\nthird_party_head_only = third_party_petl:HeadOnly\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry("method", "petl_bench.methods", "petl_bench.methods")
    method = registry.get("third-party-head-only")
    assert method.__name__ == "HeadOnly"
    model = pb.attach_method(*tiny_backbone(TINY_VIT), method(), method().make_config())
    assert pb.count_trainable(model)[0] == 0


def test_params_without_methods_counts_every_method_that_runs_on_the_backbone(monkeypatch, capsys):
    from conftest import run_cli

    code, stdout, stderr = run_cli(monkeypatch, capsys, "params", "--format", "csv")
    assert code == 0, stderr
    counts = {line.split(",")[0]: int(line.split(",")[2]) for line in stdout.splitlines()[1:]}
    assert counts == {
        "full": 85_798_656, "linear": 0, "bitfit": 102_912, "vpt_shallow": 7_680, "vpt_deep": 92_160,
        "adapter": 156_768, "adaptformer": 156_768, "lora": 294_912, "convpass": 327_552, "convpass_attn": 163_776,
        "ln_tune": 38_400, "ssf": 205_824, "fact_tt": 8_448, "fact_tk": 13_952, "repadapter": 239_808,
        "repadapter_attn": 119_904,
        "difffit": 140_544, "houlsby_adapter": 313_536, "pfeiffer_adapter": 156_768, "bi_adaptformer": 589_824,
        "bi_lora": 1_179_648, "adapter_plus": 165_984, "arc": 96_432, "arc_attn": 48_216,
        "dtl": 36_864, "dtl_plus": 43_776, "sct": 111_744, "dyt": 313_548, "vqt": 9_216, "e2vpt": 138_240,
        "glora_fixed": 1_603_776, "mona": 2_684_928,
    }  # fmt: skip
    assert "not counted: zero_shot" in stderr and "not counted: noah" in stderr


def test_every_per_task_default_names_a_registered_task_and_fits_the_config():
    import dataclasses
    import typing

    import petl_bench as pb

    tables = 0
    for name in pb.METHODS.names():
        method = pb.METHODS.get(name)()
        if not method.task_defaults:
            continue
        tables += 1
        hints = typing.get_type_hints(method.Config)
        fields = {f.name for f in dataclasses.fields(method.Config)}
        for task, values in method.task_defaults.items():
            assert task in pb.TASKS, f"{name}: per-task default for unknown task {task!r}"
            assert set(values) <= fields, (name, task, values)
            for key, value in values.items():
                expected = hints[key]
                allowed = (int, float) if expected is float else typing.get_args(expected) or (expected,)
                assert isinstance(value, allowed) and not (expected is not bool and isinstance(value, bool)), (
                    name,
                    task,
                    key,
                    value,
                )
            config = method.make_config(task)  # bounds and the method's own checks
            method.check_config(config)
    assert tables >= 10
