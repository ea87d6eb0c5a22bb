#!/usr/bin/env python
"""Soak: many jobs (valid, invalid, uploads good and bad) through runpod's local API server.

    python bench/soak.py --jobs 1000 --record     # the full soak; figures into tests/RELIABILITY.md
    python bench/soak.py --jobs 60                # a short one (tests/test_reliability_soak.py runs this)

Why this exists: a worker must survive a long stream of mixed jobs without a job failing that
should not, without files piling up, and without its memory creeping up. This starts
``runpod-handler.py --rp_serve_api`` as a subprocess on tiny random models (no GPU, no model hub)
with local storage, serves reference clips from a loopback HTTP server, and sends the jobs with
``POST /runsync`` from a few client threads at once (so the batcher shares model calls). The job
mix is fixed by ``--seed``. It reports:

* unintended failures: a valid job that did not complete with its WAV in storage as reported (or
  an upload whose voice is missing), or an invalid one that did not fail with one sentence;
* files left: anything in the worker's temp folder at the end, and half-written files in storage;
* resident memory (VmRSS of the server and its children) after the warm-up jobs (the first half) and at the end,
  and the growth between the two.

Exit status 0 only when there are no unintended failures, no files left and growth under 5 %.
"""
from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import soundfile as sf  # noqa: E402

from tests.random_models import write_model_set  # noqa: E402
from f5worker.settings import (ENV_ALLOW_PRIVATE_URLS, ENV_ASR_MODEL, ENV_BAKED_MODEL_DIR,  # noqa: E402
                               ENV_LOCAL_STORAGE_DIR, ENV_TMP_DIR, ENV_VOLUME_PATH)
from f5worker.jobs.inputs import MAX_TEXT_CHARS  # noqa: E402
from tests.fixtures_models import speechlike  # noqa: E402
from tests.fixtures_whisper import write_tiny_whisper  # noqa: E402
from tests.processes import clean_env, local_session, start_api_server, stop, wait_api_ready  # noqa: E402
from tests.reliability_report import provenance, table, write_section  # noqa: E402

READY_TIMEOUT_S = 180
JOB_TIMEOUT_S = 120
MAX_GROWTH_PERCENT = 5.0
SR = 24000
TEXTS = ["Hello there, this is a soak test.", "The quick brown fox jumps over the lazy dog.",
         "今天天气很好，我们去公园散步。", "สวัสดีครับ ยินดีที่ได้รู้จัก", "Привет, как дела?", "Ça va très bien, merci.",
         "Numbers like 42 and 3.14 are read aloud.", "One. Two. Three. Four. Five."]
INVALID = [
    ({"text": "Too few steps.", "local_voice": "basic_ref_en.wav", "nfe_step": 0}, "'nfe_step' must be at least 1."),
    ({"text": "Unknown field.", "local_voice": "basic_ref_en.wav", "volume": 3}, "Unknown input field 'volume'."),
    ({"text": "Wrong type.", "local_voice": "basic_ref_en.wav", "seed": "7"}, "'seed' must be an integer."),
    ({"text": "Bad voice.", "local_voice": "../etc/passwd.wav"}, "'local_voice' must be a file name"),
    ({"text": "Nobody.", "local_voice": "nobody-here.wav"}, "Voice 'nobody-here.wav' was not found"),
    ({"text": "a" * (MAX_TEXT_CHARS + 1), "local_voice": "basic_ref_en.wav"}, "'text' is too long"),
    ({"text": "   ", "local_voice": "basic_ref_en.wav"}, "'text' must not be empty."),
    ({"endpoint": "delete", "voice_name": "x.wav"}, "Unknown endpoint"),
    ({"endpoint": "upload", "voice_file_url": "ftp://127.0.0.1/x.wav", "voice_name": "x.wav"},
     "voice_file_url must be an http or https URL."),
]
BAD_UPLOADS = [("notaudio.txt", "The voice file is not decodable audio"), ("short.wav", "The voice must be between"),
               ("missing.wav", "Downloading the voice file failed: the server answered HTTP 404.")]
VOICE_POOL = [f"soak-{k}.wav" for k in range(5)]


# --- the pieces ---------------------------------------------------------------------------------------
def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` and all its descendants, in KiB (0 for a process that is gone)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{current}/status").read_text()
            total += int(re.search(r"^VmRSS:\s+(\d+)", status, re.M).group(1))
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return total


@dataclass
class Server:
    base_url: str
    proc: subprocess.Popen
    tmp_dir: Path
    storage_dir: Path
    log_path: Path


@contextlib.contextmanager
def api_server(folder: Path, worker_env: dict[str, str]) -> Iterator[Server]:
    """``runpod-handler.py --rp_serve_api`` on 127.0.0.1 with local storage under ``folder``."""
    volume = folder / "volume"
    tmp_dir, storage_dir = volume / "jobtmp", volume / "storage"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    env = clean_env({**worker_env, **{
        ENV_VOLUME_PATH: str(volume), ENV_TMP_DIR: str(tmp_dir), ENV_LOCAL_STORAGE_DIR: str(storage_dir),
        ENV_BAKED_MODEL_DIR: str(volume / "no-baked-models"), ENV_ALLOW_PRIVATE_URLS: "true"}})
    log_path = folder / "server.log"
    proc, base_url = start_api_server(env, log_path)
    server = Server(base_url, proc, tmp_dir, storage_dir, log_path)
    try:
        why = wait_api_ready(base_url, proc, READY_TIMEOUT_S)
        if why:
            raise RuntimeError(f"the API server did not start ({why}); log: {log_path}")
        yield server
    finally:
        stop(proc)


@contextlib.contextmanager
def clip_server(root: Path) -> Iterator[str]:
    """A loopback HTTP server for the reference clips; yields its base URL."""
    root.mkdir(parents=True, exist_ok=True)
    for k in range(3):
        sf.write(str(root / f"clip{k}.wav"), speechlike(2.0 + k, seed=k), SR, subtype="PCM_16")
    sf.write(str(root / "short.wav"), speechlike(0.5, seed=9), SR, subtype="PCM_16")
    (root / "notaudio.txt").write_text("not audio\n" * 100)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             lambda *a, **kw: Quiet(*a, directory=str(root), **kw))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def job_mix(count: int, clips_url: str, seed: int) -> list[tuple[str, dict, str]]:
    """(kind, input, expected) for each job: ``expected`` is "ok" or the start of the error sentence.
    The first jobs upload every pooled voice, so later TTS jobs may use them."""
    rng = random.Random(seed)
    jobs = [("upload", {"endpoint": "upload", "voice_file_url": f"{clips_url}/clip{k % 3}.wav", "voice_name": name,
                        "ref_text": f"Soak voice number {k}."}, "ok") for k, name in enumerate(VOICE_POOL)]
    while len(jobs) < count:
        roll = rng.random()
        if roll < 0.55:
            voice = rng.choice(["basic_ref_en.wav", "basic_ref_zh.wav"] + VOICE_POOL)
            jobs.append(("tts", {"text": rng.choice(TEXTS), "local_voice": voice, "nfe_step": rng.randint(1, 3),
                                 "seed": rng.randint(0, 2**31 - 1), "speed": rng.choice([0.8, 1.0, 1.3])}, "ok"))
        elif roll < 0.80:
            job, expected = rng.choice(INVALID)
            jobs.append(("invalid", job, expected))
        elif roll < 0.95:
            name = rng.choice(VOICE_POOL)
            jobs.append(("upload", {"endpoint": "upload", "voice_file_url": f"{clips_url}/clip{rng.randint(0, 2)}.wav",
                                    "voice_name": name, "ref_text": f"Soak words {uuid.uuid4().hex[:6]}."}, "ok"))
        else:
            path, expected = rng.choice(BAD_UPLOADS)
            jobs.append(("bad upload", {"endpoint": "upload", "voice_file_url": f"{clips_url}/{path}",
                                        "voice_name": rng.choice(VOICE_POOL)}, expected))
    return jobs[:count]


def judge(answer: dict, kind: str, expected: str, server: Server) -> str | None:
    """None when the job ended as it should, else why not."""
    if expected != "ok":
        error = answer.get("error")
        if answer.get("status") != "FAILED" or not isinstance(error, str):
            return f"{kind}: expected a failure, got {answer.get('status')}"
        if not error.startswith(expected) or "\n" in error or not error.endswith("."):
            return f"{kind}: unexpected error sentence {error!r}"
        return None
    if answer.get("status") != "COMPLETED":
        return f"{kind}: {answer.get('status')} {answer.get('error')!r}"
    output = answer.get("output") or {}
    if kind == "tts":
        path = Path(url2pathname(unquote(urlsplit(output.get("audio_url", "")).path)))
        try:
            info = sf.info(str(path))
        except Exception:
            return "tts: completed but its WAV is missing or unreadable"
        if abs(info.frames / info.samplerate - output.get("duration", -1)) > 1 / SR + 0.0005:
            return "tts: completed but its WAV is not as long as reported"
    elif not (server.storage_dir / (output.get("voice_key") or "voices/?")).is_file():
        return "upload: completed but the voice is not in storage"
    return None


@dataclass
class Tally:
    """What the soak has seen so far: jobs by kind, why each bad one went wrong, resident memory."""
    server: Server
    failures: list[str] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)
    samples: list[tuple[int, int]] = field(default_factory=list)  # (jobs done, RSS KiB)
    done: int = 0

    def record(self, future, kind: str, expected: str) -> None:
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        try:
            why = judge(future.result(), kind, expected, self.server)
        except Exception as exc:  # a dropped connection, a timeout: the job was lost
            why = f"{kind}: {type(exc).__name__}"
        if why:
            self.failures.append(why)
        self.done += 1
        if self.done % 10 == 0:
            self.samples.append((self.done, rss_kib(self.server.proc.pid)))


def send(session, base_url: str, job: dict) -> dict:
    response = session.post(f"{base_url}/runsync", json={"input": job}, timeout=JOB_TIMEOUT_S)
    if response.status_code != 200:
        return {"status": f"HTTP {response.status_code}"}
    return response.json()


def send_all(mix: list[tuple[str, dict, str]], warm_up: int, concurrency: int, tally: Tally, session) -> int:
    """Sends every job, ``concurrency`` at a time, judging each; returns the resident memory (KiB)
    once the warm-up jobs have all finished."""
    server, baseline = tally.server, 0
    with ThreadPoolExecutor(concurrency) as pool:
        # the pooled voices' uploads first (a TTS job sent beside them could ask for a voice not
        # stored yet: a race of the soak, not a failure of the worker), then the rest of the
        # warm-up, all finished before the baseline is read
        pooled = len(VOICE_POOL)
        for index, batch in enumerate((mix[:pooled], mix[pooled:warm_up], mix[warm_up:])):
            futures = {pool.submit(send, session, server.base_url, job): (kind, expected)
                       for kind, job, expected in batch}
            for future in as_completed(futures):
                tally.record(future, *futures[future])
            if index == 1:  # the warm-up done
                baseline = rss_kib(server.proc.pid)
    return baseline


def files_left(server: Server) -> list[str]:
    """Anything in the worker's temp folder, and half-written (dot) files in storage."""
    left = sorted(p.name for p in server.tmp_dir.iterdir())
    return left + sorted(str(p.relative_to(server.storage_dir)) for p in server.storage_dir.rglob(".*") if p.is_file())


def run_soak(jobs: int, folder: Path, worker_env: dict[str, str], concurrency: int = 4, seed: int = 0) -> dict:
    """Run the soak; returns its figures (see the module docstring)."""
    # Warm-up: the first half of the jobs. Every kind of job, and enough text lengths that
    # per-shape caches (oneDNN's kernels on the CPU, the allocator's arenas) have filled; they are
    # bounded, so growth over the second half would be a leak. Measured on the tiny models: resident
    # memory climbs by about 5 % (40 MiB) over the first 200 jobs whatever the voice cache's size
    # (0 or 32), then stays flat; a warm-up of 50 put a 200-job soak at 4.85 % and 5.07 % on two
    # runs of one commit.
    warm_up = max(100, jobs // 2)
    started = time.monotonic()
    with clip_server(folder / "clips") as clips_url, api_server(folder / "server", worker_env) as server:
        ready_s = time.monotonic() - started
        mix = job_mix(jobs, clips_url, seed)
        tally, session = Tally(server), local_session()
        soak_started = time.monotonic()
        baseline = send_all(mix, warm_up, concurrency, tally, session)
        soak_s = time.monotonic() - soak_started
        final = rss_kib(server.proc.pid)
        tally.samples.append((tally.done, final))
        left = files_left(server)
        alive = server.proc.poll() is None
    return {
        "jobs": jobs, "concurrency": concurrency, "seed": seed, "kinds": tally.kinds, "warm_up_jobs": warm_up,
        **memory_and_problems(tally, left, baseline, final),
        "server_alive_at_end": alive, "ready_s": round(ready_s, 1), "soak_s": round(soak_s, 1),
        "jobs_per_s": round(jobs / soak_s, 2) if soak_s else None,
    }


def memory_and_problems(tally: Tally, left: list[str], baseline: int, final: int) -> dict:
    """The failures, the files left and resident memory, in the figures' order."""
    return {
        "unintended_failures": len(tally.failures), "failure_examples": sorted(set(tally.failures))[:10],
        "files_left": len(left), "files_left_examples": left[:10],
        "rss_after_warm_up_mib": round(baseline / 1024, 1), "rss_final_mib": round(final / 1024, 1),
        "rss_peak_mib": round(max(rss for _, rss in tally.samples) / 1024, 1),
        "rss_growth_percent": round((final - baseline) / baseline * 100, 2) if baseline else None,
        "rss_mib_every_10_jobs": [round(rss / 1024, 1) for _, rss in tally.samples],
    }


def passed(figures: dict) -> bool:
    return (figures["unintended_failures"] == 0 and figures["files_left"] == 0 and figures["server_alive_at_end"]
            and figures["rss_growth_percent"] is not None and figures["rss_growth_percent"] < MAX_GROWTH_PERCENT)


def report(figures: dict, command: str, title: str) -> str:
    """The figures as a RELIABILITY.md section."""
    rows = [["jobs (" + ", ".join(f"{v} {k}" for k, v in sorted(figures["kinds"].items())) + ")", figures["jobs"]],
            ["client threads", figures["concurrency"]],
            ["unintended failures (must be 0)", figures["unintended_failures"]],
            ["files left (must be 0)", figures["files_left"]],
            [f"resident memory after {figures['warm_up_jobs']} warm-up jobs", f"{figures['rss_after_warm_up_mib']} MiB"],
            ["resident memory at the end (peak)", f"{figures['rss_final_mib']} MiB ({figures['rss_peak_mib']} MiB)"],
            [f"growth after warm-up (must be under {MAX_GROWTH_PERCENT:g} %)", f"{figures['rss_growth_percent']} %"],
            ["server still up at the end", "yes" if figures["server_alive_at_end"] else "NO"],
            ["server start to ready / soak time", f"{figures['ready_s']} s / {figures['soak_s']} s "
                                                  f"({figures['jobs_per_s']} jobs/s, tiny models on the CPU)"]]
    examples = figures["failure_examples"] + figures["files_left_examples"]
    return "\n\n".join([f"## {title}", provenance(command), table(["figure", "value"], rows)]
                       + ([f"First problems: {', '.join(f'`{e}`' for e in examples)}"] if examples else []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="work folder (default: a fresh temporary one, removed after)")
    parser.add_argument("--record", action="store_true", help="write the figures into tests/RELIABILITY.md")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        folder = args.out or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
        folder.mkdir(parents=True, exist_ok=True)
        worker_env = {**write_model_set(folder / "models"),
                      ENV_ASR_MODEL: str(write_tiny_whisper(folder / "whisper"))}
        figures = run_soak(args.jobs, folder, worker_env, args.concurrency, args.seed)
    print(json.dumps(figures, indent=2))
    if args.record:
        command = f"python bench/soak.py --jobs {args.jobs} --concurrency {args.concurrency} --seed {args.seed} --record"
        write_section("soak-full", report(figures, command, f"Soak: {args.jobs} jobs through the local API server"))
    return 0 if passed(figures) else 1


if __name__ == "__main__":
    sys.exit(main())
