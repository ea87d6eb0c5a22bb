"""The switch to the fused kernels: compiled under the volume's lock, checked against the unfused
step on the loaded weights, and taken only when they agree; the worker keeps serving otherwise.

Run on the CPU, where the fused step runs the kernels' torch references (their Triton versions are
held to those under Triton's interpreter in test_kernels.py and test_fast_fused.py)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest
import torch
from filelock import FileLock

from f5worker.jobs import plan as job_plan
from f5worker.inference import kernel_switch as fast_kernels
from f5worker.inference import kernels
from f5worker.inference.batcher import OffModelThread
from f5worker.inference.engine import TTSEngine
from f5worker.model.store import resolve_tts_files
from f5worker.settings import Settings
from tests.helpers import CPU_REL_L2, GEN_TEXT, load_stock, rel_l2, request, stock_infer
from tests.processes import REPO


@pytest.fixture
def engine(tiny_models):
    return TTSEngine.load(resolve_tts_files(Settings.from_env(tiny_models)), device="cpu", fast=True)


def run_in_order(tasks: list) -> list:
    """What Batcher.prepare_in_background does with the tasks, on this one thread."""
    return [task.run() if isinstance(task, OffModelThread) else task() for task in tasks]


def test_checked_kernels_are_switched_to_and_compute_what_stock_does(engine, tiny_models, monkeypatch, ref_wav,
                                                                    tmp_path):
    errors = fast_kernels.check_fast_paths(engine.model.transformer, torch.float32, "cpu")
    assert set(errors) == {"fused", "varlen", "fused_varlen"} and max(errors.values()) < 1e-5
    runner = engine.step_runner
    assert runner.fused is False and runner.varlen is False  # served on the unfused step from the start
    tasks = fast_kernels.switch_tasks(runner, engine.dtype, engine.device, tmp_path / "triton")
    # varlen (no flash on the CPU: declined), lock, compile-check-switch, unlock
    assert run_in_order(tasks) == [False, True, True, None]
    assert (tmp_path / "triton" / fast_kernels.LOCK_NAME).exists()
    assert runner.fused is False  # a switch lands between integrations, on the model thread
    got = job_plan.synthesize(engine, request(ref_wav, GEN_TEXT, 7, nfe_step=8))
    assert runner.fused is True
    expected = stock_infer(load_stock(tiny_models), monkeypatch, ref_wav, GEN_TEXT, 7, nfe_step=8)
    assert rel_l2(got, expected) < CPU_REL_L2


def test_kernels_that_disagree_are_not_used(engine, monkeypatch, ref_wav, tmp_path, caplog):
    # Fault injection: a kernel that computes the wrong thing (as a miscompiled one would).
    right = kernels.cfg_euler
    monkeypatch.setattr(kernels, "cfg_euler", lambda x, flow, dt, cfg, **kw: right(x, flow, dt, cfg, **kw) * 1.1)
    with caplog.at_level(logging.WARNING, logger="f5worker.inference.kernel_switch"):
        assert fast_kernels.fused_switch_task(engine.step_runner, engine.dtype, engine.device)() is False
    assert "differ from the unfused masked step" in caplog.text
    job_plan.synthesize(engine, request(ref_wav, GEN_TEXT, 7, nfe_step=2))
    assert engine.step_runner.fused is False


def test_a_compile_that_cannot_run_here_leaves_the_worker_on_the_unfused_step(engine, monkeypatch, caplog):
    # Fault injection: what Triton raises in an image without a C compiler (the CPU test cannot
    # remove the compiler from under Triton, which it never calls here).
    def no_compiler(*args, **kwargs):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(fast_kernels, "warm_fused_kernels", no_compiler)
    with caplog.at_level(logging.WARNING, logger="f5worker.inference.kernel_switch"):
        assert fast_kernels.fused_switch_task(engine.step_runner, engine.dtype, engine.device)() is False
    assert "Failed to find C compiler" in caplog.text and engine.step_runner.requested_varlen is False


def test_a_compile_lock_held_too_long_is_given_up_and_the_kernels_compiled_anyway(engine, tmp_path, caplog):
    # Another worker of the endpoint compiling: flock locks are per open file, so a lock held here
    # blocks the task's own lock on the same path as another process's would.
    lock = fast_kernels.CompileLock(tmp_path, wait_s=0.3)
    with FileLock(str(tmp_path / fast_kernels.LOCK_NAME)), caplog.at_level(logging.WARNING):
        assert lock.acquire() is False
    assert "still held after" in caplog.text
    assert fast_kernels.fused_switch_task(engine.step_runner, engine.dtype, engine.device)() is True
    lock.release()  # not held: a no-op


LEASE_HOLDER = r"""
import sys, time
from pathlib import Path
from f5worker.inference.kernel_switch import CompileLock
lock = CompileLock(Path(sys.argv[1]), soft=True, lease_s=float(sys.argv[2]))
assert lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_dead_workers_lease_on_a_volume_without_flock_is_taken_over(tmp_path):
    """A volume without flock gets a lease (a marker file its holder refreshes). A worker killed
    while holding it (SIGKILL: no cleanup) leaves the marker; another worker, which cannot probe a
    process on another host, takes it once the lease runs out, while a live holder's is waited for."""
    lease_s = 3.0
    holder = subprocess.Popen([sys.executable, "-c", LEASE_HOLDER, str(tmp_path), str(lease_s)], cwd=REPO,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        alive = fast_kernels.CompileLock(tmp_path, wait_s=lease_s + 1.5, soft=True, lease_s=lease_s)
        assert alive.acquire() is False  # refreshed by a live holder: never taken over
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / (fast_kernels.LOCK_NAME + ".marker")).exists()  # left behind by the dead worker
    taker = fast_kernels.CompileLock(tmp_path, wait_s=4 * lease_s, soft=True, lease_s=lease_s)
    assert taker.acquire() is True
    taker.release()


LOCK_CHILD = r"""
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from f5worker.inference.batcher import Batcher
from f5worker.inference.kernel_switch import CompileLock

folder, name = Path(sys.argv[1]), sys.argv[2]
events = folder / "events.jsonl"
def note(what):
    with events.open("a") as f:
        f.write(json.dumps({"who": name, "what": what, "t": time.time()}) + "\n")

def others_job_ran():
    return any(e["what"] == "job-ran" and e["who"] != name
               for e in map(json.loads, events.read_text().splitlines()))

def compile_kernels():  # on the model thread, as the fused switch task runs
    # Lasts until the other worker has served a job (at most 30 s), so the check does not hang on
    # how long each process takes to import torch on a loaded machine.
    note("compile-start")
    deadline = time.time() + 30
    while time.time() < deadline and not others_job_ran():
        time.sleep(0.05)
    note("compile-end")

lock = CompileLock(folder / "triton", wait_s=60)
from f5worker.inference.batcher import OffModelThread, whole_calls
model_thread = ThreadPoolExecutor(max_workers=1)
batcher = Batcher(whole_calls(lambda items, abandoned=None: []), executor=model_thread)
note("ready")
prepare = batcher.prepare_in_background([OffModelThread(lock.acquire), compile_kernels, OffModelThread(lock.release)])
time.sleep(0.3)
# A job's model call while this worker's background thread may be waiting for the other's lock.
model_thread.submit(lambda: note("job-ran")).result(timeout=30)
prepare.join(timeout=60)
note("done")
"""


def test_two_workers_on_one_cache_compile_one_after_the_other_and_serve_meanwhile(tmp_path):
    """Two processes on one cache folder: the second waits for the first's compile lock on its
    background thread, so its model thread still runs a job during the first's compile."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = []
    for name in ("a", "b"):
        procs.append(subprocess.Popen([sys.executable, "-c", LOCK_CHILD, str(tmp_path), name], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        time.sleep(0.2 if name == "a" else 0)
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    at = {(e["who"], e["what"]): e["t"] for e in events}
    first, second = sorted("ab", key=lambda who: at[(who, "compile-start")])
    assert at[(second, "compile-start")] >= at[(first, "compile-end")]  # never both at once
    # the waiting worker's job ran while the other compiled, not after its lock came free
    assert at[(second, "job-ran")] < at[(first, "compile-end")]


def test_without_triton_the_worker_serves_unfused_and_still_switches_to_varlen_attention(tiny_models):
    """A torch build without Triton (CPU-only wheels, some platforms; or an image whose Triton cannot
    compile): the kernels module still imports, its torch references run, the fused switch is
    declined with a reason, and variable-length attention, which needs no Triton, still switches on."""
    script = f"""
import sys, logging
sys.modules["triton"] = None  # as if not installed: 'import triton' raises ImportError
logging.basicConfig(level=logging.WARNING)
import torch
from f5worker.inference import kernel_switch as fast_kernels
from f5worker.inference import kernels
from f5worker.inference.engine import TTSEngine
from f5worker.model.store import resolve_tts_files
from f5worker.settings import Settings
assert not kernels.TRITON_AVAILABLE
engine = TTSEngine.load(resolve_tts_files(Settings.from_env({tiny_models!r})), device="cpu", fast=True)
x = torch.randn(2, 5, 64)
assert torch.equal(kernels.layernorm_modulate(x, torch.zeros(2, 64), torch.zeros(2, 64)),
                   kernels.layernorm_modulate_reference(x, torch.zeros(2, 64), torch.zeros(2, 64)))
# The CPU has no flash kernel: answer "varlen" where a GPU's flash would (the check itself then
# runs variable-length attention through its per-segment reference).
real_kind = fast_kernels.attention_kind
fast_kernels.attention_kind = lambda padded, device, dtype, varlen=None: real_kind(padded, device, dtype, True)
runner = engine.step_runner
print("varlen:", fast_kernels.varlen_switch_task(runner, engine.dtype, "cpu")())
print("fused:", fast_kernels.fused_switch_task(runner, engine.dtype, "cpu")())
print("wanted varlen:", runner.requested_varlen)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "varlen: True" in done.stdout and "fused: False" in done.stdout and "has no Triton" in done.stderr
    assert "wanted varlen: None" in done.stdout  # None: where flash runs it
