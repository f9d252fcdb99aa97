"""petl-bench: an honest, fast benchmark harness for parameter-efficient transfer learning in vision."""

from .backbones import PAPER_BACKBONE, BackboneInfo, BackboneSource, Preprocessing, build_backbone
from .checkpoints import checkpoint_bytes, load_trainable, save_trainable
from .errors import UserError
from .export import export_run, load_exported, merge
from .model import Method, PetlModel, attach_method, count_trainable, create_model, trainable_parameters
from .registry import BACKBONES, METHODS, TASKS, load_plugin, register_backbone, register_method, register_task

__version__ = "0.1.0"

__all__ = [
    "BACKBONES",
    "METHODS",
    "PAPER_BACKBONE",
    "TASKS",
    "BackboneInfo",
    "BackboneSource",
    "Method",
    "PetlModel",
    "Preprocessing",
    "UserError",
    "attach_method",
    "build_backbone",
    "checkpoint_bytes",
    "count_trainable",
    "create_model",
    "export_run",
    "load_exported",
    "merge",
    "load_plugin",
    "load_trainable",
    "register_backbone",
    "register_method",
    "register_task",
    "save_trainable",
    "trainable_parameters",
]
