"""The fast path's step runner (f5worker.inference.fast.BucketedStepRunner) on the CPU: a fault of its own
never fails the items (it steps down a level and runs them again), a CUDA device fault or
out-of-memory still does; batch buckets waste at most 15 % of their rows; the batcher groups like
lengths, so the frames computed for a mixed queue stay close to the frames the items need; graph
buffers stay under their budget.

The CPU cannot capture a CUDA graph or launch a Triton kernel, so the faults those raise on a GPU
are injected here (each test says which); tests/test_gpu.py causes the real ones on a GPU.
"""
from __future__ import annotations

import asyncio
import logging
import types

import pytest
import torch

from f5worker.inference import fast
from f5worker.inference import gpu_faults
from f5worker.inference import kernels
from f5worker.inference.batcher import Batcher
from f5worker.inference.engine import TTSEngine
from f5worker.inference.items import ChunkItem
from f5worker.model.store import resolve_tts_files
from f5worker.settings import Settings
from tests.helpers import rel_l2, sample, tiny_dit

ALLOCATOR_ASSERT = ('captures_underway.empty() INTERNAL ASSERT FAILED at "/pytorch/c10/cuda/CUDACachingAllocator.cpp"'
                    ':2418, please report a bug to PyTorch. it->second->use_count > 0')
ILLEGAL_ACCESS = "CUDA error: an illegal memory access was encountered"


def eager_unfused(model, case):
    y, step_cond, text, mask, t = case
    with torch.inference_mode():
        return fast.BucketedStepRunner(model, use_graphs=False).integrate(y, step_cond, text, mask, t, 2, 2.0)


class _NoKeeper:
    """Stands in for the pool keeper, which needs CUDA."""

    def __init__(self, *, device):
        self.pool = self.stream = None


def failing_captures(monkeypatch, message: str) -> list:
    """Every graph capture raises ``message``, as the allocator raises it on a GPU (injected: the
    CPU cannot capture); returns the list of attempted captures."""
    attempts = []

    def capture(*args, **kwargs):
        attempts.append(kwargs)
        raise RuntimeError(message)

    monkeypatch.setattr(fast, "_PoolKeeper", _NoKeeper)
    monkeypatch.setattr(fast, "_Graph", capture)
    return attempts


def test_a_failed_capture_demotes_the_runner_to_eager_and_the_items_still_succeed(monkeypatch, caplog):
    model, case = tiny_dit(), sample([12, 9, 4])
    expected = eager_unfused(model, case)
    attempts = failing_captures(monkeypatch, ALLOCATOR_ASSERT)
    runner = fast.BucketedStepRunner(model, use_graphs=False, varlen=False)
    runner.use_graphs = True  # as on a GPU
    assert runner.level == "graphed"
    y, step_cond, text, mask, t = case
    with caplog.at_level(logging.WARNING, logger="f5worker.inference.fast"), torch.inference_mode():
        got = runner.integrate(y, step_cond, text, mask, t, 2, 2.0)
        again = runner.integrate(y, step_cond, text, mask, t, 2, 2.0)
    assert torch.equal(got, expected) and torch.equal(again, expected)
    assert runner.level == "eager" and len(attempts) == 1  # demoted for the rest of the process
    assert caplog.text.count("demoted from graphed to eager") == 1 and "use_count > 0" in caplog.text


def test_a_failed_precapture_demotes_instead_of_failing_the_background_task(monkeypatch):
    failing_captures(monkeypatch, "CUDA error: operation not permitted when stream is capturing")
    runner = fast.BucketedStepRunner(tiny_dit(), use_graphs=False, varlen=False)
    runner.use_graphs = True
    runner.prepare(1, 512, torch.float32, "cpu")
    assert runner.level == "eager" and runner.single_job_buckets() == []


def test_a_fused_kernel_fault_demotes_to_the_unfused_step_for_good(monkeypatch, caplog):
    model, case = tiny_dit(), sample([12, 9, 4])
    expected = eager_unfused(model, case)

    def launch_fails(*args, **kwargs):  # injected: what Triton raises when a launch is refused
        raise RuntimeError("Triton Error [CUDA]: too many resources requested for launch")

    monkeypatch.setattr(kernels, "cfg_euler", launch_fails)
    runner = fast.BucketedStepRunner(model, use_graphs=False, fused=True, varlen=True)
    assert runner.level == "fused"
    y, step_cond, text, mask, t = case
    with caplog.at_level(logging.WARNING, logger="f5worker.inference.fast"), torch.inference_mode():
        got = runner.integrate(y, step_cond, text, mask, t, 2, 2.0)
    assert rel_l2(got, expected) < 1e-6 and runner.fused is False and runner.varlen is False
    runner.use_fused_kernels()  # a later switch cannot bring the failed level back
    runner.use_varlen_attention(None)
    with torch.inference_mode():
        runner.integrate(y, step_cond, text, mask, t, 2, 2.0)
    assert runner.fused is False and runner.level == "eager"
    assert "demoted from fused to eager" in caplog.text and "too many resources" in caplog.text


@pytest.mark.parametrize("fault", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError(ILLEGAL_ACCESS)])
def test_out_of_memory_and_device_faults_are_not_demoted_but_raised(monkeypatch, fault):
    """These replace the worker (f5worker.service): the runner must not hide them."""
    def launch(*args, **kwargs):  # injected: the CPU cannot run out of GPU memory or fault the device
        raise fault

    monkeypatch.setattr(kernels, "cfg_euler", launch)
    runner = fast.BucketedStepRunner(tiny_dit(), use_graphs=False, fused=True)
    y, step_cond, text, mask, t = sample([12, 9, 4])
    with pytest.raises(type(fault)), torch.inference_mode():
        runner.integrate(y, step_cond, text, mask, t, 2, 2.0)
    assert runner.level == "fused"


def test_a_fault_at_the_last_level_is_raised():
    runner = fast.BucketedStepRunner(tiny_dit(), use_graphs=False, varlen=False)
    assert runner.level == "eager"
    with pytest.raises(RuntimeError), torch.inference_mode():
        runner.integrate(torch.randn(1, 8, 3), torch.randn(1, 8, 3), torch.zeros(1, 2, dtype=torch.long), None,
                         torch.linspace(0, 1, 3), 2, 2.0)  # 3 mel channels: a shape bug, not the fast path's


@pytest.mark.parametrize("err, demoted, gpu", [
    (RuntimeError(ALLOCATOR_ASSERT), True, None),
    (RuntimeError("CUDA error: operation failed due to a previous error during capture"), True, "device"),
    (RuntimeError("Triton Error [CUDA]: invalid argument"), True, None),
    (ValueError("FlashAttention only supports Ampere GPUs or newer."), True, None),
    (RuntimeError(ILLEGAL_ACCESS), False, "device"),
    (torch.cuda.OutOfMemoryError("CUDA out of memory."), False, "memory"),
    (KeyboardInterrupt(), False, None),
])
def test_fault_kinds(err, demoted, gpu):
    assert gpu_faults.fast_path_fault(err) is demoted
    found = gpu_faults.gpu_fault(err)
    assert (found[0] if found else None) == gpu


def test_batch_buckets_waste_at_most_15_percent_of_rows():
    for batch in range(1, 33):
        rows = fast.bucket_batch(batch)
        assert rows >= batch and (rows - batch) / rows <= 0.15, (batch, rows)


def chunk_item(duration: int, seed: int) -> ChunkItem:
    return ChunkItem(cond_wave=torch.randn(1, 256 * 20) * 0.1, text=list("hello"), duration=duration,
                     ref_frames=20, ref_rms=0.1, seed=seed, steps=2, cfg_strength=2.0, sway_sampling_coef=-1.0)


def test_a_mixed_queue_is_grouped_by_length_so_little_padding_is_computed(tiny_models):
    """A long item first, then 16 short and 15 long ones, queued at once: the old rule (the oldest
    and the shortest others) padded 16 short items to the long length, 64 % more frames than the
    items need. Grouped by length, the runner's own tally of what it computed stays within 5 %."""
    engine = TTSEngine.load(resolve_tts_files(Settings.from_env(tiny_models)), device="cpu", fast=True)
    short, long = 250, 1000  # just under 256 and 1024: frame buckets add little
    durations = [long] + [short, long] * 15 + [short]
    items = [chunk_item(d, i) for i, d in enumerate(durations)]
    batcher = Batcher(engine.start_call)

    async def main():
        return await asyncio.gather(*(batcher.submit([item]) for item in items))

    waves = asyncio.run(main())
    tally = engine.step_runner.tally
    assert len(waves) == len(items) and sorted(batcher.calls) == [16, 16]
    assert tally.real_rows == tally.rows == len(items)  # on the CPU no row is padded
    assert tally.real_row_frames == sum(durations)
    assert tally.row_frames <= 1.05 * tally.real_row_frames, tally


class _Buffers:
    """Stands in for a captured graph (the CPU cannot capture one): only its buffer size."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes


def test_graph_buffers_stay_under_the_budget_least_recently_used_first():
    runner = fast.BucketedStepRunner(tiny_dit(), use_graphs=False, graph_memory_bytes=300)
    for key in ("a", "b", "c"):
        runner.graphs[key] = _Buffers(100)
    runner.graphs.move_to_end("a")  # "a" used last: "b" is now the least recently used
    runner.graphs["d"] = _Buffers(100)
    runner._evict(keep="d")
    assert list(runner.graphs) == ["c", "a", "d"] and runner.graph_bytes() == 300
    runner.graphs["big"] = _Buffers(1000)  # alone over the budget: kept, everything else goes
    runner._evict(keep="big")
    assert list(runner.graphs) == ["big"]


# --- integrations set aside between steps, on one shared graph ---------------------------------
class _ReplayedGraph(fast._Graph):
    """Stands in for a captured graph (the CPU cannot capture): each ``replay()`` runs the body a
    capture records, on the same static buffers, so what one integration leaves in them for
    another is what it leaves on a GPU."""

    def _record(self, pool, stream, warm_steps):
        return types.SimpleNamespace(replay=self._body)


def graphed_runner(monkeypatch, model):
    monkeypatch.setattr(fast, "_PoolKeeper", _NoKeeper)
    monkeypatch.setattr(fast, "_Graph", _ReplayedGraph)
    runner = fast.BucketedStepRunner(model, use_graphs=False, varlen=False)
    runner.use_graphs = True  # as on a GPU
    return runner


def four_steps(lengths, seed):
    y, step_cond, text, mask, _ = sample(lengths, frames=12, seed=seed)
    return y, step_cond, text, mask, torch.linspace(0, 1, 5) ** 2


def interleaved(runner, cases, order):
    """Each case's integration, its steps taken in ``order`` (indices into ``cases``)."""
    runs = [runner.start(*case, 4, 2.0) for case in cases]
    for i in order:
        runs[i].step()
    assert all(run.steps_left == 0 for run in runs)
    return [run.result() for run in runs]


def test_integrations_set_aside_on_one_graph_give_their_results_alone(monkeypatch):
    model = tiny_dit()
    cases = [four_steps([12, 9, 4], seed=1), four_steps([11, 12, 6], seed=2)]
    runner = graphed_runner(monkeypatch, model)
    with torch.inference_mode():
        alone = [runner.integrate(*case, 4, 2.0) for case in cases]
        together = interleaved(runner, cases, [0, 1, 1, 0, 1, 0, 0, 1])
        eager = fast.BucketedStepRunner(model, use_graphs=False, varlen=False).integrate(*cases[0], 4, 2.0)
    assert len(runner.graphs) == 1  # both took turns on the one graph of their bucket
    assert all(torch.equal(a, b) for a, b in zip(alone, together))
    assert rel_l2(alone[0], eager) < 1e-6 and rel_l2(alone[0], alone[1]) > 1e-2


def test_a_fault_mid_way_starts_every_integration_again_one_level_down(monkeypatch):
    model = tiny_dit()
    cases = [four_steps([12, 9, 4], seed=1), four_steps([11, 12, 6], seed=2)]
    with torch.inference_mode():
        eager = [fast.BucketedStepRunner(model, use_graphs=False, varlen=False).integrate(*case, 4, 2.0)
                 for case in cases]
        runner = graphed_runner(monkeypatch, model)
        runs = [runner.start(*case, 4, 2.0) for case in cases]
        for i in (0, 1, 0):
            runs[i].step()

        def replay_fails():  # injected: what a replay raises when a captured kernel's launch is refused
            raise RuntimeError("Triton Error [CUDA]: too many resources requested for launch")

        runs[1].graph.graph.replay = replay_fails
        runs[1].step()
        assert runner.level == "eager" and runner.demotions == 1 and runs[1].steps_left == 4
        while runs[0].steps_left or runs[1].steps_left:
            for run in runs:
                if run.steps_left:
                    run.step()
        got = [run.result() for run in runs]
    assert all(torch.equal(a, b) for a, b in zip(got, eager))
