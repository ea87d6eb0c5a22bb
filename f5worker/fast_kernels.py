"""Switching the fast path to its fused kernels and variable-length attention once they are proven
on this GPU, never on the start path or a job's.

Why this module exists: Triton compiles each fused kernel on its first launch (seconds, the first
time on a GPU kind and torch version), so compiling at start would break the cold-start target
and compiling inside a job would stall it. The worker therefore serves on the unfused graphed step
from the start; this module's task then runs once, on the model thread while it is idle (queued
after the single-job graph captures: a job arriving meanwhile waits for this one task at most):

1. compile the fused kernels with Triton's cache on the model volume (``TRITON_CACHE_DIR``, set by
   ``settings.apply_cache_env``) under a file lock, so the workers of an endpoint compile once per
   GPU kind and torch version and later ones load the compiled kernels from the volume;
2. check, on this GPU and these weights, that the fused step and variable-length attention give
   what the unfused masked step gives on a padded batch;
3. only then switch the step runner (between integrations), or log why not and keep serving on the
   unfused path.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from f5worker import kernels
from f5worker.attention import attention_kind
from f5worker.fast import BucketedStepRunner, euler_integrate, warm_fused_kernels

log = logging.getLogger(__name__)

LOCK_NAME = ".f5worker-compile.lock"
LOCK_TIMEOUT_S = 300  # another worker compiling the same kernels; after it, ours load from the cache
CHECK_LENGTHS = (96, 61, 30)  # a padded batch: three items of different lengths in one bucket
CHECK_STEPS = 2
# fp16 rounding of a different summation order is ~1e-3; a wrong kernel is O(1).
CHECK_REL_L2 = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def rel_l2(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.float(), expected.float()
    return float((got - expected).norm() / expected.norm().clamp_min(1e-12))


@torch.inference_mode()
def check_fast_paths(transformer, dtype: torch.dtype, device, use_triton=None) -> dict[str, float]:
    """Rel. L2 of the fused step and of variable-length attention (each alone and together)
    against the unfused masked step, integrated on a padded batch with the loaded weights."""
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
        out = euler_integrate(transformer, y, cond, text, mask, t, CHECK_STEPS, 2.0, attention, fused, use_triton)
        return out * mask[..., None]

    expected = run("masked", False)
    return {"fused": rel_l2(run("masked", True), expected), "varlen": rel_l2(run(varlen, False), expected),
            "fused_varlen": rel_l2(run(varlen, True), expected)}


def switch_task(runner: BucketedStepRunner, dtype: torch.dtype, device, cache_dir: Path | None):
    """The model-thread task that compiles, checks and switches (see the module docstring)."""

    def task() -> bool:
        started = time.perf_counter()
        if not kernels.TRITON_AVAILABLE and runner.use_triton is not False:
            log.warning("fused kernels not used: this torch build has no Triton; serving on the unfused step")
            return False
        try:
            if cache_dir is not None:
                Path(cache_dir).mkdir(parents=True, exist_ok=True)
                with FileLock(str(Path(cache_dir) / LOCK_NAME), timeout=LOCK_TIMEOUT_S):
                    warm_fused_kernels(runner.tr, dtype, device, runner.use_triton)
            else:
                warm_fused_kernels(runner.tr, dtype, device, runner.use_triton)
            errors = check_fast_paths(runner.tr, dtype, device, runner.use_triton)
        except (Timeout, OSError, RuntimeError, ValueError) as err:
            log.warning("fused kernels not used: %s: %s; serving on the unfused step", type(err).__name__, err)
            return False
        bound = CHECK_REL_L2.get(dtype, 1e-2)
        if any(not error <= bound for error in errors.values()):  # NaN counts as a failure
            log.warning("fused kernels not used: on this GPU they differ from the unfused step (rel. L2 %s, "
                        "bound %g); serving on the unfused step", {k: f"{v:.2e}" for k, v in errors.items()}, bound)
            return False
        runner.use_fused_kernels()
        runner.use_varlen_attention(None)  # where torch's flash kernel runs it
        log.info("fused kernels compiled and checked in %.2f s (rel. L2 vs unfused %s); switching",
                 time.perf_counter() - started, {k: f"{v:.1e}" for k, v in errors.items()})
        return True

    return task
