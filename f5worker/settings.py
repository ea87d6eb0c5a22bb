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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Mapping
from urllib.parse import SplitResult, urlsplit

from f5worker.env_values import (Choice, Device, Flag, ModelMap, NameList, NameMap, Number, Parser, PathValue, Present,
                                 Secret, Text, Var)

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
# The model registry (f5worker.model.registry): several models per endpoint.
ENV_MODELS = "F5_MODELS"
ENV_DEFAULT_MODEL = "F5_DEFAULT_MODEL"
ENV_PRELOAD_MODELS = "F5_PRELOAD_MODELS"
ENV_MODEL_MEMORY_MB = "F5_MODEL_MEMORY_MB"
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
ENV_REQUESTS_CA_BUNDLE = "REQUESTS_CA_BUNDLE"  # botocore's CA file when AWS_CA_BUNDLE is unset
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
# The HTTP face (f5worker.http): OpenAI's speech API on a RunPod load-balancing endpoint. PORT and
# PORT_HEALTH are the names RunPod's load balancer uses.
ENV_SERVE = "F5_SERVE"
ENV_HTTP_HOST = "F5_HTTP_HOST"
ENV_PORT = "PORT"
ENV_PORT_HEALTH = "PORT_HEALTH"
ENV_API_KEY = "F5_API_KEY"
ENV_HTTP_STORE_RESULTS = "F5_HTTP_STORE_RESULTS"
ENV_VOICE_ALIASES = "F5_VOICE_ALIASES"
SERVE_FACES = ("queue", "http")
# Set by RunPod on its workers (where runpod's SDK fetches jobs); unset in runpod's local modes,
# where a progress report has nowhere to go.
ENV_RUNPOD_JOB_URL = "RUNPOD_WEBHOOK_GET_JOB"
ENV_RUNPOD_REALTIME_PORT = "RUNPOD_REALTIME_PORT"  # runpod's realtime mode: its own API server
# runpod's logger reads its level from these once, at import (RUNPOD_DEBUG_LEVEL is the older name)
ENV_RUNPOD_LOG_LEVEL = "RUNPOD_LOG_LEVEL"
ENV_RUNPOD_DEBUG_LEVEL = "RUNPOD_DEBUG_LEVEL"
RUNPOD_QUIET_LEVEL = "INFO"

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

# --- fixed places ---------------------------------------------------------------------------------
DEFAULT_VOLUME_PATH = "/runpod-volume"  # where RunPod mounts a network volume on a serverless worker
POD_VOLUME_PATH = "/workspace"  # where a RunPod pod (not a serverless worker) mounts a network volume
DEFAULT_BAKED_MODEL_DIR = "/opt/f5-models"
# The largest job result RunPod passes back, which bounds audio returned inline (base64): RunPod's
# endpoint operations reference (docs.runpod.io/serverless/references/operations) gives a payload
# limit of 10 MB for /run and 20 MB for /runsync, and the runpod SDK (serverless/modules/rp_tips.py,
# check_return_size) warns about a result above 20 MB (counted in units of 1,000,000 bytes). The
# worker cannot tell which operation a job came through, so the default is the smaller one.
RUN_RESULT_BYTES = 10_000_000
RUNSYNC_RESULT_BYTES = 20_000_000
# SigV4: "X-Amz-Expires must be less than a week" (AWS and SeaweedFS alike).
MAX_PRESIGN_EXPIRY = 7 * 24 * 3600

# --- what the worker loads ----------------------------------------------------------------------
F5_REPO = "SWivid/F5-TTS"
F5_MODEL_NAME = "F5TTS_v1_Base"
F5_CKPT_IN_REPO = "F5TTS_v1_Base/model_1250000.safetensors"
F5_VOCAB_IN_REPO = "F5TTS_v1_Base/vocab.txt"
# The other built-in model: F5-TTS's first release, the layout most community fine-tunes start from.
F5_V0_MODEL_NAME = "F5TTS_Base"
F5_V0_CKPT_IN_REPO = "F5TTS_Base/model_1200000.safetensors"
F5_V0_VOCAB_IN_REPO = "F5TTS_Base/vocab.txt"
# The DiT layouts f5-tts ships as configs (f5_tts/configs/<name>.yaml), which F5_MODELS' "config" may name.
PACKAGED_LAYOUTS = ("F5TTS_v1_Base", "F5TTS_Base", "F5TTS_v1_Small", "F5TTS_Small")
VOCODER_REPO = "charactr/vocos-mel-24khz"
VOCODER_FILES = ("config.yaml", "pytorch_model.bin")

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

def parsed_endpoint(url: str) -> SplitResult:
    """``url`` split, with a netloc that does not parse (``https://[::1``, a port of ``abc`` or
    99999) taken out, so that ``endpoint_fault`` says it has no usable host."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:  # an unclosed '[' of an IPv6 host
        scheme = url.strip().partition("://")[0].lower() if "://" in url else ""
        return SplitResult(scheme, "", "", "", "")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number from 0 to 65535
    except ValueError:
        parts = parts._replace(netloc="")
    return parts


def endpoint_fault(parts: SplitResult) -> str | None:
    """What keeps an S3 endpoint URL from being one (as the end of a sentence), else None: the
    rules of both variables that give it, ``AWS_ENDPOINT_URL`` and ``BUCKET_ENDPOINT_URL``. A user
    name or password would be sent to every caller: it is in each presigned URL."""
    if parts.scheme not in ("http", "https"):
        return "its scheme https or http"
    if not parts.hostname or parts.port == 0:
        return "with a host and, if any, a port that is a number from 1 to 65535"
    if parts.username is not None or parts.password is not None:
        return (f"with no user name or password (the keys go in {either_name(ENV_AWS_ACCESS_KEY_ID)} and "
                f"{either_name(ENV_AWS_SECRET_ACCESS_KEY)})")
    if parts.query or parts.fragment:
        return "with no query or fragment"
    return None


def same_endpoint(a: str | None, b: str | None) -> bool:
    """Whether two endpoint URLs name one endpoint: scheme and host in any case, a default port
    written or not, a trailing '/' or not."""
    def key(url: str | None):
        if not url:
            return None
        parts = parsed_endpoint(url)
        scheme = parts.scheme.lower()
        port = parts.port or {"https": 443, "http": 80}.get(scheme)
        return scheme, (parts.hostname or "").lower(), port, parts.path.rstrip("/")
    return key(a) == key(b)


def check_endpoint_url(url: str) -> str:
    """``AWS_ENDPOINT_URL`` as given, if it is an endpoint (``endpoint_fault``), and not a path of one
    name (``https://host/advb``: the bucket's place, and botocore then put every object under
    ``advb/`` inside the bucket). A longer path is an endpoint's own (Supabase's ``/storage/v1/s3``)
    and is kept. ValueError naming the variable otherwise; it never repeats the URL (it may hold a password)."""
    parts = parsed_endpoint(url)
    wrong = endpoint_fault(parts)
    if wrong is None and len([seg for seg in parts.path.split("/") if seg]) == 1:  # https://host/<bucket>
        wrong = ("not followed by a bucket's name (it would put every object under that name inside the "
                 f"bucket; the bucket goes in {ENV_S3_BUCKET})")
    if wrong is None:
        return url
    raise ValueError(f"{ENV_AWS_ENDPOINT_URL} must be the S3 endpoint alone, https://<host> or "
                     f"https://<host>:<port>, {wrong}")


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
_S3_REGION_LABEL = re.compile(r"^[a-z]{2,}(?:-[a-z0-9]+)*-\d+\Z")
_SPACES_REGION_LABEL = re.compile(r"^[a-z]+\d+\Z")
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
    parts = parsed_endpoint(url)
    segments = [seg for seg in parts.path.split("/") if seg]
    wrong = endpoint_fault(parts) or ("with a path of at most one name, the bucket's" if len(segments) > 1 else None)
    if wrong is not None:
        raise ValueError(f"{ENV_BUCKET_ENDPOINT_URL} must look like https://<host>, https://<host>/<bucket> "
                         f"or https://<bucket>.s3.<region>.<provider domain>, {wrong}")
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
    host = (parsed_endpoint(url or "").hostname or "").lower()  # never raises, nor quotes the URL
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
    alias_endpoint, url_bucket = _alias_endpoint(env, notes)
    values: dict[str, str | None] = {}
    for ours, theirs in S3_ENV_ALIASES.items():
        other = alias_endpoint if theirs == ENV_BUCKET_ENDPOINT_URL else given(theirs)
        mine = given(ours)
        same = same_endpoint(mine, other) if theirs == ENV_BUCKET_ENDPOINT_URL else mine == other
        if mine and other and not same:
            notes.append(f"{ours} and {theirs} are both set and differ; {ours} is used.")
        values[ours] = mine or other
    bucket = given(ENV_S3_BUCKET)
    alias_endpoint_used = same_endpoint(values[ENV_AWS_ENDPOINT_URL], alias_endpoint)
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
    named = region_from_endpoint(values[ENV_AWS_ENDPOINT_URL])
    region = check_region(given(ENV_AWS_REGION)) if bucket else given(ENV_AWS_REGION)  # only S3 reads it
    if bucket and region and named and region.lower() != named:
        notes.append(f"{ENV_AWS_REGION} differs from the region the endpoint's host names; requests are signed "
                     f"for {ENV_AWS_REGION}, which a provider may refuse: unset it or make it the host's.")
    values[ENV_AWS_REGION] = region or named
    return values, tuple(notes)


def _alias_endpoint(env: Mapping[str, str], notes: list[str]) -> tuple[str | None, str | None]:
    """``BUCKET_ENDPOINT_URL`` split (``split_bucket_endpoint``), or (None, None) when it is unset.
    One that cannot be used stops start-up, unless ``AWS_ENDPOINT_URL`` is given: then it is not
    the endpoint in use, and a note says so."""
    if not env.get(ENV_BUCKET_ENDPOINT_URL):
        return None, None
    try:
        return split_bucket_endpoint(env[ENV_BUCKET_ENDPOINT_URL])
    except ValueError as err:
        if not env.get(ENV_AWS_ENDPOINT_URL):
            raise
        notes.append(f"{err}; it is not used, as {ENV_AWS_ENDPOINT_URL} is set.")
        return None, None


# A region as botocore takes it (botocore.utils.validate_region_name): a host label.
_REGION_NAME = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?")


def check_region(region: str | None) -> str | None:
    """``AWS_REGION`` if botocore takes it; ValueError naming the variable otherwise (botocore said
    only InvalidRegionError, at the first S3 call)."""
    if region is not None and not _REGION_NAME.fullmatch(region):
        raise ValueError(f"{ENV_AWS_REGION} must be a region name such as us-east-1 or eu-central-003 (letters, "
                         "digits and '-'), or be unset to take the one the endpoint's host names")
    return region


def looked_up(check: Callable[[], bool]) -> bool:
    """``check()``, a path's ``is_file`` or ``is_dir``; False where the name cannot even be looked up
    (a part over 255 bytes, which Python 3.11 raises on), as for a path that does not exist."""
    try:
        return check()
    except OSError:
        return False


def check_ca_bundle(raw: str | None) -> None:
    """``AWS_CA_BUNDLE`` as botocore will read it, from the environment as it is (spaces and all):
    a file that exists, if set. An empty value stopped the S3 client (InvalidConfigError), and a
    missing file or one with a space before it failed every call as a TLS handshake."""
    if raw is not None and (not raw or raw != raw.strip() or not looked_up(Path(raw).is_file)):
        raise ValueError(f"{ENV_AWS_CA_BUNDLE} must name a CA certificate file that exists, with no spaces "
                         "around it (botocore reads it as it is), or be unset")


def either_name(name: str) -> str:
    """How a message names a setting that also has runpod's alias: "AWS_ACCESS_KEY_ID (or
    BUCKET_ACCESS_KEY_ID)"."""
    alias = S3_ENV_ALIASES.get(name)
    return f"{name} (or {alias})" if alias else name


S3_HELP = ("S3 storage (B2: `https://s3.<region>.backblazeb2.com`). A bucket needs both keys (the worker never looks for "
           "credentials elsewhere, such as an instance metadata address); the bucket's name follows botocore's rule "
           "(letters, digits, `.`, `-`, `_`, at most 255; or an access point ARN). Each S3 setting, broken, stops the "
           "worker at start with a sentence naming the variable, and fails the gate")


def setting(env: str, parse: Parser, default, doc: str, *, shown: str | None = None, offered: bool = False):
    """A ``Settings`` field and its row (``Var``): the one place a setting is declared."""
    return field(default=default, metadata={"var": Var(env, parse, default, doc, shown, offered)})


@dataclass(frozen=True)
class Settings:
    """Every setting the worker reads, each declared once by its row; ``from_env`` reads them all."""

    volume_path: Path = setting(
        ENV_VOLUME_PATH, PathValue(), Path(DEFAULT_VOLUME_PATH),
        "network volume; the model root is `<volume>/models` when it exists, else `~/.cache/f5-tts-worker/models`")
    model_root: Path | None = setting(ENV_MODEL_ROOT, PathValue(), None, "model root override", shown="derived")
    baked_model_dir: Path = setting(ENV_BAKED_MODEL_DIR, PathValue(), Path(DEFAULT_BAKED_MODEL_DIR),
                                    "models baked into the image (outside the volume mount)")
    tmp_dir: Path = setting(
        ENV_TMP_DIR, PathValue(), Path("/tmp"),
        "per-job files `<job_id>_voice.wav`, `<job_id>_output.wav` (the encoded output, whatever its format), "
        "`<job_id>_download` (an upload's source), `<job_id>_subtitles` (a subtitle file before it is stored)")
    local_storage_dir: Path | None = setting(
        ENV_LOCAL_STORAGE_DIR, PathValue(), None,
        "storage with no `S3_BUCKET`; a path that is a file, lies under a file, or cannot be written (or created) "
        "is a start error and fails the gate", shown="`<volume>/storage` or `./storage`")
    ckpt_file: str | None = setting(ENV_CKPT_FILE, Text(), None, "explicit local checkpoint (a fine-tune)")
    vocab_file: str | None = setting(ENV_VOCAB_FILE, Text(), None, "explicit local vocabulary")
    model_config: str | None = setting(
        ENV_MODEL_CONFIG, Text(), None, "explicit model config: an f5-tts YAML, so the architecture may differ")
    vocoder_dir: str | None = setting(ENV_VOCODER_DIR, Text(), None, "explicit local Vocos folder")
    models: dict[str, dict[str, str]] | None = setting(
        ENV_MODELS, ModelMap(), None,
        "more models beside the built-in `F5TTS_v1_Base` and `F5TTS_Base`: each `ckpt` and `vocab` a local path or "
        "`hf://owner/repo/path`, `config` a layout f5-tts ships (" + ", ".join(f"`{n}`" for n in PACKAGED_LAYOUTS)
        + ") or a YAML file ([models](#several-models-per-endpoint))", shown="none", offered=True)
    default_model: str = setting(
        ENV_DEFAULT_MODEL, Text(), F5_MODEL_NAME,
        "the model of jobs that name none, loaded at start; `F5_CKPT_FILE`, `F5_VOCAB_FILE` and `F5_MODEL_CONFIG` "
        "replace its files", offered=True)
    preload_models: tuple[str, ...] = setting(
        ENV_PRELOAD_MODELS, NameList(), (),
        "models loaded at start beside the default (the others load on first use)", shown="none", offered=True)
    model_memory_mb: int = setting(
        ENV_MODEL_MEMORY_MB, Number(1, 2**22, whole=True), 16384,
        "TTS model weights kept on the device under this many MiB; past it the least recently used model "
        "without work in flight is unloaded (F5TTS_v1_Base: 643 MiB in fp16)")
    asr_model: str = setting(ENV_ASR_MODEL, Text(), "openai/whisper-large-v3-turbo",
                             "transcriber: a hub id or a local folder", offered=True)
    device: str | None = setting(
        ENV_DEVICE, Device(), None,
        "anything else (`cpu:0`, `banana`) stops the worker at start, and a CUDA device the machine lacks is a "
        "start error", shown="`cuda` if available else `cpu`")
    s3_bucket: str | None = setting(ENV_S3_BUCKET, Text(), None, S3_HELP, offered=True)
    aws_access_key_id: str | None = setting(ENV_AWS_ACCESS_KEY_ID, Text(), None, "the bucket's key id", offered=True)
    aws_secret_access_key: str | None = setting(ENV_AWS_SECRET_ACCESS_KEY, Text(), None, "the bucket's secret key",
                                                offered=True)
    aws_region: str | None = setting(
        ENV_AWS_REGION, Text(), None, "the bucket's region (SigV4 signs with it): letters, digits and `-`",
        offered=True,
        shown="from the endpoint's host (`s3.<region>.…`, `<region>.digitaloceanspaces.com`), else `us-east-1`")
    aws_endpoint_url: str | None = setting(
        ENV_AWS_ENDPOINT_URL, Text(), None,
        "the endpoint alone, `https://<host>[:<port>]`, not followed by a bucket's name (`https://<host>/<bucket>`: "
        "botocore would put every object under that name inside the bucket; a longer path, an endpoint's own such "
        "as Supabase's `/storage/v1/s3`, is kept), with no user name, password or query in it", offered=True)
    presign_expiry: int = setting(
        ENV_PRESIGN_EXPIRY, Number(1, MAX_PRESIGN_EXPIRY, whole=True), 3600,
        "lifetime of `audio_url`, seconds (seven days is the most an S3 presigned URL may last)", offered=True)
    allow_private_urls: bool = setting(ENV_ALLOW_PRIVATE_URLS, Flag(), False,
                                       "allow uploads from private addresses (runpod's SDK's switch)")
    max_voice_bytes: int = setting(ENV_MAX_VOICE_BYTES, Number(1, 2**30, whole=True), 50 * 1024 * 1024,
                                   "upload size cap, for every source (URL, base64, key); also the most a stored "
                                   "voice may be, so a larger WAV put in `voices/` by hand is refused by the jobs "
                                   "that name it before it is copied or read")
    max_concurrency: int = setting(ENV_MAX_CONCURRENCY, Number(1, 256, whole=True), 16,
                                   "jobs runpod may hand one worker at once (batched together)", offered=True)
    fast_path: bool = setting(ENV_FAST_PATH, Flag(), True,
                              "bucketed CUDA-graph inference; `0` runs the DiT forward eagerly", offered=True)
    fused_kernels: bool = setting(
        ENV_FUSED_KERNELS, Flag(), True,
        "after start, compile the fast path's fused Triton kernels (cache: `TRITON_CACHE_DIR`, on the volume; the "
        "compile lock there is waited for off the model thread, at most 240 s), check them against the unfused "
        "step on this GPU, and switch to them only if they agree; `0` stays on the unfused step. Variable-length "
        "flash attention is checked and switched to on its own, wherever flash runs, whatever this says")
    job_timeout_s: float = setting(
        ENV_JOB_TIMEOUT, Number(0, 24 * 3600.0), 600.0,
        "seconds: a job still running after this is stopped and answered with an error naming what it waited on; "
        "0: no limit", offered=True)
    # One storage call against an endpoint that stops answering ends within attempts x (connect + read + 1 s)
    # plus botocore's backoff, 48 s with these defaults (``s3_utils.call_bound_s`` has the formula).
    s3_connect_timeout: float = setting(ENV_S3_CONNECT_TIMEOUT, Number(0, 60.0, above=True), 5.0,
                                        "seconds to connect to the storage endpoint")
    s3_read_timeout: float = setting(
        ENV_S3_READ_TIMEOUT, Number(0, 600.0, above=True), 15.0,
        "seconds: a storage request with no answer for this long fails "
        "([guide](STORAGE-DEPLOYMENT-GUIDE.md#storage-timeouts))")
    s3_max_attempts: int = setting(
        ENV_S3_MAX_ATTEMPTS, Number(1, 10, whole=True), 2,
        "tries per storage call, so it ends within attempts × (connect + 1 + read) s plus backoff: 48 s with the "
        "defaults")
    local_retention_hours: float = setting(
        ENV_LOCAL_RETENTION_HOURS, Number(0, 10 * 365 * 24.0), 0.0,
        "local storage only: `output/` and `logs/` files older than this are removed, checked after jobs at most "
        "every 10 minutes; never `voices/`; 0 keeps them forever. On S3 use lifecycle rules "
        "([guide](STORAGE-DEPLOYMENT-GUIDE.md#keeping-storage-from-growing))")
    # Prepared reference voices are about 2.3 MB each (12 s at 24 kHz).
    voice_cache_size: int = setting(
        ENV_VOICE_CACHE_SIZE, Number(0, 1000, whole=True), 32,
        "prepared voices kept in memory per worker, each checked against storage at every use with one "
        "conditional GET ([prepared voices](#prepared-voices-in-memory)); 0: none")
    max_result_bytes: int = setting(
        ENV_MAX_RESULT_BYTES, Number(1, RUNSYNC_RESULT_BYTES, whole=True), RUN_RESULT_BYTES,
        "the largest result a job returns: a job whose result could pass it (its segments, a streamed job's pieces "
        "and its other fields at their widest: URLs, keys, the sentences about its subtitle files) is refused "
        "before synthesis, and it bounds inline audio (`return_base64`); the default is RunPod's payload limit "
        "for `/run` (`/runsync` takes 20 MB, the most it may be set to)")
    # Captured graphs keep static input buffers per (batch, frames) bucket: about 1 MiB for a single
    # job, ~80 MiB for 16 jobs of 2048 frames (fp16, F5TTS_v1_Base).
    graph_memory_mb: int = setting(
        ENV_GRAPH_MEMORY_MB, Number(1, 2**20, whole=True), 1024,
        "the fast path's captured CUDA graphs keep their static input buffers under this many MiB, the least "
        "recently used evicted (re-captured, in one step, if needed again)")
    streaming: bool = setting(
        ENV_STREAMING, Flag(), False,
        "`1`: the handler streams ([streaming](#streaming)); jobs may ask for `\"stream\": true`, and every "
        "job's output becomes the list of what it yielded, its result last", offered=True)
    serve: str = setting(
        ENV_SERVE, Choice(SERVE_FACES), "queue",
        "`queue`: RunPod's job queue; `http`: OpenAI's speech API over HTTP, for a load-balancing endpoint "
        "([HTTP](#openais-speech-api-over-http))", offered=True)
    http_host: str = setting(ENV_HTTP_HOST, Text(), "0.0.0.0", "`http` only: the address the server binds")
    port: int = setting(ENV_PORT, Number(1, 65535, whole=True), 80,
                        "`http` only: the API's port (RunPod's load balancer sets it)")
    port_health: int | None = setting(ENV_PORT_HEALTH, Number(1, 65535, whole=True), None,
                                      "`http` only: the port of `GET /ping` when it is not `PORT`", shown="`PORT`")
    api_key: str | None = setting(
        ENV_API_KEY, Secret(), None,
        "`http` only: every route but `/ping` then needs `Authorization: Bearer <key>`; unset, a server reached "
        "other than through RunPod's proxy is open")
    http_store_results: bool = setting(
        ENV_HTTP_STORE_RESULTS, Flag(), False,
        "`http` only: also store each response's audio under `output/`, as queue jobs are")
    voice_aliases: dict[str, str] | None = setting(
        ENV_VOICE_ALIASES, NameMap(), None,
        "`http` only: voice names a client may send for a stored voice (`{\"alloy\": \"alice.wav\"}`), for "
        "clients whose voice names cannot be changed", shown="none")
    on_runpod_queue: bool = setting(
        ENV_RUNPOD_JOB_URL, Present(), False,
        "set by RunPod on its workers: jobs come from RunPod's queue (progress reports go there), not runpod's "
        "local modes; never set by hand (any value, `0` too, counts as set)", shown="unset")
    warnings: tuple[str, ...] = ()  # sentences about the variables (conflicting aliases ...), no values

    @property
    def health_port(self) -> int:
        return self.port_health or self.port

    @property
    def volume_mounted(self) -> bool:
        return looked_up(self.volume_path.is_dir)

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
        """Every row read from ``env`` (the S3 ones after runpod's aliases are resolved), then the
        folders that default to places under the volume; ValueError naming a variable it refuses."""
        # Surrounding spaces dropped first, so a value of spaces alone is unset for every check alike
        # (a key of " " passed the bucket-needs-both-keys check, then reached boto3 as no key).
        raw = os.environ if env is None else env
        env = {name: value.strip() for name, value in raw.items()}
        s3, warnings = resolve_s3_env(env)
        if s3[ENV_S3_BUCKET]:  # only S3 reads it
            check_ca_bundle(raw.get(ENV_AWS_CA_BUNDLE))
        source = {**env, **{name: value or "" for name, value in s3.items()}}
        values = {name: var.read(source) for name, var in VARS.items()}
        volume = values["volume_path"]
        if values["model_root"] is None:
            # no volume: a per-user cache, never /tmp (job files live there and get swept)
            values["model_root"] = (volume / VOLUME_MODELS_SUBDIR if looked_up(volume.is_dir)
                                    else Path.home() / ".cache" / "f5-tts-worker" / "models")
        if values["local_storage_dir"] is None:
            values["local_storage_dir"] = volume / "storage" if looked_up(volume.is_dir) else Path("storage").resolve()
        return cls(**values, warnings=warnings)


# Each field's row, by field name: what from_env reads, and what the README's table and the Hub check derive from.
VARS: dict[str, Var] = {f.name: f.metadata["var"] for f in fields(Settings) if "var" in f.metadata}
# The variables a person deploying the worker is offered (the RunPod Hub listing, .runpod/hub.json,
# lists exactly these; tests/test_runpod_hub.py holds it to this list). The others have defaults
# that suit RunPod, or are for development and tests.
USER_FACING_ENV = tuple(var.env for var in VARS.values() if var.offered)
# Variables that are not Settings fields, for the README's table: runpod's aliases and botocore's own.
OTHER_VARS = (
    Var(ENV_BUCKET_ENDPOINT_URL, Text(), None,
        f"runpod's name, accepted for `{ENV_AWS_ENDPOINT_URL}`; it may name the bucket, used when `{ENV_S3_BUCKET}` "
        "is unset: `https://<host>/<bucket>`, `https://<bucket>.s3.<region>.<provider>`, "
        "`https://<bucket>.<region>.digitaloceanspaces.com` "
        "([guide](STORAGE-DEPLOYMENT-GUIDE.md#environment-variables))"),
    Var(ENV_BUCKET_ACCESS_KEY_ID, Text(), None, f"runpod's name, accepted for `{ENV_AWS_ACCESS_KEY_ID}`"),
    Var(ENV_BUCKET_SECRET_ACCESS_KEY, Text(), None,
        f"runpod's name, accepted for `{ENV_AWS_SECRET_ACCESS_KEY}`. When both of a pair are set the `AWS_*` one "
        "is used and the log says so (names only)"),
    Var(ENV_AWS_CA_BUNDLE, PathValue(), None,
        "CA certificate file for an S3 endpoint with a private CA (read by botocore, as it is: with a bucket set, "
        "a value that is empty, has spaces around it or names no file stops start-up)"),
    Var(ENV_REQUESTS_CA_BUNDLE, PathValue(), None,
        f"botocore's CA certificate file when `{ENV_AWS_CA_BUNDLE}` is unset, and the gate's for its presigned-URL "
        "check"),
    Var(ENV_RUNPOD_LOG_LEVEL, Text(), None,
        f"runpod's own log level (`{ENV_RUNPOD_DEBUG_LEVEL}` its older name); unset, the worker sets "
        f"`{RUNPOD_QUIET_LEVEL}`, because at runpod's default, `DEBUG`, it logs every job's input (the text) and "
        "output (presigned URLs with their signatures): set `DEBUG` only where those logs are private",
        shown=f"`{RUNPOD_QUIET_LEVEL}` (set by the worker)"),
)
TABLE_HEADER = "| variable | default | accepts | meaning |\n| --- | --- | --- | --- |"


def read_alone(field: str, env: Mapping[str, str] | None = None):
    """One setting read by itself, its default if its own value is refused: what a worker whose
    settings were refused (``f5worker.refusal``) still needs to know of them."""
    raw = os.environ if env is None else env
    try:
        return VARS[field].read({name: value.strip() for name, value in raw.items()})
    except ValueError:
        return VARS[field].default


def markdown_table() -> str:
    """The README's configuration table, one row per variable."""
    return "\n".join([TABLE_HEADER, *(var.markdown_row() for var in (*VARS.values(), *OTHER_VARS))])


def quiet_runpod_logs(env: dict | None = None) -> None:
    """runpod's level ``RUNPOD_QUIET_LEVEL`` unless one is set (``ENV_RUNPOD_LOG_LEVEL``). Call
    before runpod is imported: it reads the level once, at import."""
    env = os.environ if env is None else env
    if not (env.get(ENV_RUNPOD_LOG_LEVEL) or env.get(ENV_RUNPOD_DEBUG_LEVEL)):
        env[ENV_RUNPOD_LOG_LEVEL] = RUNPOD_QUIET_LEVEL


def apply_cache_env(settings: Settings, env: dict | None = None) -> dict[str, str]:
    """Point every library cache at the model root. Call before torch or huggingface is imported:
    huggingface_hub reads HF_HOME once, at import."""
    env = os.environ if env is None else env
    values = settings.cache_env()
    env.update(values)
    return values


def main(argv: list[str] | None = None) -> int:
    """``python -m f5worker.settings --markdown`` prints the README's configuration table."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m f5worker.settings", description=main.__doc__)
    parser.add_argument("--markdown", action="store_true", help="print the README's configuration table")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown_table() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
