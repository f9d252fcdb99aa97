"""open_clip image towers as backbones: the classifier on the image embedding, building it from an
open_clip model name, and the zero-shot classifier from class-name prompts."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .backbones import CLIP, OPEN_CLIP_PREFIX, BackboneInfo, Preprocessing, file_sha256
from .errors import UserError


class ClipClassifier(nn.Module):
    """An open_clip image tower followed by a linear classifier on its (optionally L2-normalised) embedding."""

    def __init__(self, visual: nn.Module, head: nn.Linear, normalize: bool = False):
        super().__init__()
        self.visual = visual
        self.head = head
        self.normalize = normalize

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """What the classifier reads: the image embedding (L2-normalised for zero-shot classifiers)."""
        features = self.visual(images)
        return nn.functional.normalize(features, dim=-1) if self.normalize else features

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """timm's interface: the classifier's input (``pre_logits``) or its logits."""
        return features if pre_logits else self.head(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


def _weights(text: str) -> tuple[str | None, str | None]:
    """(open_clip's pretrained tag or file, the file's sha256): ``none``, ``hub`` (OpenAI's), a weights
    file, or any open_clip tag such as 'laion2b_s34b_b88k'."""
    if text.lower() == "none":
        return None, None
    if text.lower() == "hub":
        return "openai", None
    if Path(text).expanduser().is_file():
        return str(Path(text).expanduser()), file_sha256(Path(text).expanduser())
    return text, None


def build_open_clip(
    name: str, pretrained: str | Path, num_classes: int, image_size: int | None, **model_kwargs
) -> tuple[nn.Module, BackboneInfo]:
    import open_clip

    model_name = name[len(OPEN_CLIP_PREFIX) :]
    if model_name not in open_clip.list_models():
        raise UserError(f"unknown open_clip model '{model_name}'; choose from open_clip.list_models()")
    text = str(pretrained)
    tag, checksum = _weights(text)
    if image_size:
        model_kwargs["force_image_size"] = image_size
    try:
        clip = open_clip.create_model(model_name, pretrained=tag, **model_kwargs)
    except (OSError, RuntimeError) as error:
        raise UserError(f"could not load open_clip '{model_name}' with pretrained '{text}': {error}") from error
    visual = clip.visual
    transformer = getattr(visual, "transformer", None)
    if transformer is None or not hasattr(transformer, "resblocks"):
        raise UserError(
            f"open_clip model '{model_name}' has no visual transformer; only ViT image towers are supported"
        )
    if not getattr(transformer, "batch_first", True):
        raise UserError(f"open_clip model '{model_name}' runs its transformer sequence-first; update open_clip_torch")
    model = ClipClassifier(visual, nn.Linear(visual.output_dim, num_classes) if num_classes else nn.Identity())
    tokenizer = open_clip.get_tokenizer(model_name)

    @torch.no_grad()
    def encode_text(texts: list[str]) -> torch.Tensor:
        chunks = [clip.encode_text(tokenizer(texts[i : i + 256]), normalize=True) for i in range(0, len(texts), 256)]
        return torch.cat(chunks)

    info = _clip_info(name, clip, encode_text, text if tag is None or text.lower() != "hub" else "hub:openai", checksum)
    return model, info


def _clip_info(name: str, clip, encode_text, pretrained: str, checksum: str | None) -> BackboneInfo:
    import open_clip

    visual, transformer = clip.visual, clip.visual.transformer
    grid = tuple(visual.grid_size)
    depth = len(transformer.resblocks)
    size = tuple(visual.image_size) if isinstance(visual.image_size, (tuple, list)) else (visual.image_size,) * 2
    patch = tuple(visual.patch_size) if isinstance(visual.patch_size, (tuple, list)) else (visual.patch_size,) * 2
    return BackboneInfo(
        name=name,
        kind=CLIP,
        block_paths=[f"visual.transformer.resblocks.{i}" for i in range(depth)],
        widths=[transformer.width] * depth,
        grids=[grid] * depth,
        num_prefix_tokens=1,
        patch_size=patch,
        num_features=visual.output_dim,
        head_path="head",
        preprocessing=Preprocessing(
            image_size=size,
            interpolation="bicubic",
            mean=tuple(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN),
            std=tuple(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD),
        ),
        pretrained=pretrained,
        checkpoint_sha256=checksum,
        encode_text=encode_text,
        logit_scale=float(clip.logit_scale.detach().exp()),
    )


TEMPLATE_SETS = ("openai80", "simple7")  # open_clip's ImageNet prompt ensembles


@torch.no_grad()
def init_classifier_from_text(model: nn.Module, info: BackboneInfo, class_names, template: str) -> None:
    """Zero-shot CLIP as a linear classifier: rows are ``logit_scale`` times the L2-normalised text
    embeddings of the class prompts, bias 0, on L2-normalised image features, so that at init the
    logits equal CLIP's zero-shot logits. ``template`` is a format string ("a photo of a {}.") or an
    open_clip ensemble ("openai80", "simple7": the mean of the normalised embeddings, renormalised)."""
    if info.encode_text is None:
        raise UserError(f"a classifier from class-name prompts needs a CLIP backbone, not '{info.name}'")
    if template in TEMPLATE_SETS:
        import open_clip

        templates = (
            open_clip.OPENAI_IMAGENET_TEMPLATES if template == "openai80" else open_clip.SIMPLE_IMAGENET_TEMPLATES
        )
        embeddings = torch.stack([info.encode_text([fill(name) for name in class_names]) for fill in templates])
        text = nn.functional.normalize(embeddings.mean(0), dim=-1)
    elif "{}" in template:
        text = info.encode_text([template.format(name) for name in class_names])
    else:
        raise UserError(f"prompt template {template!r} needs a '{{}}' for the class name, or one of {TEMPLATE_SETS}")
    head = model.get_submodule(info.head_path)
    head.weight.copy_(info.logit_scale * text)
    head.bias.zero_()
    model.normalize = True
