"""Every path, environment variable and model location the worker uses, defined once.

Why this module exists: the handler, the validation script and the Dockerfile's preload step must
agree on where models live and which variables mean what. Each of them imports from here; nothing
else reads ``os.environ`` for these names.

Order in which settings override each other (highest first):
1. a job's own input, for the per-job options it documents (speed, nfe_step, ...);
2. the environment variables named below;
3. the defaults in this module.

Model files are looked for in this order (see ``f5worker.model_store``): explicit local files
(``F5_CKPT_FILE`` and friends), the volume cache, the copy baked into the image
(``F5_BAKED_MODEL_DIR``), then a download into the volume cache.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

# --- environment variable names (the only place they are spelled) -------------------------------
ENV_VOLUME_PATH = "RUNPOD_VOLUME_PATH"
ENV_MODEL_ROOT = "F5_MODEL_ROOT"
ENV_BAKED_MODEL_DIR = "F5_BAKED_MODEL_DIR"
ENV_TMP_DIR = "F5_TMP_DIR"
ENV_LOCAL_STORAGE_DIR = "F5_LOCAL_STORAGE_DIR"
ENV_CKPT_FILE = "F5_CKPT_FILE"
ENV_VOCAB_FILE = "F5_VOCAB_FILE"
ENV_MODEL_CONFIG = "F5_MODEL_CONFIG"
ENV_VOCODER_DIR = "F5_VOCODER_DIR"
ENV_ASR_MODEL = "ASR_MODEL"
ENV_DEVICE = "F5_DEVICE"
ENV_S3_BUCKET = "S3_BUCKET"
ENV_AWS_ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
ENV_AWS_SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"
ENV_AWS_REGION = "AWS_REGION"
ENV_AWS_ENDPOINT_URL = "AWS_ENDPOINT_URL"
ENV_PRESIGN_EXPIRY = "S3_PRESIGN_EXPIRY_SECONDS"
ENV_ALLOW_PRIVATE_URLS = "RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS"  # the switch runpod's SDK uses
ENV_MAX_VOICE_BYTES = "F5_MAX_VOICE_BYTES"
ENV_MAX_CONCURRENCY = "F5_MAX_CONCURRENCY"
ENV_FAST_PATH = "F5_FAST_PATH"
ENV_JOB_TIMEOUT = "F5_JOB_TIMEOUT_SECONDS"
ENV_S3_CONNECT_TIMEOUT = "S3_CONNECT_TIMEOUT_SECONDS"
ENV_S3_READ_TIMEOUT = "S3_READ_TIMEOUT_SECONDS"
ENV_S3_MAX_ATTEMPTS = "S3_MAX_ATTEMPTS"
ENV_AWS_CA_BUNDLE = "AWS_CA_BUNDLE"  # read by botocore itself; named here for messages and tests
ENV_LOCAL_RETENTION_HOURS = "F5_LOCAL_RETENTION_HOURS"
ENV_MAX_RESULT_BYTES = "F5_MAX_RESULT_BYTES"

# Cache variables third-party libraries read; all derived from the model root. (Not
# TRANSFORMERS_CACHE: transformers 5 no longer reads it and finds its files through HF_HOME.)
CACHE_ENV_SUBDIRS = {
    "HF_HOME": "",
    "HF_HUB_CACHE": "hub",
    "TORCH_HOME": "torch",
}
VOLUME_MODELS_SUBDIR = "models"  # the model root on a mounted volume: <volume>/models
F5_SUBDIR = "f5-tts"

# --- defaults -----------------------------------------------------------------------------------
DEFAULT_VOLUME_PATH = "/runpod-volume"
POD_VOLUME_PATH = "/workspace"  # where a RunPod pod (not a serverless worker) mounts a network volume
DEFAULT_BAKED_MODEL_DIR = "/opt/f5-models"
DEFAULT_TMP_DIR = "/tmp"
DEFAULT_PRESIGN_EXPIRY = 3600
DEFAULT_MAX_VOICE_BYTES = 50 * 1024 * 1024
DEFAULT_MAX_CONCURRENCY = 16
DEFAULT_JOB_TIMEOUT = 600.0  # a job still running after this gets an error; 0: no limit
# S3 requests: a request that gets no answer for S3_READ_TIMEOUT_SECONDS fails, and one storage call
# makes at most S3_MAX_ATTEMPTS requests. Worst case of one call against an endpoint that stops
# answering: attempts x (connect + read + 1 s) plus botocore's backoff between tries, 48 s with
# these defaults (``s3_utils.call_bound_s`` has the formula).
DEFAULT_S3_CONNECT_TIMEOUT = 5.0
DEFAULT_S3_READ_TIMEOUT = 15.0
DEFAULT_S3_MAX_ATTEMPTS = 2
DEFAULT_LOCAL_RETENTION_HOURS = 0.0  # 0: local outputs and job records are kept forever
# The largest job result RunPod passes back, which bounds audio returned inline (base64): RunPod's
# endpoint operations reference (docs.runpod.io/serverless/references/operations) gives a payload
# limit of 10 MB for /run and 20 MB for /runsync, and the runpod SDK (serverless/modules/rp_tips.py,
# check_return_size) warns about a result above 20 MB (counted in units of 1,000,000 bytes). The
# worker cannot tell which operation a job came through, so the default is the smaller one.
DEFAULT_MAX_RESULT_BYTES = 10_000_000

# --- what the worker loads ----------------------------------------------------------------------
F5_REPO = "SWivid/F5-TTS"
F5_MODEL_NAME = "F5TTS_v1_Base"
F5_CKPT_IN_REPO = "F5TTS_v1_Base/model_1250000.safetensors"
F5_VOCAB_IN_REPO = "F5TTS_v1_Base/vocab.txt"
VOCODER_REPO = "charactr/vocos-mel-24khz"
VOCODER_FILES = ("config.yaml", "pytorch_model.bin")
DEFAULT_ASR_MODEL = "openai/whisper-large-v3-turbo"

# Approximate download sizes, used to refuse a download the volume has no room for.
F5_DOWNLOAD_BYTES = 1_400_000_000
VOCODER_DOWNLOAD_BYTES = 60_000_000
ASR_DOWNLOAD_BYTES = 1_700_000_000
DOWNLOAD_HEADROOM_BYTES = 200_000_000

# --- storage layout (S3 keys and local folders alike) -------------------------------------------
VOICES_PREFIX = "voices/"
OUTPUT_PREFIX = "output/"
LOGS_PREFIX = "logs/"
# Uploaded voices carry their transcript inside the WAV (f5worker.voices). Beside a voice, with the
# voice's own name (e.g. voices/alice.wav) plus a suffix:
TRANSCRIPT_SUFFIX = ".txt"  # voices/alice.wav.txt: a transcript written by a person
VOICE_META_SUFFIX = ".json"  # voices/alice.wav.json: Whisper's transcript, bound to the voice's SHA-256


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _number(env: Mapping[str, str], name: str, default, cast=float, minimum: float = 0.0,
            above: bool = False):
    """``env[name]`` as a ``cast`` number (``default`` when unset); ValueError naming the variable
    when it is not a number, is below ``minimum``, or (``above``) not greater than it."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = cast(raw)
    except ValueError:
        value = None
    if value is None or not (value > minimum if above else value >= minimum) or value == float("inf"):
        bound = f"greater than {minimum:g}" if above else f"at least {minimum:g}"
        raise ValueError(f"{name} must be a {'whole ' if cast is int else ''}number {bound}, not {raw!r}")
    return value


@dataclass(frozen=True)
class Settings:
    volume_path: Path
    model_root: Path
    baked_model_dir: Path
    tmp_dir: Path
    local_storage_dir: Path
    ckpt_file: str | None
    vocab_file: str | None
    model_config: str | None
    vocoder_dir: str | None
    asr_model: str
    device: str | None
    s3_bucket: str | None
    aws_access_key_id: str | None
    aws_secret_access_key: str | None
    aws_region: str | None
    aws_endpoint_url: str | None
    presign_expiry: int
    allow_private_urls: bool
    max_voice_bytes: int
    max_concurrency: int
    fast_path: bool
    job_timeout_s: float
    s3_connect_timeout: float
    s3_read_timeout: float
    s3_max_attempts: int
    local_retention_hours: float
    max_result_bytes: int

    @property
    def volume_mounted(self) -> bool:
        return self.volume_path.is_dir()

    @property
    def f5_dir(self) -> Path:
        return self.model_root / F5_SUBDIR

    @property
    def hub_cache(self) -> Path:
        return self.model_root / CACHE_ENV_SUBDIRS["HF_HUB_CACHE"]

    def cache_env(self) -> dict[str, str]:
        """The cache variables, each under the model root."""
        return {name: str(self.model_root / sub) if sub else str(self.model_root)
                for name, sub in CACHE_ENV_SUBDIRS.items()}

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        volume = Path(env.get(ENV_VOLUME_PATH) or DEFAULT_VOLUME_PATH)
        if env.get(ENV_MODEL_ROOT):
            model_root = Path(env[ENV_MODEL_ROOT])
        elif volume.is_dir():
            model_root = volume / VOLUME_MODELS_SUBDIR
        else:  # no volume: a per-user cache, never /tmp (job files live there and get swept)
            model_root = Path.home() / ".cache" / "f5-tts-worker" / "models"
        if env.get(ENV_LOCAL_STORAGE_DIR):
            local_storage = Path(env[ENV_LOCAL_STORAGE_DIR])
        elif volume.is_dir():
            local_storage = volume / "storage"
        else:
            local_storage = Path("storage").resolve()
        return cls(
            volume_path=volume,
            model_root=model_root,
            baked_model_dir=Path(env.get(ENV_BAKED_MODEL_DIR) or DEFAULT_BAKED_MODEL_DIR),
            tmp_dir=Path(env.get(ENV_TMP_DIR) or DEFAULT_TMP_DIR),
            local_storage_dir=local_storage,
            ckpt_file=env.get(ENV_CKPT_FILE) or None,
            vocab_file=env.get(ENV_VOCAB_FILE) or None,
            model_config=env.get(ENV_MODEL_CONFIG) or None,
            vocoder_dir=env.get(ENV_VOCODER_DIR) or None,
            asr_model=env.get(ENV_ASR_MODEL) or DEFAULT_ASR_MODEL,
            device=env.get(ENV_DEVICE) or None,
            s3_bucket=env.get(ENV_S3_BUCKET) or None,
            aws_access_key_id=env.get(ENV_AWS_ACCESS_KEY_ID) or None,
            aws_secret_access_key=env.get(ENV_AWS_SECRET_ACCESS_KEY) or None,
            aws_region=env.get(ENV_AWS_REGION) or None,
            aws_endpoint_url=env.get(ENV_AWS_ENDPOINT_URL) or None,
            presign_expiry=_number(env, ENV_PRESIGN_EXPIRY, DEFAULT_PRESIGN_EXPIRY, cast=int, minimum=1),
            allow_private_urls=_truthy(env.get(ENV_ALLOW_PRIVATE_URLS)),
            max_voice_bytes=_number(env, ENV_MAX_VOICE_BYTES, DEFAULT_MAX_VOICE_BYTES, cast=int, minimum=1),
            max_concurrency=_number(env, ENV_MAX_CONCURRENCY, DEFAULT_MAX_CONCURRENCY, cast=int, minimum=1),
            fast_path=env.get(ENV_FAST_PATH, "1").strip().lower() not in {"0", "false", "no", "off"},
            job_timeout_s=_number(env, ENV_JOB_TIMEOUT, DEFAULT_JOB_TIMEOUT),
            s3_connect_timeout=_number(env, ENV_S3_CONNECT_TIMEOUT, DEFAULT_S3_CONNECT_TIMEOUT, above=True),
            s3_read_timeout=_number(env, ENV_S3_READ_TIMEOUT, DEFAULT_S3_READ_TIMEOUT, above=True),
            s3_max_attempts=_number(env, ENV_S3_MAX_ATTEMPTS, DEFAULT_S3_MAX_ATTEMPTS, int, 1),
            local_retention_hours=_number(env, ENV_LOCAL_RETENTION_HOURS, DEFAULT_LOCAL_RETENTION_HOURS),
            max_result_bytes=_number(env, ENV_MAX_RESULT_BYTES, DEFAULT_MAX_RESULT_BYTES, cast=int, minimum=1),
        )


def apply_cache_env(settings: Settings, env: dict | None = None) -> dict[str, str]:
    """Point every library cache at the model root. Call before torch or huggingface is imported:
    huggingface_hub reads HF_HOME once, at import."""
    env = os.environ if env is None else env
    values = settings.cache_env()
    env.update(values)
    return values
