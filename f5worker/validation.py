"""Pre-deployment checks of the worker's storage configuration (``validate-storage-config.py``).

Why this module exists: every storage mistake the worker can meet in production (no network volume
attached, model caches pointed at the small container disk or ``/tmp``, a half-downloaded
checkpoint, a volume too full for the first download, S3 credentials that cannot write) otherwise
shows up only as a failed job after a cold start. These checks find each of them in seconds, on
the machine that will run the worker, and say how to fix it. They read the same settings the
worker reads (``f5worker.settings``), resolve models by the same order (``f5worker.model.store``,
never downloading) and probe storage with the same code (``s3_utils.make_storage``), so a passing
run means the worker will find what it needs.

Nothing here changes the environment: the worker points the library caches at the model root
itself when it starts (``apply_cache_env``); this only reports whether the container's own
environment agrees. Credentials are never printed: the access key id shows as its last 4
characters, the secret as "set", and every message is scrubbed of both before output.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import ssl
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from f5worker.errors import StorageError, WorkerError
from f5worker.model.registry import ModelSpec, model_registry, required_models, split_hf
from f5worker.model.store import (
    VOCODER_HUB_FILES,
    HubFile,
    hub_parts,
    resolve_asr_model,
    resolve_hub_files,
    resolve_model_files,
    resolve_vocoder_dir,
)
from f5worker.settings import (
    ASR_DOWNLOAD_BYTES,
    CACHE_ENV_SUBDIRS,
    DEFAULT_VOLUME_PATH,
    DOWNLOAD_HEADROOM_BYTES,
    ENV_AWS_ACCESS_KEY_ID,
    ENV_AWS_CA_BUNDLE,
    ENV_AWS_ENDPOINT_URL,
    ENV_AWS_REGION,
    ENV_AWS_SECRET_ACCESS_KEY,
    ENV_BUCKET_ENDPOINT_URL,
    ENV_DEVICE,
    ENV_FUSED_KERNELS,
    ENV_LOCAL_STORAGE_DIR,
    ENV_MODEL_CONFIG,
    ENV_MODEL_ROOT,
    ENV_REQUESTS_CA_BUNDLE,
    ENV_S3_BUCKET,
    ENV_TMP_DIR,
    ENV_VOCODER_DIR,
    ENV_VOLUME_PATH,
    PACKAGED_LAYOUTS,
    POD_VOLUME_PATH,
    VOCODER_DOWNLOAD_BYTES,
    VOCODER_FILES,
    VOLUME_MODELS_SUBDIR,
    Settings,
    either_name,
)
from f5worker.model.loader import check_model_checkpoint, check_vocoder_weights
from s3_utils import Storage, make_storage

log = logging.getLogger(__name__)

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"

TMP_MIN_FREE_BYTES = 1_000_000_000  # reference clips and outputs of concurrent jobs
GIB = 2 ** 30
# Cards sold as "8 GB" report a little under 8 GiB; F5TTS in fp16 needs about 2-3 GB.
GPU_MIN_BYTES = int(7.5 * GIB)
GPU_RECOMMENDED_BYTES = 15 * GIB  # "16 GB" cards


@dataclass
class CheckResult:
    name: str
    status: str  # pass / warn / fail / skip
    message: str  # one line; names the fix when the status is not pass


def _gb(n: int | float) -> str:
    return f"{n / 1e9:.1f} GB"


def _fix(message: str, fix: str) -> str:
    return f"{message} Fix: {fix}"


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _is_under(path: Path, root: Path) -> bool:
    try:
        return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))
    except (OSError, ValueError):
        return False


def _write_test(directory: Path) -> str | None:
    """None if a file can be created and deleted in ``directory``, else why not."""
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=".f5-validate-", suffix=".tmp")
        try:
            os.write(fd, b"f5-tts storage validation")
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as err:
        return err.strerror or type(err).__name__
    return None


def _free_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


# --- what the models need ------------------------------------------------------------------------

@dataclass
class ModelState:
    """Which model sets resolve locally (never downloading), and what the missing ones need."""

    f5: dict[str, tuple[Path, Path, Path]]  # model name -> checkpoint, vocab, config, when all resolved
    vocoder_dir: Path | None  # when its files resolved
    found: dict[str, list[Path]]  # model name or "vocoder" -> files found (checked for integrity)
    sources: dict[str, str]  # model name or "vocoder" -> where it came from
    missing: dict[str, int]  # model name or "vocoder" -> approximate download bytes
    errors: list[str]  # explicit settings that point at nothing: a download cannot fix these
    asr_path: Path | None
    asr_error: str | None


def _explicit_errors(settings: Settings) -> list[str]:
    """The same explicit-folder rules as ``model.store``'s resolvers (a model's own files: below)."""
    errors = []
    if settings.vocoder_dir and not Path(settings.vocoder_dir).exists():
        errors.append(f"{ENV_VOCODER_DIR} is set to {settings.vocoder_dir}, which does not exist.")
    if settings.vocoder_dir and Path(settings.vocoder_dir).is_dir():
        lacking = [n for n in VOCODER_FILES if not (Path(settings.vocoder_dir) / n).is_file()]
        if lacking:
            errors.append(f"{ENV_VOCODER_DIR} ({settings.vocoder_dir}) lacks {', '.join(lacking)}.")
    return errors


def _local_part_errors(spec: ModelSpec) -> list[str]:
    """A model's local files (not hf://) that do not exist: a download cannot fix these."""
    parts = [("ckpt", spec.ckpt), ("vocab", spec.vocab)]
    if spec.config not in PACKAGED_LAYOUTS:
        parts.append(("config", spec.config))
    return [f"{spec.label(part)} is set to {value}, which does not exist." for part, value in parts
            if value and split_hf(value) is None and not Path(value).exists()]


def _inspect_tts_model(state: "ModelState", spec: ModelSpec, settings: Settings, *, required: bool) -> None:
    try:
        ckpt, vocab, config, state.sources[spec.name] = resolve_model_files(spec, settings, allow_download=False)
    except StorageError as err:
        if not required:
            return
        local = _local_part_errors(spec)
        parts = list(hub_parts(spec).values())
        repos = {f.repo: tuple(g for g in parts if g.repo == f.repo) for f in parts}  # a repo's files: one set
        hub = [f for files in repos.values() if not _cached(files, settings) for f in files]
        if local:
            state.errors.extend(local)
        elif hub:
            state.missing[spec.name] = sum(f.size_hint for f in hub)
        else:
            state.errors.append(str(err))
        return
    state.f5[spec.name] = (ckpt, vocab, config)
    state.found[spec.name] = [ckpt, vocab, config]


def _cached(hub_files: tuple[HubFile, ...], settings: Settings) -> bool:
    try:
        resolve_hub_files(hub_files, settings, allow_download=False)
    except StorageError:
        return False
    return True


def inspect_models(settings: Settings) -> ModelState:
    """Each set (F5-TTS files, vocoder) on its own: one missing set must not hide the other's faults."""
    state = ModelState(f5={}, vocoder_dir=None, found={}, sources={}, missing={},
                       errors=_explicit_errors(settings), asr_path=None, asr_error=None)
    try:
        registry = model_registry(settings)
    except StorageError as err:  # F5_DEFAULT_MODEL or F5_PRELOAD_MODELS names no model
        state.errors.append(str(err))
        registry = {}
    required = required_models(settings, registry)
    for name, spec in registry.items():
        _inspect_tts_model(state, spec, settings, required=name in required)
    try:
        state.vocoder_dir, state.sources["vocoder"] = resolve_vocoder_dir(settings, allow_download=False)
        state.found["vocoder"] = [state.vocoder_dir / n for n in VOCODER_FILES]
    except StorageError as err:
        if not settings.vocoder_dir and not _cached(VOCODER_HUB_FILES, settings):
            state.missing["vocoder"] = VOCODER_DOWNLOAD_BYTES
        elif not state.errors:
            state.errors.append(str(err))
    try:
        state.asr_path = resolve_asr_model(settings, allow_download=False)
    except StorageError as err:
        state.asr_error = str(err)
    return state


def fit_problems(m: ModelState) -> list[str]:
    """The sentences the worker's loader would refuse the weights with: names and shapes against the
    architecture (built on the meta device, so no second copy of the model anywhere), finite values."""
    problems = []
    for ckpt, vocab, config in m.f5.values():
        try:
            check_model_checkpoint(ckpt, config, vocab)
        except StorageError as err:
            problems.append(str(err))
    if m.vocoder_dir is not None:
        try:
            check_vocoder_weights(m.vocoder_dir)
        except StorageError as err:
            problems.append(str(err))
    return problems


def check_model_file(path: Path) -> str | None:  # noqa: C901 - one model file's checks, each a line
    """None if ``path`` is non-empty and its format's header loads, else what is wrong with it."""
    try:
        size = path.stat().st_size
    except OSError as err:
        return f"{path} cannot be read ({err.strerror or type(err).__name__})"
    if size == 0:
        return f"{path} is empty"
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors import safe_open

            # Parses the header and checks the data it describes is all there (a truncated
            # download fails with "incomplete metadata, file not fully covered").
            with safe_open(str(path), framework="pt") as f:
                if not list(f.keys()):
                    return f"{path} holds no tensors"
        elif suffix in {".bin", ".pt", ".pth", ".ckpt"}:
            import torch

            if zipfile.is_zipfile(path):  # the zip format: memory-mapped, nothing read in full
                torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            else:  # the legacy format cannot be memory-mapped
                torch.load(str(path), map_location="cpu", weights_only=True)
        elif suffix in {".yaml", ".yml"}:
            import yaml

            if not isinstance(yaml.safe_load(path.read_text(encoding="utf-8")), dict):
                return f"{path} is not a YAML mapping"
        elif suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif suffix == ".txt":
            if not path.read_text(encoding="utf-8").strip():
                return f"{path} has no entries"
    except Exception as err:  # noqa: BLE001 - any failure to load is the finding
        detail = str(err).splitlines()[0][:160] if str(err) else ""
        return f"{path} does not load ({type(err).__name__}{': ' + detail if detail else ''})"
    return None


# --- the checks ------------------------------------------------------------------------------------

@dataclass
class Step:
    """What a running check is doing now, named when it does not finish in time."""

    doing: str = ""

    def __call__(self, doing: str) -> None:
        self.doing = doing


@dataclass
class Context:
    settings: Settings
    env: dict[str, str]
    args: argparse.Namespace
    models: ModelState
    name: str = ""  # the running check's, from CHECKS
    step: Step = field(default_factory=Step)


def check_volume(ctx: Context) -> CheckResult:
    name, volume = ctx.name, ctx.settings.volume_path
    if not ctx.settings.volume_mounted:
        return CheckResult(name, FAIL, _fix(
            f"{volume} does not exist or is not a directory: models would go to the container disk "
            f"({ctx.settings.model_root}) and be downloaded again by every worker.",
            f"attach a network volume (a serverless worker mounts it at {DEFAULT_VOLUME_PATH}; a pod "
            f"mounts it at {POD_VOLUME_PATH}, so set {ENV_VOLUME_PATH}={POD_VOLUME_PATH} there), or set "
            f"{ENV_VOLUME_PATH} to where it is mounted."))
    why = _write_test(volume)
    if why:
        return CheckResult(name, FAIL, _fix(f"{volume} is not writable ({why}).",
                                            "attach the network volume read-write."))
    free = _gb(_free_bytes(volume))
    if not os.path.ismount(volume):
        # RunPod mounts its cached models under the volume's mount point even with no volume attached.
        cached = ctx.settings.runpod_model_cache
        also = (f" RunPod's cached models are in {cached}, but no network volume is attached."
                if cached.is_dir() else "")
        return CheckResult(name, WARN, _fix(
            f"{volume} (writable, {free} free) is not a mount point: data will not persist.{also}",
            f"attach a network volume mounted at {volume} (a plain folder is lost with the container)."))
    return CheckResult(name, PASS, f"{volume} (mounted, writable, {free} free)")


def check_model_root(ctx: Context) -> CheckResult:
    name, s = ctx.name, ctx.settings
    root = s.model_root
    if _is_under(root, s.tmp_dir) and not (s.volume_mounted and _is_under(root, s.volume_path)):
        return CheckResult(name, FAIL, _fix(
            f"the model root {root} is under the temp folder {s.tmp_dir}, which is small and swept.",
            f"unset {ENV_MODEL_ROOT} (models then go to {s.volume_path / VOLUME_MODELS_SUBDIR}) or point "
            "it at the volume."))
    if not (s.volume_mounted and _is_under(root, s.volume_path)):
        return CheckResult(name, WARN, _fix(
            f"the model root {root} is not on the network volume {s.volume_path}: downloaded models "
            "will not persist between workers.",
            f"attach the volume and unset {ENV_MODEL_ROOT}, or bake the models into the image "
            "(--build-arg PRELOAD_MODELS=1)."))
    if ctx.models.missing:  # a download will write here
        why = _write_test(_existing_ancestor(root))
        if why:
            return CheckResult(name, FAIL, _fix(f"the model root {root} is not writable ({why}) and "
                                                "models are missing.", "make the volume writable."))
    return CheckResult(name, PASS, f"{root} (on the volume)")


def dockerfile_cache_env(settings: Settings) -> dict[str, str]:
    """The cache variables Dockerfile.runpod sets: those of the model root on the default volume
    (tests/test_dockerfile.py holds the file to this)."""
    return replace(settings, model_root=Path(DEFAULT_VOLUME_PATH) / VOLUME_MODELS_SUBDIR).cache_env()


def check_cache_env(ctx: Context) -> CheckResult:
    """Only the variables something reads (``CACHE_ENV_SUBDIRS``); others, such as
    TRANSFORMERS_CACHE, which transformers 5 ignores, are not looked at."""
    name, s = ctx.name, ctx.settings
    expected, image = s.cache_env(), dockerfile_cache_env(s)
    unset, wrong = [], []
    for var in CACHE_ENV_SUBDIRS:
        value = ctx.env.get(var)
        if not value:
            unset.append(var)
        elif os.path.normpath(value) != os.path.normpath(expected[var]):
            wrong.append(var)
    if wrong and not s.volume_mounted and all(ctx.env[v] == image[v] for v in wrong):
        return CheckResult(name, WARN, _fix(
            f"{', '.join(wrong)} hold Dockerfile.runpod's values for a volume at {DEFAULT_VOLUME_PATH}, "
            f"but no volume is mounted at {s.volume_path}: the worker points them at {s.model_root} "
            "when it starts.", "attach the network volume (see \"volume mounted\")."))
    as_image = expected == image
    if wrong:
        found = "; ".join(f"{v}={ctx.env[v]} (expected {expected[v]})" for v in wrong)
        fix = ("set each to the expected value, as Dockerfile.runpod does, or unset it." if as_image else
               f"set each to the expected value in the endpoint's environment, or unset it (Dockerfile.runpod's "
               f"values are for a volume at {DEFAULT_VOLUME_PATH} with {ENV_MODEL_ROOT} unset).")
        return CheckResult(name, FAIL, _fix(f"not under the model root {s.model_root}: {found}.", fix))
    if unset:
        return CheckResult(name, WARN, _fix(
            f"{', '.join(unset)} not set: the worker sets them itself when it starts, but other "
            "tools in the container (huggingface-cli, python -c ...) will not see them.",
            "set " + ", ".join(f"{v}={expected[v]}" for v in unset)
            + (" (Dockerfile.runpod sets these)." if as_image else ".")))
    return CheckResult(name, PASS, f"{', '.join(CACHE_ENV_SUBDIRS)} under {s.model_root}")


def check_tts_models(ctx: Context) -> CheckResult:
    name, m = ctx.name, ctx.models
    if m.errors:
        return CheckResult(name, FAIL, _fix(" ".join(m.errors), "correct or unset these variables."))
    problems = [p for files in m.found.values() for f in files if (p := check_model_file(f))]
    if problems:
        return CheckResult(name, FAIL, _fix(
            "; ".join(problems) + ".",
            "delete the damaged file(s) (a cached copy: its snapshot link and blob) so the worker "
            "downloads them again, or replace them."))
    misfits = fit_problems(m)
    if misfits:  # the worker would refuse to load these
        return CheckResult(name, FAIL, _fix(
            " ".join(misfits),
            "replace the file (a cached copy: delete its snapshot link and blob so the worker downloads "
            f"it again), or set {ENV_MODEL_CONFIG} to the config the weights were trained with."))
    where = "; ".join(f"{k} from {v}" for k, v in ctx.models.sources.items())
    if m.missing:
        what = " and ".join(m.missing)
        message = (f"{what} not in any local cache; the first job will download about "
                   f"{_gb(sum(m.missing.values()))} into {ctx.settings.hub_cache}"
                   + (f" ({where})" if where else "") + ".")
        status = FAIL if ctx.args.require_models else WARN
        return CheckResult(name, status, _fix(
            message, "pre-load them (build with --build-arg PRELOAD_MODELS=1, or run "
                     "python -m f5worker.preload --volume with the volume attached) to avoid a slow first job."))
    count = sum(len(v) for v in m.found.values())
    return CheckResult(name, PASS, f"{where} ({count} files checked)")


def check_asr_model(ctx: Context) -> CheckResult:
    name, m = ctx.name, ctx.models
    if m.asr_path is None:
        return CheckResult(name, WARN, _fix(
            f"{ctx.settings.asr_model} is not in any local cache; it is only needed for jobs that "
            f"do not pass ref_text, and is downloaded (about {_gb(ASR_DOWNLOAD_BYTES)}) by the first such job.",
            "pass ref_text with each voice (or store a transcript beside it), or pre-load it "
            "with python -m f5worker.preload --volume."))
    problems = [p for f in sorted(m.asr_path.glob("*.safetensors")) + sorted(m.asr_path.glob("config.json"))
                if (p := check_model_file(f))]
    if problems:
        return CheckResult(name, FAIL, _fix("; ".join(problems) + ".",
                                            "delete the damaged file(s) so they are downloaded again."))
    return CheckResult(name, PASS, f"{ctx.settings.asr_model} at {m.asr_path}")


def check_model_space(ctx: Context) -> CheckResult:
    name, m = ctx.name, ctx.models
    directory = _existing_ancestor(ctx.settings.hub_cache)
    try:
        free = _free_bytes(directory)
    except OSError as err:
        return CheckResult(name, FAIL, f"cannot read free space of {directory} ({err.strerror}).")
    needed = sum(m.missing.values())
    if needed and free < needed + DOWNLOAD_HEADROOM_BYTES:
        return CheckResult(name, FAIL, _fix(
            f"{directory} has {_gb(free)} free; downloading the missing models needs about "
            f"{_gb(needed + DOWNLOAD_HEADROOM_BYTES)}.",
            "attach a larger network volume or pre-load the models."))
    with_asr = needed + (ASR_DOWNLOAD_BYTES if m.asr_path is None else 0)
    if with_asr > needed and free < with_asr + DOWNLOAD_HEADROOM_BYTES:
        return CheckResult(name, WARN, _fix(
            f"{directory} has {_gb(free)} free: enough for the TTS models but not for the "
            f"transcription model (about {_gb(with_asr + DOWNLOAD_HEADROOM_BYTES)} in all).",
            "attach a larger volume, or always pass ref_text."))
    if not needed:
        return CheckResult(name, PASS, f"{directory}: {_gb(free)} free, TTS models already present")
    return CheckResult(name, PASS, f"{directory}: {_gb(free)} free, the missing models need about "
                                   f"{_gb(needed + DOWNLOAD_HEADROOM_BYTES)}")


def check_tmp(ctx: Context) -> CheckResult:
    name, tmp = ctx.name, ctx.settings.tmp_dir
    if not tmp.is_dir():
        return CheckResult(name, FAIL, _fix(f"{tmp} does not exist.",
                                            f"create it or set {ENV_TMP_DIR} to a writable folder."))
    why = _write_test(tmp)
    if why:
        return CheckResult(name, FAIL, _fix(f"{tmp} is not writable ({why}).",
                                            f"set {ENV_TMP_DIR} to a writable folder."))
    free = _free_bytes(tmp)
    if free < TMP_MIN_FREE_BYTES:
        return CheckResult(name, FAIL, _fix(
            f"{tmp} has {_gb(free)} free; jobs need at least {_gb(TMP_MIN_FREE_BYTES)} for voices and outputs.",
            "raise the container disk size or free space in it."))
    return CheckResult(name, PASS, f"{tmp} (writable, {_gb(free)} free)")


def check_s3(ctx: Context) -> CheckResult:
    """The storage probe, and what ``Settings.warnings`` says about the storage variables (both of
    an alias pair set and different ...): a probe that passes with such a note is a warning."""
    result = _check_storage(ctx)
    notes = " ".join(ctx.settings.warnings)
    if not notes or result.status == SKIP:
        return result
    if result.status == PASS:
        return CheckResult(result.name, WARN, _fix(f"{result.message}; but: {notes}",
                                                   "unset one variable of each pair named."))
    return CheckResult(result.name, result.status, f"{notes} {result.message}")


def _check_storage(ctx: Context) -> CheckResult:
    """The storage the worker will use, with the worker's own settings (its timeouts and tries, not
    shorter ones: what the worker would meet is what is tested); the gate's own bound cuts it short."""
    name, s = ctx.name, ctx.settings
    if ctx.args.skip_s3:
        return CheckResult(name, SKIP, "skipped (--skip-s3)")
    if not s.s3_bucket:
        return _check_local_storage(ctx)
    key_hint = f"key id ...{s.aws_access_key_id[-4:]}" if len(s.aws_access_key_id) > 8 else "key id set"
    try:
        storage = make_storage(s)
        where = storage.describe()
        storage.probe(step=ctx.step, also=lambda key, text: fetch_as_caller(ctx, storage, key, text))
    except StorageError as err:
        return CheckResult(name, FAIL, _fix(
            f"the storage probe failed: {err} ({key_hint}, secret set).",
            f"check {ENV_S3_BUCKET}, the key pair and its permissions on the bucket, and "
            f"{either_name(ENV_AWS_ENDPOINT_URL)} for non-AWS providers."))
    except Exception as err:  # noqa: BLE001 - never show a library's own text: it can hold URLs
        return CheckResult(name, FAIL, _fix(f"the probe failed unexpectedly ({type(err).__name__}; "
                                            f"{key_hint}, secret set).",
                                            "check the S3 settings."))
    return CheckResult(name, PASS, f"{where}: write, read, presigned fetch and delete OK ({key_hint}, secret set)")


PRESIGNED = "the probe object's presigned URL (what a job gives as audio_url)"


def fetch_as_caller(ctx: Context, storage: Storage, key: str, text: str) -> None:
    """The probe object fetched through the URL a job's result would give for it (``audio_url``),
    as a caller fetches it: a plain GET, no credentials, by the proxies and CA file botocore uses.
    API calls can pass where such a URL fails (botocore follows a bucket's region for its own
    calls, while a URL signed for another region is refused), and then every job's audio_url would
    be of no use. StorageError if it fails; the URL is never said (it holds a signature)."""
    ctx.step(f"fetching {key} through its presigned URL, as a caller fetches audio_url")
    url = storage.result_url(key)
    fix = f"check {ENV_AWS_REGION} (it must be the bucket's region) and that the endpoint is one callers can reach"
    try:
        # botocore's CA file: AWS_CA_BUNDLE, else REQUESTS_CA_BUNDLE; its proxies: the environment's
        cafile = ctx.env.get(ENV_AWS_CA_BUNDLE) or ctx.env.get(ENV_REQUESTS_CA_BUNDLE) or None
        context = ssl.create_default_context(cafile=cafile)
        with urllib.request.build_opener(urllib.request.HTTPSHandler(context=context)).open(
                url, timeout=ctx.settings.s3_read_timeout) as answer:
            body = answer.read(len(text) + 1)
    except urllib.error.HTTPError as err:
        code = re.search(rb"<Code>([A-Za-z]{1,64})</Code>", err.read(4096) or b"")
        said = f"HTTP {err.code}" + (f" {code.group(1).decode()}" if code else "")
        raise StorageError(f"{PRESIGNED} was answered {said}, so callers could not fetch their audio; {fix}") from None
    except (urllib.error.URLError, OSError) as err:  # ssl.SSLError too: a CA file that is not PEM
        reason = getattr(err, "reason", err)
        raise StorageError(f"{PRESIGNED} could not be fetched ({type(reason).__name__}); {fix}") from None
    if body != text.encode("utf-8"):
        raise StorageError(f"{PRESIGNED} gave other content than was stored")


def _check_local_storage(ctx: Context) -> CheckResult:
    """No bucket: the local folder must be one the worker can write (or create); it is probed only
    where it already is or is on the volume, so no new storage/ folder is left where this ran."""
    name, s = ctx.name, ctx.settings
    status = FAIL if ctx.args.require_s3 else WARN
    local = f"{s.local_storage_dir} (not created yet)"
    try:
        storage = make_storage(s)
        storage.check_exists()
        if s.local_storage_dir.is_dir() or (s.volume_mounted and _is_under(s.local_storage_dir, s.volume_path)):
            storage.probe(step=ctx.step)
            local = f"{storage.describe()} (writable)"
    except StorageError as err:
        return CheckResult(name, FAIL, _fix(f"{err}.", f"set {ENV_LOCAL_STORAGE_DIR} to a writable folder, or "
                                                       f"set {ENV_S3_BUCKET} and its keys."))
    return CheckResult(name, status, _fix(
        f"{ENV_S3_BUCKET} is not set: voices and outputs are kept in the local folder {local}, "
        "and results are returned as file paths, not URLs.",
        f"set {ENV_S3_BUCKET}, {either_name(ENV_AWS_ACCESS_KEY_ID)}, {either_name(ENV_AWS_SECRET_ACCESS_KEY)} "
        f"(and {either_name(ENV_AWS_ENDPOINT_URL)} for B2, R2, MinIO ...; {ENV_BUCKET_ENDPOINT_URL} "
        f"may name the bucket instead of {ENV_S3_BUCKET})."))


def check_gpu(ctx: Context) -> CheckResult:
    name = ctx.name
    if ctx.args.skip_gpu:
        return CheckResult(name, SKIP, "skipped (--skip-gpu)")
    import torch

    from f5worker.inference.device import pick_device

    if ctx.settings.device == "cpu":
        return CheckResult(name, FAIL, _fix(f"{ENV_DEVICE}=cpu: the worker would run on the CPU, far too slowly.",
                                            f"unset {ENV_DEVICE}, or pass --skip-gpu when validating elsewhere."))
    if not torch.cuda.is_available():
        return CheckResult(name, FAIL, _fix(
            "no CUDA GPU is visible to PyTorch; the worker would run on the CPU, far too slowly.",
            "run on a GPU worker (16 GB+ recommended), or pass --skip-gpu when validating elsewhere."))
    try:
        device = pick_device(ctx.settings.device)  # the worker's own rule, F5_DEVICE=cuda:<index> included
    except WorkerError as err:
        return CheckResult(name, FAIL, f"{err}.")
    props = torch.cuda.get_device_properties(device)
    total = props.total_memory
    desc = f"{props.name}, {total / GIB:.1f} GiB"
    if total < GPU_MIN_BYTES:
        return CheckResult(name, FAIL, _fix(f"{desc}: F5-TTS needs at least 8 GB.",
                                            "choose a GPU with 16 GB or more."))
    if total < GPU_RECOMMENDED_BYTES:
        return CheckResult(name, WARN, _fix(f"{desc}: enough for single jobs (F5-TTS in fp16 needs about "
                                            "2-3 GB), tight for concurrent ones.",
                                            "choose a GPU with 16 GB or more."))
    return CheckResult(name, PASS, desc)


def check_triton(ctx: Context) -> CheckResult:
    """Whether the fast path's fused Triton kernels can compile and launch on this GPU; a warning
    only, since the worker then serves on the unfused step (slower, never wrong)."""
    name = ctx.name
    if ctx.args.skip_gpu or not ctx.settings.fast_path or not ctx.settings.fused_kernels:
        return CheckResult(name, SKIP, "skipped (--skip-gpu, or the fast path or its fused kernels are off)")
    import torch

    if not torch.cuda.is_available() or ctx.settings.device == "cpu":
        return CheckResult(name, SKIP, "skipped: no CUDA GPU in use")
    from f5worker.inference.device import pick_device
    from f5worker.inference.kernel_switch import triton_probe

    try:
        device = pick_device(ctx.settings.device)  # the GPU the worker would use (F5_DEVICE=cuda:<index>)
    except WorkerError:
        return CheckResult(name, SKIP, f"skipped: {ENV_DEVICE} names no GPU here (the GPU check says so)")
    problem = triton_probe(device)
    if problem is None:
        return CheckResult(name, PASS, "a Triton kernel compiled and ran here, equal to its torch reference")
    return CheckResult(name, WARN, _fix(
        f"the fused Triton kernels cannot run here ({problem}); the worker will serve on the slower unfused step.",
        "build from Dockerfile.runpod, which installs the C compiler Triton needs (gcc), or use a -devel base "
        f"image; set {ENV_FUSED_KERNELS}=0 to silence this."))


# Each check by the name its result carries, in the order they run.
CHECKS: dict[str, Callable[[Context], CheckResult]] = {
    "volume mounted": check_volume,
    "model cache location": check_model_root,
    "cache variables": check_cache_env,
    "TTS models": check_tts_models,
    "transcription model": check_asr_model,
    "free space for models": check_model_space,
    "temp folder": check_tmp,
    "S3 storage": check_s3,
    "GPU": check_gpu,
    "Fused kernels": check_triton,
}


# --- running them ------------------------------------------------------------------------------------

def _redactor(settings: Settings) -> Callable[[str], str]:
    secrets = []
    if settings.aws_secret_access_key:
        secrets.append((settings.aws_secret_access_key, "***"))
    if settings.aws_access_key_id and len(settings.aws_access_key_id) > 4:
        secrets.append((settings.aws_access_key_id, "..." + settings.aws_access_key_id[-4:]))

    def redact(text: str) -> str:
        for secret, shown in secrets:
            text = text.replace(secret, shown)
        return text

    return redact


# The whole gate answers within --timeout seconds (the guide promises seconds), each check within
# CHECK_TIMEOUT_S of it: a check still waiting then (a storage endpoint that trickles one byte a
# second, a volume that stopped answering) is reported with the step it was at, and left behind.
DEFAULT_GATE_TIMEOUT_S = 90.0
CHECK_TIMEOUT_S = 30.0  # at the default --timeout; it scales with it (a slow volume's checkpoint read)
# Checks that only ever warn: running out of time is a warning for them too.
WARN_ONLY_CHECKS = {"transcription model", "Fused kernels"}


def check_timeout_s(gate_timeout_s: float) -> float:
    """Each check's share of the run's --timeout: a third of it (30 s of the default 90 s)."""
    return gate_timeout_s * CHECK_TIMEOUT_S / DEFAULT_GATE_TIMEOUT_S


def _bounded(call: Callable[[], object], seconds: float) -> tuple[bool, object]:
    """(True, what ``call`` returned) if it ends within ``seconds``, else (False, None); it runs on
    a daemon thread, so one that never ends cannot keep the script from exiting. Raises what it raised."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = call()
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            box["error"] = err

    thread = threading.Thread(target=target, name="gate-check", daemon=True)
    thread.start()
    thread.join(max(seconds, 0.0))
    if thread.is_alive():
        return False, None
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return True, box.get("value")


def _unfinished(name: str, seconds: float, step: Step) -> CheckResult:
    at = f" (it was {step.doing})" if step.doing else ""
    return CheckResult(name, WARN if name in WARN_ONLY_CHECKS else FAIL, _fix(
        f"did not finish within {seconds:.3g} s{at}; the worker would wait on the same thing.",
        "see what it waits for (a storage endpoint or volume that answers slowly or not at all); "
        f"--timeout gives the whole run, and each check a third of it, longer (default {DEFAULT_GATE_TIMEOUT_S:g} s)."))


def _run_one(name: str, check: Callable[[Context], CheckResult], ctx: Context, deadline: float) -> CheckResult:
    seconds = min(check_timeout_s(ctx.args.timeout), deadline - time.monotonic())
    if seconds <= 0:
        return CheckResult(name, FAIL, "not run: the run's --timeout was spent by the checks before it.")
    ctx = replace(ctx, name=name, step=Step())
    try:
        finished, result = _bounded(lambda: check(ctx), seconds)
    except Exception as err:  # noqa: BLE001 - one broken check must not hide the others
        log.debug("check %s crashed", name, exc_info=True)
        return CheckResult(name, FAIL, f"the check itself failed ({type(err).__name__}: {err}).")
    return result if finished else _unfinished(name, seconds, ctx.step)


def run_checks(settings: Settings, env: dict[str, str], args: argparse.Namespace, *,
               deadline: float) -> list[CheckResult]:
    """Every check, each within its share of ``--timeout`` and all by ``deadline`` (monotonic)."""
    finished, models = _bounded(lambda: inspect_models(settings), check_timeout_s(args.timeout))
    if not finished:
        return [_unfinished("model files", check_timeout_s(args.timeout), Step("looking for the model files"))]
    ctx = Context(settings=settings, env=env, args=args, models=models)
    redact = _redactor(settings)
    results = []
    for name, check in CHECKS.items():
        result = _run_one(name, check, ctx, deadline)
        result.message = " ".join(redact(result.message).split())  # one line, no secrets
        results.append(result)
    return results


INTERRUPTED = 130  # the exit status of a run stopped by Ctrl-C (128 + SIGINT), as shells give
MAX_GATE_TIMEOUT_S = 86400.0  # a day: past what a thread's wait takes (threading.TIMEOUT_MAX), a slip


def _positive_seconds(raw: str) -> float:
    value = float(raw)
    if not 0 < value <= MAX_GATE_TIMEOUT_S:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds above 0 and at most {MAX_GATE_TIMEOUT_S:g}, not {raw!r}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="validate-storage-config.py",
        description="Check the F5-TTS worker's storage configuration: network volume, model "
                    "caches, models, temp space, S3 and GPU. Exit status 0 only if no check failed.")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    parser.add_argument("--require-models", action="store_true",
                        help="fail (not warn) when the TTS models are not already on the volume or in the image")
    parser.add_argument("--require-s3", action="store_true",
                        help="fail (not warn) when S3_BUCKET is not set")
    parser.add_argument("--skip-s3", action="store_true", help="do not check S3 storage")
    parser.add_argument("--skip-gpu", action="store_true", help="do not check for a GPU")
    parser.add_argument("--timeout", type=_positive_seconds, default=DEFAULT_GATE_TIMEOUT_S, metavar="SECONDS",
                        help="answer within this many seconds in all, each check within a third of them "
                             f"(default {DEFAULT_GATE_TIMEOUT_S:g})")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    return parser.parse_args(argv)


def gate(env: dict[str, str], args: argparse.Namespace) -> list[CheckResult]:
    """The settings read as the worker reads them, then every check. Reading them looks at the
    volume, which may not answer: that is bounded like a check."""
    deadline = time.monotonic() + args.timeout
    seconds = check_timeout_s(args.timeout)
    try:
        finished, settings = _bounded(lambda: Settings.from_env(env), seconds)
    except ValueError as err:  # a variable the worker could not start with
        return [CheckResult("settings", FAIL, _fix(f"{err}.", "set it to a valid value or unset it."))]
    if not finished:
        return [_unfinished("settings", seconds, Step(f"looking at the volume ({ENV_VOLUME_PATH})"))]
    return run_checks(settings, env, args, deadline=deadline)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.verbose:
        logging.getLogger().setLevel(logging.INFO)
    env = dict(os.environ)  # a copy: nothing here writes to the environment
    try:
        results = gate(env, args)
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback
        print("interrupted: the checks did not finish (a storage probe cut short may leave its small "
              "logs/probe-*.txt object behind).", file=sys.stderr)
        return INTERRUPTED
    failed = sum(r.status == FAIL for r in results)
    warned = sum(r.status == WARN for r in results)
    if args.json:
        print(json.dumps({"ok": failed == 0, "checks": [asdict(r) for r in results]}, indent=2))
    else:
        for r in results:
            print(f"{r.status.upper():<4}  {r.name}  {r.message}")
        if failed:
            print(f"{failed} required check(s) failed.")
        else:
            print("All storage configuration checks passed."
                  + (f" {warned} warning(s) above." if warned else ""))
    sys.stdout.flush()
    return 1 if failed else 0
