"""FacT: Factor-Tuning (Jie & Deng, AAAI 2023), tensor-train (TT) and Tucker (TK) formats, as the
official JieShibo/PETL-ViT ``FacT/fact_tt.py`` and ``FacT/fact_tk.py``.

The increments of all 12 x (q, k, v, o, fc1, fc2) weights share one down factor ``U: d -> r`` (PyTorch
default init) and one up factor ``V: r -> d`` (zero: the model starts as the backbone). Between them
each weight has an ``r x r`` core (fc1 ``4r x r``, fc2 ``r x 4r``) with dropout 0.1 after it, scaled by
a per-task ``s``:

* TT: the cores are per-block bias-free Linears (PyTorch default init).
* TK: the cores come from one ``C (r x r x r)`` and ``P (r x 12L)``, both xavier_uniform:
  ``M = C @ P[:, 12i : 12i+12]``; the code multiplies row vectors from the right (``u @ M[:, :, j]``).
  Both fc cores are ``M[:, :, 4:8]`` / ``M[:, :, 8:12]`` reshaped row-major to ``r x 4r``, as in the code.

The fc1 update fills the 4 chunks of d outputs from the 4 chunks of r hidden units; fc2 reads its
input as 4 chunks of d. So the MLP must be ``d -> 4d -> d``. Every update is linear, so it folds
exactly into the four Linears of every block (``merge``). Official per-task (rank, scale) are the
``task_defaults``; the paper searched r in {1, 2, 4, 8, 16} (TT) / {2, 4, 8, 16, 32} (TK) and
s in {0.01, 0.1, 1, 10, 100}.

Equal in distribution, not in draws: dropout is drawn once on the stacked q/k/v hidden tensor, where the
official code calls it per projection; the masks are independent Bernoulli(0.9) either way, so training
follows the same distribution, but a given seed gives other masks than the official code's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from petl_bench.backbones import VIT
from petl_bench.errors import UserError
from petl_bench.model import Method
from petl_bench.registry import register_method

from .building_blocks import task_table

CHUNKS = 4  # the MLP hidden width is 4 d, read as 4 chunks of d


class TTCores(nn.Module):
    """One block's FacT-TT cores, bias-free Linears (weights in Linear form: ``y = W x``)."""

    def __init__(self, rank: int):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(rank, rank, bias=False) for _ in range(4))
        self.fc1 = nn.Linear(rank, CHUNKS * rank, bias=False)
        self.fc2 = nn.Linear(CHUNKS * rank, rank, bias=False)

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).weight for name in ("q", "k", "v", "o", "fc1", "fc2")}


class FacTFactors(nn.Module):
    """The shared factors ``u``, ``v`` and the cores of every block (TT: per block; TK: ``c`` and ``p``)."""

    def __init__(self, width: int, rank: int, depth: int, tucker: bool):
        super().__init__()
        self.rank = rank
        self.u = nn.Linear(width, rank, bias=False)
        self.v = nn.Linear(rank, width, bias=False)
        nn.init.zeros_(self.v.weight)
        self.tucker = tucker
        if tucker:
            self.c = nn.Parameter(nn.init.xavier_uniform_(torch.empty(rank, rank, rank)))
            self.p = nn.Parameter(nn.init.xavier_uniform_(torch.empty(rank, 12 * depth)))
        else:
            self.cores = nn.ModuleList(TTCores(rank) for _ in range(depth))

        self.__dict__["_tucker_cores"] = None  # C @ P for every block, during one forward pass (not state)

    def begin_forward(self, module=None, args=None) -> None:
        """TK: compute ``C @ P`` for every block once per forward pass (one product, not one per Linear).
        A forward pre-hook of the backbone (a bound method, so a deep copy of the model hooks its copy)."""
        if self.tucker:
            self.__dict__["_tucker_cores"] = self.c @ self.p

    def end_forward(self, module=None, args=None, output=None) -> None:
        self.__dict__["_tucker_cores"] = None

    def core_weights(self, block: int) -> dict[str, torch.Tensor]:
        """Block ``block``'s cores as Linear weights: q, k, v, o ``r x r``, fc1 ``4r x r``, fc2 ``r x 4r``."""
        if not self.tucker:
            return self.cores[block].weights()
        r = self.rank
        every = self.__dict__["_tucker_cores"]
        if every is not None:
            m = every[:, :, 12 * block : 12 * block + 12]  # r x r x 12, sliced from the pass's one product
        else:
            m = self.c @ self.p[:, 12 * block : 12 * block + 12]
        weights = {name: m[:, :, j].t() for j, name in enumerate(("q", "k", "v", "o"))}
        weights["fc1"] = m[:, :, 4:8].reshape(r, CHUNKS * r).t()  # the code's u @ F1
        weights["fc2"] = m[:, :, 8:12].reshape(r, CHUNKS * r)  # the code's z @ F2^T
        return weights


class FacTLinear(nn.Module):
    """A Linear of block ``block`` plus its FacT update ``s * V dropout(core U x)`` (per slot, see module doc)."""

    def __init__(self, linear: nn.Linear, factors: FacTFactors, block: int, slot: str, scale: float, dropout: float):
        super().__init__()
        self.linear = linear
        self.__dict__["factors"] = factors  # shared, registered once on the backbone (not a submodule here)
        self.block = block
        self.slot = slot
        self.scale = scale
        self.dropout = nn.Dropout(dropout)

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        f = self.factors
        cores = f.core_weights(self.block)
        if self.slot == "qkv":  # the three cores at once: ... x 3 x r, each entry with its own dropout mask
            hidden = torch.einsum("...i,jki->...jk", f.u(x), torch.stack([cores[n] for n in ("q", "k", "v")]))
            return f.v(self.dropout(hidden)).flatten(-2)
        if self.slot == "proj":
            return f.v(self.dropout(F.linear(f.u(x), cores["o"])))
        if self.slot == "fc1":
            hidden = self.dropout(F.linear(f.u(x), cores["fc1"]))
            return f.v(hidden.unflatten(-1, (CHUNKS, f.rank))).flatten(-2)
        z = f.u(x.unflatten(-1, (CHUNKS, -1))).flatten(-2)
        return f.v(self.dropout(F.linear(z, cores["fc2"])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self._delta(x) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """The update as a weight of the Linear's shape (dropout is the identity in eval mode)."""
        f, r = self.factors, self.factors.rank
        u, v = f.u.weight, f.v.weight
        cores = f.core_weights(self.block)
        if self.slot == "qkv":
            delta = torch.cat([v @ cores[name] @ u for name in ("q", "k", "v")])
        elif self.slot == "proj":
            delta = v @ cores["o"] @ u
        elif self.slot == "fc1":
            delta = torch.cat([v @ cores["fc1"][c * r : (c + 1) * r] @ u for c in range(CHUNKS)])
        else:
            delta = torch.cat([v @ cores["fc2"][:, c * r : (c + 1) * r] @ u for c in range(CHUNKS)], dim=1)
        return self.scale * delta


def slot_paths(path: str) -> dict[str, str]:
    return {"qkv": f"{path}.attn.qkv", "proj": f"{path}.attn.proj", "fc1": f"{path}.mlp.fc1", "fc2": f"{path}.mlp.fc2"}


@dataclass
class FacTConfig:
    rank: int = 4  # the paper's fixed-rank FacT-TT row (8,448 parameters on ViT-B/16)
    scale: float = 1.0
    dropout: float = 0.1


@dataclass
class FacTTKConfig(FacTConfig):
    rank: int = 8  # the paper's fixed-rank FacT-TK row (13,952 parameters on ViT-B/16)


CITATION = "Jie & Deng, FacT: Factor-Tuning for Lightweight Adaptation on Vision Transformer, AAAI 2023"


@register_method
class FacTTT(Method):
    """FacT-TT: ``1536 r + 144 r^2`` parameters on ViT-B/16 (shared U, V; per-block cores)."""

    name = "fact_tt"
    identity_at_init = True
    published_as = ("FacT-TT",)
    citation = CITATION
    trains = "shared factors U, V (2dr) and per-block cores (12 r^2 per block) updating qkv, proj, fc1, fc2"
    kinds = (VIT,)
    Config = FacTConfig
    task_defaults = task_table("fact_tt")
    search_space = {"rank": (1, 2, 4, 8, 16), "scale": (0.01, 0.1, 1, 10, 100)}
    tucker = False
    merges = True

    def attach(self, model, info, config):
        width = info.widths[0]
        for path in info.block_paths:
            hidden = model.get_submodule(path).mlp.fc1.out_features
            if hidden != CHUNKS * width:
                raise UserError(f"{self.name} needs an MLP of 4 x the width ({CHUNKS * width}); this one has {hidden}")
        factors = FacTFactors(width, config.rank, len(info.block_paths), self.tucker)
        model.fact = factors
        if self.tucker:
            factors.__dict__["hooks"] = (
                model.register_forward_pre_hook(factors.begin_forward),
                model.register_forward_hook(factors.end_forward),
            )
        for block, path in enumerate(info.block_paths):
            for slot, target in slot_paths(path).items():
                linear = model.get_submodule(target)
                model.set_submodule(target, FacTLinear(linear, factors, block, slot, config.scale, config.dropout))
        return list(factors.parameters())

    @torch.no_grad()
    def merge(self, model):
        backbone = model.backbone
        for path in model.info.block_paths:
            for target in slot_paths(path).values():
                wrapped = backbone.get_submodule(target)
                wrapped.linear.weight += wrapped.delta_weight().to(wrapped.linear.weight.dtype)
                backbone.set_submodule(target, wrapped.linear)
        for hook in backbone.fact.__dict__.get("hooks", ()):
            hook.remove()
        del backbone.fact


@register_method
class FacTTK(FacTTT):
    """FacT-TK: ``1536 r + 144 r + r^3`` parameters on ViT-B/16 (shared U, V, C and P)."""

    name = "fact_tk"
    published_as = ("FacT-TK",)
    trains = "shared factors U, V (2dr), core C (r^3) and P (12 L r) updating qkv, proj, fc1, fc2"
    Config = FacTTKConfig
    task_defaults = task_table("fact_tk")
    search_space = {"rank": (2, 4, 8, 16, 32), "scale": (0.01, 0.1, 1, 10, 100)}
    tucker = True
