"""Kernels a training step dispatches and the memory it holds, found without running it (fake tensors, any
machine).

On a GPU a step of a small-batch PETL method takes about max(GPU time, host time per kernel x kernels):
the host launches each kernel, so a method that dispatches three times the floor's kernels runs up to
three times slower however little each kernel computes. Counting what the dispatcher sees in one step
(forward, loss, backward, optimizer), with fake tensors so that nothing is computed, is the proxy this
module gives: it runs in seconds on a CPU and counts the ops a CUDA step would dispatch. One op differs
between the two devices: ``F.dropout`` is one fused ``native_dropout`` kernel on CUDA and four on a CPU
(``empty_like``, ``bernoulli_``, ``div_``, ``mul``), so the count routes it to ``native_dropout`` as CUDA
does (``as_on_cuda``); drop-path draws its own mask with ``bernoulli_`` on both.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Ops that launch no kernel: views and metadata (they alias their input).
_FREE = {"detach", "alias", "lift_fresh", "_to_copy_noop"}


@dataclass
class OpCount:
    """Ops dispatched in one training step: ``kernels`` launch work on the device, ``views`` only alias."""

    kernels: int = 0
    views: int = 0
    by_op: collections.Counter = field(default_factory=collections.Counter)
    syncs: int = 0  # device-to-host reads (``.item()``, ``nonzero``, a tensor's value in Python)

    @property
    def total(self) -> int:
        return self.kernels + self.views


class _Counter(TorchDispatchMode):
    def __init__(self, count: OpCount):
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.namespace == "prim":  # metadata queries (a tensor's device, sizes): no op at all
            return func(*args, **(kwargs or {}))
        if getattr(func, "is_view", False) or name in _FREE:
            self.count.views += 1
        else:
            self.count.kernels += 1
            self.count.by_op[name] += 1
        if name in ("_local_scalar_dense", "nonzero", "item"):
            self.count.syncs += 1
        return func(*args, **(kwargs or {}))


class _Tracker(TorchDispatchMode):
    """Bytes of the storages alive, and their most at once: every op's outputs are added when made and
    subtracted when freed (a weak reference to each storage); views share their base's storage."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._alive: dict[int, weakref.ref] = {}

    def hold(self, tensors) -> None:
        for tensor in tensors:
            storage = tensor.untyped_storage()
            key = id(storage)
            if key not in self._alive:
                size = storage.nbytes()
                self.live += size
                self.peak = max(self.peak, self.live)
                self._alive[key] = weakref.ref(storage, functools.partial(self._freed, key, size))

    def _freed(self, key: int, size: int, _reference) -> None:
        self.live -= size
        self._alive.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.hold(t for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


@contextlib.contextmanager
def as_on_cuda():
    """``F.dropout`` in training as CUDA runs it: one ``native_dropout`` (the same masks' distribution and
    scaling; fake tensors compute nothing), so the CPU count is CUDA's."""
    original = nn.functional.dropout

    def dropout(input, p=0.5, training=True, inplace=False):
        if training and 0.0 < p < 1.0 and input.numel():
            return torch.native_dropout(input, p, True)[0]
        return original(input, p, training, inplace)

    nn.functional.dropout = dropout
    try:
        yield
    finally:
        nn.functional.dropout = original


def count_step(
    model: nn.Module,
    batch: int,
    image_size: tuple[int, int],
    num_classes: int,
    *,
    dtype: torch.dtype | None = torch.bfloat16,
    input_grad: bool = False,
    optimizer: str = "fused",
    frozen_in_dtype: bool = True,
) -> OpCount:
    """Ops of one training step of ``model`` (in train mode) on a fake batch: forward under ``dtype``
    autocast (None: fp32), cross-entropy in fp32, backward, AdamW (``foreach``, ``fused`` or
    ``for-loop``) and ``zero_grad``; with ``frozen_in_dtype`` the frozen weights are held in ``dtype`` as
    training holds them (``engine.frozen_weights_in``). The second step is counted (the optimizer's state
    exists then)."""
    count = OpCount()
    counter = _Counter(count)
    _fake_steps(model, batch, image_size, num_classes, dtype, input_grad, optimizer, frozen_in_dtype,
                watch=lambda index: counter if index == 1 else contextlib.nullcontext())  # fmt: skip
    return count


def step_memory(
    model: nn.Module, batch: int, image_size: tuple[int, int], num_classes: int, *,
    dtype: torch.dtype | None = torch.bfloat16, optimizer: str = "fused", input_grad: bool = False,
) -> int:  # fmt: skip
    """The most bytes two training steps of ``model`` hold at once, as the engine trains it (frozen weights
    in ``dtype`` beside their fp32 originals, the trained tensors, their gradients and AdamW's state, the
    batch, the activations kept for backward and each op's temporaries), from fake tensors: nothing is
    computed or allocated, any machine can estimate a GPU's need. Not counted: the device's own context,
    library workspaces and the allocator's rounding and fragmentation."""
    tracker = _Tracker()
    tracker.hold(t for t in itertools.chain(model.parameters(), model.buffers()) if not t.requires_grad)
    _fake_steps(model, batch, image_size, num_classes, dtype, input_grad, optimizer, True,
                watch=lambda index: tracker, hold=tracker.hold)  # fmt: skip
    return tracker.peak


def forward_memory(model: nn.Module, batch: int, image_size: tuple[int, int], *,
                   dtype: torch.dtype | None = torch.bfloat16) -> int:  # fmt: skip
    """The most bytes an evaluation forward pass (eval mode, no gradients, ``dtype`` autocast, frozen weights
    held in ``dtype``) holds at once beyond the model's own tensors (the batch, activations, temporaries),
    from fake tensors as :func:`step_memory`."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .engine import frozen_weights_in

    tracker = _Tracker()
    was_training = model.training
    model.eval()
    try:
        with frozen_weights_in(model, dtype), FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            images = torch.randn(batch, 3, *image_size)
            tracker.hold([images])
            with tracker, _autocast(dtype):
                model(images)
    finally:
        model.train(was_training)
    return tracker.peak


def _fake_steps(model, batch, image_size, num_classes, dtype, input_grad, optimizer, frozen_in_dtype, *, watch,
                hold=None) -> None:  # fmt: skip
    """Two training steps on fake tensors (the trained parameters faked, the frozen ones real), each under
    ``watch(index)``; ``hold``, if given, is shown every tensor that exists before the first op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .engine import frozen_weights_in

    params = [p for p in model.parameters() if p.requires_grad]
    kinds = {"foreach": {"foreach": True}, "fused": {"fused": True}, "for-loop": {"foreach": False}}
    held = frozen_weights_in(model, dtype if frozen_in_dtype else None)  # real weights, before faking
    with held, as_on_cuda(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_params = {p: nn.Parameter(mode.from_tensor(p.detach()), requires_grad=True) for p in params}
        with _swap_parameters(model, fake_params):
            step_optimizer = torch.optim.AdamW(list(fake_params.values()), lr=1e-3, **kinds[optimizer])
            images = torch.randn(batch, 3, *image_size)
            labels = torch.randint(0, num_classes, (batch,))
            if hold:
                hold([*model.parameters(), *model.buffers(), images, labels])
            for index in range(2):
                with watch(index):
                    x = images.requires_grad_(input_grad)
                    loss = _loss(model, x, labels, dtype)
                    step_optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    step_optimizer.step()


def _loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The training loss as the engine computes it: the method's own (``extra_loss``) or the classifier's."""

    def compute():
        return _autocast(dtype)

    def criterion(logits, targets):
        return nn.functional.cross_entropy(logits.float(), targets)

    method = getattr(model, "method", None)
    if getattr(method, "extra_loss", False):
        return method.training_loss(model, images, labels, criterion, compute)
    with compute():
        logits = model(images)
    return criterion(logits, labels)


@contextlib.contextmanager
def _swap_parameters(model: nn.Module, replacements: dict):
    """Put fake copies of the trained parameters in place for the count, and the real ones back after."""
    owners = [
        (module, name, p) for module in model.modules() for name, p in module._parameters.items() if p in replacements
    ]
    try:
        for module, name, parameter in owners:
            module._parameters[name] = replacements[parameter]
        yield
    finally:
        for module, name, parameter in owners:
            module._parameters[name] = parameter


def _autocast(dtype: torch.dtype | None):
    """Autocast to ``dtype`` (fake tensors live on the CPU), or nothing for fp32."""
    return torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
