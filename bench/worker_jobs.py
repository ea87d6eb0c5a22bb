"""Jobs through the whole worker while its fast path switches: every one must succeed.

    python bench/worker_jobs.py --models DIR --out OUT.json [--jobs 8] [--chapter CHARS] [--tiny]

Why this module exists: the fast path changes under live traffic (graphs captured while idle,
variable-length attention and the fused kernels switched on by background tasks, graphs dropped
and re-captured), and the GPU review found a switch that would have failed every later job. This
builds the worker as ``serve`` does (``service.build_worker``: random full-size F5TTS_v1_Base
weights, local storage), sends ``--jobs`` concurrent TTS jobs through the real handler right at
ready (while the background tasks run), waits for the tasks, sends as many again, and records each
result, the runner's level and what was switched. With ``--chapter`` one job of that many
characters follows (a chapter-length job: its seconds, and from them how many characters fit the
default 600 s job timeout at this speed). Exit status 1 if any job failed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "Serverless workers are billed by the second, so every second counts.",
         "A short one.",
         "Voice cloning takes a reference clip and its transcript, then speaks new text in that voice."]


def worker_env(models: dict[str, str], root: Path) -> dict[str, str]:
    from f5worker.settings import ENV_LOCAL_STORAGE_DIR, ENV_MODEL_ROOT, ENV_TMP_DIR

    return {**os.environ, **models, ENV_MODEL_ROOT: str(root / "models"),
            ENV_LOCAL_STORAGE_DIR: str(root / "storage"), ENV_TMP_DIR: str(root / "tmp")}


async def round_of_jobs(handler, name: str, count: int) -> list[dict]:
    async def one(i: int) -> dict:
        started = time.perf_counter()
        result = await handler({"id": f"{name}-{i}", "input": {
            "text": TEXTS[i % len(TEXTS)], "local_voice": "basic_ref_en.wav", "seed": i, "return_base64": False}})
        return {"job": f"{name}-{i}", "ok": "error" not in result, "error": result.get("error"),
                "seconds": round(time.perf_counter() - started, 3), "duration": result.get("duration")}

    return list(await asyncio.gather(*(one(i) for i in range(count))))


def chapter_text(chars: int) -> str:
    """Prose of at most ``chars`` characters, ending at a sentence."""
    sentences, size = [], 0
    while True:
        sentence = f"{TEXTS[len(sentences) % len(TEXTS)]} That was line {len(sentences)} of the chapter."
        if size + len(sentence) + 1 > chars:
            return " ".join(sentences)
        sentences.append(sentence)
        size += len(sentence) + 1


async def chapter_job(handler, chars: int) -> dict:
    text = chapter_text(chars)
    started = time.perf_counter()
    result = await handler({"id": "chapter", "input": {"text": text, "local_voice": "basic_ref_en.wav", "seed": 1,
                                                       "return_base64": False}})
    seconds = time.perf_counter() - started
    return {"job": "chapter", "ok": "error" not in result, "error": result.get("error"), "characters": len(text),
            "seconds": round(seconds, 3), "duration": result.get("duration"), "chunks": result.get("chunks"),
            "characters_in_600_s": int(len(text) / seconds * 600)}  # derived: this job's speed held for 600 s


def runner_state(worker) -> dict:
    runner = worker.engine.step_runner
    return {"level": getattr(runner, "level", "stock eager"), "fused": getattr(runner, "fused", None),
            "varlen": getattr(runner, "varlen", None), "graphs": len(getattr(runner, "graphs", {}))}


async def run(worker, jobs: int, chapter: int = 0) -> dict:
    from f5worker.service import make_handler

    handler = make_handler(worker)
    report = {"at_ready": runner_state(worker)}
    report["jobs_at_ready"] = await round_of_jobs(handler, "ready", jobs)
    preparing = worker.batcher.preparing
    waited = time.perf_counter()
    if preparing is not None:
        await asyncio.get_running_loop().run_in_executor(None, preparing.join, 600)
    report["background_seconds_after_first_round"] = round(time.perf_counter() - waited, 2)
    report["after_background"] = runner_state(worker)
    report["jobs_after_background"] = await round_of_jobs(handler, "after", jobs)
    if chapter:
        report["chapter"] = await chapter_job(handler, chapter)
    report["end"] = runner_state(worker)
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", required=True, help="folder for the random model files (written if missing)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--chapter", type=int, default=0, help="then one job of this many characters")
    ap.add_argument("--tiny", action="store_true", help="shrunken model: a CPU smoke test")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from f5worker.settings import Settings, apply_cache_env

    root = Path(tempfile.mkdtemp(prefix="f5-worker-jobs-"))
    (root / "tmp").mkdir()
    from tests.random_models import write_model_set  # imports torch: after the cache variables

    models_dir = Path(args.models) / ("tiny" if args.tiny else "full")
    marker = models_dir / "env.json"
    if marker.exists():
        models = json.loads(marker.read_text())
    else:
        models = write_model_set(models_dir, full_size=not args.tiny)
        marker.write_text(json.dumps(models))
    settings = Settings.from_env(worker_env(models, root))
    apply_cache_env(settings)
    from f5worker.service import build_worker

    phases: dict = {}
    try:
        worker = build_worker(settings, phases)
        report = {"phases": phases, **asyncio.run(run(worker, args.jobs, args.chapter))}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    jobs = report["jobs_at_ready"] + report["jobs_after_background"] + ([report["chapter"]] if args.chapter else [])
    report["failed"] = [j for j in jobs if not j["ok"]]
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({"jobs": len(jobs), "failed": len(report["failed"]), "at_ready": report["at_ready"],
                      "end": report["end"], "chapter": report.get("chapter")}))
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
