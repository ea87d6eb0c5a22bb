"""Process start to worker ready, by phase, on whatever device the machine has.

Why this module exists: start-up is the serverless worker's cost on every scale-up, and comparing
two commits' start on the same machine (with or without a GPU) shows what a change did to it.

    python bench/start_phases.py REPO MODELS_DIR

REPO is a checkout of this project (pass an older commit's worktree to compare), MODELS_DIR a model
set written by ``tests.random_models.write_model_set`` (full size for real figures). Storage is
local, in a fresh temp folder. Prints one JSON line: seconds from process start to ready, and the
worker's own start-up phases. Used for the CPU start-up figures in bench/RESULTS.md.
"""
import json
import os
import sys
import tempfile
import time

# The spawning shell passes its clock (BENCH_SPAWN_T) so the interpreter's own start counts too.
SPAWNED = float(os.environ.get("BENCH_SPAWN_T", time.time()))


def main(repo: str, models: str) -> None:
    sys.path.insert(0, repo)
    sys.argv = sys.argv[:1]  # runpod parses argv on import
    volume = tempfile.mkdtemp()
    os.makedirs(os.path.join(volume, "tmp"))
    from f5worker.settings import (ENV_BAKED_MODEL_DIR, ENV_CKPT_FILE, ENV_MODEL_CONFIG, ENV_TMP_DIR, ENV_VOCODER_DIR,
                                   ENV_VOLUME_PATH, Settings, apply_cache_env)

    env = {**os.environ, ENV_CKPT_FILE: os.path.join(models, "model.safetensors"),
           ENV_MODEL_CONFIG: os.path.join(models, "model.yaml"), ENV_VOCODER_DIR: os.path.join(models, "vocos"),
           ENV_VOLUME_PATH: volume, ENV_TMP_DIR: os.path.join(volume, "tmp"),
           ENV_BAKED_MODEL_DIR: os.path.join(volume, "none")}

    settings = Settings.from_env(env)
    apply_cache_env(settings)
    from f5worker.service import start_worker

    phases: dict = {}
    worker, error, _ = start_worker(settings, phases)
    if error:
        raise SystemExit(str(error))
    print(json.dumps({"ready_s": round(time.time() - SPAWNED, 2), "phases": phases}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
