"""Registries of methods, tasks and backbones, with third-party plugins.

Built-in entries register themselves when their package is imported (``petl_bench.methods``,
``petl_bench.tasks``); other packages add entries through the entry-point groups
``petl_bench.methods`` / ``petl_bench.tasks`` / ``petl_bench.backbones``; a user can also load a
single Python file with :func:`load_plugin`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import sys
import types
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, TypeVar

from .errors import UserError, unknown_choice

log = logging.getLogger(__name__)
T = TypeVar("T")


def canonical(name: str) -> str:
    """Registry key of a user-facing name: case-insensitive, hyphens and underscores alike."""
    return name.strip().lower().replace("-", "_")


class Registry(Generic[T]):
    """Name -> object, filled by decorators, built-in modules and entry points."""

    def __init__(self, kind: str, builtin_module: str | None, entry_point_group: str):
        self.kind = kind
        self._builtin_module = builtin_module
        self._group = entry_point_group
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}
        self._families: dict[str, tuple[Callable[[str], T], Callable[[], dict[str, str]]]] = {}
        self._loaded = False

    def register_family(self, prefix: str, make: Callable[[str], T], describe: Callable[[], dict[str, str]]) -> None:
        """Names ``<prefix><member>`` made on demand by ``make(member)`` (a UserError for an unknown member);
        ``describe()`` says what the family is, for listings (its members among it). Members are not part
        of :meth:`names` (a sweep over 'all')."""
        self._families[canonical(prefix)] = (make, describe)

    def families(self) -> dict[str, dict[str, str]]:
        """Each family's prefix and its description."""
        self._load()
        return {prefix: describe() for prefix, (_, describe) in self._families.items()}

    def register(self, obj: T | None = None, *, name: str | None = None, aliases: tuple[str, ...] = ()):
        """Register ``obj`` under ``name`` (default: its ``name`` attribute); usable as a decorator."""

        def add(target: T) -> T:
            key = canonical(name or target.name)
            if key in self._entries and self._entries[key] is not target:
                raise ValueError(f"{self.kind} '{key}' is already registered")
            self._entries[key] = target
            for alias in aliases:
                self._aliases[canonical(alias)] = key
            return target

        return add if obj is None else add(obj)

    def resolve(self, name: str) -> str:
        """The registered key for ``name`` or one of its aliases; UserError when unknown."""
        self._load()
        key = canonical(name)
        key = self._aliases.get(key, key)
        for prefix, (make, _) in self._families.items():
            if key not in self._entries and key.startswith(prefix):
                self._entries[key] = make(key[len(prefix) :])
        if key not in self._entries:
            raise unknown_choice(self.kind, name, [*self._entries, *(f"{p}<name>" for p in self._families)])
        return key

    def get(self, name: str) -> T:
        return self._entries[self.resolve(name)]

    def __contains__(self, name: str) -> bool:
        self._load()
        key = canonical(name)
        return self._aliases.get(key, key) in self._entries

    def names(self) -> list[str]:
        """The registered entries, family members made so far left out."""
        self._load()
        return [key for key in self._entries if not any(key.startswith(p) for p in self._families)]

    def items(self) -> Iterator[tuple[str, T]]:
        self._load()
        return iter([(key, self._entries[key]) for key in self.names()])

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self._builtin_module:
            importlib.import_module(self._builtin_module)
        for entry_point in importlib.metadata.entry_points(group=self._group):
            try:
                loaded = entry_point.load()
            except Exception as error:  # a broken third-party plugin must not break the harness
                log.warning("could not load %s plugin '%s': %s", self.kind, entry_point.name, error)
                continue
            if not isinstance(loaded, types.ModuleType) and canonical(entry_point.name) not in self._entries:
                self.register(loaded, name=entry_point.name)


METHODS: Registry[Any] = Registry("method", "petl_bench.methods", "petl_bench.methods")
TASKS: Registry[Any] = Registry("task", "petl_bench.tasks", "petl_bench.tasks")
BACKBONES: Registry[Any] = Registry("backbone", "petl_bench.demo_backbone", "petl_bench.backbones")

SUITES: Registry[Any] = Registry("suite", "petl_bench.tasks", "petl_bench.suites")
DATASETS: Registry[Any] = Registry("dataset", "petl_bench.tasks", "petl_bench.datasets")

register_method = METHODS.register
register_task = TASKS.register
register_backbone = BACKBONES.register
register_suite = SUITES.register
register_dataset = DATASETS.register


_loaded_plugins: set[Path] = set()


def load_plugin(path: str | Path) -> None:
    """Execute a Python file so that its ``@register_method`` (or task / backbone) decorators run.
    A file already loaded in this process is not executed again."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"plugin file not found: {path}")
    if path.resolve() in _loaded_plugins:
        return
    _loaded_plugins.add(path.resolve())
    for registry in (METHODS, TASKS, BACKBONES, SUITES, DATASETS):  # built-ins first: a clash is the plugin's
        registry._load()
    module_name = f"petl_bench_plugin_{canonical(path.stem)}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except UserError:
        raise
    except SystemExit as exit_:
        raise UserError(
            f"plugin {path} called sys.exit({exit_.code!r}) while loading; a plugin only registers"
        ) from None
    except Exception as error:
        raise UserError(f"plugin {path} failed to load: {type(error).__name__}: {error}") from error
