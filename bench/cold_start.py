"""One cold start in a fresh process, timed by phase: ``python bench/cold_start.py worker|stock``.

Run by bench.py with the model files' variables set. Prints one JSON line: seconds from process
start (as the parent measured it) for each phase, then the first and a warm job's time.
"""
import json
import os
import sys
import time

SPAWNED = float(os.environ.get("BENCH_SPAWN_T", time.time()))
stamps = {"interpreter": time.time() - SPAWNED}


def lap(name, since=[time.time()]):  # noqa: B006 - a running mark
    now = time.time()
    stamps[name] = round(now - since[0], 3)
    since[0] = now


def main(path: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.argv = sys.argv[:1]  # runpod parses argv on import
    if path == "worker":
        from f5worker.settings import Settings, apply_cache_env

        settings = Settings.from_env()
        apply_cache_env(settings)
    lap("start")
    import torch

    lap("import_torch")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.zeros(1, device=device)
        torch.cuda.synchronize()
    lap("cuda_init")
    from bench.bench import GEN_TEXT, REF_TEXT, SR, reference_clip, stub_training_imports

    ref = reference_clip()
    if path == "worker":
        from f5worker.job_plan import SynthesisRequest
        from f5worker.service import start_worker

        phases = {}
        worker, error, _ = start_worker(settings, phases)
        if error:
            raise SystemExit(str(error))
        stamps["worker_phases"] = phases
        lap("ready")

        def job(seed):  # through the model thread, as the batcher runs jobs
            request = SynthesisRequest(ref_audio=ref, ref_sr=SR, ref_text=REF_TEXT, gen_text=GEN_TEXT, seed=seed)
            return worker.batcher.executor.submit(worker.engine.synthesize, request).result()
    else:
        stub_training_imports()
        import yaml
        from pathlib import Path

        from f5_tts.infer import utils_infer as ui
        from f5_tts.model import DiT

        lap("import_f5")
        arch = yaml.safe_load(Path(os.environ["F5_MODEL_CONFIG"]).read_text())["model"]["arch"]
        model = ui.load_model(DiT, arch, os.environ["F5_CKPT_FILE"], vocab_file=os.environ["F5_VOCAB_FILE"], device=device)
        lap("load_model")
        vocoder = ui.load_vocoder("vocos", is_local=True, local_path=os.environ["F5_VOCODER_DIR"], device=device)
        lap("ready")
        ui.torchaudio.load = lambda p, *a, **k: (torch.from_numpy(ref)[None], SR)

        def job(seed):
            return ui.infer_process("ref.wav", REF_TEXT + " ", GEN_TEXT, model, vocoder, show_info=lambda *a: None,
                                    progress=None, device=device)[0]
    for name in ("first_job", "warm_job", "job_after_preparation"):
        if name == "job_after_preparation":
            if path != "worker" or worker.batcher.preparing is None:
                continue
            start = time.time()
            worker.batcher.preparing.join()
            stamps["preparation_left_after_warm_job"] = round(time.time() - start, 3)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.time()
        job(0)
        if device == "cuda":
            torch.cuda.synchronize()
        stamps[name] = round(time.time() - start, 3)
    stamps["to_ready_total"] = round(sum(v for k, v in stamps.items()
                                         if k in ("interpreter", "start", "import_torch", "cuda_init", "import_f5",
                                                      "load_model", "ready")), 3)
    print(json.dumps(stamps))


if __name__ == "__main__":
    main(sys.argv[1])
