#!/usr/bin/env python
"""Stock f5-tts and the worker side by side, on random weights of the exact F5TTS_v1_Base architecture.

    python bench/bench.py --out DIR            # full size (GPU): writes DIR/bench.json, DIR/summary.md
    python bench/bench.py --out DIR --tiny     # shrunken model, fewer runs: a CPU smoke run (CI)

Why this module exists: the worker's speed, start-up and memory targets are claims about a GPU,
and the only fair yardstick is stock f5-tts on the same weights, inputs and GPU in the same run.
Compute does not depend on weight values, so random weights of the exact architecture time like
the real model. Both load the same files: stock through ``utils_infer.load_model`` /
``load_vocoder`` and ``preprocess_ref_audio_text`` + ``infer_process`` (what ``F5TTS.infer`` runs),
the worker through ``TTSEngine`` and its batcher.

What is measured (bench/RESULTS.md has the figures and the targets):

- cold start to ready, by phase, in fresh processes (bench/cold_start.py): stock, and the worker
  twice on one fresh model root, first with an empty Triton kernel cache, then with the one the
  first run left; when the background switch to the fused kernels landed and whether it did; a job
  arriving at ready against the steady state; peak reserved GPU memory from process start;
- in this process: agreement with stock (waveform rel. L2), batch-1 RTF text to waveform, and audio
  seconds per GPU second with N jobs in flight of equal and of mixed lengths, for the worker on its
  unfused graphed step and again after the switch to the fused kernels;
- time to first audio: stock's streaming path, and the worker's first chunk alone (``worker_s``).

The job is the device baseline's: a 5 s reference and a 165-byte text, about 10.5 s of audio.
Mixed lengths are N texts cut from one passage for 2 to 20 s of audio each. ``bench.json`` is
rewritten after every section, so a run stopped by a time limit keeps what it measured.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import builtins
import contextlib
import functools
import importlib.machinery
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REF_TEXT = "Some call me nature, others call me mother nature, and I have been here long."
GEN_TEXT = ("I don't really care what you call me. I have been a silent spectator, watching species "
            "evolve, empires rise and fall, and always remember, I am mighty and enduring.")
# About 20 s of audio: two copies of the 10.45 s bench text.
TTFA_TEXT = GEN_TEXT + " " + GEN_TEXT
TTFA_NOTE = ("a 20 s text, warm; worker: as a streamed job runs it (short first chunk sampled and vocoded "
             "alone, then the rest in one call); stock: infer_batch_process(streaming=True)")
# Mixed-length jobs are cut from this passage, word by word.
PASSAGE = (GEN_TEXT + " Respect me and I'll nurture you; ignore me and you shall face the consequences. "
           "Rivers carve the valleys, winds shape the mountains, and the oceans keep their own slow time, "
           "while every season returns to remind you how small and how lucky you are.")
SR = 24000
HOP = 256
REF_SECONDS = 5
MIXED_SECONDS = (2.0, 20.0)
CHILD_TIMEOUT_S = 300
# Agreement bounds: fp32 on the CPU agrees to summation order; fp16 on a GPU to rounding
# (tests/test_gpu.py's bound). A wrong mask or time step is O(1).
AGREEMENT_LIMIT = {"float32": 1e-4, "float16": 3e-2, "bfloat16": 3e-2}
TARGETS = {"cold_start_s": 5.0, "cold_start_over_torch_cuda_s": 2.0, "first_job_ratio": 1.5, "rtf_nfe32": 0.012,
           "audio_s_per_gpu_s": 110.0, "memory_vs_stock": 2.0}


def stub_training_imports() -> list[str]:
    """Stock ``from f5_tts.model import CFM`` imports the trainer (wandb, datasets). Where those are
    not installed (the GPU image), empty stand-ins let stock inference import; nothing calls them."""
    stubbed = []
    for name, attrs in (("wandb", {}), ("datasets", {"Dataset": object, "load_from_disk": None})):
        try:
            __import__(name)
        except ImportError:
            module = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)
            module.__dict__.update(attrs)
            sys.modules[name] = module
            stubbed.append(name)
    return stubbed


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, *args, **kw):
    sync()
    start = time.perf_counter()
    out = fn(*args, **kw)
    sync()
    return time.perf_counter() - start, out


@functools.lru_cache(maxsize=1)
def reference_clip():
    import numpy as np

    rng = np.random.default_rng(0)
    t = np.arange(REF_SECONDS * SR) / SR
    wave = 0.3 * np.sin(2 * np.pi * 180 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)) + 0.05 * rng.standard_normal(t.size)
    return (np.round(wave * 32767) / 32768).astype("float32")


def ref_path_for(folder) -> Path:
    return Path(folder) / "ref.wav"


def rel_l2(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


# --- the workloads --------------------------------------------------------------------------------

def audio_seconds_per_byte() -> float:
    """f5-tts's duration rule: generated frames = ref frames / ref text bytes x text bytes (the
    reference transcript gets ". " normalisation and a trailing space, 2 bytes here)."""
    ref_frames = REF_SECONDS * SR // HOP
    return ref_frames / (len(REF_TEXT.encode()) + 2) * HOP / SR


def text_for_seconds(seconds: float) -> str:
    """The shortest prefix of PASSAGE, in whole words, that asks for at least ``seconds`` of audio."""
    want = seconds / audio_seconds_per_byte()
    words = PASSAGE.split()
    for end in range(1, len(words) + 1):
        text = " ".join(words[:end])
        if len(text.encode()) >= want:
            return text
    raise ValueError(f"PASSAGE is too short for {seconds} s of audio")


def equal_texts(n: int) -> list[str]:
    return [GEN_TEXT] * n


def mixed_texts(n: int) -> list[str]:
    lo, hi = MIXED_SECONDS
    return [text_for_seconds(lo + (hi - lo) * i / max(1, n - 1)) for i in range(n)]


def worker_request(text: str, nfe: int, seed: int):
    from f5worker.jobs.plan import SynthesisRequest

    return SynthesisRequest(ref_audio=reference_clip(), ref_sr=SR, ref_text=REF_TEXT, gen_text=text, seed=seed,
                            nfe_step=nfe)


async def run_worker_jobs(engine, batcher, texts: list[str], nfe: int) -> list:
    """``len(texts)`` jobs in flight at once through the batcher, as the worker runs concurrent jobs."""
    from f5worker.jobs import plan as job_plan

    plans = [job_plan.plan(worker_request(text, nfe, seed)) for seed, text in enumerate(texts)]
    waves = await asyncio.gather(*(batcher.submit(plan.items) for plan in plans))
    return [job_plan.finish(plan, wave) for plan, wave in zip(plans, waves)]


@contextlib.contextmanager
def quiet_prints():
    """infer_process prints every chunk's text; stock's output stays out of the bench's."""
    real = builtins.print
    builtins.print = lambda *a, **k: None
    try:
        yield
    finally:
        builtins.print = real


class Stock:
    """Stock f5-tts 1.1.22's inference, as ``F5TTS.infer`` runs it, plus its batch and streaming forms."""

    def __init__(self, env, device: str, lap=None):
        lap = lap or (lambda name: None)
        stub_training_imports()
        import soundfile as sf
        import torch
        import yaml

        from f5_tts.infer import utils_infer as ui
        from f5_tts.model import DiT
        from f5_tts.model.utils import convert_char_to_pinyin, seed_everything

        from f5worker.settings import ENV_CKPT_FILE, ENV_MODEL_CONFIG, ENV_VOCAB_FILE, ENV_VOCODER_DIR

        lap("import_f5")
        arch = yaml.safe_load(Path(env[ENV_MODEL_CONFIG]).read_text())["model"]["arch"]
        with quiet_prints():
            self.model = ui.load_model(DiT, arch, env[ENV_CKPT_FILE], vocab_file=env[ENV_VOCAB_FILE], device=device)
            lap("load_model")
            self.vocoder = ui.load_vocoder("vocos", is_local=True, local_path=env[ENV_VOCODER_DIR], device=device)
        lap("load_vocoder")
        # stock reads the reference with torchaudio.load, which needs torchcodec + FFmpeg: the same PCM via soundfile
        ui.torchaudio.load = lambda p, *a, **k: (
            torch.from_numpy(sf.read(p, dtype="float32", always_2d=True)[0].T.copy()), sf.info(p).samplerate)
        self.ui, self.device, self.torch = ui, device, torch
        self.seed_everything, self.pinyin = seed_everything, convert_char_to_pinyin

    def reference(self, ref_path):
        with quiet_prints():
            return self.ui.preprocess_ref_audio_text(str(ref_path), REF_TEXT, show_info=lambda *a: None)

    def _infer(self, ref_path, text: str, nfe: int):
        # cached by the audio's hash after the first call; printing already silenced by the caller
        ref_file, ref_text = self.ui.preprocess_ref_audio_text(str(ref_path), REF_TEXT, show_info=lambda *a: None)
        wave, _, _ = self.ui.infer_process(ref_file, ref_text, text, self.model, self.vocoder,
                                           show_info=lambda *a: None, progress=None, nfe_step=nfe, device=self.device)
        return wave

    def job(self, ref_path, text: str, nfe: int, seed: int | None = None):
        with quiet_prints():
            if seed is not None:
                self.seed_everything(seed)
            return self._infer(ref_path, text, nfe)

    def concurrent(self, ref_path, texts: list[str], nfe: int) -> list:
        """One ``infer_process`` per text, all at once on threads: how stock runs several texts
        (infer_batch_process runs a text's chunks the same way), each a batch of one."""
        self.reference(ref_path)
        with quiet_prints(), ThreadPoolExecutor(max_workers=len(texts)) as pool:
            return list(pool.map(lambda text: self._infer(ref_path, text, nfe), texts))

    def batch_equal(self, ref_path, text: str, n: int, nfe: int) -> list:
        """``n`` copies of one text in one ``model.sample`` call and one vocoder call: stock's batch,
        which takes one duration for all rows (equal lengths only); infer_batch_process's arithmetic."""
        torch = self.torch
        ref_file, ref_text = self.reference(ref_path)
        audio, sr = self.ui.torchaudio.load(ref_file)
        rms = torch.sqrt(torch.mean(torch.square(audio)))
        if rms < 0.1:
            audio = audio * 0.1 / rms
        audio = audio.to(self.device)
        if len(ref_text[-1].encode("utf-8")) == 1:
            ref_text = ref_text + " "
        ref_frames = audio.shape[-1] // HOP
        duration = ref_frames + int(ref_frames / len(ref_text.encode()) * len(text.encode()))
        with torch.inference_mode():
            mel, _ = self.model.sample(cond=audio.repeat(n, 1), text=self.pinyin([ref_text + text]) * n,
                                       duration=duration, steps=nfe, cfg_strength=2.0, sway_sampling_coef=-1.0)
            waves = self.vocoder.decode(mel.to(torch.float32)[:, ref_frames:, :].permute(0, 2, 1))
            if rms < 0.1:
                waves = waves * rms / 0.1
        return list(waves.cpu().numpy())

    def first_audio_s(self, ref_path, text: str, nfe: int) -> float:
        """Seconds until stock's streaming path (infer_batch_process(streaming=True), as its socket
        server runs it) yields its first audio."""
        ref_file, ref_text = self.reference(ref_path)
        audio, sr = self.ui.torchaudio.load(ref_file)
        seconds = audio.shape[-1] / sr
        batches = self.ui.chunk_text(text, max_chars=int(len(ref_text.encode()) / seconds * (22 - seconds)))
        sync()
        start = time.perf_counter()
        stream = self.ui.infer_batch_process((audio, sr), ref_text, batches, self.model, self.vocoder, progress=None,
                                             nfe_step=nfe, device=self.device, streaming=True)
        next(stream)
        sync()
        elapsed = time.perf_counter() - start
        stream.close()
        return elapsed


# --- cold starts ------------------------------------------------------------------------------------

def cold_start(env: dict, path: str, out: Path, inflight: int, nfe: int, stop_at_ready=False,
               importtime=False) -> dict:
    """bench/cold_start.py in a fresh process (see there). With ``importtime``, also the ten
    costliest top-level imports (python -X importtime, seconds)."""
    env = {**os.environ, **env, "BENCH_SPAWN_T": repr(time.time())}
    flags = ["-X", "importtime"] if importtime else []
    cmd = [sys.executable, *flags, str(ROOT / "bench" / "cold_start.py"), path, "--inflight", str(inflight),
           "--nfe", str(nfe), "--ref-dir", str(out)] + (["--stop-at-ready"] if stop_at_ready else [])
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, cwd=ROOT)
    except subprocess.TimeoutExpired as err:
        return {"error": f"no answer in {CHILD_TIMEOUT_S} s", "stderr": str(err.stderr or "")[-2000:]}
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": (proc.stdout[-1500:] + proc.stderr[-2500:])}
    if importtime:
        top = []
        for line in proc.stderr.splitlines():
            parts = line.split("|")
            if line.startswith("import time:") and len(parts) == 3 and not parts[2].startswith("  "):
                try:
                    top.append((int(parts[1]) / 1e6, parts[2].strip()))
                except ValueError:
                    continue
        result["top_imports_s"] = {name: round(sec, 3) for sec, name in sorted(top, reverse=True)[:10]}
    return result


def memory_figures(cold: dict) -> dict:
    """Peak reserved GPU memory from process start, from the cold-start children, and per job."""
    out = {}
    for name, child in cold.items():
        peaks = child.get("peak_reserved_mib") or {}
        one, equal, n = peaks.get("one_job"), peaks.get("inflight_equal"), child.get("inflight_jobs")
        if one is None or equal is None:
            continue
        out[name] = {**peaks, "per_job_in_flight_mib": round(equal / n, 1),
                     "added_per_job_in_flight_mib": round((equal - one) / max(1, n - 1), 1)}
    return out


# --- in this process ---------------------------------------------------------------------------------

def median_run(fn, runs: int, warm: bool = True) -> dict:
    """Median wall time of ``fn`` (which returns waveforms) and the audio it made."""
    if warm:
        fn()
    times, waves = [], None
    for _ in range(runs):
        seconds, waves = timed(fn)
        times.append(seconds)
    audio_s = sum(len(w) for w in waves) / SR
    median = statistics.median(times)
    return {"median_s": median, "audio_s": audio_s, "times": times, "jobs": len(waves),
            "rtf": median / audio_s, "audio_s_per_gpu_s": audio_s / median}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", help="where bench.json and summary.md go")
    ap.add_argument("--summary", metavar="DIR", help="only print the table of DIR/bench.json (a run cut short)")
    ap.add_argument("--tiny", action="store_true", help="shrunken model, fewer runs: a CPU smoke test")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per batch-1 figure (half that in flight)")
    ap.add_argument("--inflight", type=int, default=16, help="jobs in flight for throughput and memory")
    ap.add_argument("--skip-cold", action="store_true")
    ap.add_argument("--models", help="where to write the random model files (default: OUT/models)")
    args = ap.parse_args(argv)
    if args.summary:
        print(table(json.loads((Path(args.summary) / "bench.json").read_text())))
        return 0
    if not args.out:
        ap.error("--out is required")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = 1 if args.tiny else args.runs
    runs_inflight = max(1, runs // 2)
    inflight = 4 if args.tiny else args.inflight
    nfes = [4] if args.tiny else [32, 16]
    nfe = nfes[0]
    # A fresh model root: its triton/ folder is the worker's kernel cache (empty for the first cold start)
    model_root = Path(tempfile.mkdtemp(prefix="f5bench-root-"))
    try:
        return run(args, out, runs, runs_inflight, inflight, nfes, nfe, model_root)
    finally:
        shutil.rmtree(model_root, ignore_errors=True)


@dataclasses.dataclass
class Bench:
    """One run's context, shared by its phases: the options, the figures so far (``res``) and what
    the phases build for the later ones (the model files, both paths, the stock waveforms)."""
    args: argparse.Namespace
    out: Path
    runs: int
    runs_inflight: int
    inflight: int
    nfes: list[int]
    nfe: int
    model_root: Path
    settings_env: dict
    device: str
    res: dict
    started: float = dataclasses.field(default_factory=time.perf_counter)
    env: dict | None = None
    ref_path: Path | None = None
    stock: Stock | None = None
    settings: Any = None
    engine: Any = None
    batcher: Any = None
    limit: float = 3e-2
    stock_waves: dict | None = None

    def save(self, section: str | None = None) -> None:
        """Rewrites bench.json, so that a run stopped by a time limit keeps what it measured."""
        if section:  # seconds since the run started, when each section ended (for time budgets)
            self.res.setdefault("section_end_s", {})[section] = round(time.perf_counter() - self.started, 1)
        (self.out / "bench.json").write_text(json.dumps(self.res, indent=1))


def run(args, out, runs, runs_inflight, inflight, nfes, nfe, model_root) -> int:
    """The bench's phases in order; each saves bench.json when it ends."""
    bench = start_run(args, out, runs, runs_inflight, inflight, nfes, nfe, model_root)
    write_inputs(bench)
    if not args.skip_cold:
        measure_cold_starts(bench)
    load_both_paths(bench)
    measure_agreement_and_stock_rtf(bench)
    measure_worker(bench, "worker_unfused")
    switch_to_fused(bench)
    measure_stock_in_flight(bench)
    measure_time_to_first_audio(bench)
    return verdict(bench)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip() or None
    except OSError:
        return None


def start_run(args, out, runs, runs_inflight, inflight, nfes, nfe, model_root) -> Bench:
    """The environment the worker reads, set before torch is imported, and the run's header figures."""
    from f5worker.settings import ENV_LOCAL_STORAGE_DIR, ENV_MODEL_ROOT, Settings, apply_cache_env

    # the worker's storage (unused by the bench) goes to the temp root too, not into the repository
    settings_env = {ENV_MODEL_ROOT: str(model_root), ENV_LOCAL_STORAGE_DIR: str(model_root / "storage")}
    apply_cache_env(Settings.from_env({**os.environ, **settings_env}))  # before torch: Triton's cache
    stubbed = stub_training_imports()

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    res: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                 "tiny": args.tiny, "stubbed_for_stock": stubbed, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                 "runs": runs, "runs_inflight": runs_inflight, "inflight_jobs": inflight, "targets": TARGETS}
    res["commit"] = git_commit()
    return Bench(args=args, out=out, runs=runs, runs_inflight=runs_inflight, inflight=inflight, nfes=nfes, nfe=nfe,
                 model_root=model_root, settings_env=settings_env, device=device, res=res)


def write_inputs(bench: Bench) -> None:
    """The random model files and the reference clip, which both paths read."""
    import soundfile as sf

    from tests.random_models import write_model_set

    args, res = bench.args, bench.res
    t = time.perf_counter()
    bench.env = write_model_set(Path(args.models) if args.models else bench.out / "models", full_size=not args.tiny)
    res["make_files_s"] = time.perf_counter() - t
    bench.ref_path = ref_path_for(bench.out)
    sf.write(str(bench.ref_path), reference_clip(), SR, subtype="PCM_16")
    res["mixed_texts_bytes"] = [len(text.encode()) for text in mixed_texts(bench.inflight)]


def measure_cold_starts(bench: Bench) -> None:
    """Fresh processes: the worker with an empty kernel cache, the same cache again, then stock."""
    res, inflight, nfe = bench.res, bench.inflight, bench.nfe
    cold = {}
    worker_env = {**bench.env, **bench.settings_env}
    for name, path, child_env in (("worker_empty_cache", "worker", worker_env),
                                  ("worker_warm_cache", "worker", worker_env), ("stock", "stock", bench.env)):
        cold[name] = cold_start(child_env, path, bench.out, inflight, nfe)
        cold[name]["inflight_jobs"] = inflight
        res["cold_start"] = cold
        bench.save(f"cold_{name}")
    triton = bench.model_root / "triton"
    res["kernel_cache_files"] = sum(1 for p in triton.rglob("*") if p.is_file()) if triton.is_dir() else 0
    if not bench.args.tiny:  # where the start's import time goes (the worker's own modules only, now)
        cold["worker_importtime"] = cold_start(worker_env, "worker", bench.out, inflight, nfe, stop_at_ready=True,
                                               importtime=True)
    res["memory"] = memory_figures(cold)
    bench.save("cold_starts")


def load_both_paths(bench: Bench) -> None:
    """Stock and the worker in this process, from the same files."""
    from f5worker.inference.batcher import Batcher
    from f5worker.inference.engine import TTSEngine
    from f5worker.jobs import plan as job_plan
    from f5worker.model.store import resolve_tts_files
    from f5worker.settings import Settings

    res, device = bench.res, bench.device
    bench.stock = Stock(bench.env, device)
    bench.settings = Settings.from_env({**bench.env, **bench.settings_env})
    files = resolve_tts_files(bench.settings)
    try:
        engine = TTSEngine.load(files, device=device, fast=True)
        job_plan.warm_up(engine)
    except Exception:  # report the fast path's failure and still measure the rest
        import traceback

        res["fast_path_error"] = traceback.format_exc()[-3000:]
        print(res["fast_path_error"], file=sys.stderr)
        engine = TTSEngine.load(files, device=device, fast=False)
    res["params"] = sum(p.numel() for p in engine.model.transformer.parameters())
    res["dtype"] = str(engine.dtype).removeprefix("torch.")
    bench.engine, bench.batcher = engine, Batcher(engine.start_call)
    bench.limit = AGREEMENT_LIMIT.get(res["dtype"], 3e-2)
    res["agreement_limit"] = bench.limit


def synth(bench: Bench, text: str, nfe: int, seed: int):
    from f5worker.jobs import plan as job_plan

    return job_plan.synthesize(bench.engine, worker_request(text, nfe, seed))


def agreement(bench: Bench) -> dict:
    """The worker's waveforms against stock's (same seed), and jobs batched together against each alone."""
    from f5worker.jobs import plan as job_plan

    engine = bench.engine
    figures = {f"nfe{n}_wave_rel_l2": rel_l2(synth(bench, GEN_TEXT, n, 1234), bench.stock_waves[n])
               for n in bench.nfes}
    texts = [GEN_TEXT, GEN_TEXT[:80], GEN_TEXT + " And then some more words.", GEN_TEXT[:40]]
    items = [it for i, text in enumerate(texts) for it in job_plan.plan(worker_request(text, bench.nfe, i)).items]
    together = engine.run_items(items)
    figures["batched_vs_alone_max_rel_l2"] = max(rel_l2(w, engine.run_items([it])[0])
                                                 for it, w in zip(items, together))
    return figures


def measure_agreement_and_stock_rtf(bench: Bench) -> None:
    """Stock against itself and the unfused worker against stock, then stock's batch-1 RTF."""
    stock, ref_path, nfes, res, inflight = bench.stock, bench.ref_path, bench.nfes, bench.res, bench.inflight
    bench.stock_waves = {n: stock.job(ref_path, GEN_TEXT, n, 1234) for n in nfes}
    res["agreement"] = {"stock_rerun": {f"nfe{n}_wave_rel_l2": rel_l2(stock.job(ref_path, GEN_TEXT, n, 1234),
                                                                      bench.stock_waves[n]) for n in nfes},
                        "unfused": agreement(bench)}
    res["rtf"] = {"stock": {}, "worker_unfused": {}}
    res["throughput"] = {"equal": {"how_stock": f"one model.sample batch of {inflight} and one vocoder call"},
                         "mixed": {"how_stock": f"{inflight} concurrent infer_process calls on threads (batch 1 "
                                                "each), as infer_batch_process runs a text's chunks"}}
    for n in nfes:
        res["rtf"]["stock"][f"nfe{n}"] = median_run(lambda n=n: [stock.job(ref_path, GEN_TEXT, n, 0)], bench.runs)
    bench.save("load_agreement_stock_rtf")


def measure_worker(bench: Bench, label: str) -> None:
    """The worker's batch-1 RTF, then N jobs in flight of equal and of mixed lengths, under ``label``."""
    res, engine, batcher = bench.res, bench.engine, bench.batcher
    for n in bench.nfes:
        res["rtf"][label][f"nfe{n}"] = median_run(lambda n=n: [synth(bench, GEN_TEXT, n, 0)], bench.runs)
        bench.save()
    for kind, texts in (("equal", equal_texts(bench.inflight)), ("mixed", mixed_texts(bench.inflight))):
        calls = len(batcher.calls)
        figure = median_run(lambda texts=texts: asyncio.run(run_worker_jobs(engine, batcher, texts, bench.nfe)),
                            bench.runs_inflight)
        figure["model_calls"] = batcher.calls[calls:]
        res["throughput"][kind][label] = figure
        bench.save(f"{label}_{kind}")


def switch_to_fused(bench: Bench) -> None:
    """The switch to the fused kernels, as the worker's background task makes it; the worker's
    agreement and figures again once it has switched."""
    from f5worker.inference.batcher import OffModelThread
    from f5worker.inference.fast import BucketedStepRunner
    from f5worker.inference.kernel_switch import switch_tasks

    res, engine, runner = bench.res, bench.engine, bench.engine.step_runner
    if isinstance(runner, BucketedStepRunner):
        def switch() -> list:  # the worker's background tasks, in order, on this thread
            return [task.run() if isinstance(task, OffModelThread) else task()
                    for task in switch_tasks(runner, engine.dtype, engine.device, bench.settings.kernel_cache)]

        seconds, results = timed(switch)
        switched = bool(results[2]) if len(results) > 2 else False  # varlen, lock, fused, unlock
        res["switch_in_bench"] = {"switched": switched, "varlen": bool(results[0]), "seconds": seconds,
                                  "kernel_cache": "warm" if not bench.args.skip_cold else "empty"}
        if switched:
            res["agreement"]["fused"] = agreement(bench)
            res["rtf"]["worker_fused"] = {}
            measure_worker(bench, "worker_fused")
            res["switch_in_bench"]["runner_fused"] = runner.fused
        res["switch_in_bench"]["level"] = runner.level  # "fused" unless a fault demoted it
    bench.save("switch_and_fused")


def measure_stock_in_flight(bench: Bench) -> None:
    """Stock with N jobs in flight: one batch of equal lengths, concurrent calls of mixed ones."""
    stock, ref_path, inflight, nfe = bench.stock, bench.ref_path, bench.inflight, bench.nfe
    throughput = bench.res["throughput"]
    throughput["equal"]["stock"] = median_run(lambda: stock.batch_equal(ref_path, GEN_TEXT, inflight, nfe),
                                              bench.runs_inflight)
    bench.save("stock_equal")
    throughput["mixed"]["stock"] = median_run(lambda: stock.concurrent(ref_path, mixed_texts(inflight), nfe),
                                              bench.runs_inflight, warm=False)
    bench.save("stock_mixed")


def worker_stream(bench: Bench) -> tuple[float, float]:
    """Seconds from submitting a streamed job to its first audio (the short first chunk alone), and
    to the whole file."""
    from f5worker.jobs import plan as job_plan

    engine = bench.engine
    request = dataclasses.replace(worker_request(TTFA_TEXT, bench.nfe, 0), short_first_chunk=True)
    sync()
    start = time.perf_counter()
    plan = job_plan.plan(request)
    engine.run_items(plan.items[:1])
    sync()
    first = time.perf_counter() - start
    if plan.items[1:]:
        engine.run_items(plan.items[1:])
    sync()
    return first, time.perf_counter() - start


def measure_time_to_first_audio(bench: Bench) -> None:
    """Stock's streaming path, and the worker's ("worker_s")."""
    worker_stream(bench)  # the buckets these lengths use, captured before the timed run
    first, whole = worker_stream(bench)
    bench.res["time_to_first_audio"] = {"stock_s": bench.stock.first_audio_s(bench.ref_path, TTFA_TEXT, bench.nfe),
                                        "worker_s": first, "worker_whole_s": whole, "note": TTFA_NOTE}
    bench.save("time_to_first_audio")


def verdict(bench: Bench) -> int:
    """The summary table, printed and written; exit status 1 if the worker disagrees with stock."""
    res, limit = bench.res, bench.limit
    summary = table(res)
    (bench.out / "summary.md").write_text(summary + "\n")
    print(summary)
    disagree = {f"{path}.{k}": v for path in ("unfused", "fused") for k, v in res["agreement"].get(path, {}).items()
                if not v < limit}
    if disagree:
        print(f"the worker's output differs from stock beyond {limit}: {disagree}", file=sys.stderr)
        return 1
    return 0


# --- the summary --------------------------------------------------------------------------------------

def _f(value, fmt="{:.3f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def table(res: dict) -> str:
    """The Markdown summary of a run's figures (of those measured, for a run cut short)."""
    lines = [f"device: {res['device']}, torch {res['torch']}, {res.get('params', 0):,} parameters, "
             f"{res.get('dtype')}, commit {res.get('commit')}", "",
             "| figure | stock f5-tts | worker | target |", "| --- | --- | --- | --- |"]
    for rows in (_cold_rows, _rtf_rows, _throughput_rows, _memory_rows, _agreement_rows, _ttfa_rows):
        lines += rows(res)
    return "\n".join(lines)


def _cold_rows(res: dict) -> list[str]:
    cold = res.get("cold_start", {})
    if not cold:
        return []
    stock_cold, empty, warm = cold.get("stock", {}), cold.get("worker_empty_cache", {}), cold.get("worker_warm_cache", {})
    torch_cuda = [c.get("import_torch", 0) + c.get("cuda_init", 0) for c in (empty, warm)]
    return [
        _row("cold start to ready, s (import torch + CUDA init)",
             f"{_f(stock_cold.get('to_ready'))} ({_f(stock_cold.get('import_torch', 0) + stock_cold.get('cuda_init', 0), '{:.2f}')})",
             f"empty cache {_f(empty.get('to_ready'))} ({torch_cuda[0]:.2f}), warm {_f(warm.get('to_ready'))} "
             f"({torch_cuda[1]:.2f})", f"≤ {TARGETS['cold_start_s']:g} and ≤ torch + CUDA + 2"),
        _row("worker start phases (warm cache), s", "", json.dumps(warm.get("worker_phases")), ""),
        _row("fused kernels switched, s after ready", "",
             f"empty cache {_f(empty.get('fused_switch_after_ready'), '{:.1f}')} (switched: {empty.get('fused_switched')}), "
             f"warm {_f(warm.get('fused_switch_after_ready'), '{:.1f}')} (switched: {warm.get('fused_switched')})", ""),
        _row("first job at ready / after preparation, s (ratio)",
             f"{_f(stock_cold.get('first_job'))} / {_f(stock_cold.get('job_after_preparation'))} "
             f"({_f(stock_cold.get('first_job_ratio'), '{:.2f}')})",
             f"empty {_f(empty.get('first_job'))} / {_f(empty.get('job_after_preparation'))} "
             f"({_f(empty.get('first_job_ratio'), '{:.2f}')}), warm {_f(warm.get('first_job'))} / "
             f"{_f(warm.get('job_after_preparation'))} ({_f(warm.get('first_job_ratio'), '{:.2f}')})",
             f"≤ {TARGETS['first_job_ratio']:g}×"),
        # a job arriving while the background task compiles the kernels waits for it
        _row("second job, straight after the first, s", _f(stock_cold.get("second_job")),
             f"empty {_f(empty.get('second_job'))}, warm {_f(warm.get('second_job'))}", ""),
    ]


def _rtf_rows(res: dict) -> list[str]:
    rtf = res.get("rtf", {})
    rows = []
    for n in [int(k.removeprefix("nfe")) for k in rtf.get("stock", {})]:
        s = rtf.get("stock", {}).get(f"nfe{n}", {})
        u, f = rtf.get("worker_unfused", {}).get(f"nfe{n}", {}), rtf.get("worker_fused", {}).get(f"nfe{n}", {})
        rows.append(_row(f"RTF batch 1, {n} NFE, text to waveform", _f(s.get("rtf"), "{:.4f}"),
                         f"unfused {_f(u.get('rtf'), '{:.4f}')}, fused {_f(f.get('rtf'), '{:.4f}')}",
                         f"{TARGETS['rtf_nfe32']}" if n == 32 else ""))
    return rows


def _throughput_rows(res: dict) -> list[str]:
    return [_row(f"audio-s per GPU-s, {res['inflight_jobs']} in flight, {kind} lengths",
                 f"{_f(tp.get('stock', {}).get('audio_s_per_gpu_s'), '{:.1f}')} ({tp['how_stock']})",
                 f"unfused {_f(tp.get('worker_unfused', {}).get('audio_s_per_gpu_s'), '{:.1f}')}, fused "
                 f"{_f(tp.get('worker_fused', {}).get('audio_s_per_gpu_s'), '{:.1f}')}",
                 f"≥ {TARGETS['audio_s_per_gpu_s']:g}")
            for kind, tp in res.get("throughput", {}).items()]


def _memory_rows(res: dict) -> list[str]:
    mem = res.get("memory", {})
    return [_row(f"peak reserved GPU MiB from process start, {label}", _f(mem.get("stock", {}).get(key), "{:.0f}"),
                 f"empty cache {_f(mem.get('worker_empty_cache', {}).get(key), '{:.0f}')}, "
                 f"warm {_f(mem.get('worker_warm_cache', {}).get(key), '{:.0f}')}",
                 f"≤ {TARGETS['memory_vs_stock']:g}× stock")
            for key, label in (("one_job", "1 job"), ("inflight_equal", "N in flight, equal"),
                               ("inflight_mixed", "N in flight, mixed"), ("per_job_in_flight_mib", "per job in flight"))]


def _agreement_rows(res: dict) -> list[str]:
    agreement = res.get("agreement", {})
    return [_row(f"agreement, waveform rel. L2 vs stock, {path}", "",
                 ", ".join(f"{k.removesuffix('_rel_l2')} {v:.1e}" for k, v in agreement[path].items()),
                 f"< {res['agreement_limit']}")
            for path in ("unfused", "fused") if path in agreement]


def _ttfa_rows(res: dict) -> list[str]:
    ttfa = res.get("time_to_first_audio", {})
    return [_row("20 s text: time to first audio, s", _f(ttfa.get("stock_s")), _f(ttfa.get("worker_s")),
                 "≤ 0.1 on an H100"),
            _row("20 s text: time to the whole file, streamed, s", "", _f(ttfa.get("worker_whole_s")), "")]


if __name__ == "__main__":
    sys.exit(main())
