"""Runs per GPU from free memory: a step's memory estimated from fake tensors equals what a real step holds
(measured by the profiler's allocation events on this CPU), and the choice follows the free memory."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from conftest import TINY_RUN, TINY_VIT, make_task_folder, run_cli, tiny_backbone
from torch import nn
from torch.profiler import ProfilerActivity, profile

import petl_bench as pb
from petl_bench import capacity, executors, ledger, records, runner
from petl_bench.engine import frozen_weights_in
from petl_bench.opcount import forward_memory, step_memory
from petl_bench.planning import SweepSpec

SPEC = dict(TINY_VIT, embed_dim=64, depth=3)


def _model(method: str) -> nn.Module:
    backbone, info = tiny_backbone(SPEC, num_classes=10)
    runner = pb.METHODS.get(method)()
    return pb.attach_method(backbone, info, runner, runner.make_config(None)).train()


def _storage_bytes(tensors, seen: dict) -> None:
    for tensor in tensors:
        seen[id(tensor.untyped_storage())] = tensor.untyped_storage().nbytes()


def _measured_peak(run, before: dict) -> int:
    """The tensors in ``before`` plus the most bytes the CPU allocator held at once during ``run()``, from the
    profiler's memory events (each op's own allocations net of its frees, in time order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return sum(before.values()) + peak


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", ["lora", "convpass", "ssf"])
def test_a_steps_estimated_memory_is_what_a_real_step_holds(method, dtype):
    batch = 64
    estimate = step_memory(_model(method), batch, (32, 32), 10, dtype=dtype, optimizer="for-loop")
    model = _model(method)
    images, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    resident: dict = {}
    _storage_bytes([p for p in model.parameters() if not p.requires_grad], resident)  # fp32 originals, kept
    with frozen_weights_in(model, dtype):
        _storage_bytes([*model.parameters(), *model.buffers(), images, labels], resident)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], foreach=False)

        def two_steps():
            for _ in range(2):
                with torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext():
                    logits = model(images)
                loss = nn.functional.cross_entropy(logits.float(), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        measured = _measured_peak(two_steps, resident)
    assert 0.97 < estimate / measured < 1.08, (estimate, measured)
    assert step_memory(_model(method), 2 * batch, (32, 32), 10, dtype=dtype) > 1.5 * estimate - sum(resident.values())


def test_an_evaluation_forwards_estimated_memory_is_what_it_holds():
    model = _model("convpass")
    estimate = forward_memory(model, 256, (32, 32), dtype=None)
    assert model.training, "the model is put back in training mode"
    images = torch.randn(256, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        measured = _measured_peak(lambda: model(images), {"images": images.nbytes})
    assert 0.97 < estimate / measured < 1.08, (estimate, measured)


def test_runs_that_fit_follow_memory_and_stop_at_cores_runs_and_the_cap():
    gib = 2**30
    assert capacity.runs_that_fit(10 * gib, 100 * gib, cores=16, pending=50) == capacity.MOST_RUNS_PER_GPU
    assert capacity.runs_that_fit(30 * gib, 100 * gib, cores=16, pending=50) == 3  # 0.9 * 100 // 30
    assert capacity.runs_that_fit(30 * gib, 100 * gib, cores=2, pending=50) == 2
    assert capacity.runs_that_fit(30 * gib, 100 * gib, cores=16, pending=1) == 1
    assert capacity.runs_that_fit(200 * gib, 100 * gib, cores=16, pending=50) == 1, "at least one, as before"


def _fake_cuda(monkeypatch, free: int) -> None:
    """One GPU with ``free`` bytes free, as far as choosing runs per GPU is concerned."""
    monkeypatch.setattr(capacity, "local_gpus", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(capacity, "free_bytes", lambda gpus: free)
    monkeypatch.setattr(capacity, "usable_cores", lambda: 16)


def _checked(tmp_path, tiny_plugin, seeds=(0, 1, 2, 3)):
    spec = SweepSpec(methods="lora", task_dirs=[str(make_task_folder(tmp_path / "colours"))],
                     backbones=["tiny_test_vit"], seeds=list(seeds), pretrained="none",
                     recipe_overrides={"batch_size": 8, "image_size": 16, "epochs": 1}, plugins=[str(tiny_plugin)])  # fmt: skip
    return spec, executors.check(spec, executors.Execution(tmp_path / "runs"))


def test_runs_per_gpu_are_chosen_from_the_free_memory_of_the_gpu(monkeypatch, tmp_path, tiny_plugin):
    _, checked = _checked(tmp_path, tiny_plugin)
    need = capacity.run_bytes(checked.jobs[0], checked)
    assert need > capacity.PROCESS_BYTES
    _fake_cuda(monkeypatch, free=int(3.5 * need / capacity.FREE_SHARE))
    placed, note = executors.Execution(tmp_path / "runs").placed(checked)
    assert placed.runs_per_gpu == 3 and not placed.in_process
    assert note.startswith("runs per GPU: 3 (chosen from memory") and "lora on tiny_test_vit" in note

    def no_estimate(*args):
        raise AssertionError("an explicit --runs-per-gpu or a CPU run needs no estimate")

    monkeypatch.setattr(capacity, "run_bytes", no_estimate)
    assert executors.Execution(tmp_path / "runs", runs_per_gpu=2).placed(checked) == (
        executors.Execution(tmp_path / "runs", runs_per_gpu=2), None)  # fmt: skip
    placed, note = executors.Execution(tmp_path / "runs", device="cpu").placed(checked)
    assert placed.runs_per_gpu == 1 and placed.in_process and note is None


def test_run_starts_the_chosen_number_of_workers_and_reports_what_they_did(monkeypatch, capsys, tmp_path,
                                                                            tiny_plugin):  # fmt: skip
    task = make_task_folder(tmp_path / "colours")
    _fake_cuda(monkeypatch, free=64 * 2**30)
    started = {}

    def run_on_gpus(spec, output, gpus, *, force, checkpoint_seconds, runs_per_gpu, watch):
        """The workers' part played by this process on the CPU: the same job list, the same run folders."""
        started.update(gpus=gpus, runs_per_gpu=runs_per_gpu)
        jobs = spec.jobs()
        runner.run_sweep(jobs[:3], output, device=torch.device("cpu"))
        watch()
        failed = ledger.run_folder(output, jobs[3].run_id)
        failed.mkdir()
        (failed / records.FAILURE).write_text(json.dumps({"error": "RuntimeError('out of memory')"}))
        watch()

    monkeypatch.setattr(executors, "run_on_gpus", run_on_gpus)
    code, stdout, stderr = run_cli(monkeypatch, capsys, "run", "--plugin", str(tiny_plugin), "--task-dir", str(task),
                                   "--methods", "linear,lora", "--seeds", "0,1", "--output", str(tmp_path / "r"),
                                   *TINY_RUN)  # fmt: skip
    assert started == {"gpus": 1, "runs_per_gpu": 4}, "four runs to train, memory for more"
    assert "runs per GPU: 4 (chosen from memory: 64.0 GiB free" in stderr
    assert code == 1, "a run failed in a worker: the sweep says so"
    assert stderr.count("finished linear on colours") == 2 and stderr.count("finished lora on colours") == 1
    assert "runs 4/4" in stderr, "the overall progress follows the workers' run folders"
    assert "3 run(s) trained, 0 already finished, 0 running elsewhere, 1 failed" in stdout
    assert "out of memory" in stdout


def test_the_watch_of_a_forced_sweep_reports_only_records_written_after_it_started(tmp_path, tiny_plugin):
    spec, checked = _checked(tmp_path, tiny_plugin, seeds=(0,))
    output = tmp_path / "runs"
    runner.run_sweep(checked.jobs, output, device=torch.device("cpu"), checked=checked)
    reported = []
    watch = executors.LedgerWatch(checked, output, force=True, on_finished=reported.append)
    watch()
    assert reported == [], "the record from before the sweep is not this sweep's"
    runner.run_sweep(checked.jobs, output, device=torch.device("cpu"), force=True, checked=checked)
    watch()
    watch()
    assert [r.run_id for r in reported] == [checked.jobs[0].run_id], "reported once"
    summary = watch.finish()
    assert len(summary.finished) == 1 and not summary.busy and not summary.skipped and not summary.failed
    again = executors.LedgerWatch(checked, output, force=False)
    assert again.finish().skipped == [checked.jobs[0].run_id], "without --force a finished run is skipped"


def test_worker_processes_train_a_sweep_once_and_the_parent_reports_each_run(monkeypatch, tmp_path, tiny_plugin):
    """The local worker path end to end, with two CPU workers in place of two runs on one GPU: spawned
    processes walk the same job list, the locks keep them off each other's runs, the parent's watch sees
    every run land once."""
    spec, checked = _checked(tmp_path, tiny_plugin, seeds=(0, 1, 2))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(executors, "worker_devices", lambda gpus, runs_per_gpu: ["cpu"] * (gpus * runs_per_gpu))
    monkeypatch.setattr(executors, "POLL_SECONDS", 0.5)
    run = executors.Execution(tmp_path / "runs", runs_per_gpu=2)
    reported = []
    outcome = executors.run_checked(spec, checked, run, on_finished=reported.append)
    assert outcome.counted and sorted(r.seed for r in outcome.summary.finished) == [0, 1, 2]
    assert sorted(r.seed for r in reported) == [0, 1, 2] and not outcome.summary.failed
    assert len(records.load_records(tmp_path / "runs")) == 3, "each run trained once"


def test_each_worker_gets_its_own_share_of_the_cores():
    assert executors.core_shares(list(range(16)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert executors.core_shares([0, 2, 4, 6, 8], 2) == [[0, 2, 4], [6, 8]], "the cores this process may use"
    assert executors.core_shares([0, 1], 4) == [[0, 1]] * 4, "fewer cores than workers: all of them to each"
