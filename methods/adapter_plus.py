"""Adapter+ (Steitz & Roth, Adapters Strike Back, CVPR 2024): the official visinf/adapter_plus adapter.

``A(z) = s * DP_a(W_u dropout(GELU(W_d z + b_d)) + b_u)`` added to the residual stream once per block. Adapter+
is the ``post`` position (it reads the whole block output, residual included: ``z + A(z)``), a learned
per-channel scaling ``s`` (init 1), GELU, no LayerNorm, biases, Houlsby init (both projections
trunc_normal(std 0.01, within +-0.02), zero biases: not the identity at init), no dropout and its own
drop-path of fixed rate 0.1 on the bottleneck output. The repository's other positions (``pre``,
``intermediate``, ``parallel``), scalings (``learned`` scalar, ``fixed``) and inits (``lora``: zero up-
projection; ``bert``: N(0, 0.02)) are settings, for its ablation rows. Per adapter ``1537 r + 1536``
parameters with the channel scaling (r = 8: 12 adapters = 165,984; the paper's plotted counts add the
classifier). ``ranks=dim1-4|dim1-8|dim1-32`` takes the repository's per-task ranks ("Adapter+ opt.",
``adapter_plus.ranks.json``). Source: visinf/adapter_plus 191c4ab, adapter_plus/vit_adapter.py,
conf/adapter/{base_adapter,adapter_plus}.yaml, conf/experiment/vtab/adapter_plus_dim1-*.yaml.

Official recipe differences (not applied: every method runs the harness's shared recipe): weight decay on
the two projection weights and the head weight only (``--set recipe.weight_decay_scope=skip_1d``), a
10-epoch warm-up from lr/100 and a cosine to lr/1000, inputs normalised with mean = std = 0.5
(``--set recipe.normalization=backbone``), the last epoch's test accuracy averaged over 3 seeds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from importlib.resources import files

import torch
from timm.layers import DropPath
from torch import nn

from petl_bench.backbones import SWIN, VIT
from petl_bench.errors import UserError
from petl_bench.model import Method, task_key
from petl_bench.registry import register_method

from .building_blocks import residuals

POSITIONS = ("post", "pre", "intermediate", "parallel")
SCALINGS = ("channel", "learned", "fixed")
INITS = ("houlsby", "lora", "bert")
RANKS = ("none", "dim1-4", "dim1-8", "dim1-32")


class AdapterDelta(nn.Module):
    """``s * DP_a(W_u dropout(GELU(W_d z + b_d)) + b_u)``: what the adapter adds to the stream."""

    def __init__(self, width: int, dim: int, config: "AdapterPlusConfig"):
        super().__init__()
        self.down = nn.Linear(width, dim)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(config.dropout)
        self.up = nn.Linear(dim, width)
        self.drop_path = DropPath(config.drop_path) if config.drop_path > 0 else nn.Identity()
        if config.scaling == "channel":
            self.scaling = nn.Parameter(torch.ones(width))
        elif config.scaling == "learned":
            self.scaling = nn.Parameter(torch.ones(1))
        else:
            self.register_buffer("scaling", torch.tensor(float(config.scale)), persistent=False)
        _init(self.down, self.up, config.init)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.scaling * self.drop_path(self.up(self.dropout(self.act(self.down(z)))))


def _init(down: nn.Linear, up: nn.Linear, init: str) -> None:
    """The official ``Adapter.__init__`` inits."""
    if init == "houlsby":
        for layer in (down, up):
            nn.init.trunc_normal_(layer.weight, std=0.01, a=-0.02, b=0.02)
            nn.init.zeros_(layer.bias)
    elif init == "bert":
        for layer in (down, up):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
    else:  # lora: PyTorch's Linear init for the down-projection, a zero up-projection
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)


class AdapterPlusBlock(nn.Module):
    """A transformer block with one adapter at ``position`` (see the module docstring)."""

    def __init__(self, block: nn.Module, kind: str, adapter: AdapterDelta, position: str):
        super().__init__()
        self.block, self.kind, self.position = block, kind, position
        self.adapter = adapter

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.position == "post":
            z = self.block(x, **kwargs)
            return z + self.adapter(z)
        attn, mlp = residuals(self.block, self.kind, kwargs)
        y = x + attn.drop_path(attn.branch(attn.norm(x)))
        if self.position == "pre":
            y = y + self.adapter(y)
            return y + mlp.drop_path(mlp.branch(mlp.norm(y)))
        h = mlp.drop_path(mlp.branch(mlp.norm(y)))
        return y + h + self.adapter(h if self.position == "intermediate" else y)


@dataclass
class AdapterPlusConfig:
    dim: int = 8  # r
    position: str = "post"
    scaling: str = "channel"  # "channel" (Adapter+), "learned" (one scalar) or "fixed" (``scale``)
    scale: float = 1.0  # with scaling="fixed"
    init: str = "houlsby"
    dropout: float = 0.0
    drop_path: float = 0.1  # the adapter's own, fixed rate (not depth-scaled)
    ranks: str = "none"  # per-task ranks of the repository ("Adapter+ opt."): dim1-4, dim1-8 or dim1-32


def rank_tables() -> dict[str, dict[str, int]]:
    """The repository's per-task ranks, ``{"dim1-8": {"cifar": 1, ...}, ...}``."""
    data = json.loads((files("petl_bench.methods") / "adapter_plus.ranks.json").read_text(encoding="utf-8"))
    return {name: table for name, table in data.items() if not name.startswith("_")}


@register_method
class AdapterPlus(Method):
    """Adapter+: one bottleneck adapter after every block, with a learned per-channel scaling."""

    name = "adapter_plus"
    identity_at_init = False  # Houlsby init: the up-projection is not zero
    published_as = ("Adapter+", "Adapter+ opt.")
    citation = "Steitz & Roth, Adapters Strike Back (Adapter+), CVPR 2024"
    trains = "1 bottleneck adapter per block on the block output, per-channel scaling (1537r + 1536 parameters)"
    kinds = (VIT, SWIN)
    Config = AdapterPlusConfig
    search_space = {"dim": (1, 2, 4, 8, 16, 32)}
    bounds = {"dim": (1, None, False), "dropout": (0.0, 1.0, True), "drop_path": (0.0, 1.0, True)}

    def make_config(self, task: str | None = None, **overrides):
        config = super().make_config(task, **overrides)
        if config.ranks != "none" and task is not None and "dim" not in overrides:
            table = rank_tables().get(config.ranks, {})
            if task_key(task) in table:
                config = replace(config, dim=table[task_key(task)])
        return config

    def row_settings(self, identity, task):
        """With per-task ranks, the rank each task's table gave is the same request on every task."""
        table = rank_tables().get(identity.get("ranks"), {})
        if task_key(task) in table and identity.get("dim") == table[task_key(task)]:
            identity = {k: v for k, v in identity.items() if k != "dim"}
        return identity

    def check_config(self, config):
        for name, allowed in (("position", POSITIONS), ("scaling", SCALINGS), ("init", INITS), ("ranks", RANKS)):
            if getattr(config, name) not in allowed:
                raise UserError(f"adapter_plus.{name} is {getattr(config, name)!r}; choose from: {', '.join(allowed)}")

    def attach(self, model, info, config):
        params = []
        for path, width in zip(info.block_paths, info.widths):
            adapter = AdapterDelta(width, config.dim, config)
            model.set_submodule(path, AdapterPlusBlock(model.get_submodule(path), info.kind, adapter, config.position))
            params += list(adapter.parameters())
        return params
