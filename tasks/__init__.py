"""Built-in tasks and suites; importing this package registers them (installed as ``petl_bench.tasks``)."""

from . import vtab, fewshot, dg, demo  # noqa: F401  isort: skip
