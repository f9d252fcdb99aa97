"""Compiled execution (torch.compile of forward, loss and backward without graph breaks) trains every
built-in method exactly as eager execution does. On CPU the graphs run through ``aot_eager`` (AOTAutograd's
traced forward and backward executed by eager kernels): the capture is the same as on CUDA, so a graph
break or a difference in what is computed shows here; inductor's fused kernels and CUDA graphs are the GPU's."""

from __future__ import annotations

import pytest
import torch
from conftest import SMALL, TINY_VIT, tiny_backbone

import petl_bench as pb
from petl_bench.config import Recipe
from petl_bench.data import Normalizer, TensorDataset
from petl_bench.engine import fit


class Recording:
    """``aot_eager``, counting the graphs it is given (so a test knows the compiled path ran)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph, inputs):
        self.graphs += 1
        return torch._dynamo.lookup_backend("aot_eager")(graph, inputs)


def _train(method: str, execution: str, backend=None, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    backbone, info = tiny_backbone(TINY_VIT, num_classes=4, seed=seed)
    runner = pb.METHODS.get(method)()
    model = pb.attach_method(backbone, info, runner, runner.make_config(None, **SMALL.get(method, {})))
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=generator)
    data = TensorDataset(images, torch.arange(16) % 4)
    recipe = Recipe(epochs=2, batch_size=8, warmup_epochs=1, lr=1e-2, execution=execution)
    torch.manual_seed(seed)  # dropout and drop-path draw from the global stream in both executions
    fit(model, data, None, Normalizer((0.5,) * 3, (0.5,) * 3), recipe, device=torch.device("cpu"), seed=seed,
        backend=backend or "aot_eager")  # fmt: skip
    model.eval()
    with torch.no_grad():
        logits = model(images[:4].float() / 255)
    return model, logits


@pytest.mark.parametrize("method", sorted(set(pb.METHODS.names()) - {"zero_shot"}))
def test_compiled_training_equals_eager(method):
    eager, eager_logits = _train(method, "eager")
    backend = Recording()
    compiled, compiled_logits = _train(method, "compiled", backend)
    assert backend.graphs == 1, "one graph for the step (fullgraph: a break would have raised)"
    assert torch.equal(eager_logits, compiled_logits), (eager_logits - compiled_logits).abs().max()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), f"{name}: {(a - b).abs().max()}"


def test_the_next_seed_reuses_the_compiled_step_and_trains_as_a_fresh_compile():
    """A sweep's next run of the same architecture and shapes (another seed: other weights, data and draws)
    runs the graph compiled for the run before, with its own parameters as inputs: no second trace, and the
    same training as a step compiled for it alone."""
    torch._dynamo.reset()
    backend = Recording()
    _train("convpass", "compiled", backend, seed=0)
    reused, reused_logits = _train("convpass", "compiled", backend, seed=1)
    assert backend.graphs == 1, "the second fit traced nothing"
    torch._dynamo.reset()
    fresh, fresh_logits = _train("convpass", "compiled", Recording(), seed=1)
    assert torch.equal(reused_logits, fresh_logits)
    assert all(torch.equal(a, b) for a, b in zip(reused.parameters(), fresh.parameters()))


def test_a_full_graph_cache_is_emptied_instead_of_running_eagerly(monkeypatch):
    """Dynamo's per-function cache holds a few graphs (its recompile limit); when another architecture finds
    it full, the cache is emptied and the step compiled: it never falls back to eager without a word."""
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "cache_size_limit", 1)
    backend = Recording()
    _train("lora", "compiled", backend)
    _, logits = _train("convpass", "compiled", backend)
    assert backend.graphs == 2, "convpass compiled after the cache was emptied"
    assert torch.equal(logits, _train("convpass", "eager")[1])


def test_graphs_are_dropped_after_a_number_of_fits(monkeypatch):
    """Kept graphs hold memory (and on CUDA a recording per run's parameters): after FITS_SHARING_GRAPHS fits
    they are dropped and the next fit compiles afresh."""
    from petl_bench import engine

    torch._dynamo.reset()
    monkeypatch.setattr(engine, "FITS_SHARING_GRAPHS", 1)
    backend = Recording()
    for seed in range(2):
        _train("lora", "compiled", backend, seed=seed)
    assert backend.graphs == 2


def test_auto_compiles_on_cuda_only_the_methods_that_declare_it():
    from petl_bench.engine import execution_of

    cuda = torch.device("cuda")  # a device object: no GPU needed
    assert execution_of(cuda, "auto") == "compiled" and execution_of(torch.device("cpu"), "auto") == "eager"
    assert execution_of(cuda, "auto", compiles=False) == "eager" and execution_of(cuda, "compiled", False) == "compiled"
    assert all(pb.METHODS.get(name).compiles for name in pb.METHODS.names())  # built-ins: held by the test above
    assert pb.METHODS.get("peft:dora").compiles is False  # DoRA's forward breaks the graph
