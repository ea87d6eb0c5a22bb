"""The models a job may name: which registered model it means, loading it on first use, the list.

Why this module exists: a job for a model that is not loaded yet must wait for it without holding up
the jobs of loaded models more than it must. Its files are found (and downloaded, through the volume
cache with its room check and huggingface_hub's per-file lock, so one worker downloads while others
wait) on the I/O threads; only the load itself runs on the model thread, between model calls. Room
is made under the memory budget first (``inference.models.ModelPool``), never by unloading a model
that a job still has work queued for: a job holds its model (``ModelPool.in_use``) from before it
asks for it until its last chunk is sampled.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
import weakref
from typing import Awaitable, Callable

from f5worker.errors import ModelUnavailable, StorageError
from f5worker.inference.engine import TTSEngine
from f5worker.inference.models import ModelPool
from f5worker.model.checkpoint import model_name, read_model_config
from f5worker.jobs.threads import outlast
from f5worker.model.loader import weight_bytes
from f5worker.model.registry import ModelSpec, default_aliases, model_for_job, model_registry
from f5worker.model.store import ModelFiles, resolve_model_files, resolve_tts_files
from f5worker.model.text_tokens import load_vocab
from f5worker.settings import Settings

log = logging.getLogger(__name__)

Runner = Callable[..., Awaitable]  # runs fn(*args) on a thread (the model thread, or the I/O threads)


class JobModels:
    """The registry of one worker and its loaded models (``pool``)."""

    def __init__(self, settings: Settings, pool: ModelPool, *, load_engine: Callable[[ModelFiles], TTSEngine],
                 on_model_thread: Runner, off_loop: Runner,
                 on_loaded: Callable[[TTSEngine], object] = lambda engine: None):
        """``on_loaded``: what follows a model's load (the worker queues its graph captures and
        kernel switch, as for the default model at start)."""
        self.settings = settings
        self._on_loaded = on_loaded
        self.registry: dict[str, ModelSpec] = model_registry(settings)
        self.pool = pool
        self._load_engine = load_engine
        self._on_model_thread = on_model_thread
        self._off_loop = off_loop
        # One load at a time (so two loads never both fit the budget before either is added), per
        # event loop: a lock belongs to the loop it first waited on (tests run one loop per job)
        self._loading: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = \
            weakref.WeakKeyDictionary()

    def name_for(self, requested: str | None) -> str:
        """The registered name a job's ``model`` means (NotFound, listing the names, if none)."""
        return model_for_job(requested, self.registry, self.pool.default, default_aliases(self.settings))

    async def ensure_loaded(self, name: str) -> float:
        """Load ``name`` unless it is loaded; the seconds this call waited for it (0.0 when loaded).
        Jobs asking at once for a model that is loading wait for the one load."""
        if self.pool.get(name) is not None:
            return 0.0
        started = time.perf_counter()
        async with self._loading.setdefault(asyncio.get_running_loop(), asyncio.Lock()):
            if self.pool.get(name) is None:
                await self._load(name)
        return time.perf_counter() - started

    async def _load(self, name: str) -> None:
        """``name`` loaded; its files not to be had, or not loadable, are ``ModelUnavailable``
        (a volume or setting to fix), as the worker's Whisper is."""
        try:
            files = await self._off_loop(functools.partial(resolve_tts_files, self.settings, model=name))
            await self._off_loop(self._make_room, files)
            # loaded and added on the model thread, and awaited to its end even by a job cancelled
            # meanwhile: the load goes on there anyway, and the one-load lock is held until it ends
            await outlast(asyncio.ensure_future(self._on_model_thread(functools.partial(self._load_and_add, name,
                                                                                          files))))
        except ModelUnavailable:
            raise
        except StorageError as err:
            raise ModelUnavailable(str(err)) from err

    def _load_and_add(self, name: str, files: ModelFiles) -> None:
        self._added(name, self._load_engine(files))

    def load_now(self, name: str) -> None:
        """Load ``name`` in this thread, before the worker serves (F5_PRELOAD_MODELS)."""
        if self.pool.get(name) is None:
            files = resolve_tts_files(self.settings, model=name)
            self._make_room(files)
            self._load_and_add(name, files)

    def _make_room(self, files: ModelFiles) -> None:
        # shapes checked first (milliseconds, no weights read): a checkpoint that cannot load into its
        # config, or a config that overstates its model, must not cost the loaded models their places
        needed = weight_bytes(files.model_config, files.vocab, self.pool.dtype, ckpt=files.ckpt)
        self.pool.make_room(needed, keep=files.model)

    def _added(self, name: str, engine: TTSEngine) -> None:
        self.pool.add(name, engine)
        self._on_loaded(engine)
        log.info("model %s ready (%.0f MiB of weights; loaded: %s)", name, engine.weight_bytes / 2**20,
                 ", ".join(self.pool.loaded()))

    def describe(self) -> list[dict]:
        """Each registered model as ``list_models`` answers (blocking: reads local files only)."""
        loaded = set(self.pool.loaded())
        return [self._description(spec, loaded) for spec in self.registry.values()]

    def _description(self, spec: ModelSpec, loaded: set[str]) -> dict:
        entry = {"name": spec.name, "default": spec.name == self.pool.default, "loaded": spec.name in loaded,
                 "layout": spec.config, "vocab_size": None, "files": {"ckpt": spec.ckpt, "vocab": spec.vocab},
                 "language": spec.language, "registered_by": spec.origin, "source": None}
        try:
            ckpt, vocab, config, source = resolve_model_files(spec, self.settings, allow_download=False)
            entry.update(layout=model_name(read_model_config(config), config), vocab_size=len(load_vocab(vocab)),
                         source=source)
        except (StorageError, OSError, UnicodeDecodeError) as err:
            entry["source"] = f"not available locally: {err}"
        return entry

