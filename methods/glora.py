"""GLoRA, Generalized LoRA (Chavan et al., arXiv 2306.07967; official Arnav0400/ViT-Slim GLoRA/layer.py,
supernet.py, evolution.py).

Every Linear of the encoder (ViT: qkv, proj, fc1, fc2 of each block; not the classifier) computes
``y = x W'^T + b'`` with ``W' = W + W * A + B`` and ``b' = b + b * D + E + W C``. Each of A, B (o x i), C (i x 1),
D, E (o) takes one form per layer, its *path*: A, B ``lora`` (``X_d X_u``, rank r), ``vector`` (a column,
broadcast over the inputs), ``constant`` or ``none``; C ``lora``, ``vector`` or ``none``; D, E ``vector``,
``constant`` or ``none``: 432 paths per layer. ``X_d``, C_d, D, E start at zero and ``X_u`` xavier-uniform, so
every path starts as the pretrained layer. With its paths fixed a layer folds exactly into a plain Linear.

``glora`` takes the paths of every layer from a file (``petl-bench glora search``: a supernet whose layers
draw a random path at every forward, trained on train800, then the official evolutionary search scored on
val200, never the test images); the official code evaluates the supernet's tensors with the chosen paths,
while here the chosen configuration is retrained from the pretrained backbone like every other run (as
NOAH's pipeline does). ``glora_fixed`` is not in the official code: every layer's A, B, C ``lora`` and D, E
``vector`` (ViT-B/16, r = 4: 1,603,776 parameters, the whole supernet's allocation).
A fixed path allocates only the tensors it uses, so the count is the official ``get_param``'s.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from petl_bench.backbones import VIT
from petl_bench.errors import UserError
from petl_bench.model import Method
from petl_bench.registry import register_method

SCALING = ("lora", "vector", "constant", "none")  # A and B
PROMPT = ("lora", "vector", "none")  # C
SHIFT = ("vector", "constant", "none")  # D and E
CHOICES = {"A": SCALING, "B": SCALING, "C": PROMPT, "D": SHIFT, "E": SHIFT}
FIXED = {"A": "lora", "B": "lora", "C": "lora", "D": "vector", "E": "vector"}


def random_path(rng: random.Random) -> dict[str, str]:
    """One of the 432 paths of a layer, uniformly (the official ``random.choice(self.configs)``)."""
    return {name: rng.choice(choices) for name, choices in CHOICES.items()}


class GLoRALinear(nn.Linear):
    """A frozen Linear (the same weight and bias tensors) with GLoRA's support tensors. ``path`` None: the
    supernet (every tensor allocated, a random path drawn at each forward unless ``chosen`` is set)."""

    def __init__(self, linear: nn.Linear, rank: int, path: dict[str, str] | None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.path, self.chosen, self.rng = path, None, random.Random()
        out, inp = self.out_features, self.in_features
        need = path or FIXED  # the supernet allocates every tensor: the largest forms
        for name in ("A", "B", "C"):
            rows, cols = (inp, 1) if name == "C" else (out, inp)
            form = need[name]
            if form != "none":
                self.register_parameter(f"{name}d", nn.Parameter(torch.zeros(rows if form != "constant" else 1,
                                                                             rank if form == "lora" else 1)))  # fmt: skip
            if form == "lora":
                self.register_parameter(f"{name}u", nn.Parameter(nn.init.xavier_uniform_(torch.empty(rank, cols))))
        for name in ("D", "E"):
            if need[name] != "none":
                self.register_parameter(name, nn.Parameter(torch.zeros(out if need[name] == "vector" else 1)))

    def _factor(self, name: str, form: str) -> torch.Tensor | None:
        if form == "none":
            return None
        down = getattr(self, f"{name}d")
        if form == "lora":
            return down @ getattr(self, f"{name}u")
        return down[:, :1] if form == "vector" else down[:1, :1]

    def _shift(self, name: str, form: str) -> torch.Tensor | None:
        if form == "none":
            return None
        vector = getattr(self, name)
        return vector if form == "vector" else vector[:1]

    def effective(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W', b') of the path in use."""
        path = self.path or self.chosen or random_path(self.rng)
        weight, bias = self.weight, self.bias
        a, b, c = (self._factor(name, path[name]) for name in ("A", "B", "C"))
        d, e = self._shift("D", path["D"]), self._shift("E", path["E"])
        new_weight = weight if a is None else weight + weight * a
        new_weight = new_weight if b is None else new_weight + b
        new_bias = bias if bias is None or d is None else bias + bias * d
        for extra in (e, None if c is None else (weight @ c).squeeze(-1)):
            if extra is not None:
                new_bias = extra if new_bias is None else new_bias + extra
        return new_weight, new_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, *self.effective())

    def folded(self) -> nn.Linear:
        """The plain Linear of the fixed path (exact)."""
        weight, bias = self.effective()
        plain = nn.Linear(self.in_features, self.out_features, bias=bias is not None)
        with torch.no_grad():
            plain.weight.copy_(weight)
            if bias is not None:
                plain.bias.copy_(bias)
        return plain.requires_grad_(False)


def encoder_linears(model: nn.Module, head_path: str) -> list[str]:
    """The names of every Linear of the encoder (not the classifier), in module order."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not name.startswith(head_path)]


def read_paths(source: str, layers: int | None = None) -> list[dict[str, str]]:
    """A searched configuration: a JSON list of one path per encoder Linear (``{"A": "lora", ...}``); with
    ``layers``, exactly that many."""
    path = Path(source)
    if not path.is_file():
        raise UserError(f"GLoRA paths file not found: {source} (petl-bench glora search writes one)")
    try:
        paths = json.loads(path.read_text())
        paths = paths["paths"] if isinstance(paths, dict) else paths
        if layers is not None and len(paths) != layers:
            raise ValueError(f"{len(paths)} paths for {layers} layers")
        for item in paths:
            if set(item) != set(CHOICES) or any(item[k] not in CHOICES[k] for k in CHOICES):
                raise ValueError(f"not a path: {item}")
    except (ValueError, TypeError, KeyError) as error:
        raise UserError(f"{source} is not a GLoRA configuration: {error}") from None
    return paths


# What a searched paths file was asked for (the rest is what the search found on its task): a report row's key.
PATHS_REQUEST = ("budget_m", "rank", "search", "backbone", "seed")


@dataclass
class GLoRAConfig:
    paths: str = ""  # a JSON file of every layer's path (petl-bench glora search)
    rank: int = 4


@register_method
class GLoRA(Method):
    """GLoRA with searched paths: per encoder Linear, a scaling and a shift of the weight and bias."""

    name = "glora"
    identity_at_init = True
    published_as = ("GLoRA",)
    citation = "Chavan et al., One-for-All: Generalized LoRA for Parameter-Efficient Fine-tuning, arXiv 2306.07967"
    trains = "per encoder Linear, the tensors of its path (A, B: r(o+i), o, 1 or 0; C: r(i+1), i or 0; D, E: o, 1 or 0)"
    kinds = (VIT,)
    Config = GLoRAConfig
    reads_frozen_weights = True  # W' = W + W * A + B reads the frozen weight outside F.linear's cast
    merges = True
    # The official lr is 1e-4: a searched path with a vector or constant B adds the same step to a whole row
    # (or every weight) of W, which the shared grid's 1e-2 (and often 1e-3) wrecks.
    recipe_grid = {"lr": (1e-4, 1e-3), "weight_decay": (1e-4, 1e-3)}

    def check_config(self, config):
        if not config.paths:
            raise UserError("glora needs its searched paths: --set glora.paths=FILE (petl-bench glora search), "
                            "or run glora_fixed")  # fmt: skip
        read_paths(config.paths)  # a missing or malformed file: an error before anything trains

    def check_pair(self, info, config):
        """Paths searched on another backbone (a search's file says which) do not fit this one."""
        found = json.loads(Path(config.paths).read_text()) if getattr(config, "paths", "") else None
        if isinstance(found, dict) and found.get("backbone", info.name) != info.name:
            raise UserError(f"the GLoRA paths in {config.paths} were searched on {found['backbone']}; "
                            f"this run's backbone is {info.name}")  # fmt: skip

    def layer_paths(self, config, layers: int) -> list[dict[str, str]] | None:
        return read_paths(config.paths, layers)

    def config_identity(self, config):
        identity = super().config_identity(config)
        if config.paths and Path(config.paths).is_file():  # the file's content, not its name
            identity["paths"] = json.loads(Path(config.paths).read_text())
        return identity

    def row_settings(self, identity, task):
        """A row per search request (budget, rank, search settings, backbone, seed), not per task's paths."""
        found = identity.get("paths")
        if isinstance(found, dict):
            identity = {**identity, "paths": {k: found[k] for k in PATHS_REQUEST if k in found}}
        return identity

    def attach(self, model, info, config):
        names = encoder_linears(model, info.head_path)
        paths = self.layer_paths(config, len(names))
        params = []
        for name, path in zip(names, paths or [None] * len(names)):
            layer = GLoRALinear(model.get_submodule(name), config.rank, path)
            model.set_submodule(name, layer)
            params += [p for key, p in layer.named_parameters(recurse=False) if key not in ("weight", "bias")]
        return params

    def merge(self, model):
        for name, module in list(model.backbone.named_modules()):
            if isinstance(module, GLoRALinear):
                if module.path is None:
                    raise UserError("a GLoRA supernet has no fixed paths to fold")
                model.backbone.set_submodule(name, module.folded())


@dataclass
class GLoRAFixedConfig:
    rank: int = 4


@register_method
class GLoRAFixed(GLoRA):
    """GLoRA without search (not in the official code): A, B, C LoRA and D, E vectors in every layer."""

    name = "glora_fixed"
    published_as = ()
    trains = "per encoder Linear, A, B (rank r), C (rank r) and the D, E vectors: 2r(o+i) + r(i+1) + 2o"
    Config = GLoRAFixedConfig
    recipe_grid = None  # LoRA and vectors only: the shared grid

    def check_config(self, config):
        pass  # no paths to read

    def layer_paths(self, config, layers):
        return [dict(FIXED) for _ in range(layers)]

    def config_identity(self, config):
        return Method.config_identity(self, config)
