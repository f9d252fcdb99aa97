"""ARC, Adapter Re-Composing (Dong et al., Efficient Adaptation of Large Vision Transformer via Adapter
Re-Composing, NeurIPS 2023): the official DavidYanAnDe/ARC adapter, as its ``Model/ARC_ViT.py`` names it.

``ARC(z) = z + dropout(z U diag(lambda)) U^T + beta`` before attention and before the MLP, after their LayerNorms
(RepAdapter's place): ``x + attn(ARC_att(norm1 x))``, ``x + mlp(ARC_mlp(norm2 x))``. One down-projection
``U`` (d x r, xavier_uniform) per sub-block kind is shared by all layers and its transpose is the up-
projection; each layer has its own rescaling ``lambda`` (1 x r) and bias ``beta`` (d). Init: ``lambda_att = 0``,
``beta = 0``, ``lambda_mlp`` xavier_uniform on its (1, r) shape, so the MLP adapter is not the identity at
init (the attention one is). Dropout 0.1 on the r-dim. Being linear it folds exactly into ``qkv`` and
``fc1`` (``W' = W M``, ``b' = b + W beta``, ``M = I + U diag(lambda) U^T``). Counts: ``1560 r + 18,432`` (r = 50:
96,432); ``arc_attn`` ``780 r + 9,216``. Source: DavidYanAnDe/ARC 8227d57, Model/ARC_ViT.py, vtab_ARC_train.py.

The released training script imports ``Model/ARC_new.py``, whose tensor names the freezing rule
(``Utils/Frozen_weight.ViT_ARC_Frozen``: names with head, adapter or down_projection) does not match, so as
released only the classifier trains; this follows the model's own naming, where the adapters train.
Official recipe differences (not applied): lr 0.01, weight decay 0, batch 32 without drop_last, a per-step
warm-up and cosine, gradient clipping at 1.0, fp32, no drop-path, a zero-initialised head
(``--set recipe.head_init=zero``), the best test epoch reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from petl_bench.backbones import VIT
from petl_bench.model import Method
from petl_bench.registry import register_method

from .building_blocks import AdaptedInput


class SharedProjection(nn.Module):
    """The down-projection ``U`` (d x r) shared by one kind of adapter across all layers."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(width, dim))
        nn.init.xavier_uniform_(self.weight)


class ARCAdapter(nn.Module):
    """``z + dropout(z U diag(lambda)) U^T + beta`` with the shared ``U`` (held, not owned: it is registered
    once, on the backbone)."""

    def __init__(self, shared: SharedProjection, width: int, dim: int, dropout: float, identity: bool):
        super().__init__()
        self.__dict__["shared"] = shared  # not a submodule: one U for every layer, stored once
        self.adapter_rescale = nn.Parameter(torch.zeros(1, dim))
        self.adapter_bias = nn.Parameter(torch.zeros(width))
        self.dropout = nn.Dropout(dropout)
        if not identity:
            bound = math.sqrt(6.0 / (1 + dim))  # xavier_uniform on a (1, r) tensor
            nn.init.uniform_(self.adapter_rescale, -bound, bound)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        u = self.shared.weight.to(z.dtype)
        hidden = self.dropout(z @ (u * self.adapter_rescale.to(z.dtype)))
        return z + hidden @ u.t() + self.adapter_bias.to(z.dtype)

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, beta)`` with ``ARC(z) = M z + beta`` (column form) in eval mode."""
        u = self.shared.weight
        return torch.eye(u.shape[0], dtype=u.dtype, device=u.device) + (
            u * self.adapter_rescale
        ) @ u.t(), self.adapter_bias


@dataclass
class ARCConfig:
    dim: int = 50  # r, the official adapter_dim of ViT-B
    dropout: float = 0.1


@register_method
class ARC(Method):
    """ARC: re-composed linear adapters before attention and the MLP, the down-projection shared by layers."""

    name = "arc"
    identity_at_init = False  # the MLP adapter's rescaling starts xavier-uniform
    published_as = ("ARC",)
    citation = (
        "Dong et al., Efficient Adaptation of Large Vision Transformer via Adapter Re-Composing (ARC), NeurIPS 2023"
    )
    trains = "a shared d x r projection per sub-block kind, per layer an r-vector and a d bias (1560r + 18,432)"
    kinds = (VIT,)
    Config = ARCConfig
    search_space = {"dim": (10, 25, 50, 100)}
    bounds = {"dim": (1, None, False), "dropout": (0.0, 1.0, True)}
    merges = True
    targets = (("attn.qkv", "att", True), ("mlp.fc1", "mlp", False))  # (Linear, shared U, identity at init)

    def attach(self, model, info, config):
        width, params = info.widths[0], []
        for _, kind, _ in self.targets:
            shared = SharedProjection(width, config.dim)
            model.add_module(f"arc_{kind}_down_projection", shared)
            params.append(shared.weight)
            for path in info.block_paths:
                target = f"{path}.{self._linear(kind)}"
                adapter = ARCAdapter(shared, width, config.dim, config.dropout, identity=kind == "att")
                model.set_submodule(target, AdaptedInput(model.get_submodule(target), adapter))
                params += list(adapter.parameters())
        return params

    def _linear(self, kind: str) -> str:
        return next(linear for linear, name, _ in self.targets if name == kind)

    def merge(self, model):
        for _, kind, _ in self.targets:
            for path in model.info.block_paths:
                target = f"{path}.{self._linear(kind)}"
                model.backbone.set_submodule(target, model.backbone.get_submodule(target).folded())
            delattr(model.backbone, f"arc_{kind}_down_projection")


@register_method
class ARCAttn(ARC):
    """ARC_att: the adapter before attention only (the identity at init)."""

    name = "arc_attn"
    identity_at_init = True
    published_as = ("ARC_att",)
    trains = "a shared d x r projection, per layer an r-vector and a d bias, before attention (780r + 9,216)"
    targets = (("attn.qkv", "att", True),)
