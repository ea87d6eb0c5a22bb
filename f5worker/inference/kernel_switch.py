"""Switching the fast path to variable-length attention and its fused kernels once they are proven
on this GPU, never on the start path or a job's.

Why this module exists: Triton compiles each fused kernel on its first launch (seconds, the first
time on a GPU kind and torch version), so compiling at start would break the cold-start target
and compiling inside a job would stall it. The worker therefore serves on the unfused graphed step
with masked attention from the start; this module's background tasks then follow (f5worker.inference.batcher
runs them while the worker is idle, each model-thread task alone, so a job arriving meanwhile waits
for one task at most):

1. variable-length attention, which needs no Triton: where torch's flash kernel runs it, checked
   against masked attention on the loaded weights and switched to (on the model thread);
2. the compile lock on Triton's cache folder on the volume (``TRITON_CACHE_DIR``, set by
   ``settings.apply_cache_env``), waited for OFF the model thread in short tries, so the workers
   of an endpoint compile once per GPU kind and torch version while jobs keep running. The lock
   only saves work: Triton writes each cache entry to a temporary file and renames it, so two
   workers compiling at once cost time, never a corrupt cache. Hence a lock held too long is given
   up on (this worker compiles anyway), and on a volume without ``flock`` the lock is a lease
   (filelock's ``SoftFileLease``: a marker file its holder refreshes), so a dead worker's marker,
   on another host, is taken over once ``LEASE_S`` passes without a refresh;
3. on the model thread: compile the fused kernels, check the fused step against the unfused masked
   one on a padded batch, and switch only if they agree; then the lock is released.
A failure at any step is logged and leaves the worker serving on what it had.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from pathlib import Path

import torch
from filelock import BaseFileLock, FileLock, SoftFileLease, Timeout

from f5worker.inference import kernels
from f5worker.inference.attention import attention_kind
from f5worker.inference.batcher import OffModelThread
from f5worker.inference.fast import BucketedStepRunner, euler_integrate, warm_fused_kernels

log = logging.getLogger(__name__)

LOCK_NAME = ".f5worker-compile.lock"
LOCK_WAIT_S = 240  # another worker compiling the same kernels; after it, ours load from the cache
LOCK_POLL_S = 0.5  # one short try every this often, on the background thread
LEASE_S = 60  # no flock on the volume: a marker its holder has not refreshed for this long is a dead worker's
_NO_FLOCK = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL}
CHECK_LENGTHS = (96, 61, 30)  # a padded batch: three items of different lengths in one bucket
CHECK_STEPS = 2
# fp16 rounding of a different summation order is ~1e-3; a wrong kernel is O(1).
CHECK_REL_L2 = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def rel_l2(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.float(), expected.float()
    return float((got - expected).norm() / expected.norm().clamp_min(1e-12))


@torch.inference_mode()
def check_fast_paths(transformer, dtype: torch.dtype, device, use_triton=None, *,
                     kinds: tuple[str, ...] = ("fused", "varlen", "fused_varlen")) -> dict[str, float]:
    """Rel. L2 against the unfused masked step, integrated on a padded batch with the loaded weights,
    of each of ``kinds``: the fused step, variable-length attention, and both together."""
    gen = torch.Generator(device=device).manual_seed(0)
    n_mel = transformer.proj_out.out_features
    frames = max(CHECK_LENGTHS)
    lengths = torch.tensor(CHECK_LENGTHS, device=device)
    mask = torch.arange(frames, device=device)[None, :] < lengths[:, None]
    y = torch.randn(len(CHECK_LENGTHS), frames, n_mel, device=device, dtype=dtype, generator=gen) * mask[..., None]
    ref_frames = torch.arange(frames, device=device)[None, :, None] < 20  # each item's "reference" part
    cond = torch.randn(y.shape, device=device, dtype=dtype, generator=gen) * ref_frames
    text = torch.randint(0, 100, (len(CHECK_LENGTHS), 20), device=device, generator=gen)
    t = torch.linspace(0, 1, CHECK_STEPS + 1, device=device, dtype=dtype)
    varlen = attention_kind(True, device, dtype, True)

    def run(attention: str, fused: bool) -> torch.Tensor:
        out = euler_integrate(transformer, y, cond, text, mask, t, steps=CHECK_STEPS, cfg_strength=2.0,
                              attention=attention, fused=fused, use_triton=use_triton)
        return out * mask[..., None]

    expected = run("masked", False)
    runs = {"fused": ("masked", True), "varlen": (varlen, False), "fused_varlen": (varlen, True)}
    return {kind: rel_l2(run(*runs[kind]), expected) for kind in kinds}


def _agree(errors: dict[str, float], dtype: torch.dtype, what: str) -> bool:
    bound = CHECK_REL_L2.get(dtype, 1e-2)
    if all(error <= bound for error in errors.values()):  # NaN counts as a failure
        return True
    log.warning("%s not used: on this GPU they differ from the unfused masked step (rel. L2 %s, bound %g)",
                what, {k: f"{v:.2e}" for k, v in errors.items()}, bound)
    return False


def varlen_switch_task(runner: BucketedStepRunner, dtype: torch.dtype, device):
    """The model-thread task that checks variable-length attention and switches to it, where torch's
    flash kernel runs it (no Triton needed); False where it does not, or it disagrees."""

    def task() -> bool:
        if attention_kind(True, device, dtype, None) != "varlen":
            return False
        try:
            errors = check_fast_paths(runner.tr, dtype, device, runner.use_triton, kinds=("varlen",))
        except (OSError, RuntimeError, ValueError) as err:
            log.warning("variable-length attention not used: %s: %s", type(err).__name__, err)
            return False
        if not _agree(errors, dtype, "variable-length attention"):
            return False
        runner.use_varlen_attention(None)
        log.info("variable-length attention checked (rel. L2 vs masked %.1e); switching", errors["varlen"])
        return True

    return task


def triton_probe(device="cuda") -> str | None:
    """Compile and launch one of the fused kernels here, against its torch reference: None when it
    works, else why not (the pre-deploy gate reports it; the worker would serve unfused)."""
    if not kernels.TRITON_AVAILABLE:
        return "this torch build has no Triton"
    try:
        x = torch.randn(4, 64, device=device, dtype=torch.float16)
        bias = torch.randn(64, device=device, dtype=torch.float16)
        got = kernels.gelu_tanh(x, bias, use_triton=True)
    except Exception as err:  # noqa: BLE001 - a missing compiler, an unsupported GPU: all mean "not here"
        return f"{type(err).__name__}: {str(err)[:300]}"
    if rel_l2(got, kernels.gelu_tanh_reference(x, bias)) > CHECK_REL_L2[torch.float16]:
        return "the compiled kernel differs from its torch reference"
    return None


def _flock_works(path: Path) -> bool:
    """Whether the folder's filesystem implements ``flock`` (network volumes may not)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except OSError as err:
        return err.errno not in _NO_FLOCK  # EWOULDBLOCK: held by a compiling worker, so flock works
    finally:
        os.close(fd)


class CompileLock:
    """The kernel cache's compile lock, taken off the model thread in short tries (module docstring).
    ``soft``: a marker file instead of ``flock`` (None: whichever the folder's filesystem allows)."""

    def __init__(self, folder: Path, *, wait_s: float | None = None, soft: bool | None = None,
                 lease_s: float = LEASE_S):
        self.folder = Path(folder)
        self.wait_s = LOCK_WAIT_S if wait_s is None else wait_s
        self.soft, self.lease_s = soft, lease_s
        self._lock: BaseFileLock | None = None

    def _make(self) -> BaseFileLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_NAME
        soft = not _flock_works(path) if self.soft is None else self.soft
        if soft:  # its own name: a flock holder's file must never pass for a marker
            return SoftFileLease(str(path) + ".marker", lease_duration=self.lease_s, thread_local=False)
        return FileLock(str(path), thread_local=False)

    def acquire(self) -> bool:
        """True once held; False after ``wait_s`` (this worker then compiles without it) or when the
        folder cannot hold a lock at all."""
        started = time.monotonic()
        try:
            self._lock = lock = self._make()
            while True:
                try:
                    lock.acquire(timeout=0)
                    return True
                except Timeout:
                    if time.monotonic() - started >= self.wait_s:
                        log.warning("the kernel compile lock in %s is still held after %.0f s; compiling without it "
                                    "(at worst the work is done twice)", self.folder, self.wait_s)
                        return False
                    time.sleep(LOCK_POLL_S)
        except OSError as err:
            log.warning("no kernel compile lock in %s (%s: %s); compiling without it", self.folder,
                        type(err).__name__, err)
            self._lock = None
            return False

    def release(self) -> None:
        if self._lock is not None and self._lock.is_locked:
            self._lock.release()


def fused_switch_task(runner: BucketedStepRunner, dtype: torch.dtype, device):
    """The model-thread task that compiles the fused kernels, checks them and switches."""

    def task() -> bool:
        started = time.perf_counter()
        if not kernels.TRITON_AVAILABLE and runner.use_triton is not False:
            log.warning("fused kernels not used: this torch build has no Triton; serving on the unfused step")
            return False
        varlen = attention_kind(True, device, dtype, runner.requested_varlen) == "varlen"
        kinds = ("fused", "fused_varlen") if varlen else ("fused",)
        try:
            warm_fused_kernels(runner.tr, dtype, device, runner.use_triton)
            errors = check_fast_paths(runner.tr, dtype, device, runner.use_triton, kinds=kinds)
        except Exception as err:  # noqa: BLE001 - a compiler, a launch, a missing C compiler: all mean "not here"
            log.warning("fused kernels not used: %s: %s; serving on the unfused step", type(err).__name__,
                        str(err)[:500])
            return False
        if not _agree(errors, dtype, "fused kernels"):
            return False
        runner.use_fused_kernels()
        log.info("fused kernels compiled and checked in %.2f s (rel. L2 vs unfused %s); switching",
                 time.perf_counter() - started, {k: f"{v:.1e}" for k, v in errors.items()})
        return True

    return task


def switch_tasks(runner: BucketedStepRunner, dtype: torch.dtype, device, cache_dir: Path | None,
                 *, fused: bool = True) -> list:
    """The background tasks of the module docstring, in order: plain callables run on the model
    thread, ``OffModelThread`` ones on the background thread."""
    tasks: list = [varlen_switch_task(runner, dtype, device)]
    if not fused:
        return tasks
    if cache_dir is None:
        return [*tasks, fused_switch_task(runner, dtype, device)]
    lock = CompileLock(cache_dir)
    return [*tasks, OffModelThread(lock.acquire), fused_switch_task(runner, dtype, device),
            OffModelThread(lock.release)]
