"""Every path, environment variable and model location the worker uses, defined once.

Why this module exists: the handler, the validation script and the Dockerfile's preload step must
agree on where models live and which variables mean what. Each of them imports from here; nothing
else reads ``os.environ`` for these names.

Order in which settings override each other (highest first):
1. a job's own input, for the per-job options it documents (speed, nfe_step, ...);
2. the environment variables named below;
3. the defaults in this module.

Model files are looked for in this order (see ``f5worker.model.store``): explicit local files
(``F5_CKPT_FILE`` and friends), RunPod's cached models (``<volume>/huggingface-cache/hub``), the
volume cache, the copy baked into the image (``F5_BAKED_MODEL_DIR``), then a download into the
volume cache.

S3 settings also accept the names runpod's own upload helper reads (``BUCKET_ENDPOINT_URL``,
``BUCKET_ACCESS_KEY_ID``, ``BUCKET_SECRET_ACCESS_KEY``) as aliases of ours; ``S3_ENV_ALIASES`` and
``resolve_s3_env`` define how, in one place.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

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
ENV_FUSED_KERNELS = "F5_FUSED_KERNELS"
ENV_JOB_TIMEOUT = "F5_JOB_TIMEOUT_SECONDS"
ENV_S3_CONNECT_TIMEOUT = "S3_CONNECT_TIMEOUT_SECONDS"
ENV_S3_READ_TIMEOUT = "S3_READ_TIMEOUT_SECONDS"
ENV_S3_MAX_ATTEMPTS = "S3_MAX_ATTEMPTS"
ENV_AWS_CA_BUNDLE = "AWS_CA_BUNDLE"  # read by botocore itself; named here for messages and tests
ENV_LOCAL_RETENTION_HOURS = "F5_LOCAL_RETENTION_HOURS"
# The names runpod's upload helper (runpod/serverless/utils/rp_upload.py) reads, accepted as aliases.
ENV_BUCKET_ENDPOINT_URL = "BUCKET_ENDPOINT_URL"
ENV_BUCKET_ACCESS_KEY_ID = "BUCKET_ACCESS_KEY_ID"
ENV_BUCKET_SECRET_ACCESS_KEY = "BUCKET_SECRET_ACCESS_KEY"

# Our name -> runpod's name for the same setting. Ours win when both are set: they are the names
# botocore and every AWS tool read, so a value set under them is the one the rest of the container
# sees too. When both are set and differ, ``Settings.warnings`` says so, naming the variables only.
S3_ENV_ALIASES = {
    ENV_AWS_ENDPOINT_URL: ENV_BUCKET_ENDPOINT_URL,
    ENV_AWS_ACCESS_KEY_ID: ENV_BUCKET_ACCESS_KEY_ID,
    ENV_AWS_SECRET_ACCESS_KEY: ENV_BUCKET_SECRET_ACCESS_KEY,
}
ENV_VOICE_CACHE_SIZE = "F5_VOICE_CACHE_SIZE"
ENV_MAX_RESULT_BYTES = "F5_MAX_RESULT_BYTES"
ENV_GRAPH_MEMORY_MB = "F5_GRAPH_MEMORY_MB"
# On: the handler is a generator and jobs may ask for "stream": true (f5worker.service).
ENV_STREAMING = "F5_STREAMING"
# Set by RunPod on its workers (where runpod's SDK fetches jobs); unset in runpod's local modes,
# where a progress report has nowhere to go.
ENV_RUNPOD_JOB_URL = "RUNPOD_WEBHOOK_GET_JOB"

# Cache variables third-party libraries read; all derived from the model root. (Not
# TRANSFORMERS_CACHE: transformers 5 no longer reads it and finds its files through HF_HOME.)
CACHE_ENV_SUBDIRS = {
    "HF_HOME": "",
    "HF_HUB_CACHE": "hub",
    "TORCH_HOME": "torch",
    # Triton's compiled kernels (the fast path's fused step): on the volume, so the workers of an
    # endpoint compile them once per GPU kind and torch version (f5worker.inference.kernel_switch).
    "TRITON_CACHE_DIR": "triton",
}
VOLUME_MODELS_SUBDIR = "models"  # the model root on a mounted volume: <volume>/models
# RunPod's "cached models" (an endpoint's Model setting): RunPod puts the model's huggingface_hub
# snapshot here, on the worker's local disk, before the worker starts. Also the folder other RunPod
# workers use as their hub cache on a network volume. Same layout as any hub cache.
RUNPOD_CACHED_MODELS_SUBDIR = "huggingface-cache/hub"
F5_SUBDIR = "f5-tts"

# --- defaults -----------------------------------------------------------------------------------
DEFAULT_VOLUME_PATH = "/runpod-volume"
POD_VOLUME_PATH = "/workspace"  # where a RunPod pod (not a serverless worker) mounts a network volume
DEFAULT_BAKED_MODEL_DIR = "/opt/f5-models"
DEFAULT_TMP_DIR = "/tmp"
DEFAULT_PRESIGN_EXPIRY = 3600
MAX_PRESIGN_EXPIRY = 7 * 24 * 3600  # SigV4: "X-Amz-Expires must be less than a week" (AWS and SeaweedFS alike)
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
# Prepared reference voices kept in memory (about 2.3 MB each for 12 s at 24 kHz); 0: no cache.
DEFAULT_VOICE_CACHE_SIZE = 32
# The largest job result RunPod passes back, which bounds audio returned inline (base64): RunPod's
# endpoint operations reference (docs.runpod.io/serverless/references/operations) gives a payload
# limit of 10 MB for /run and 20 MB for /runsync, and the runpod SDK (serverless/modules/rp_tips.py,
# check_return_size) warns about a result above 20 MB (counted in units of 1,000,000 bytes). The
# worker cannot tell which operation a job came through, so the default is the smaller one.
DEFAULT_MAX_RESULT_BYTES = 10_000_000
# The fast path's captured graphs keep static input buffers per (batch, frames) bucket: about 1 MiB
# for a single job, ~80 MiB for 16 jobs of 2048 frames (fp16, F5TTS_v1_Base). Past this budget the
# least recently used are evicted (re-captured, in one step, if needed again).
DEFAULT_GRAPH_MEMORY_MB = 1024

# Upper bounds: past these a value is a slip, never a choice, and some broke every job
# (S3_READ_TIMEOUT_SECONDS=1e308 overflowed the socket timeout: "HTTPClientError" on every call).
MAX_JOB_TIMEOUT = 24 * 3600.0
MAX_S3_CONNECT_TIMEOUT = 60.0
MAX_S3_READ_TIMEOUT = 600.0
MAX_S3_MAX_ATTEMPTS = 10
MAX_LOCAL_RETENTION_HOURS = 10 * 365 * 24.0
MAX_MAX_CONCURRENCY = 256
MAX_VOICE_CACHE_SIZE = 1000
MAX_MAX_VOICE_BYTES = 2**30
# RunPod's larger payload limit (/runsync); see DEFAULT_MAX_RESULT_BYTES.
MAX_MAX_RESULT_BYTES = 20_000_000
MAX_GRAPH_MEMORY_MB = 2**20
# F5_DEVICE: what torch and safetensors both accept ("cpu:0" is torch's, not safetensors').
DEVICE_RE = re.compile(r"cpu|cuda(?::\d+)?")

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
# Files the upload job may take a voice from (voice_s3_key); the worker only reads them.
INCOMING_PREFIX = "incoming/"
# A voice is voices/<voice_name>, its name ending in .wav (e.g. voices/alice.wav); an upload carries
# its transcript inside the WAV (f5worker.jobs.voices). Beside a voice, the voice's whole name plus a suffix:
TRANSCRIPT_SUFFIX = ".txt"  # voices/alice.wav.txt: a transcript written by a person
VOICE_META_SUFFIX = ".json"  # voices/alice.wav.json: Whisper's transcript, bound to the voice's SHA-256

# The variables a person deploying the worker is offered (the RunPod Hub listing, .runpod/hub.json,
# lists exactly these; tests/test_runpod_hub.py holds it to this list). The others have defaults
# that suit RunPod, or are for development and tests.
USER_FACING_ENV = (
    ENV_S3_BUCKET, ENV_AWS_ACCESS_KEY_ID, ENV_AWS_SECRET_ACCESS_KEY, ENV_AWS_REGION, ENV_AWS_ENDPOINT_URL,
    ENV_PRESIGN_EXPIRY, ENV_MAX_CONCURRENCY, ENV_JOB_TIMEOUT, ENV_FAST_PATH, ENV_STREAMING, ENV_ASR_MODEL,
)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _number(env: Mapping[str, str], name: str, default, cast=float, minimum: float = 0.0,
            above: bool = False, maximum: float | None = None):
    """``env[name]`` as a ``cast`` number (``default`` when unset); ValueError naming the variable
    when it is not a number, is below ``minimum``, (``above``) not greater than it, or above
    ``maximum``."""
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
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum:g}, not {raw!r}")
    return value


def _device(env: Mapping[str, str]) -> str | None:
    """``F5_DEVICE``: unset, ``cpu``, ``cuda`` or ``cuda:<index>``; ValueError naming it otherwise
    (``banana`` or ``cpu:0`` started, then every model load failed)."""
    raw = (env.get(ENV_DEVICE) or "").strip()
    if raw and not DEVICE_RE.fullmatch(raw):
        raise ValueError(f"{ENV_DEVICE} must be cpu, cuda or cuda:<index> (such as cuda:0), or unset "
                         f"to pick the GPU when there is one, not {raw[:40]!r}")
    return raw or None


def check_endpoint_url(url: str) -> str:
    """``AWS_ENDPOINT_URL`` as given, if it is an endpoint: http(s), a host, maybe a port, no query,
    and not a path of one name (``https://host/advb``: the bucket's place, and botocore then put every
    object under ``advb/`` inside the bucket). A longer path is an endpoint's own (Supabase's
    ``/storage/v1/s3``) and is kept. ValueError naming the variable otherwise; it never repeats the URL (it may hold a password)."""
    parts = urlsplit(url.strip())
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        parts = parts._replace(netloc="")
    one_name = len([seg for seg in parts.path.split("/") if seg]) == 1  # https://host/<bucket>: the bucket
    if parts.scheme not in ("http", "https") or not parts.hostname or one_name or parts.query or parts.fragment:
        raise ValueError(f"{ENV_AWS_ENDPOINT_URL} must be the S3 endpoint alone, https://<host> or "
                         "https://<host>:<port>, not followed by a bucket's name (it would put every object "
                         f"under that name inside the bucket; the bucket goes in {ENV_S3_BUCKET})")
    return url


def _check_keys(values: Mapping[str, str | None]) -> None:
    """A bucket needs both keys: without them botocore would look for credentials elsewhere, the
    instance metadata address among them, which no RunPod worker has."""
    lacking = [either_name(name) for name in (ENV_AWS_ACCESS_KEY_ID, ENV_AWS_SECRET_ACCESS_KEY) if not values[name]]
    if values[ENV_S3_BUCKET] and lacking:
        raise ValueError(f"a bucket is set ({ENV_S3_BUCKET} or {ENV_BUCKET_ENDPOINT_URL}) but "
                         f"{' and '.join(lacking)} {'is' if len(lacking) == 1 else 'are'} not; set the "
                         "bucket's key pair, or unset the bucket to keep voices and outputs in the local folder")


# A region label as the S3 providers spell it in their hostnames: us-east-1, eu-central-003 (AWS,
# Backblaze B2, Wasabi: s3.<region>.<domain>) and nyc3, ams3 (DigitalOcean: <region>.digitaloceanspaces.com).
_S3_REGION_LABEL = re.compile(r"^[a-z]{2,}(?:-[a-z0-9]+)*-\d+$")
_SPACES_REGION_LABEL = re.compile(r"^[a-z]+\d+$")
_SPACES_DOMAIN = ".digitaloceanspaces.com"


def split_bucket_endpoint(url: str) -> tuple[str, str | None]:
    """``BUCKET_ENDPOINT_URL`` as (the S3 endpoint to call, the bucket the URL names or None).

    runpod's upload helper hands this URL to boto3 unchanged and never reads a bucket from it (its
    callers pass one, or it uses the month, "%m-%y"); RunPod's documentation, though, shows URLs
    that name the bucket. Recognised, in this order:

    * ``https://<host>/<bucket>``: the path is the bucket (an S3 endpoint has no path of its own);
    * ``https://<bucket>.s3.<rest>`` (AWS, Backblaze B2, Wasabi ...): the labels before ``s3``;
    * ``https://<bucket>.<region>.digitaloceanspaces.com``: the first label.

    Anything else (``https://s3.us-west-004.backblazeb2.com``,
    ``https://<account id>.r2.cloudflarestorage.com``) names no bucket: it is the endpoint itself and
    the bucket comes from ``S3_BUCKET``. The error never repeats the URL (it may carry a password).
    """
    parts = urlsplit(url.strip())
    segments = [seg for seg in parts.path.split("/") if seg]
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment \
            or len(segments) > 1:
        raise ValueError(f"{ENV_BUCKET_ENDPOINT_URL} must look like https://<host>, https://<host>/<bucket> "
                         "or https://<bucket>.s3.<region>.<provider domain>")
    if segments:
        return f"{parts.scheme}://{parts.netloc}", segments[0]
    labels = parts.hostname.split(".")
    port = f":{parts.port}" if parts.port else ""
    if "s3" in labels[1:]:
        at = labels.index("s3", 1)
        return f"{parts.scheme}://{'.'.join(labels[at:])}{port}", ".".join(labels[:at])
    if parts.hostname.endswith(_SPACES_DOMAIN) and len(labels) == 4:
        return f"{parts.scheme}://{'.'.join(labels[1:])}{port}", labels[0]
    return f"{parts.scheme}://{parts.netloc}", None


def region_from_endpoint(url: str | None) -> str | None:
    """The region an S3 endpoint's hostname names (``s3.<region>.<domain>`` or
    ``<region>.digitaloceanspaces.com``), else None. SigV4 signs with the region and a provider may
    refuse a signature made for another; runpod's upload helper also reads the region from the URL
    (from ``<bucket>.s3.<region>...`` and Spaces hosts)."""
    host = (urlsplit(url or "").hostname or "").lower()
    labels = host.split(".")
    if "s3" in labels:
        rest = labels[labels.index("s3") + 1:]
        if len(rest) >= 3 and _S3_REGION_LABEL.match(rest[0]):
            return rest[0]
    if host.endswith(_SPACES_DOMAIN) and len(labels) >= 3 and _SPACES_REGION_LABEL.match(labels[-3]):
        return labels[-3]
    return None


def resolve_s3_env(env: Mapping[str, str]) -> tuple[dict[str, str | None], tuple[str, ...]]:
    """The S3 settings by our variable names, each from our variable else runpod's alias
    (``S3_ENV_ALIASES``), and one sentence per conflict or surprise, naming variables, never values.

    The bucket is ``S3_BUCKET``, else the one ``BUCKET_ENDPOINT_URL`` names (``split_bucket_endpoint``)
    when that URL is the endpoint in use. The region is ``AWS_REGION``, else the one the endpoint's
    hostname names (``region_from_endpoint``); s3_utils falls back to us-east-1.
    """
    def given(name: str) -> str | None:
        return env.get(name) or None

    notes = []
    alias_endpoint, url_bucket = split_bucket_endpoint(env[ENV_BUCKET_ENDPOINT_URL]) \
        if given(ENV_BUCKET_ENDPOINT_URL) else (None, None)
    values: dict[str, str | None] = {}
    for ours, theirs in S3_ENV_ALIASES.items():
        other = alias_endpoint if theirs == ENV_BUCKET_ENDPOINT_URL else given(theirs)
        mine = given(ours)
        same = (mine or "").rstrip("/") == (other or "").rstrip("/") if theirs == ENV_BUCKET_ENDPOINT_URL \
            else mine == other
        if mine and other and not same:
            notes.append(f"{ours} and {theirs} are both set and differ; {ours} is used.")
        values[ours] = mine or other
    bucket = given(ENV_S3_BUCKET)
    alias_endpoint_used = (values[ENV_AWS_ENDPOINT_URL] or "").rstrip("/") == (alias_endpoint or "").rstrip("/")
    if url_bucket and alias_endpoint_used:
        if bucket and bucket != url_bucket:
            notes.append(f"{ENV_S3_BUCKET} and the bucket named in {ENV_BUCKET_ENDPOINT_URL} differ; "
                         f"{ENV_S3_BUCKET} is used.")
        bucket = bucket or url_bucket
    if not bucket and given(ENV_BUCKET_ENDPOINT_URL):
        why = ("names no bucket" if url_bucket is None else
               f"names a bucket, which is not used with the endpoint in {ENV_AWS_ENDPOINT_URL},")
        notes.append(f"{ENV_BUCKET_ENDPOINT_URL} is set but {why} and {ENV_S3_BUCKET} is not set, "
                     f"so voices and outputs go to the local folder; set {ENV_S3_BUCKET}.")
    values[ENV_S3_BUCKET] = bucket
    if given(ENV_AWS_ENDPOINT_URL) and bucket:  # runpod's alias had its bucket path taken off above
        check_endpoint_url(env[ENV_AWS_ENDPOINT_URL])
    _check_keys(values)
    values[ENV_AWS_REGION] = given(ENV_AWS_REGION) or region_from_endpoint(values[ENV_AWS_ENDPOINT_URL])
    return values, tuple(notes)


def either_name(name: str) -> str:
    """How a message names a setting that also has runpod's alias: "AWS_ACCESS_KEY_ID (or
    BUCKET_ACCESS_KEY_ID)"."""
    alias = S3_ENV_ALIASES.get(name)
    return f"{name} (or {alias})" if alias else name


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
    fused_kernels: bool
    job_timeout_s: float
    s3_connect_timeout: float
    s3_read_timeout: float
    s3_max_attempts: int
    local_retention_hours: float
    voice_cache_size: int
    max_result_bytes: int
    graph_memory_mb: int
    streaming: bool = False
    on_runpod_queue: bool = False  # jobs come from RunPod's queue, not runpod's local modes
    warnings: tuple[str, ...] = ()  # sentences about the variables (conflicting aliases ...), no values

    @property
    def volume_mounted(self) -> bool:
        return self.volume_path.is_dir()

    @property
    def f5_dir(self) -> Path:
        return self.model_root / F5_SUBDIR

    @property
    def kernel_cache(self) -> Path:
        return self.model_root / CACHE_ENV_SUBDIRS["TRITON_CACHE_DIR"]

    @property
    def hub_cache(self) -> Path:
        return self.model_root / CACHE_ENV_SUBDIRS["HF_HUB_CACHE"]

    @property
    def runpod_model_cache(self) -> Path:
        """Where RunPod mounts its cached models: under the volume's mount point, whether or not
        a network volume is attached."""
        return self.volume_path / RUNPOD_CACHED_MODELS_SUBDIR

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
        s3, warnings = resolve_s3_env(env)
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
            device=_device(env),
            s3_bucket=s3[ENV_S3_BUCKET],
            aws_access_key_id=s3[ENV_AWS_ACCESS_KEY_ID],
            aws_secret_access_key=s3[ENV_AWS_SECRET_ACCESS_KEY],
            aws_region=s3[ENV_AWS_REGION],
            aws_endpoint_url=s3[ENV_AWS_ENDPOINT_URL],
            presign_expiry=_number(env, ENV_PRESIGN_EXPIRY, DEFAULT_PRESIGN_EXPIRY, cast=int, minimum=1,
                                   maximum=MAX_PRESIGN_EXPIRY),
            allow_private_urls=_truthy(env.get(ENV_ALLOW_PRIVATE_URLS)),
            max_voice_bytes=_number(env, ENV_MAX_VOICE_BYTES, DEFAULT_MAX_VOICE_BYTES, cast=int, minimum=1,
                                    maximum=MAX_MAX_VOICE_BYTES),
            max_concurrency=_number(env, ENV_MAX_CONCURRENCY, DEFAULT_MAX_CONCURRENCY, cast=int, minimum=1,
                                    maximum=MAX_MAX_CONCURRENCY),
            fast_path=env.get(ENV_FAST_PATH, "1").strip().lower() not in {"0", "false", "no", "off"},
            fused_kernels=env.get(ENV_FUSED_KERNELS, "1").strip().lower() not in {"0", "false", "no", "off"},
            job_timeout_s=_number(env, ENV_JOB_TIMEOUT, DEFAULT_JOB_TIMEOUT, maximum=MAX_JOB_TIMEOUT),
            s3_connect_timeout=_number(env, ENV_S3_CONNECT_TIMEOUT, DEFAULT_S3_CONNECT_TIMEOUT, above=True,
                                       maximum=MAX_S3_CONNECT_TIMEOUT),
            s3_read_timeout=_number(env, ENV_S3_READ_TIMEOUT, DEFAULT_S3_READ_TIMEOUT, above=True,
                                    maximum=MAX_S3_READ_TIMEOUT),
            s3_max_attempts=_number(env, ENV_S3_MAX_ATTEMPTS, DEFAULT_S3_MAX_ATTEMPTS, int, 1,
                                    maximum=MAX_S3_MAX_ATTEMPTS),
            local_retention_hours=_number(env, ENV_LOCAL_RETENTION_HOURS, DEFAULT_LOCAL_RETENTION_HOURS,
                                          maximum=MAX_LOCAL_RETENTION_HOURS),
            voice_cache_size=_number(env, ENV_VOICE_CACHE_SIZE, DEFAULT_VOICE_CACHE_SIZE, cast=int,
                                     maximum=MAX_VOICE_CACHE_SIZE),
            max_result_bytes=_number(env, ENV_MAX_RESULT_BYTES, DEFAULT_MAX_RESULT_BYTES, cast=int, minimum=1,
                                     maximum=MAX_MAX_RESULT_BYTES),
            graph_memory_mb=_number(env, ENV_GRAPH_MEMORY_MB, DEFAULT_GRAPH_MEMORY_MB, cast=int, minimum=1,
                                    maximum=MAX_GRAPH_MEMORY_MB),
            streaming=_truthy(env.get(ENV_STREAMING)),
            on_runpod_queue=bool(env.get(ENV_RUNPOD_JOB_URL)),
            warnings=warnings,
        )


def apply_cache_env(settings: Settings, env: dict | None = None) -> dict[str, str]:
    """Point every library cache at the model root. Call before torch or huggingface is imported:
    huggingface_hub reads HF_HOME once, at import."""
    env = os.environ if env is None else env
    values = settings.cache_env()
    env.update(values)
    return values
