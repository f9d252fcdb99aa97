"""NOAH, Neural prOmpt seArcH (Zhang et al. 2022): per-block VPT prompts, LoRA and adapter of searched sizes.

Every block carries three prunable modules: prompts appended at the end of the sequence (block i
replaces block i-1's prompt outputs), NOAH's LoRA on the fused qkv and NOAH's sequential adapter
after the MLP. Modules are allocated at the super size (100) and sliced to the subnet's sizes
(weight entanglement): the supernet trains all subnets at once, and a retrained subnet starts from
super-size initialisation sliced down, as the original does. ``noah`` retrains a subnet (the
published VTAB-1K subnets by default) from the pretrained backbone; ``petl-bench noah search``
finds one (see ``petl_bench/noah_search.py``).

Effective init (``init="official"``, the default): NOAH's ``VisionTransformer.__init__`` builds the
blocks with their LoRA and adapter ``nn.Linear`` modules and then runs timm's ``init_weights``
(``self.apply(_init_vit_weights)``): every one of them becomes trunc_normal(std 0.02) with zero bias
(LoRA's B is not zero). The prompt tokens are ``nn.Parameter`` s, untouched by it: xavier_uniform, as
here. The classifier is NOAH's ``reset_classifier``: trunc_normal(0.02), zero bias. ``init="module"``
keeps the modules' own init (LoRA B zero, adapter xavier). Source: ZhangYuanhan-AI/NOAH,
model/supernet_vision_transformer_timm.py.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from petl_bench.errors import UserError
from petl_bench.model import Method, vit_linear_init_
from petl_bench.registry import register_method

from .adapter import noah_adapter
from .building_blocks import AdaptedBlock, Bottleneck, PromptedBlocks, Tap, check_init
from .lora import FusedQKVLoRA

CITATION = "Zhang et al., Neural Prompt Search (NOAH), arXiv:2206.04673"
SUPER_DIM = 100
PUBLISHED_PREFIX = "vtab:"
# What a searched subnet file was asked for (the rest is what the search found on its task): a report row's key.
SEARCH_REQUEST = ("budget_m", "counter", "search", "backbone", "seed")


@dataclass(frozen=True)
class Subnet:
    """Per-block sizes: prompt length, LoRA rank and adapter width (0: no module in that block)."""

    prompt: tuple[int, ...]
    lora: tuple[int, ...]
    adapter: tuple[int, ...]

    def __post_init__(self):
        if not len(self.prompt) == len(self.lora) == len(self.adapter):
            raise UserError(f"subnet lists differ in length: {len(self.prompt)}, {len(self.lora)}, {len(self.adapter)}")
        if min((*self.prompt, *self.lora, *self.adapter), default=0) < 0:
            raise UserError("subnet sizes must be >= 0")

    @property
    def depth(self) -> int:
        return len(self.prompt)

    def to_dict(self) -> dict:
        return {"prompt": list(self.prompt), "lora": list(self.lora), "adapter": list(self.adapter)}

    @classmethod
    def from_dict(cls, data: dict) -> "Subnet":
        try:
            return cls(tuple(data["prompt"]), tuple(data["lora"]), tuple(data["adapter"]))
        except (KeyError, TypeError) as error:
            raise UserError(f"a subnet needs lists 'prompt', 'lora' and 'adapter': {error}") from None

    @classmethod
    def load(cls, source: str) -> "Subnet":
        """``vtab:<task>`` (a published VTAB-1K subnet) or a JSON file with the three lists."""
        if source.startswith(PUBLISHED_PREFIX):
            task = source[len(PUBLISHED_PREFIX) :]
            published = published_subnets()
            if task not in published:
                raise UserError(f"no published NOAH subnet for '{task}'; published: {', '.join(published)}")
            return published[task]
        path = Path(source).expanduser()
        if not path.is_file():
            raise UserError(f"NOAH subnet file not found: {path}")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as error:
            raise UserError(f"{path} is not JSON: {error}") from None

    def effective_params(self, width: int) -> int:
        """Parameters that train: prompts, LoRA (A: r x d, B: 3d x r), adapters (2ad + a + d)."""
        return sum(
            width * p + 4 * width * r + ((2 * width + 1) * a + width if a else 0)
            for p, r, a in zip(self.prompt, self.lora, self.adapter)
        )

    def noah_counted_params(self, width: int, super_dim: int = SUPER_DIM) -> int:
        """NOAH's own counter: also counts the model-level input prompt (overwritten in block 0, so dead)
        and its full super-size position embedding (0.43M in the NOAH paper vs 0.36M effective)."""
        dead = width * self.prompt[0] + super_dim * width if self.prompt[0] else 0
        return self.effective_params(width) + dead


def published_subnets() -> dict[str, Subnet]:
    data = json.loads((files("petl_bench.methods") / "noah_subnets.json").read_text())
    return {task: Subnet.from_dict(entry) for task, entry in data["subnets"].items()}


class SlicedLoRA(FusedQKVLoRA):
    """NOAH's LoRA at a super rank; only the first ``rank`` rows of A and columns of B act."""

    def __init__(self, qkv: nn.Linear, super_rank: int, dropout: float):
        super().__init__(qkv, super_rank, dropout)
        self.rank = super_rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rank == 0:
            return self.qkv(x)
        down = F.linear(self.lora.dropout(x), self.lora.down.weight[: self.rank])
        return self.qkv(x) + F.linear(down, self.lora.up.weight[:, : self.rank])

    def shrink(self) -> FusedQKVLoRA:
        """A plain LoRA of the active rank holding the active slices."""
        plain = FusedQKVLoRA(self.qkv, self.rank, self.lora.dropout.p).train(self.training)
        with torch.no_grad():
            plain.lora.down.weight.copy_(self.lora.down.weight[: self.rank])
            plain.lora.up.weight.copy_(self.lora.up.weight[:, : self.rank])
        return plain


class SlicedAdapter(Bottleneck):
    """NOAH's adapter at a super width; only the first ``dim`` hidden units act."""

    def __init__(self, width: int, dim: int, activation: nn.Module, dropout: float):
        super().__init__(width, dim, activation, dropout)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dim == 0:
            return x.new_zeros(())
        hidden = self.act(F.linear(x, self.down.weight[: self.dim], self.down.bias[: self.dim]))
        return F.linear(self.dropout(hidden), self.up.weight[:, : self.dim], self.up.bias)

    def shrink(self) -> Bottleneck:
        plain = Bottleneck(self.up.out_features, self.dim, self.act, self.dropout.p).train(self.training)
        with torch.no_grad():
            plain.down.weight.copy_(self.down.weight[: self.dim])
            plain.down.bias.copy_(self.down.bias[: self.dim])
            plain.up.weight.copy_(self.up.weight[:, : self.dim])
            plain.up.bias.copy_(self.up.bias)
        return plain


@dataclass
class NoahConfig:
    subnet: str | None = None  # "vtab:<task>" (published) or a JSON file from `petl-bench noah search`
    prompt_dropout: float = 0.1
    lora_dropout: float = 0.1
    adapter_dropout: float = 0.1
    super_dim: int = SUPER_DIM
    init: str = "official"  # "official": NOAH's runs (every Linear trunc_normal 0.02); "module": modules' own


class Supernet:
    """Handles on the NOAH modules attached to a ViT: select a subnet, or shrink to it."""

    def __init__(self, model: nn.Module, info, config: NoahConfig):
        self.model = model
        self.info = info
        self.blocks: list[AdaptedBlock] = []
        self.loras: list[SlicedLoRA] = []
        for index, path in enumerate(info.block_paths):
            block = model.get_submodule(path)
            lora = SlicedLoRA(block.attn.qkv, config.super_dim, config.lora_dropout)
            block.attn.qkv = lora
            adapter = noah_adapter(info.widths[index], config.super_dim, config.adapter_dropout, SlicedAdapter)
            wrapped = AdaptedBlock(block, info.kind, Tap.OUTPUT, drop_path_side=False, mlp=adapter)
            model.set_submodule(path, wrapped)
            self.loras.append(lora)
            self.blocks.append(wrapped)
        if config.init == "official":  # at the super size, before any slicing, as NOAH's init_weights
            vit_linear_init_([lora.lora for lora in self.loras] + [block.adapter_mlp for block in self.blocks])
        prompts = {}
        for index, width in enumerate(info.widths):
            prompt = torch.empty(1, config.super_dim, width)
            nn.init.xavier_uniform_(prompt)
            prompts[index] = nn.Parameter(prompt)
        self.prompts = PromptedBlocks(
            model.get_submodule(info.blocks_path), prompts, insert_at=None, dropout=config.prompt_dropout
        )
        model.set_submodule(info.blocks_path, self.prompts)

    def parameters(self) -> list[nn.Parameter]:
        """The NOAH modules' parameters (super size, or the selected size after :meth:`shrink`)."""
        params = [p for block in self.blocks if block.adapter_mlp is not None for p in block.adapter_mlp.parameters()]
        params += [p for qkv in self.loras if isinstance(qkv, FusedQKVLoRA) for p in qkv.delta_parameters()]
        return params + list(self.prompts.prompts.values())

    def select(self, subnet: Subnet) -> None:
        """Use the first ``subnet`` sizes of every module (weight entanglement)."""
        if subnet.depth != len(self.blocks):
            raise UserError(f"subnet has {subnet.depth} blocks, the backbone {len(self.blocks)}")
        super_dim = self.prompts.prompts["0"].shape[1]
        if max((*subnet.prompt, *subnet.lora, *subnet.adapter)) > super_dim:
            raise UserError(f"subnet sizes exceed the super size {super_dim}")
        for index, (p, r, a) in enumerate(zip(subnet.prompt, subnet.lora, subnet.adapter)):
            self.prompts.lengths[index] = p
            self.loras[index].rank = r
            self.blocks[index].adapter_mlp.dim = a

    def shrink(self) -> None:
        """Replace every module by one of the selected size holding the selected slices; drop empty ones."""
        for index, (block, lora) in enumerate(zip(self.blocks, self.loras)):
            block.block.attn.qkv = lora.shrink() if lora.rank else lora.qkv
            block.adapter_mlp = block.adapter_mlp.shrink() if block.adapter_mlp.dim else None
            length = self.prompts.lengths[index]
            if length:
                self.prompts.prompts[str(index)] = nn.Parameter(
                    self.prompts.prompts[str(index)][:, :length].detach().clone()
                )
            else:
                del self.prompts.prompts[str(index)]
        self.prompts.lengths = {}
        self.loras = [block.block.attn.qkv for block in self.blocks]


@register_method
class Noah(Method):
    """A NOAH subnet retrained from the pretrained backbone (published VTAB-1K subnets per task)."""

    name = "noah"
    identity_at_init = False
    citation = CITATION
    trains = "per-block prompts, LoRA and adapter of the subnet's sizes (NOAH)"
    Config = NoahConfig
    head_init = "trunc_normal"
    task_defaults = {task: {"subnet": f"{PUBLISHED_PREFIX}{task}"} for task in published_subnets()}

    def check_config(self, config: NoahConfig) -> None:
        check_init(self.name, config.init)
        if config.subnet is None:
            raise UserError(
                "noah needs a subnet: a VTAB-1K task (its published subnet), --set noah.subnet=FILE, "
                "or one found with 'petl-bench noah search'"
            )
        Subnet.load(config.subnet)

    def attach(self, model, info, config):
        subnet = Subnet.load(config.subnet)
        supernet = Supernet(model, info, config)
        supernet.select(subnet)
        supernet.shrink()
        return supernet.parameters()

    def row_settings(self, identity, task):
        """A row per subnet request: the published subnet of each task, or one search's settings, not the
        sizes each task's subnet has (they follow from it)."""
        identity = {k: v for k, v in identity.items() if k != "subnet_sizes"}
        subnet = identity.get("subnet")
        if isinstance(subnet, str) and not subnet.startswith(PUBLISHED_PREFIX) and Path(subnet).is_file():
            try:
                found = json.loads(Path(subnet).read_text())
                identity["subnet"] = {k: found[k] for k in SEARCH_REQUEST if k in found} or subnet
            except (ValueError, TypeError):
                pass  # not a search's file: the path keys the row
        return identity

    def config_identity(self, config: NoahConfig) -> dict:
        identity = dataclasses.asdict(config)
        if config.subnet is not None:
            identity["subnet_sizes"] = Subnet.load(config.subnet).to_dict()
        return identity
