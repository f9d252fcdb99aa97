"""How many runs of a sweep train at once on one GPU when ``--runs-per-gpu`` is not given: as many as the
GPU's free memory holds, each run's need estimated from fake tensors (:mod:`petl_bench.opcount`, no GPU
memory used), and no more than the host's cores, the runs left to do and :data:`MOST_RUNS_PER_GPU`.

A small-batch PETL run leaves a large GPU idle between the kernels its host dispatches; several runs on
one GPU fill those gaps. A run's need is its training step's peak (frozen weights in bf16 beside their fp32
originals, trained tensors, gradients, AdamW's state, activations), plus an evaluation batch's forward
pass (compiled steps replay CUDA graphs from a pool of their own, so the two do not share memory), plus its
cached images on the device, times :data:`ALLOCATOR_MARGIN`, plus :data:`PROCESS_BYTES`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from .backbones import build_backbone, preserved_rng
from .costs import architecture
from .data import usable_cores
from .engine import eval_batch, precision_of
from .model import attach_method
from .opcount import forward_memory, step_memory
from .planning import Checked, Job

log = logging.getLogger(__name__)

ALLOCATOR_MARGIN = 1.25  # the caching allocator's rounding and fragmentation over the bytes tensors hold
PROCESS_BYTES = 1 << 30  # per worker: the CUDA context, cuBLAS/cuDNN workspaces, a merged copy for timing
FREE_SHARE = 0.9  # of the free memory: the rest stays for other processes' growth
MOST_RUNS_PER_GPU = 4  # an upper bound until measured on a GPU: a few runs cover one run's launch gaps


@dataclass(frozen=True)
class Placement:
    """Runs per GPU and how they were chosen (printed before the sweep starts)."""

    runs_per_gpu: int
    note: str


def run_bytes(job: Job, checked: Checked) -> int:
    """The GPU memory one run of ``job`` needs (see the module's docstring), estimated on this machine."""
    data, recipe = checked.data[job.data_key], job.recipe
    with preserved_rng():
        network, info = build_backbone(job.backbone, "none", num_classes=data.num_classes,
                                       drop_path_rate=recipe.drop_path, image_size=recipe.image_size)  # fmt: skip
        model = attach_method(network, info, job.method_object, job.method_config, recipe.head_init).train()
        size = info.preprocessing.image_size
        cuda = torch.device("cuda")
        dtype = torch.bfloat16 if precision_of(cuda, recipe.precision) == "bf16" else None
        step = step_memory(model, recipe.batch_size, size, data.num_classes, dtype=dtype)
        evaluation = forward_memory(model, eval_batch(recipe.eval_batch_size, cuda), size, dtype=dtype)
    cached = (len(data.train) if recipe.augment == "none" else 0) + len(data.eval)
    return int((step + evaluation + cached * 3 * size[0] * size[1]) * ALLOCATOR_MARGIN) + PROCESS_BYTES


def local_gpus() -> bool:
    """This process sees CUDA devices (one place to ask, which tests replace to try the GPU path)."""
    return torch.cuda.is_available()


def free_bytes(gpus: int) -> int:
    """The least free memory over cuda:0 .. cuda:gpus-1."""
    return min(torch.cuda.mem_get_info(index)[0] for index in range(gpus))


def runs_that_fit(need: int, free: int, cores: int, pending: int) -> int:
    """Runs per GPU: as many as ``FREE_SHARE`` of ``free`` bytes hold at ``need`` each, at most ``cores``,
    ``pending`` and :data:`MOST_RUNS_PER_GPU`, at least one."""
    return max(1, min(int(FREE_SHARE * free // need), cores, pending, MOST_RUNS_PER_GPU))


def largest_need(checked: Checked, pending: list[Job], progress=None) -> tuple[int, Job]:
    """The largest need over the architectures of the ``pending`` jobs (one estimate each) and its job."""
    firsts: dict[str, Job] = {}
    for job in pending:
        key = f"{architecture(job, checked.info(job))}, batch {job.recipe.batch_size}, {job.recipe.precision}"
        firsts.setdefault(key, job)
    bar = progress.add_task(f"memory of {len(firsts)} architecture(s)", total=len(firsts)) if progress else None
    needs = []
    for job in firsts.values():
        needs.append((run_bytes(job, checked), job))
        if bar is not None:
            progress.update(bar, advance=1)
    if bar is not None:
        progress.remove_task(bar)
    return max(needs, key=lambda pair: pair[0])


def placement(checked: Checked, pending: list[Job], gpus: int, progress=None) -> Placement:
    """Runs per GPU for the ``pending`` jobs of ``checked`` on GPUs cuda:0 .. cuda:gpus-1: the largest need
    over the sweep's architectures against the least free memory of those GPUs."""
    if not pending:
        return Placement(1, "runs per GPU: 1 (nothing to train)")
    try:
        need, job = largest_need(checked, pending, progress)
    except Exception as error:  # an estimate, not a check: the run itself reports what is wrong
        log.warning("could not estimate a run's memory: %s", error)
        return Placement(1, f"runs per GPU: 1 (a run's memory could not be estimated: {error})")
    free = free_bytes(gpus)
    cores = max(1, usable_cores() // gpus)
    runs = runs_that_fit(need, free, cores, math.ceil(len(pending) / gpus))
    return Placement(runs, (
        f"runs per GPU: {runs} (chosen from memory: {free / 2**30:.1f} GiB free, about {need / 2**30:.1f} GiB "
        f"per run of {job.method} on {job.backbone} at batch {job.recipe.batch_size}; at most "
        f"{MOST_RUNS_PER_GPU}, {cores} core(s) per GPU and the {len(pending)} run(s) to train; "
        f"--runs-per-gpu N sets it)"
    ))  # fmt: skip
