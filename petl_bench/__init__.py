"""petl-bench: an honest, fast benchmark harness for parameter-efficient transfer learning in vision.

The public names below are imported on first use (PEP 562), so ``petl-bench --version`` and ``--help``
start without importing torch.
"""

from __future__ import annotations

import importlib

from .version import __version__

_PUBLIC = {
    "PAPER_BACKBONE": "backbones", "BackboneInfo": "backbones", "BackboneSource": "backbones",
    "Preprocessing": "backbones", "build_backbone": "backbones",
    "checkpoint_bytes": "checkpoints", "load_trainable": "checkpoints", "save_trainable": "checkpoints",
    "UserError": "errors", "Recipe": "config", "fit": "engine", "evaluate": "engine", "prepare": "runner",
    "export_run": "export", "load_exported": "export", "merge": "export",
    "Method": "model", "PetlModel": "model", "attach_method": "model", "count_trainable": "model",
    "create_model": "model", "trainable_parameters": "model",
    "BACKBONES": "registry", "METHODS": "registry", "TASKS": "registry", "load_plugin": "registry",
    "register_backbone": "registry", "register_method": "registry", "register_task": "registry",
}  # fmt: skip

__all__ = ["__version__", *sorted(_PUBLIC)]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    try:  # a submodule: pb.report, pb.records, ...
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
