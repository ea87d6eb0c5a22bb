"""A worker whose models cannot be loaded still answers every job with one sentence saying why."""
import asyncio

from f5worker.service import make_handler, start_worker
from f5worker.settings import Settings


def test_corrupt_checkpoint_is_reported_to_every_job(tiny_models, tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a checkpoint")
    env = {**tiny_models, "F5_CKPT_FILE": str(bad), "RUNPOD_VOLUME_PATH": str(tmp_path / "vol")}
    worker, error, runpod = start_worker(Settings.from_env(env))
    assert worker is None and error is not None and hasattr(runpod, "serverless")
    result = asyncio.run(make_handler(None, error)({"id": "j1", "input": {"text": "x", "local_voice": "a.wav"}}))
    assert result == {"error": "The worker could not load its models (SafetensorError); the worker log has details."}


def test_missing_model_file_is_reported(tiny_models, tmp_path):
    env = {**tiny_models, "F5_VOCODER_DIR": str(tmp_path / "nowhere"), "RUNPOD_VOLUME_PATH": str(tmp_path)}
    worker, error, _ = start_worker(Settings.from_env(env))
    result = asyncio.run(make_handler(worker, error)({"id": "j2", "input": {}}))
    assert result["error"].startswith("F5_VOCODER_DIR is set to ") and result["error"].endswith("does not exist.")
