"""One cold start in a fresh process, timed by phase, then what the same process does next.

    python bench/cold_start.py worker|stock [--inflight N] [--nfe N] [--stop-at-ready]

Why this module exists: start-up time and peak GPU memory must be measured from the start of a
process (the bench's own process has both models loaded and has run everything before), so
bench.py runs this file as a child with the model files' variables set (for the worker also
F5_MODEL_ROOT, whose triton/ folder is the Triton kernel cache) and reads the one JSON line it
prints last. Times are seconds; ``interpreter`` counts from the moment the parent spawned it.

What the child measures, in this order (each later figure includes what came before it):

1. phases up to ready (the worker through ``service.start_worker``, as ``serve`` starts it; stock
   through ``load_model`` and ``load_vocoder``) and peak reserved GPU memory at ready;
2. a job arriving at ready, a second one straight after (it may wait behind a background task),
   then, once the worker's background preparation has finished, one more job: the steady state;
3. for the worker, when each background step finished (graph captures, the fused kernels compiled,
   checked and switched), from the worker's own log records, and whether the switch happened;
4. peak reserved GPU memory from process start (``torch.cuda.max_memory_reserved``, CUDA graph
   pools included) after one job at a time, after N jobs in flight of equal length and after N of
   mixed lengths (stock: one ``model.sample`` batch of N, and N concurrent ``infer_process`` calls).
"""
import argparse
import asyncio
import json
import logging
import os
import sys
import threading
import time

SPAWNED = float(os.environ.get("BENCH_SPAWN_T", time.time()))
stamps: dict = {"interpreter": round(time.time() - SPAWNED, 3)}
_mark = [time.time()]

PREPARATION_WAIT_S = 240  # an empty kernel cache compiles here; the compile lock is waited for up to 240 s, off the model thread


def lap(name: str) -> float:
    """Seconds since the previous lap, recorded under ``name``; returns the current time."""
    now = time.time()
    stamps[name] = round(now - _mark[0], 3)
    _mark[0] = now
    return now


class Timeline(logging.Handler):
    """The f5worker log records of the background preparation, with their times."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def first(self, prefix: str) -> logging.LogRecord | None:
        return next((r for r in self.records if isinstance(r.msg, str) and r.msg.startswith(prefix)), None)


def peak_reserved_mib(torch) -> float | None:
    return round(torch.cuda.max_memory_reserved() / 2**20, 1) if torch.cuda.is_available() else None


def timed_s(torch, fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.time()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return round(time.time() - start, 3)


def to_ready(names) -> float:
    return round(sum(v for k, v in stamps.items() if k in names), 3)


def run_worker(args) -> None:
    torch, worker, timeline, ready = start_worker_timed()
    if args.stop_at_ready:
        return
    time_worker_jobs(torch, worker, args.nfe, ready)
    read_background_log(timeline, worker.engine, ready)
    stamps["peak_reserved_mib"]["one_job"] = peak_reserved_mib(torch)
    time_worker_inflight(torch, worker, args)


def start_worker_timed():
    """The worker's start to ready, by phase, as ``serve`` starts it; returns torch, the worker,
    the log timeline and the time it was ready."""
    from f5worker.settings import Settings, apply_cache_env

    settings = Settings.from_env()
    apply_cache_env(settings)  # before torch: Triton's cache goes under the model root
    lap("settings")
    import torch

    lap("import_torch")
    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
    lap("cuda_init")
    timeline = Timeline()
    logger = logging.getLogger("f5worker")
    logger.setLevel(logging.INFO)
    logger.addHandler(timeline)
    from f5worker.service import start_worker

    phases: dict = {}
    worker, error, _ = start_worker(settings, phases)
    if error:
        raise SystemExit(str(error))
    ready = lap("start_worker")
    stamps["worker_phases"] = phases
    # start_worker beyond build_worker's phases: waiting for runpod's import, the thread
    stamps["start_worker_other"] = round(stamps["start_worker"] - sum(phases.values()), 3)
    stamps["to_ready"] = to_ready(("interpreter", "settings", "import_torch", "cuda_init", "start_worker"))
    stamps["peak_reserved_mib"] = {"ready": peak_reserved_mib(torch)}
    return torch, worker, timeline, ready


def time_worker_jobs(torch, worker, nfe: int, ready: float) -> None:
    """A job at ready, one straight after, and one once the background preparation has finished."""
    from bench.bench import equal_texts, worker_request
    from f5worker.jobs.plan import synthesize

    engine, batcher = worker.engine, worker.batcher
    preparation_done: list[float] = []
    if batcher.preparing is not None:
        watcher = threading.Thread(target=lambda: (batcher.preparing.join(), preparation_done.append(time.time())),
                                   daemon=True)
        watcher.start()

    def job(seed):  # through the model thread, as the batcher runs jobs
        return batcher.executor.submit(synthesize, engine, worker_request(equal_texts(1)[0], nfe, seed)).result()

    stamps["first_job"] = timed_s(torch, lambda: job(0))
    stamps["second_job"] = timed_s(torch, lambda: job(1))
    if batcher.preparing is not None:
        batcher.preparing.join(PREPARATION_WAIT_S)
        stamps["preparation_finished"] = not batcher.preparing.is_alive()
        watcher.join(1)
    stamps["job_after_preparation"] = timed_s(torch, lambda: job(2))
    stamps["first_job_ratio"] = round(stamps["first_job"] / stamps["job_after_preparation"], 2)
    stamps["preparation_done_after_ready"] = round(preparation_done[0] - ready, 3) if preparation_done else None


def read_background_log(timeline: Timeline, engine, ready: float) -> None:
    """When the background steps finished, from the worker's log records, and whether it switched."""
    stamps["fused_switched"] = bool(getattr(engine.step_runner, "fused", False))
    compiled = timeline.first("fused kernels compiled and checked")
    warmed = timeline.first("fused DiT kernels ready")
    refused = timeline.first("fused kernels not used")
    stamps["fused_switch_after_ready"] = round(compiled.created - ready, 3) if compiled else None
    stamps["fused_compile_and_check_s"] = round(float(compiled.args[0]), 3) if compiled else None
    stamps["fused_compiled_after_ready"] = round(warmed.created - ready, 3) if warmed else None
    stamps["fused_refused_because"] = refused.getMessage()[:300] if refused else None
    stamps["background_log"] = [[round(r.created - ready, 3), r.getMessage()[:160]] for r in timeline.records
                                if r.created >= ready][:40]


def time_worker_inflight(torch, worker, args) -> None:
    """N jobs in flight of equal, then of mixed lengths, and peak reserved memory after each."""
    from bench.bench import equal_texts, mixed_texts, run_worker_jobs

    engine, batcher = worker.engine, worker.batcher

    def inflight(texts):
        return lambda: asyncio.run(run_worker_jobs(engine, batcher, texts, args.nfe))

    calls = len(batcher.calls)
    stamps["inflight_equal_first_s"] = timed_s(torch, inflight(equal_texts(args.inflight)))
    stamps["peak_reserved_mib"]["inflight_equal"] = peak_reserved_mib(torch)
    stamps["inflight_mixed_first_s"] = timed_s(torch, inflight(mixed_texts(args.inflight)))
    stamps["peak_reserved_mib"]["inflight_mixed"] = peak_reserved_mib(torch)
    stamps["inflight_model_calls"] = batcher.calls[calls:]


def run_stock(args) -> None:
    from bench.bench import Stock, equal_texts, mixed_texts, ref_path_for

    lap("bench_helpers")  # not part of stock's start
    import torch

    lap("import_torch")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.zeros(1, device=device)
        torch.cuda.synchronize()
    lap("cuda_init")
    stock = Stock(os.environ, device, lap=lap)
    stamps["to_ready"] = to_ready(("interpreter", "import_torch", "cuda_init", "import_f5", "load_model",
                                   "load_vocoder"))
    stamps["peak_reserved_mib"] = {"ready": peak_reserved_mib(torch)}
    if args.stop_at_ready:
        return
    ref_path = ref_path_for(args.ref_dir)
    text = equal_texts(1)[0]
    for name, seed in (("first_job", 0), ("second_job", 1), ("job_after_preparation", 2)):
        stamps[name] = timed_s(torch, lambda seed=seed: stock.job(ref_path, text, args.nfe, seed))
    stamps["first_job_ratio"] = round(stamps["first_job"] / stamps["job_after_preparation"], 2)
    stamps["peak_reserved_mib"]["one_job"] = peak_reserved_mib(torch)
    stamps["inflight_equal_first_s"] = timed_s(torch, lambda: stock.batch_equal(ref_path, text, args.inflight, args.nfe))
    stamps["peak_reserved_mib"]["inflight_equal"] = peak_reserved_mib(torch)
    texts = mixed_texts(args.inflight)
    stamps["inflight_mixed_first_s"] = timed_s(torch, lambda: stock.concurrent(ref_path, texts, args.nfe))
    stamps["peak_reserved_mib"]["inflight_mixed"] = peak_reserved_mib(torch)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path", choices=("worker", "stock"))
    ap.add_argument("--inflight", type=int, default=16)
    ap.add_argument("--nfe", type=int, default=32)
    ap.add_argument("--ref-dir", default=".", help="where the bench wrote ref.wav")
    ap.add_argument("--stop-at-ready", action="store_true")
    args = ap.parse_args()
    sys.argv = sys.argv[:1]  # runpod parses argv on import
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lap("start")
    stamps["path"] = args.path
    (run_worker if args.path == "worker" else run_stock)(args)
    print(json.dumps(stamps))


if __name__ == "__main__":
    main()
