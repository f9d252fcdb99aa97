"""DyT, Dynamic Tuning (Zhao et al., NeurIPS 2024; official NUS-HPC-AI-Lab/Dynamic-Tuning d1744f0,
models/vision_transformer_IN21K.py, models/dynamic_adapter.py, models/losses.py, engine_finetune.py, main_vtab.py).

Every block: ``x' = x + DP1(attn(LN1 x))``; a token dispatcher (``mlp_token_select.mlp_head``, Linear(d -> 1)
on the patch tokens of ``x'``) gives a mask ``m``: in training a hard Gumbel-sigmoid, ``1[sigmoid((g + G1 -
G2) / tau) > 0.5]`` (tau = 5) with the straight-through gradient of the soft value; in evaluation
``1[sigmoid(g) > 0.5]`` (the same straight-through expression, as the official code computes it); prefix
tokens 1. An AdaptFormer-style adapter (``adaptmlp``: down, ReLU, dropout 0.1, up, scale 1, no LayerNorm) reads
``x'`` for every token: ``x'' = x' + m * DP2(MLP(LN2 x')) + adapter(x')``.

Its training loss (the method's ``training_loss`` hook) takes two passes of the same weights, the student
with the masks and the teacher with every token through the MLP (the official ``complete_model``):
``CE(student) + 2 (mean(m) - 0.5)^2 + CE(teacher) + KL(teacher.detach() || student)``, ``mean(m)`` over the
batch, the blocks and the patch tokens. ``distill=False`` gives the March 2024 code's loss (the first two terms).

What it computes: like the official training and evaluation code, the MLP runs on every token and the mask
multiplies its output, so this implementation saves no FLOPs; the record's FLOPs are what it computes. The
paper's speed-up comes from a separate implementation (``models/model_speed_test.py``) that gathers the kept
tokens and runs the MLP on them only: its MLP FLOPs scale with the kept fraction (about 0.5 after training).

Init: the adapter's down projection PyTorch's Linear init (kaiming_uniform a=sqrt(5)), biases 0, up 0; the
dispatcher trunc_normal(0.02), bias 0 (so its logits start near 0: the masks are not all ones, and the model
is not the frozen backbone at init); the classifier trunc_normal(std 0.01), bias 0 (MoCo v3's, ``mocov3``).
Counts ``12 (1537 b + 1537)``: b = 16 (train_vtab.sh), 313,548.

Official recipe differences (not applied: every method runs the shared recipe): drop-path 0, AdamW lr 1e-3 and
weight decay 1e-4 with a per-iteration schedule, inputs normalised with mean = std = 0.5, the best test epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import trunc_normal_
from torch import nn
from torch.nn import functional as F

from petl_bench.backbones import VIT
from petl_bench.errors import UserError
from petl_bench.model import Method
from petl_bench.registry import register_method

from .building_blocks import residuals


class TokenSelect(nn.Module):
    """The official dispatcher: one logit per patch token, a hard Gumbel-sigmoid mask (straight-through)."""

    def __init__(self, width: int, prefix: int, tau: float):
        super().__init__()
        self.mlp_head = nn.Linear(width, 1)
        trunc_normal_(self.mlp_head.weight, std=0.02)
        nn.init.zeros_(self.mlp_head.bias)
        self.prefix, self.tau = prefix, tau

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.mlp_head(x[:, self.prefix :])
        if self.training:
            gumbels = [-torch.empty_like(logits).exponential_().log() for _ in range(2)]
            soft = ((logits + gumbels[0] - gumbels[1]) / self.tau).sigmoid()
        else:
            soft = logits.sigmoid()
        hard = torch.zeros_like(logits).masked_fill(soft > 0.5, 1.0)
        mask = hard - soft.detach() + soft
        return torch.cat([mask.new_ones(x.shape[0], self.prefix, 1), mask], dim=1)


class Adapter(nn.Module):
    """The official ``Adapter`` as DyT configures it: down, ReLU, dropout, up, times ``scale``."""

    def __init__(self, width: int, bottleneck: int, dropout: float, scale: float):
        super().__init__()
        self.down_proj = nn.Linear(width, bottleneck)
        self.up_proj = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.down_proj.bias)
        nn.init.zeros_(self.up_proj.weight)
        nn.init.zeros_(self.up_proj.bias)
        self.dropout, self.scale = dropout, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down = F.dropout(F.relu(self.down_proj(x)), p=self.dropout, training=self.training)
        return self.up_proj(down) * self.scale


class DyTBlock(nn.Module):
    """A timm ViT block with DyT's dispatcher and adapter (names as the official ``Block``)."""

    def __init__(self, block: nn.Module, width: int, prefix: int, config: "DyTConfig"):
        super().__init__()
        self.block = block
        self.adaptmlp = Adapter(width, config.bottleneck, config.dropout, config.scale)
        self.mlp_token_select = TokenSelect(width, prefix, config.tau)
        self.gather = False  # True: evaluate with the gather implementation (the official speed test's)

    def run(self, x: torch.Tensor, complete: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the block's output, its mask); ``complete``: every token through the MLP (the teacher, no mask;
        the official code draws the teacher's unused Gumbel noise too, which only moves the random stream)."""
        attn, mlp = residuals(self.block, VIT, {})
        x = x + attn.drop_path(attn.branch(attn.norm(x)))
        mask = None if complete else self.mlp_token_select(x)
        adapted = self.adaptmlp(x)
        h = mlp.drop_path(mlp.branch(mlp.norm(x)))
        return x + (h if mask is None else mask * h) + adapted, mask

    def run_gathered(self, x: torch.Tensor) -> torch.Tensor:
        """Inference as the official speed test (``model_speed_test.py``, ``batch_forward``): the MLP runs only
        on the tokens the dispatcher keeps, gathered over the whole batch and scattered back (a host read of
        how many: not for training)."""
        attn, mlp = residuals(self.block, VIT, {})
        x = x + attn.drop_path(attn.branch(attn.norm(x)))
        mask, adapted = self.mlp_token_select(x), self.adaptmlp(x)
        flat = x.reshape(-1, x.shape[-1])
        kept = mask.reshape(-1).nonzero().squeeze(1)
        out = torch.zeros_like(flat).index_copy(0, kept, mlp.branch(mlp.norm(flat[kept])).to(flat.dtype))
        return x + out.view_as(x) + adapted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gather and not self.training:
            return self.run_gathered(x)
        return self.run(x)[0]


def dyt_forward(model, images: torch.Tensor, complete: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, the patch tokens' masks of every block, (B, blocks, N, 1), None for the teacher) of a timm ViT
    with DyT blocks: its
    ``forward`` written out so that the pass can be the teacher's (a test holds it equal to ``model(images)``)."""
    vit = model.backbone
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    masks = []
    for block in vit.blocks:
        x, mask = block.run(x, complete)
        masks.append(mask)
    logits = vit.forward_head(vit.norm(x))
    return logits, None if complete else torch.stack(masks, dim=1)[:, :, model.info.num_prefix_tokens :]


@dataclass
class DyTConfig:
    bottleneck: int = 16  # b, train_vtab.sh's --ffn_num
    scale: float = 1.0
    dropout: float = 0.1
    tau: float = 5.0
    target: float = 0.5  # rho, the kept fraction the ratio loss asks for
    ratio_weight: float = 2.0
    distill: bool = True  # the NeurIPS code's teacher CE and KL terms; False: the March 2024 loss


@register_method
class DyT(Method):
    """DyT: per-block token dispatch for the MLP (Gumbel-sigmoid masks) and a parallel adapter; a ratio and a
    self-distillation loss."""

    name = "dyt"
    identity_at_init = False  # the dispatcher's masks skip the MLP for some tokens from the start
    published_as = ("DyT",)
    citation = "Zhao et al., Dynamic Tuning Towards Parameter and Inference Efficiency for ViT Adaptation, NeurIPS 2024"
    trains = "an adapter (bottleneck b) parallel to the MLP and a token dispatcher per block (1537 b + 1537 per block)"
    kinds = (VIT,)
    Config = DyTConfig
    head_init = "mocov3"
    extra_loss = True
    search_space = {"bottleneck": (8, 16, 32), "target": (0.3, 0.5, 0.7)}
    bounds = {"tau": (0.0, None, False), "target": (0.0, 1.0, False), "ratio_weight": (0.0, None, False)}
    merge_note = "its masks depend on the tokens and its adapter is non-linear"

    def check_config(self, config):
        if config.tau <= 0:
            raise UserError(f"{self.name}.tau must be positive, not {config.tau}")

    def attach(self, model, info, config):
        params = []
        for index, path in enumerate(info.block_paths):
            wrapped = DyTBlock(model.get_submodule(path), info.widths[index], info.num_prefix_tokens, config)
            model.set_submodule(path, wrapped)
            params += [*wrapped.adaptmlp.parameters(), *wrapped.mlp_token_select.parameters()]
        return params

    def training_passes(self, config):
        return 2 if config.distill else 1  # the teacher pass is trained too (its own cross-entropy)

    def training_loss(self, model, images, labels, criterion, compute):
        config = model.config
        with compute():
            student, masks = dyt_forward(model, images, complete=False)
            teacher = dyt_forward(model, images, complete=True)[0] if config.distill else None
        loss = criterion(student, labels) + config.ratio_weight * (masks.float().mean() - config.target) ** 2
        if teacher is None:
            return loss
        student_log, teacher_log = F.log_softmax(student.float(), -1), F.log_softmax(teacher.float().detach(), -1)
        kl = F.kl_div(student_log, teacher_log, reduction="batchmean", log_target=True)
        return loss + criterion(teacher, labels) + kl
