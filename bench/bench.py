#!/usr/bin/env python
"""Stock f5-tts and the worker's inference path, side by side in one process, on random weights.

    python bench/bench.py --out DIR            # full-size F5TTS_v1_Base architecture (GPU)
    python bench/bench.py --out DIR --tiny     # shrunken model: a CPU smoke run (CI)

Compute does not depend on weight values, so random weights of the exact architecture time like
the real model. Both paths load the same files: stock through ``utils_infer.load_model`` /
``load_vocoder`` and ``infer_process`` (the path ``F5TTS.infer`` takes), the worker through
``TTSEngine`` and its batcher. The job is the device baseline's: a 5 s reference, a 165-byte text,
about 10.5 s of audio. Prints a Markdown table and writes ``bench.json`` into ``--out``.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.machinery
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REF_TEXT = "Some call me nature, others call me mother nature, and I have been here long."
GEN_TEXT = ("I don't really care what you call me. I have been a silent spectator, watching species "
            "evolve, empires rise and fall, and always remember, I am mighty and enduring.")
SR = 24000


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


def reference_clip():
    import numpy as np

    rng = np.random.default_rng(0)
    t = np.arange(5 * SR) / SR
    wave = 0.3 * np.sin(2 * np.pi * 180 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)) + 0.05 * rng.standard_normal(t.size)
    return (np.round(wave * 32767) / 32768).astype("float32")


def rel_l2(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def cold_start(env: dict, path: str, importtime: bool = False) -> dict:
    """A fresh process: ``bench/cold_start.py`` times each phase up to a served first job. With
    ``importtime``, also the ten costliest top-level imports (python -X importtime, seconds)."""
    env = {**os.environ, **env, "BENCH_SPAWN_T": repr(time.time())}
    flags = ["-X", "importtime"] if importtime else []
    proc = subprocess.run([sys.executable, *flags, str(ROOT / "bench" / "cold_start.py"), path], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except Exception:
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="shrunken model, fewer runs: a CPU smoke test")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--skip-cold", action="store_true")
    ap.add_argument("--models", help="where to write the random model files (default: OUT/models)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stubbed = stub_training_imports()

    import soundfile as sf
    import torch

    from f5worker.random_models import write_model_set
    from f5worker.settings import Settings

    device = "cuda" if torch.cuda.is_available() else "cpu"
    res: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                 "tiny": args.tiny, "stubbed_for_stock": stubbed,
                 "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        res["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip() or None
    except OSError:
        res["commit"] = None
    runs = 1 if args.tiny else args.runs
    nfes = [4] if args.tiny else [32, 16]
    batch_sizes = [1, 2] if args.tiny else [1, 4, 8, 16]

    t = time.perf_counter()
    env = write_model_set(Path(args.models) if args.models else out / "models", full_size=not args.tiny)
    res["make_files_s"] = time.perf_counter() - t
    ref = reference_clip()
    ref_path = out / "ref.wav"
    sf.write(str(ref_path), ref, SR, subtype="PCM_16")

    if not args.skip_cold:
        res["cold_start_worker"] = cold_start(env, "worker")
        res["cold_start_stock"] = cold_start(env, "stock")
        res["cold_start_worker_importtime"] = cold_start(env, "worker", importtime=True)

    # --- both paths, same files -----------------------------------------------------------------
    import yaml

    from f5_tts.infer import utils_infer as ui
    from f5_tts.model import DiT
    from f5_tts.model.utils import seed_everything
    from f5worker.batcher import Batcher
    from f5worker.engine import TTSEngine
    from f5worker.job_plan import SynthesisRequest
    from f5worker.model_store import resolve_tts_files

    arch = yaml.safe_load(Path(env["F5_MODEL_CONFIG"]).read_text())["model"]["arch"]
    stock_model = ui.load_model(DiT, arch, env["F5_CKPT_FILE"], vocab_file=env["F5_VOCAB_FILE"], device=device)
    stock_vocoder = ui.load_vocoder("vocos", is_local=True, local_path=env["F5_VOCODER_DIR"], device=device)
    files = resolve_tts_files(Settings.from_env(env))
    try:
        engine = TTSEngine.load(files, device=device, fast=True)
        engine.warm_up()
    except Exception:  # report the fast path's failure and still measure the rest
        import traceback

        res["fast_path_error"] = traceback.format_exc()[-3000:]
        print(res["fast_path_error"], file=sys.stderr)
        engine = TTSEngine.load(files, device=device, fast=False)
    res["params"] = sum(p.numel() for p in engine.model.parameters())
    res["dtype"] = str(engine.dtype)

    # stock reads the reference with torchaudio.load, which needs torchcodec + FFmpeg: same PCM via soundfile
    ui.torchaudio.load = lambda p, *a, **k: (torch.from_numpy(sf.read(p, dtype="float32", always_2d=True)[0].T.copy()),
                                             sf.info(p).samplerate)
    quiet = lambda *a, **k: None  # noqa: E731
    import builtins

    real_print = builtins.print
    ref_file, ref_text = ui.preprocess_ref_audio_text(str(ref_path), REF_TEXT, show_info=quiet)

    def stock_job(nfe, seed):
        builtins.print = quiet  # infer_process prints every chunk
        try:
            seed_everything(seed)
            wave, _, _ = ui.infer_process(ref_file, ref_text, GEN_TEXT, stock_model, stock_vocoder, show_info=quiet,
                                          progress=None, nfe_step=nfe, device=device)
        finally:
            builtins.print = real_print
        return wave

    def request(nfe, seed, text=GEN_TEXT):
        return SynthesisRequest(ref_audio=ref, ref_sr=SR, ref_text=REF_TEXT, gen_text=text, seed=seed, nfe_step=nfe)

    # agreement: same weights, inputs, seed
    agree = {}
    for nfe in nfes:
        stock_wave = stock_job(nfe, 1234)
        worker_wave = engine.synthesize(request(nfe, 1234))
        agree[f"nfe{nfe}_wave_rel_l2"] = rel_l2(worker_wave, stock_wave)
        agree[f"nfe{nfe}_stock_rerun_rel_l2"] = rel_l2(stock_job(nfe, 1234), stock_wave)
    texts = [GEN_TEXT, GEN_TEXT[:80], GEN_TEXT + " And then some more words.", GEN_TEXT[:40]]
    items = [it for i, txt in enumerate(texts) for it in engine.plan(request(nfes[0], i, txt)).items]
    together = engine.run_items(items)
    agree["batched_vs_alone_max_rel_l2"] = max(rel_l2(w, engine.run_items([it])[0]) for it, w in zip(items, together))
    res["agreement"] = agree

    # batch 1 RTF, whole job (text to waveform)
    for nfe in nfes:
        for name, fn in (("stock", lambda s: stock_job(nfe, s)), ("worker", lambda s: engine.synthesize(request(nfe, s)))):
            fn(0)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            times, audio_s = [], None
            for i in range(runs):
                seconds, wave = timed(fn, i)
                times.append(seconds)
                audio_s = len(wave) / SR
            entry = {"median_s": statistics.median(times), "audio_s": audio_s,
                     "rtf": statistics.median(times) / audio_s, "times": times}
            if device == "cuda":
                entry["peak_job_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                entry["peak_total_mib"] = torch.cuda.max_memory_allocated() / 2**20
            res[f"{name}_nfe{nfe}_b1"] = entry

    # throughput: N jobs in flight
    nfe = nfes[0]
    ref_t = torch.from_numpy(ref)[None].to(device)
    from f5_tts.model.utils import convert_char_to_pinyin

    ref_frames = ref_t.shape[-1] // 256
    frames = ref_frames + int(ref_frames / len(REF_TEXT.encode()) * len(GEN_TEXT.encode()))
    pinyin = convert_char_to_pinyin([REF_TEXT + " " + GEN_TEXT])
    gen_audio_s = (frames - ref_frames) * 256 / SR
    batcher = Batcher(engine.run_items)

    async def in_flight(n):
        plans = [engine.plan(request(nfe, i)) for i in range(n)]
        await asyncio.gather(*(batcher.submit(p.items) for p in plans))
        return plans

    for n in batch_sizes:
        with torch.inference_mode():
            stock_call = lambda: stock_model.sample(cond=ref_t.repeat(n, 1), text=pinyin * n, duration=frames,  # noqa: E731
                                                    steps=nfe, cfg_strength=2.0, sway_sampling_coef=-1.0)
            stock_call()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            stock_s = statistics.median(timed(stock_call)[0] for _ in range(max(1, runs // 2)))
            stock_peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else None
        asyncio.run(in_flight(n))  # first use of this bucket
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        calls_before = len(batcher.calls)
        seconds_before = len(batcher.call_seconds)
        worker_times = []
        audio_total = 0.0
        for _ in range(max(1, runs // 2)):
            seconds, plans = timed(lambda: asyncio.run(in_flight(n)))
            worker_times.append(seconds)
        worker_s = statistics.median(worker_times)
        audio_total = sum(p.items[0].duration - p.items[0].ref_frames for p in plans) * 256 / SR
        worker_peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else None
        res[f"inflight_{n}"] = {
            "stock_sample_s": stock_s, "stock_audio_s_per_gpu_s": n * gen_audio_s / stock_s,
            "worker_s": worker_s, "worker_audio_s_per_gpu_s": audio_total / worker_s,
            "worker_model_calls": batcher.calls[calls_before:],
            # model calls only (DiT + vocoder), comparable to stock's model.sample figure
            "worker_model_audio_s_per_gpu_s": audio_total * len(worker_times) / sum(batcher.call_seconds[seconds_before:]),
            "stock_peak_mib_per_job": stock_peak / n if stock_peak is not None else None,
            "worker_peak_mib_per_job": worker_peak / n if worker_peak is not None else None}

    (out / "bench.json").write_text(json.dumps(res, indent=1))
    print(table(res, nfes, batch_sizes))
    print(json.dumps(res))
    # fp32 on the CPU agrees to summation order; fp16 on a GPU to rounding (tests/test_gpu.py's bound)
    limit = 1e-4 if engine.dtype == torch.float32 else 3e-2
    disagree = {k: v for k, v in res["agreement"].items() if "stock_rerun" not in k and not v < limit}
    if disagree:
        print(f"the worker's output differs from stock beyond {limit}: {disagree}", file=sys.stderr)
        return 1
    return 0


def table(res, nfes, batch_sizes) -> str:
    lines = [f"device: {res['device']}, torch {res['torch']}, {res['params']:,} parameters, {res['dtype']}",
             "", "| figure | stock f5-tts | worker |", "| --- | --- | --- |"]
    for nfe in nfes:
        s, w = res[f"stock_nfe{nfe}_b1"], res[f"worker_nfe{nfe}_b1"]
        lines.append(f"| RTF, batch 1, {nfe} NFE | {s['rtf']:.4f} ({s['median_s']:.3f} s) | {w['rtf']:.4f} ({w['median_s']:.3f} s) |")
        if "peak_job_mib" in s:
            lines.append(f"| peak GPU MiB for that job | {s['peak_job_mib']:.0f} | {w['peak_job_mib']:.0f} |")
    for n in batch_sizes:
        r = res[f"inflight_{n}"]
        lines.append(f"| audio-s per GPU-s, {n} in flight | {r['stock_audio_s_per_gpu_s']:.1f} (model.sample) | "
                     f"{r['worker_audio_s_per_gpu_s']:.1f} whole jobs, {r['worker_model_audio_s_per_gpu_s']:.1f} "
                     f"model calls {r['worker_model_calls']} |")
    for key in ("cold_start_stock", "cold_start_worker", "cold_start_worker_importtime"):
        if key in res:
            lines.append(f"| {key} | {json.dumps(res[key])} | |")
    lines.append(f"| agreement | {json.dumps(res['agreement'])} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
