"""Where a sweep's runs execute: this process, one worker process per GPU, or SLURM via submitit.

Workers never receive Job objects: they get the :class:`~petl_bench.runner.SweepSpec` (plain
values) and rebuild the jobs themselves, plugins included. The job ledger is the run folders: a
worker skips finished runs and runs a locked one never, so resubmitting a sweep or requeueing a
preempted SLURM job simply does what is left.
"""

from __future__ import annotations

import logging
import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .runner import SweepSpec, run_sweep, validate

log = logging.getLogger(__name__)


def _worker(spec: SweepSpec, output: str, device: str, force: bool, checkpoint_seconds: float) -> None:
    logging.basicConfig(level=logging.INFO, format=f"[{device}] %(levelname)s %(message)s")
    summary = run_sweep(
        spec.jobs(), Path(output), device=torch.device(device), force=force, checkpoint_seconds=checkpoint_seconds,
        skip_unsupported=spec.skip_unsupported,
    )  # fmt: skip
    log.info(
        "%d trained, %d finished before, %d failed", len(summary.finished), len(summary.skipped), len(summary.failed)
    )


def run_on_gpus(spec: SweepSpec, output: Path, gpus: int, *, force: bool, checkpoint_seconds: float) -> None:
    """One worker process per GPU (cuda:0 .. cuda:gpus-1), all walking the same job list."""
    available = torch.cuda.device_count()
    if gpus > available:
        raise UserError(f"--gpus {gpus} asked for, but torch sees {available} CUDA device(s)")
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_worker, args=(spec, str(output), f"cuda:{index}", force, checkpoint_seconds))
        for index in range(gpus)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    failed = [index for index, worker in enumerate(workers) if worker.exitcode != 0]
    if failed:
        raise RuntimeError(f"GPU worker(s) {failed} exited with an error; see their logs above")


class RunOne:
    """A SLURM task: run one job of the sweep (submitit requeues it on preemption; the run resumes)."""

    def __call__(self, spec: SweepSpec, run_id: str, output: str, force: bool, checkpoint_seconds: float) -> str:
        jobs = [job for job in spec.jobs() if job.run_id == run_id]
        if not jobs:
            raise RuntimeError(f"run {run_id} is no longer part of the sweep (changed code or plugins?)")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        summary = run_sweep(jobs, Path(output), device=device, force=force, checkpoint_seconds=checkpoint_seconds)
        if summary.failed:
            raise RuntimeError(summary.failed[0][1])
        return run_id

    def checkpoint(self, *args, **kwargs):
        """On preemption or timeout: resubmit the same call; the run continues from its resume.pt."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


@dataclass
class SlurmOptions:
    cluster: str = "slurm"  # submitit cluster: slurm, or local / debug to try a sweep on one machine
    partition: str | None = None
    time_minutes: int = 240
    gpus_per_job: int = 1
    cpus_per_job: int = 8
    array_parallelism: int = 64
    wait: bool = False


def submit(
    spec: SweepSpec, output: Path, options: SlurmOptions, *, force: bool, checkpoint_seconds: float, checked=None
) -> list:
    """Submit one SLURM array task per unfinished run; logs go to OUTPUT/slurm-logs. ``checked``: the
    sweep as :func:`runner.validate` returned it, when the caller validated it already."""
    import submitit

    checked = checked or validate(spec.jobs(), strict=False, skip_unsupported=spec.skip_unsupported)
    pending = [job for job in checked.jobs if force or not checked.finished(job, output)]
    if not pending:
        return []
    try:  # name the cluster: submitit would otherwise fall back to running locally without saying so
        executor = submitit.AutoExecutor(folder=output / "slurm-logs" / "%j", cluster=options.cluster)
    except (RuntimeError, ValueError) as error:  # e.g. no srun on this machine
        raise UserError(f"cannot submit to {options.cluster}: {error}") from None
    parameters = dict(timeout_min=options.time_minutes, gpus_per_node=options.gpus_per_job,
                      cpus_per_task=options.cpus_per_job, name="petl-bench", slurm_array_parallelism=options.array_parallelism)  # fmt: skip
    if options.partition:
        parameters["slurm_partition"] = options.partition
    executor.update_parameters(**parameters)
    task = RunOne()
    n = len(pending)
    submitted = executor.map_array(
        task, [spec] * n, [job.run_id for job in pending], [str(output)] * n, [force] * n, [checkpoint_seconds] * n
    )
    if options.wait:
        errors = []
        for job in submitted:
            try:
                job.result()
            except Exception as error:  # report every failed task, not only the first
                errors.append(f"{job.job_id}: {error}")
        if errors:
            raise RuntimeError("SLURM task(s) failed: " + "; ".join(errors))
    return submitted
