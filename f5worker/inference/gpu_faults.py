"""What kind of fault an exception is: one the GPU does not recover from, or one of the fast path's.

Why this module exists: two layers must tell faults apart by the same rule. The handler
(``f5worker.service``) asks RunPod to replace the worker after a CUDA out-of-memory error or a
CUDA device fault; the fast path (``f5worker.inference.fast``) demotes itself one level (fused -> unfused
graphed -> eager) after any other fault of its own: a graph capture that failed (including the
caching allocator's ``use_count > 0`` assert on a pool whose graphs are all gone), a Triton compile
or launch error, a flash-attention call the build does not support. Those leave the GPU usable:
the same items run again on the safer level.

torch is never imported here (the handler's import stays torch-free): an error can only be a
torch error once torch is loaded.
"""
from __future__ import annotations

import re
import sys

# Faults that leave the GPU unusable for the rest of the process (torch's wording, stable for years).
_CUDA_FAULT = re.compile(r"CUDA error|CUBLAS_STATUS_|CUDNN_STATUS_|cuDNN error|CUDA driver")
# Faults of a stream capture: CUDA invalidates the capture, not the context (cudaErrorStreamCapture*,
# "operation not permitted when stream is capturing", "... due to a previous error during capture"),
# and the allocator's assert on a graph pool that no live graph references.
_CAPTURE_FAULT = re.compile(r"captur|StreamCapture|use_count > 0|CUDACachingAllocator", re.IGNORECASE)


def _chain(err: BaseException | None):
    """``err`` and the errors it was raised from or during, each once."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _text(err: BaseException) -> str:
    return str(err) if isinstance(err, RuntimeError) else ""


def is_capture_fault(err: BaseException) -> bool:
    """True when ``err`` (or an error in its chain) is a failed CUDA graph capture."""
    return any(_CAPTURE_FAULT.search(_text(e)) for e in _chain(err))


def gpu_fault(err: BaseException) -> tuple[str, BaseException] | None:
    """``("memory" or "device", the CUDA error)`` when ``err``, or an error it was raised from, is
    a CUDA out-of-memory error or a CUDA device fault; None otherwise."""
    torch = sys.modules.get("torch")
    out_of_memory = torch.cuda.OutOfMemoryError if torch is not None else ()
    accelerator = getattr(torch, "AcceleratorError", ()) if torch is not None else ()
    for e in _chain(err):
        text = _text(e)
        if isinstance(e, out_of_memory) or "CUDA out of memory" in text or "CUDA error: out of memory" in text:
            return "memory", e
        if isinstance(e, accelerator) or _CUDA_FAULT.search(text):
            return "device", e
    return None


def fast_path_fault(err: BaseException) -> bool:
    """True when the fast path should demote itself and run the items again one level down: any
    ordinary error it raised, a failed capture included, but never out-of-memory or a device fault
    (those replace the worker), nor a stop (KeyboardInterrupt, SystemExit)."""
    if not isinstance(err, Exception):
        return False
    if is_capture_fault(err):
        return True
    return gpu_fault(err) is None
