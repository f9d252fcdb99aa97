"""What a weights file must hold before its tensors are loaded into a model: tensors of a floating dtype
where the model has weights, every value finite. One ``UserError`` for every fault, naming the file."""

from __future__ import annotations

from collections import Counter
from typing import Mapping

import torch

from .errors import UserError


def checked_state(
    state, source, expected: Mapping[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """(``state`` with floating tensors as float32, a note saying what was cast, "" when nothing was).
    A value that is not a tensor, a NaN or infinite value, or an integer or boolean tensor where a weight
    belongs is refused. With ``expected`` (the model's state dict) an integer tensor the model does not hold
    as a float (an index, a counter of an original checkpoint) is left as it is."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{source} is not a state dict of tensors")
    cast: Counter[str] = Counter()
    out = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            weight = expected is None or (name in expected and expected[name].is_floating_point())
            if weight:
                raise UserError(f"{source}: {name} holds {tensor.dtype} values, not floating-point weights")
        elif not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{source}: {name} holds NaN or infinite values")
        elif tensor.dtype != torch.float32:
            cast[str(tensor.dtype).removeprefix("torch.")] += 1
            tensor = tensor.float()
        out[name] = tensor
    note = ", ".join(f"{n} {dtype} tensor(s)" for dtype, n in sorted(cast.items()))
    return out, (f"{source}: {note} cast to float32" if note else "")
