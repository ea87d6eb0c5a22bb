"""Download every model the worker uses (the registry's, f5worker.model.registry) into a cache folder, ahead of the first job.

Why this module exists: the Dockerfile's optional preload step and an operator warming a fresh
network volume need the same list of files the worker resolves (``model.store``), fetched into
huggingface_hub's cache layout so the worker finds them without a download.

    python -m f5worker.preload                  # into the image copy, F5_BAKED_MODEL_DIR/hub
    python -m f5worker.preload --volume         # into the volume cache, <model root>/hub

``--volume`` refuses (exit status 2) when no volume is mounted: the model root would then be on the
container disk, which the download would fill and which is lost with the container.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from f5worker.model.registry import model_registry, required_models
from f5worker.errors import StorageError
from f5worker.model.store import (ASR_ALLOW_PATTERNS, VOCODER_HUB_FILES, HubFile, asr_model_folder, cached_asr_model,
                                   cached_file, ensure_free_space, hub_parts)
from f5worker.settings import ASR_DOWNLOAD_BYTES, ENV_VOLUME_PATH, POD_VOLUME_PATH, Settings

log = logging.getLogger(__name__)


def registry_hub_files(settings: Settings) -> list[HubFile]:
    """The hub files of every model the worker may be asked for at once: the default, the preloaded
    and those F5_MODELS registers (f5worker.model.registry.required_models), and the vocoder."""
    registry = model_registry(settings)
    files = [f for name in required_models(settings, registry) for f in hub_parts(registry[name]).values()]
    return list(dict.fromkeys([*files, *VOCODER_HUB_FILES]))


def preload(cache_dir: Path, settings: Settings, with_asr: bool = True) -> list[Path]:
    """Every file into ``cache_dir``; room is asked only for those it does not hold yet (a preload
    run again, or one more F5_MODELS fine-tune on a filled volume, downloads only what is new), and
    Whisper is skipped when ``ASR_MODEL`` names a local folder, as the worker reads it from there."""
    from huggingface_hub import hf_hub_download, snapshot_download

    hub_files = registry_hub_files(settings)
    with_asr = with_asr and asr_model_folder(settings) is None
    asr_missing = with_asr and cached_asr_model(settings.asr_model, cache_dir) is None
    ensure_free_space(cache_dir, sum(f.size_hint for f in hub_files if cached_file(f, cache_dir) is None)
                      + (ASR_DOWNLOAD_BYTES if asr_missing else 0))
    paths = [Path(hf_hub_download(f.repo, f.filename, cache_dir=str(cache_dir))) for f in hub_files]
    if with_asr:
        paths.append(Path(snapshot_download(settings.asr_model, cache_dir=str(cache_dir),
                                            allow_patterns=ASR_ALLOW_PATTERNS)))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volume", action="store_true", help="fill the volume cache instead of the image copy")
    parser.add_argument("--no-asr", action="store_true", help="skip the Whisper transcription model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env()
    except ValueError as err:  # one sentence naming the variable, not a traceback
        log.error("%s", err)
        return 2
    if args.volume and not settings.volume_mounted:
        log.error("No network volume is mounted at %s, so --volume would fill the container disk instead: "
                  "attach the volume, or set %s to where it is mounted (a pod mounts it at %s, so %s=%s).",
                  settings.volume_path, ENV_VOLUME_PATH, POD_VOLUME_PATH, ENV_VOLUME_PATH, POD_VOLUME_PATH)
        return 2
    if args.volume and not os.path.ismount(settings.volume_path):
        log.warning("%s is not a mount point: what is written there is lost with the container.",
                    settings.volume_path)
    cache_dir = settings.hub_cache if args.volume else settings.baked_model_dir / "hub"
    try:
        paths = preload(cache_dir, settings, with_asr=not args.no_asr)
    except StorageError as err:  # no room, a cache that cannot be written: one sentence
        log.error("%s", err)
        return 1
    for path in paths:
        log.info("cached %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
