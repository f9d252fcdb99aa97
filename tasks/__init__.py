"""Built-in tasks; importing this package registers them (installed as ``petl_bench.tasks``)."""

from . import vtab  # noqa: F401
