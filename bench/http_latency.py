#!/usr/bin/env python
"""Time to first and last byte of OpenAI's speech API (the HTTP face) beside the queue face's first audio.

    python bench/http_latency.py --out OUT.json [--runs 5] [--nfe 32] [--full] [--models DIR]

Why this exists: the HTTP face must add next to nothing to the model's own time to first audio.
This builds the worker as ``serve`` does (``service.build_worker``, local storage) on random weights
(the tiny models by default, ``--full`` for full-size F5TTS_v1_Base, which a GPU makes worth it),
then, for a text of about 20 s of audio:

* the queue face: a ``"stream": true`` job through ``make_handler(worker, streaming=True)``, the
  handler runpod calls; its first piece (``queue_first_audio_s``) and its result;
* the HTTP face: ``POST /v1/audio/speech`` (pcm and mp3) to the real app under uvicorn on
  127.0.0.1, read with httpx as it streams: first byte (``ttfb_s``), last byte (``ttlb_s``), and
  when the request's first model call ended (``first_call_end_s``, from the batcher's own model
  function, wrapped to note the time); ``overhead_ms`` is the first byte's lead over that end: what
  the server adds (the first chunk's encoding, the response's start, the loopback hop).

Each figure is the median of ``--runs`` after one warm-up run. Reproduce on any machine, GPU or
not: ``scripts/setup.sh --dev && .venv/bin/python bench/http_latency.py --out /tmp/http.json``
(add ``--full`` on a GPU).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# About 20 s of speech: ~320 characters at F5-TTS's planned rate.
TEXT = ("Serverless workers are billed by the second, so every second counts. A voice clone speaks new "
        "text in the voice of a short reference clip, and a listener hears the first words while the rest "
        "is still being made. That is why the first chunk is cut short: it is sampled alone, sent at once, "
        "and the longer chunks follow behind it without a gap.")
VOICE = "basic_ref_en.wav"


class CallClock:
    """The batcher's ``start_call``, unchanged, noting when each model call ends (its last step:
    the ``advance`` that returns the waveforms; a call set aside between steps ends later)."""

    def __init__(self, batcher):
        self.real = batcher._start_call
        self.ends: list[float] = []
        batcher._start_call = self

    def __call__(self, items, abandoned):
        return _TimedCall(self.real(items, abandoned), self.ends)


class _TimedCall:
    """A ``ModelCall`` passed through: the batcher's preemption still sees its steps left."""

    def __init__(self, call, ends: list[float]):
        self.call, self.ends = call, ends

    @property
    def steps_left(self) -> int:
        return self.call.steps_left

    def close(self) -> None:
        self.call.close()

    def advance(self, set_aside):
        waves = self.call.advance(set_aside)
        if waves is not None:
            self.ends.append(time.perf_counter())
        return waves


async def queue_run(handler, n: int, nfe: int) -> dict:
    job = {"id": f"queue-{n}", "input": {"text": TEXT, "local_voice": VOICE, "nfe_step": nfe, "seed": n,
                                         "stream": True, "return_base64": False}}
    started, first = time.perf_counter(), None
    async for item in handler(job):
        if "chunk" in item and first is None:
            first = time.perf_counter() - started
        elif "error" in item:
            raise RuntimeError(item["error"])
    return {"queue_first_audio_s": first, "queue_result_s": time.perf_counter() - started}


def http_run(client, base_url: str, clock: CallClock, fmt: str, n: int, nfe: int) -> dict:
    body = {"model": "tts-1", "input": TEXT, "voice": VOICE, "response_format": fmt, "nfe_step": nfe, "seed": n}
    calls_before = len(clock.ends)
    started, first, size = time.perf_counter(), None, 0
    with client.stream("POST", f"{base_url}/v1/audio/speech", json=body, timeout=600) as response:
        response.raise_for_status()
        for data in response.iter_raw():
            if first is None and data:
                first = time.perf_counter() - started
            size += len(data)
    last = time.perf_counter() - started
    first_call_end = clock.ends[calls_before] - started
    return {"format": fmt, "ttfb_s": first, "ttlb_s": last, "first_call_end_s": first_call_end,
            "overhead_ms": (first - first_call_end) * 1000, "bytes": size}


def start_server(worker):
    import uvicorn

    from f5worker.http.app import ServerState, make_app
    from tests.processes import free_port

    state = ServerState(worker.settings)
    state.ready(worker)
    server = uvicorn.Server(uvicorn.Config(make_app(state), host="127.0.0.1", port=free_port(), log_config=None,
                                           access_log=False, lifespan="off"))
    threading.Thread(target=server.run, name="uvicorn", daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return server


def median_of(runs: list[dict]) -> dict:
    keys = [k for k, v in runs[0].items() if isinstance(v, float)]
    return {k: round(statistics.median(r[k] for r in runs), 4) for k in keys}


def measure(worker, runs: int, nfe: int) -> dict:
    import httpx

    from f5worker.service import make_handler

    handler = make_handler(worker, streaming=True)
    queue = [asyncio.run(queue_run(handler, n, nfe)) for n in range(runs + 1)][1:]  # before the server's loop
    clock = CallClock(worker.batcher)
    server = start_server(worker)
    base_url = f"http://127.0.0.1:{server.config.port}"
    report = {"queue": median_of(queue), "queue_runs": queue}
    with httpx.Client(trust_env=False) as client:
        for fmt in ("pcm", "mp3"):
            done = [http_run(client, base_url, clock, fmt, n, nfe) for n in range(runs + 1)][1:]
            report[fmt] = median_of(done)
            report[f"{fmt}_runs"] = done
    server.should_exit = True
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--nfe", type=int, default=32, help="ODE steps per chunk (the worker's default is 32)")
    ap.add_argument("--full", action="store_true", help="full-size F5TTS_v1_Base random weights")
    ap.add_argument("--models", help="folder for the random model files (default: a temporary one)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from f5worker.settings import ENV_LOCAL_STORAGE_DIR, ENV_MODEL_ROOT, ENV_TMP_DIR, Settings, apply_cache_env

    root = Path(tempfile.mkdtemp(prefix="f5-http-latency-"))
    (root / "tmp").mkdir()
    try:
        from tests.random_models import write_model_set  # imports torch

        models = write_model_set(Path(args.models or root / "models-random"), full_size=args.full)
        env = {**os.environ, **models, ENV_MODEL_ROOT: str(root / "models"),
               ENV_LOCAL_STORAGE_DIR: str(root / "storage"), ENV_TMP_DIR: str(root / "tmp")}
        settings = Settings.from_env(env)
        apply_cache_env(settings)
        from f5worker.service import build_worker

        worker = build_worker(settings)
        report = {"text_chars": len(TEXT), "nfe_step": args.nfe, "runs": args.runs, "full_size": args.full,
                  "device": str(worker.engine.device), **measure(worker, args.runs, args.nfe)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("device", "queue", "pcm", "mp3")}))  # one line: the device run shows it
    return 0


if __name__ == "__main__":
    sys.exit(main())
