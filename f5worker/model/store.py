"""Where the model files come from: one documented resolution order, nothing loaded here.

Why this module exists: a network volume mounted at run time hides anything an image build put
under its mount point, so "pre-load into /runpod-volume at build time" cannot work. The worker
instead looks, in order, at:

1. explicit local files (``F5_CKPT_FILE``, ``F5_VOCAB_FILE``, ``F5_MODEL_CONFIG``,
   ``F5_VOCODER_DIR``; ``ASR_MODEL`` when it names a folder);
2. RunPod's cached models (``<volume>/huggingface-cache/hub``, ``Settings.runpod_model_cache``): an
   endpoint whose Model setting is ``SWivid/F5-TTS`` gets that repo's snapshot there, complete,
   before the worker starts, on the worker's local disk: the fastest copy there is, and one the
   operator asked for by name. Only one model per endpoint can be cached, so the other sets come
   from the steps below;
3. the volume cache (``<model root>/hub``, huggingface_hub's own layout);
4. the copy baked into the image (``F5_BAKED_MODEL_DIR``/hub, written by ``python -m f5worker.preload``);
5. a download into the volume cache, only after checking the volume has room for it.

Each set (F5-TTS checkpoint and vocab; the vocoder; Whisper) is taken whole from one cache. A cache
repo without ``refs/main`` (RunPod documents that its cache may lack it) is read from its newest
snapshot that holds the whole set. huggingface_hub writes each file as ``*.incomplete`` under a
per-file lock and links it into the snapshot only when complete, so two workers on one volume never
corrupt a download and a half-finished file is never found by step 3.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from importlib.resources import files as package_files
from pathlib import Path
from typing import Callable

from f5worker.errors import StorageError
from f5worker.model.registry import BUILTIN_MODELS, ModelSpec, model_registry, split_hf
from f5worker.settings import (
    ASR_DOWNLOAD_BYTES,
    DOWNLOAD_HEADROOM_BYTES,
    ENV_VOCODER_DIR,
    F5_DOWNLOAD_BYTES,
    F5_MODEL_NAME,
    PACKAGED_LAYOUTS,
    VOCODER_DOWNLOAD_BYTES,
    VOCODER_FILES,
    VOCODER_REPO,
    Settings,
)

log = logging.getLogger(__name__)

# Files of the Whisper repo the transcriber needs (weights as safetensors only).
ASR_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt"]


@dataclass(frozen=True)
class HubFile:
    repo: str
    filename: str
    size_hint: int  # bytes, for the free-space check before a download


TEXT_FILE_DOWNLOAD_BYTES = 20_000  # a vocab.txt or a config YAML
VOCODER_HUB_FILES = tuple(HubFile(VOCODER_REPO, name, VOCODER_DOWNLOAD_BYTES // 2) for name in VOCODER_FILES)


@dataclass
class ModelFiles:
    """Resolved local paths of everything the TTS engine loads, and where each came from."""

    ckpt: Path
    vocab: Path
    model_config: Path
    vocoder_dir: Path
    sources: dict[str, str] = field(default_factory=dict)
    model: str = F5_MODEL_NAME  # its name in the registry (f5worker.model.registry)


def cache_dirs(settings: Settings) -> list[tuple[str, Path]]:
    """The caches searched, in order, before any download (a folder named twice is searched once)."""
    caches = [("RunPod cached models", settings.runpod_model_cache), ("volume cache", settings.hub_cache),
              ("image copy", settings.baked_model_dir / "hub")]
    unique, seen = [], set()
    for label, cache_dir in caches:
        if os.path.normpath(cache_dir) not in seen:
            seen.add(os.path.normpath(cache_dir))
            unique.append((label, cache_dir))
    return unique


def cached_file(hub_file: HubFile, cache_dir: Path) -> Path | None:
    """Where ``cache_dir`` holds ``hub_file`` whole (huggingface_hub's lookup), or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(hub_file.repo, hub_file.filename, cache_dir=str(cache_dir))
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def unreferenced_snapshot(repo: str, cache_dir: Path, holds: Callable[[Path], bool]) -> Path | None:
    """For a cached repo without ``refs/main`` (where huggingface_hub's own lookup finds nothing):
    its newest snapshot for which ``holds(snapshot)`` is true. None when the repo has ``refs/main``
    (then that snapshot alone counts, as huggingface_hub decides) or no such snapshot."""
    repo_dir = cache_dir / f"models--{repo.replace('/', '--')}"
    if (repo_dir / "refs" / "main").is_file():
        return None
    try:
        snapshots = [p for p in (repo_dir / "snapshots").iterdir() if p.is_dir()]
    except OSError:
        return None
    for snapshot in sorted(snapshots, key=lambda p: p.stat().st_mtime, reverse=True):
        if holds(snapshot):
            return snapshot
    return None


def _cached_set(hub_files: tuple[HubFile, ...], cache_dir: Path) -> dict[HubFile, Path] | None:
    """Every file of the set from one cache, or None."""
    found = {f: cached_file(f, cache_dir) for f in hub_files}
    if all(found.values()):
        return found
    repos = {f.repo for f in hub_files}
    if len(repos) == 1:
        snapshot = unreferenced_snapshot(repos.pop(), cache_dir,
                                         lambda snap: all((snap / f.filename).is_file() for f in hub_files))
        if snapshot is not None:
            return {f: snapshot / f.filename for f in hub_files}
    return None


def ensure_free_space(directory: Path, needed: int) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(directory).free
    except OSError as err:  # a file in its place, a read-only volume
        raise StorageError(f"The model cache at {directory} cannot be used "
                           f"({err.strerror or type(err).__name__}), so no model can be downloaded into it.") from err
    if free < needed + DOWNLOAD_HEADROOM_BYTES:
        raise StorageError(
            f"The model cache at {directory} has {free / 1e9:.2f} GB free but downloading the missing "
            f"models needs about {(needed + DOWNLOAD_HEADROOM_BYTES) / 1e9:.2f} GB, so attach a larger "
            "network volume or pre-load the models."
        )


def _download(hub_files: list[HubFile], settings: Settings) -> dict[HubFile, Path]:
    from huggingface_hub import hf_hub_download

    ensure_free_space(settings.hub_cache, sum(f.size_hint for f in hub_files))
    out = {}
    for hub_file in hub_files:
        log.info("downloading %s/%s into %s", hub_file.repo, hub_file.filename, settings.hub_cache)
        try:
            out[hub_file] = Path(hf_hub_download(hub_file.repo, hub_file.filename, cache_dir=str(settings.hub_cache)))
        except Exception as exc:  # offline, hub down, repo moved: one sentence for the caller
            raise StorageError(
                f"Model file {hub_file.repo}/{hub_file.filename} is not in any local cache "
                f"({', '.join(str(d) for _, d in cache_dirs(settings))}) and could not be downloaded "
                f"({type(exc).__name__})."
            ) from exc
    return out


def resolve_hub_files(hub_files: tuple[HubFile, ...], settings: Settings, *, allow_download: bool = True
                      ) -> tuple[dict[HubFile, Path], str]:
    """Find every file in one cache (a set is never mixed across caches), else download them."""
    for label, cache_dir in cache_dirs(settings):
        found = _cached_set(hub_files, cache_dir)
        if found is not None:
            return found, f"{label} ({cache_dir})"
    if not allow_download:
        raise StorageError(f"Model files from {hub_files[0].repo} are not in any local cache.")
    return _download(list(hub_files), settings), f"downloaded into {settings.hub_cache}"


def _explicit(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise StorageError(f"{what} is set to {p}, which does not exist.")
    return p


def packaged_vocab() -> Path:
    """f5-tts's own vocabulary (F5TTS_v1_Base's), used for a checkpoint given without one, as F5TTS does."""
    return Path(str(package_files("f5_tts").joinpath("infer/examples/vocab.txt")))


def model_config_path(spec: ModelSpec) -> Path:
    """The config YAML of a model: f5-tts's packaged one for a layout it ships, else the given file."""
    if spec.config in PACKAGED_LAYOUTS:
        return Path(str(package_files("f5_tts").joinpath(f"configs/{spec.config}.yaml")))
    return _explicit(spec.config, spec.label("config"))


def hub_parts(spec: ModelSpec) -> dict[str, HubFile]:
    """The model's files addressed as hf://owner/repo/path, as the hub files to find."""
    hints = {"ckpt": F5_DOWNLOAD_BYTES, "vocab": TEXT_FILE_DOWNLOAD_BYTES, "config": TEXT_FILE_DOWNLOAD_BYTES}
    parts = {}
    for part, address in (("ckpt", spec.ckpt), ("vocab", spec.vocab), ("config", spec.config)):
        where = split_hf(address) if address else None
        if where is not None:
            parts[part] = HubFile(where[0], where[1], hints[part])
    return parts


# The default built-in model's hub files (ckpt, vocab), as the registry addresses them.
F5_FILES = tuple(hub_parts(BUILTIN_MODELS[F5_MODEL_NAME]).values())


def resolve_model_files(spec: ModelSpec, settings: Settings, *, allow_download: bool = True
                        ) -> tuple[Path, Path, Path, str]:
    """A registered model's checkpoint, vocabulary and config, and where they came from. Files of
    one hub repo are taken from one cache together (a checkpoint never meets another copy's vocab)."""
    hub = hub_parts(spec)
    paths, sources = {}, []
    for repo in dict.fromkeys(f.repo for f in hub.values()):
        wanted = tuple(f for f in hub.values() if f.repo == repo)
        found, source = resolve_hub_files(wanted, settings, allow_download=allow_download)
        paths.update({part: found[f] for part, f in hub.items() if f.repo == repo})
        sources.append(source)
    for part, address in (("ckpt", spec.ckpt), ("vocab", spec.vocab)):
        if address and part not in hub:
            paths[part] = _explicit(address, spec.label(part))
            sources.append("local files")
    vocab = paths.get("vocab") or packaged_vocab()
    config = paths.get("config") or model_config_path(spec)
    return paths["ckpt"], vocab, config, "; ".join(dict.fromkeys(sources))


def resolve_f5_files(settings: Settings, *, allow_download: bool = True, model: str | None = None
                     ) -> tuple[Path, Path, Path, str]:
    """The checkpoint, vocab and model config of a registered model (the default one unless named)."""
    registry = model_registry(settings)
    return resolve_model_files(registry[model or settings.default_model], settings, allow_download=allow_download)


def resolve_vocoder_dir(settings: Settings, *, allow_download: bool = True) -> tuple[Path, str]:
    """The folder holding the Vocos config and weights, and where it came from."""
    if settings.vocoder_dir:
        vocoder_dir = _explicit(settings.vocoder_dir, ENV_VOCODER_DIR)
        missing = [n for n in VOCODER_FILES if not (vocoder_dir / n).is_file()]
        if missing:
            raise StorageError(f"{ENV_VOCODER_DIR} ({vocoder_dir}) lacks {', '.join(missing)}.")
        return vocoder_dir, "local files"
    found, source = resolve_hub_files(VOCODER_HUB_FILES, settings, allow_download=allow_download)
    return found[VOCODER_HUB_FILES[0]].parent, source


def resolve_tts_files(settings: Settings, *, allow_download: bool = True, model: str | None = None) -> ModelFiles:
    """Everything a TTS engine loads for a registered model (the default one unless named)."""
    name = model or settings.default_model
    ckpt, vocab, model_config, f5_source = resolve_f5_files(settings, allow_download=allow_download, model=name)
    vocoder_dir, vocoder_source = resolve_vocoder_dir(settings, allow_download=allow_download)
    return ModelFiles(ckpt=ckpt, vocab=vocab, model_config=model_config, vocoder_dir=vocoder_dir,
                      sources={"f5": f5_source, "vocoder": vocoder_source}, model=name)


def _holds_asr_model(snapshot: Path) -> bool:
    return (snapshot / "config.json").is_file() and any(snapshot.glob("*.safetensors"))


def asr_model_folder(settings: Settings) -> Path | None:
    """``ASR_MODEL`` when it names a local folder (no hub address: nothing to look up or fetch)."""
    return Path(settings.asr_model) if Path(settings.asr_model).is_dir() else None


def cached_asr_model(asr_model: str, cache_dir: Path) -> Path | None:
    """The Whisper model's snapshot in ``cache_dir``, whole, or None."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(asr_model, cache_dir=str(cache_dir), local_files_only=True,
                                 allow_patterns=ASR_ALLOW_PATTERNS)
        if any(Path(path).glob("*.safetensors")):
            return Path(path)
    except Exception:  # not in this cache
        pass
    return unreferenced_snapshot(asr_model, cache_dir, _holds_asr_model)


def resolve_asr_model(settings: Settings, *, allow_download: bool = True) -> Path:
    """A local folder with the Whisper model, by the same order as the TTS files."""
    from huggingface_hub import snapshot_download

    if (folder := asr_model_folder(settings)) is not None:
        return folder
    for label, cache_dir in cache_dirs(settings):
        if (snapshot := cached_asr_model(settings.asr_model, cache_dir)) is not None:
            log.info("transcriber model from %s", label)
            return snapshot
    if not allow_download:
        raise StorageError(f"The transcription model {settings.asr_model} is not in any local cache.")
    ensure_free_space(settings.hub_cache, ASR_DOWNLOAD_BYTES)
    try:
        return Path(snapshot_download(settings.asr_model, cache_dir=str(settings.hub_cache),
                                      allow_patterns=ASR_ALLOW_PATTERNS))
    except Exception as exc:
        raise StorageError(
            f"The transcription model {settings.asr_model} is not cached and could not be downloaded "
            f"({type(exc).__name__})."
        ) from exc
