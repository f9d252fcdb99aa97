"""Where a sweep's runs execute: this process, worker processes on the local GPUs (``runs_per_gpu`` of
them on each; by default as many as the free memory holds, :mod:`petl_bench.capacity`), or SLURM via
submitit. :class:`Execution` is how (the options ``run`` and ``tune`` share); :func:`check` validates a sweep
before anything trains and :func:`run_checked` runs it.

Workers never receive Job objects: they get the :class:`~petl_bench.runner.SweepSpec` (plain
values) and rebuild the jobs themselves, plugins included. The job ledger is the run folders: a
worker skips finished runs and runs a locked one never, so resubmitting a sweep or requeueing a
preempted SLURM job simply does what is left.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.connection
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from . import atomic, capacity, ledger, records
from .data import usable_core_ids
from .errors import UserError
from .planning import Checked, Job, SweepSpec, validate
from .runner import SweepSummary, pick_device, run_sweep

log = logging.getLogger(__name__)


def _worker(spec: SweepSpec, output: str, device: str, force: bool, checkpoint_seconds: float, cores=None) -> None:
    logging.basicConfig(level=logging.INFO, format=f"[{device}] %(levelname)s %(message)s")
    if cores and hasattr(os, "sched_setaffinity"):  # its decoding pool and threads stay on its own cores
        os.sched_setaffinity(0, cores)
    summary = run_sweep(
        spec.jobs(), Path(output), device=torch.device(device), force=force, checkpoint_seconds=checkpoint_seconds,
        skip_unsupported=spec.skip_unsupported,
    )  # fmt: skip
    log.info(
        "%d trained, %d finished before, %d failed", len(summary.finished), len(summary.skipped), len(summary.failed)
    )


def core_shares(cores: list[int], workers: int) -> list[list[int]]:
    """Each worker's cores: ``cores`` in contiguous shares as even as can be, so that one worker decoding a task
    on all of its cores does not take the cores the others dispatch their kernels from; every core to each
    worker when there are fewer cores than workers."""
    if len(cores) < workers:
        return [list(cores)] * workers
    size, extra = divmod(len(cores), workers)
    bounds = [index * size + min(index, extra) for index in range(workers + 1)]
    return [list(cores[start:end]) for start, end in zip(bounds, bounds[1:])]


def worker_devices(gpus: int, runs_per_gpu: int) -> list[str]:
    """The device of each worker process: ``runs_per_gpu`` on each of cuda:0 .. cuda:gpus-1."""
    return [f"cuda:{index % gpus}" for index in range(gpus * runs_per_gpu)]


def run_on_gpus(
    spec: SweepSpec, output: Path, gpus: int, *, force: bool, checkpoint_seconds: float, runs_per_gpu: int = 1,
    watch: Callable[[], None] | None = None,
) -> None:  # fmt: skip
    """``runs_per_gpu`` worker processes on each GPU (cuda:0 .. cuda:gpus-1), all walking the same job list
    (the ledger's locks keep two workers off one run): several small runs fill a large GPU. ``watch`` is
    called every few seconds while they run, and once at the end."""
    available = torch.cuda.device_count()
    if gpus > available:
        raise UserError(f"--gpus {gpus} asked for, but torch sees {available} CUDA device(s)")
    context = multiprocessing.get_context("spawn")
    devices = worker_devices(gpus, runs_per_gpu)
    workers = [
        context.Process(target=_worker, args=(spec, str(output), device, force, checkpoint_seconds, cores))
        for device, cores in zip(devices, core_shares(usable_core_ids(), len(devices)))
    ]
    for worker in workers:
        worker.start()
    while alive := [worker.sentinel for worker in workers if worker.is_alive()]:
        multiprocessing.connection.wait(alive, timeout=POLL_SECONDS)
        if watch:
            watch()
    for worker in workers:
        worker.join()
    if watch:
        watch()
    failed = [index for index, worker in enumerate(workers) if worker.exitcode != 0]
    if failed:
        raise RuntimeError(f"GPU worker(s) {failed} exited with an error; see their logs above")


POLL_SECONDS = 5.0  # how often the run folders are read while worker processes train


class LedgerWatch:
    """What worker processes did, read from the run folders (the ledger) while they run: each run they finish
    goes to ``on_finished`` and the progress bar as it lands, and :attr:`summary` counts the sweep as a run
    in this process would (trained, finished before, failed, left to another process)."""

    def __init__(self, checked: Checked, output: Path, force: bool, progress=None, on_finished=None):
        self.output, self.progress, self.on_finished = output, progress, on_finished
        pending = {job.run_id for job in checked.to_train(output, force)}
        self.summary = SweepSummary(skipped=[job.run_id for job in checked.jobs if job.run_id not in pending],
                                    left_out=checked.left_out)  # fmt: skip
        self.before = {run_id: self._state(run_id) for run_id in pending}
        self.bar = progress.add_task(f"runs 0/{len(pending)}", total=len(pending)) if progress and pending else None

    def _state(self, run_id: str) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        """Which record file and failure note the run folder holds now (each written by an atomic rename:
        a new one is a new inode)."""
        folder = ledger.run_folder(self.output, run_id)

        def stamp(path: Path) -> tuple[int, int] | None:
            try:
                stat = path.stat()
            except OSError:
                return None
            return stat.st_ino, stat.st_mtime_ns

        return stamp(folder / records.RECORD), stamp(folder / records.FAILURE)

    def __call__(self) -> None:
        for run_id, before in list(self.before.items()):
            now = self._state(run_id)
            folder = ledger.run_folder(self.output, run_id)
            record = ledger.finished_record(folder, repair=False) if now[0] not in (None, before[0]) else None
            if record is not None:
                self.summary.finished.append(record)
                if self.on_finished:
                    self.on_finished(record)
            elif now[1] not in (None, before[1]):
                self.summary.failed.append((run_id, _failure_text(folder / records.FAILURE)))
            else:
                continue
            del self.before[run_id]
            if self.bar is not None:
                done = len(self.summary.finished) + len(self.summary.failed)
                self.progress.update(self.bar, advance=1, description=f"runs {done}/{done + len(self.before)}")

    def finish(self) -> SweepSummary:
        """The summary once the workers have exited: runs neither finished nor failed were left to another
        process (their lock was held)."""
        self.summary.busy = list(self.before)
        return self.summary


def _failure_text(path: Path) -> str:
    try:
        return json.loads(path.read_text()).get("error", "")
    except (OSError, ValueError, AttributeError):
        return "(unreadable failure note)"


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
class Outcome:
    """What running a sweep did: its jobs and its summary, which counts what ran (``counted``) when this process
    ran the jobs or watched its worker processes run them; SLURM tasks report through the run folders only
    (every job counts as skipped)."""

    jobs: list[Job]
    summary: SweepSummary | None  # None: submitted to SLURM without waiting
    submitted: int = 0  # SLURM array tasks submitted
    counted: bool = False  # the summary says what was trained, skipped and failed


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
    sweep as :func:`planning.validate` returned it, when the caller validated it already."""
    import submitit

    checked = checked or validate(spec.jobs(), strict=False, skip_unsupported=spec.skip_unsupported)
    pending = checked.to_train(output, force)
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


@dataclass
class Execution:
    """How and where a sweep's runs execute (the options ``run`` and ``tune`` share)."""

    output: Path
    device: str = "auto"
    force: bool = False
    strict: bool = False
    checkpoint_seconds: float = 60.0
    executor: str = "local"
    gpus: int = 1
    runs_per_gpu: int | None = None  # None: chosen from the free GPU memory (one on a CPU)
    slurm: SlurmOptions = field(default_factory=SlurmOptions)

    def __post_init__(self) -> None:
        if self.executor not in ("local", "slurm"):
            raise UserError(f"unknown executor '{self.executor}'; choose from: local, slurm")
        if self.gpus < 1 or (self.runs_per_gpu is not None and self.runs_per_gpu < 1):
            raise UserError(
                f"--gpus and --runs-per-gpu take positive integers, got {self.gpus} and {self.runs_per_gpu}"
            )
        if self.executor == "local" and not self.in_process and torch.cuda.device_count() < self.gpus:
            given = [f"--gpus {self.gpus}"] if self.gpus > 1 else []
            given += [f"--runs-per-gpu {self.runs_per_gpu}"] if (self.runs_per_gpu or 1) > 1 else []
            raise UserError(
                f"{' with '.join(given)}: worker processes on CUDA devices, but torch sees "
                f"{torch.cuda.device_count()}; on a CPU, runs go one at a time (leave both at 1)"
            )
        if self.executor == "slurm":
            try:
                import submitit  # noqa: F401
            except ModuleNotFoundError:
                raise UserError("--executor slurm needs submitit: pip install 'petl-bench[slurm]'") from None
        atomic.check_writable(self.output, "--output")

    @property
    def in_process(self) -> bool:
        """The runs execute in this process (one local device, one run at a time; runs per GPU not yet
        chosen count as one)."""
        return self.executor == "local" and self.gpus == 1 and (self.runs_per_gpu or 1) == 1

    def placed(self, checked: Checked, progress=None) -> tuple[Execution, str | None]:
        """This execution with its runs per GPU chosen (from the free memory on the local GPUs, when not
        given and the runs go to CUDA devices) and a line saying how, if it was chosen here."""
        if self.runs_per_gpu is not None:
            return self, None
        if self.executor != "local" or self.device not in ("auto", "cuda") or not capacity.local_gpus():
            return replace(self, runs_per_gpu=1), None
        chosen = capacity.placement(checked, checked.to_train(self.output, self.force), self.gpus, progress)
        return replace(self, runs_per_gpu=chosen.runs_per_gpu), chosen.note


def check(spec: SweepSpec, run: Execution) -> Checked:
    """The spec's jobs, every one checked before anything trains (see :func:`planning.validate`)."""
    return validate(spec.jobs(), run.strict, spec.skip_unsupported)


def run_checked(
    spec: SweepSpec, checked: Checked, run: Execution, *, progress=None,
    on_finished: Callable | None = None,
) -> Outcome:  # fmt: skip
    """Run (or submit) a checked sweep's jobs where ``run`` says (its runs per GPU chosen first if not given:
    :meth:`Execution.placed`)."""
    run = run.placed(checked)[0]
    jobs = checked.jobs
    if run.executor == "slurm":
        submitted = submit(spec, run.output, run.slurm, force=run.force, checkpoint_seconds=run.checkpoint_seconds,
                           checked=checked)  # fmt: skip
        summary = SweepSummary(skipped=[j.run_id for j in jobs]) if run.slurm.wait else None
        return Outcome(jobs, summary, submitted=len(submitted))
    if not run.in_process:
        watch = LedgerWatch(checked, run.output, run.force, progress, on_finished)
        run_on_gpus(spec, run.output, run.gpus, force=run.force, checkpoint_seconds=run.checkpoint_seconds,
                    runs_per_gpu=run.runs_per_gpu, watch=watch)  # fmt: skip
        return Outcome(jobs, watch.finish(), counted=True)
    summary = run_sweep(
        checked.jobs, run.output, device=pick_device(run.device), force=run.force, progress=progress,
        checkpoint_seconds=run.checkpoint_seconds, checked=checked, on_finished=on_finished,
    )  # fmt: skip
    return Outcome(jobs, summary, counted=True)
