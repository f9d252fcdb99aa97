"""What a weights file must hold before its tensors are loaded into a model: tensors of a floating dtype,
every value finite. One ``UserError`` for every fault, naming the file."""

from __future__ import annotations

import torch

from .errors import UserError


def checked_state(state, source) -> tuple[dict[str, torch.Tensor], str]:
    """(``state`` with floating tensors as float32, a note saying what was cast, "" when nothing was).
    A value that is not a tensor, an integer or boolean tensor, or a NaN or infinite value is refused."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{source} is not a state dict of tensors")
    cast: dict[str, int] = {}
    out = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            raise UserError(f"{source}: {name} holds {tensor.dtype} values, not floating-point weights")
        if not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{source}: {name} holds NaN or infinite values")
        if tensor.dtype != torch.float32:
            cast[str(tensor.dtype).removeprefix("torch.")] = cast.get(str(tensor.dtype).removeprefix("torch."), 0) + 1
            tensor = tensor.float()
        out[name] = tensor
    note = ", ".join(f"{n} {dtype} tensor(s)" for dtype, n in sorted(cast.items()))
    return out, (f"{source}: {note} cast to float32" if note else "")
