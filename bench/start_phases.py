"""Process start to worker ready, by phase, on whatever device the machine has.

    python bench/start_phases.py REPO MODELS_DIR

REPO is a checkout of this project (pass an older commit's worktree to compare), MODELS_DIR a model
set written by ``f5worker.random_models.write_model_set`` (full size for real figures). Storage is
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
    env = dict(os.environ, F5_CKPT_FILE=os.path.join(models, "model.safetensors"),
               F5_MODEL_CONFIG=os.path.join(models, "model.yaml"), F5_VOCODER_DIR=os.path.join(models, "vocos"),
               RUNPOD_VOLUME_PATH=volume, F5_TMP_DIR=os.path.join(volume, "tmp"),
               F5_BAKED_MODEL_DIR=os.path.join(volume, "none"))
    from f5worker.settings import Settings, apply_cache_env

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
