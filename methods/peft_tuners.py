"""Hugging Face PEFT's tuners on the harness's backbones: ``peft:<type>`` for any tuner type PEFT registers.

The tuner types come from PEFT itself (its config mapping, prompt-learning types left out); those
made for language models are refused with the reason (``NOT_FOR_VISION``), and ``petl-bench methods``
lists those tested here on ViT, Swin and CLIP towers (``TESTED``); a type newer than both is usable with
a warning. ``peft:dora`` is PEFT's LoRA with ``use_dora=True``. A tuner is injected with PEFT's
own ``get_peft_model`` into the timm / open_clip backbone, in place: the backbone keeps its classes and
forward, PEFT's layers replace the targeted ``nn.Linear`` modules, and the wrapper PEFT returns is
dropped. The hyperparameters are the fields of the tuner's PEFT config (``--set peft:lora.r=8``); by
default the targets are the attention's qkv and output projections and the MLP's two layers, as a
regex on module names (``--set peft:lora.target_modules=REGEX``). Merging uses PEFT's ``merge`` on each
of its layers, then puts the base layer back. Effective init: PEFT's own (nothing re-initialises the
backbone after injection); every tuner tested here starts as the identity.

The harness's own ``lora`` is NOAH's LoRA, which the Convpass table's numbers come from: one rank-8
update of the fused qkv only, input dropout, no scaling, and NOAH's effective init (B not zero).
``peft:lora`` is PEFT's: separate updates of every targeted layer, scaling ``lora_alpha / r``, B zero.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
import warnings

from petl_bench.backbones import CLIP, SWIN, VIT
from petl_bench.errors import UserError
from petl_bench.model import Method
from petl_bench.registry import METHODS

PREFIX = "peft:"
ALIASES = {"dora": ("LORA", {"use_dora": True})}  # names PEFT spells as an option of another type
# Module-name regexes of the default targets, per backbone kind.
TARGETS = {
    VIT: r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))$",
    SWIN: r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))$",
    CLIP: r".*resblocks\.\d+\.(attn\.out_proj|mlp\.(c_fc|c_proj))$",
}
FEEDFORWARD = {VIT: r".*mlp\.fc2$", SWIN: r".*mlp\.fc2$", CLIP: r".*mlp\.c_proj$"}  # IA3's input-scaled layers
# LayerNorm tuning's targets: the blocks' LayerNorms and the final one (as the native ``ln_tune``).
NORMS = {VIT: r"(.*\.)?(norm1|norm2)|norm", SWIN: r"(.*\.)?(norm1|norm2)|norm", CLIP: r".*\.(ln_1|ln_2|ln_post)"}
TARGETS_OF = {"ln_tuning": NORMS}
# Tuner types made for language models: refused, with the reason.
NOT_FOR_VISION = {
    "adaption_prompt": "it adapts the attention of a LLaMA-style transformers language model",
    "adalora": "its rank allocation needs update_and_allocate() after every optimizer step, which no method here calls",
    "poly": "it routes every input by a task id (multi-task training); a task here has none",
    "shadow": "it wraps the backbone of a transformers language model",
    "trainable_tokens": "it trains a language model's token embeddings; a vision backbone has none",
    "xlora": "it mixes LoRA adapters trained beforehand and trains none of its own",
}
# Tested on a tiny ViT (tests/test_peft.py: attach, count, one step); the listing shows these.
TESTED = (
    "adamss", "beft", "boft", "c3a", "deft", "delora", "dora", "fourierft", "frod", "glora", "gralora", "hira", "hra",
    "ia3", "lily", "ln_tuning", "loha", "lokr", "lora", "miss", "oft", "osf", "peanut", "psoft", "pvera", "randlora",
    "road", "shira", "supertuning", "tinylora", "unilora", "vblora", "vera", "waveft",
)  # fmt: skip


def _peft():
    try:
        import peft
    except ModuleNotFoundError:
        raise UserError("peft: methods need Hugging Face PEFT: pip install -e '.[peft]'") from None
    return peft


def tuner_types() -> dict[str, type]:
    """Lower-case tuner name -> PEFT config class, for every type PEFT can inject into a module."""
    _peft()
    from peft.config import PromptLearningConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    return {
        str(getattr(kind, "value", kind)).lower(): config
        for kind, config in PEFT_TYPE_TO_CONFIG_MAPPING.items()
        if kind in PEFT_TYPE_TO_TUNER_MAPPING and not issubclass(config, PromptLearningConfig)
    }


def listing() -> list[str]:
    """The tuners to offer: those of the installed PEFT that were tested here on vision backbones."""
    try:
        return sorted(name for name in [*tuner_types(), *ALIASES] if name in TESTED)
    except UserError:
        return []


def resolved(config, kind: str):
    """``config`` with the default targets of a ``kind`` backbone where it names none."""
    changes = {}
    if config.target_modules is None:
        changes["target_modules"] = TARGETS_OF.get(
            str(getattr(config.peft_type, "value", config.peft_type)).lower(), TARGETS
        )[kind]
    if hasattr(config, "feedforward_modules") and config.feedforward_modules is None:
        changes["feedforward_modules"] = FEEDFORWARD[kind]
    return dataclasses.replace(config, **changes) if changes else config


class PeftTuner(Method):
    """A PEFT tuner (the subclass made for each ``peft:<type>`` fills ``Config`` and ``preset``)."""

    kinds = (VIT, SWIN, CLIP)
    merges = True
    reads_frozen_weights = True  # DoRA's norm, VeRA/BOFT/OFT's transforms read the base weight in their own code
    compiles = False  # PEFT's layers are not checked for graph breaks (DoRA's break: str.startswith in its forward)
    preset: typing.ClassVar[dict] = {}

    def build_config(self, values: dict):
        """The tuner's PEFT config from ``--set peft:<type>.FIELD=VALUE``; PEFT's own checks apply, and a
        ``target_modules`` regex must compile."""
        for key in ("target_modules", "feedforward_modules"):
            if isinstance(values.get(key), str):
                try:
                    re.compile(values[key])
                except re.error as error:
                    raise UserError(f"{self.name}.{key}={values[key]!r} is not a regular expression: {error}") from None
        try:
            return self.Config(**{**self.preset, **values})
        except (ValueError, TypeError) as error:
            raise UserError(f"PEFT rejects {self.name} with {values}: {error}") from None

    def config_identity(self, config) -> dict:
        return json.loads(json.dumps(config.to_dict(), sort_keys=True, default=str))

    @classmethod
    def defaults(cls) -> dict:
        return {}

    def attach(self, model, info, config):
        from peft import get_peft_model

        config = resolved(config, info.kind)
        try:
            with warnings.catch_warnings():  # BOFT's optional CUDA kernel: its absence is no news on a CPU
                warnings.filterwarnings("ignore", message="Failed to load the CUDA extension")
                get_peft_model(model, config)  # injects PEFT's layers into ``model`` itself
        except (ValueError, TypeError, KeyError, RuntimeError, NotImplementedError) as error:
            raise UserError(f"PEFT cannot attach {self.name} to {info.name}: {error}") from None
        return [p for p in model.parameters() if p.requires_grad]

    def merge(self, model) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name, module in list(model.backbone.named_modules()):
            if isinstance(module, BaseTunerLayer):
                try:
                    module.merge()
                except Exception as error:  # noqa: BLE001 - PEFT raises several kinds
                    raise UserError(f"PEFT cannot merge {self.name}: {type(error).__name__}: {error}") from None
                model.backbone.set_submodule(name, module.get_base_layer())


def make(member: str) -> type[Method]:
    peft = _peft()
    kind, preset = ALIASES.get(member, (member, {}))
    if member in NOT_FOR_VISION:
        raise UserError(f"peft:{member} does not apply to vision backbones: {NOT_FOR_VISION[member]}")
    types = tuner_types()
    if kind.lower() not in types:
        raise UserError(f"unknown PEFT tuner '{member}'; PEFT {peft.__version__} has: {', '.join(listing())}")
    if member not in TESTED:
        warnings.warn(
            f"peft:{member} (new in PEFT {peft.__version__}) was not tested on vision backbones here", stacklevel=2
        )
    config = types[kind.lower()]
    return type(
        f"Peft{member.title().replace('_', '')}",
        (PeftTuner,),
        {
            "name": PREFIX + member,
            "citation": f"Hugging Face PEFT {peft.__version__}: {config.__name__}"
            + (f" with {preset}" if preset else ""),
            "trains": "what PEFT's tuner adds to the targeted Linear layers (attention qkv/proj, MLP fc1/fc2)",
            "Config": config,
            "preset": preset,
        },
    )


def describe() -> dict[str, str]:
    """The family in ``petl-bench methods``: where it comes from and its members."""
    try:
        source = f"Hugging Face PEFT {_peft().__version__}"
    except UserError:
        source = "Hugging Face PEFT (not installed: pip install -e '.[peft]')"
    return {"citation": source, "trains": f"any of: {', '.join(listing()) or '-'}",
            "backbones": ", ".join(PeftTuner.kinds), "defaults": "the tuner's PEFT config fields"}  # fmt: skip


METHODS.register_family(PREFIX, make, describe)
