"""The TTS models loaded on one worker's device, by name, under a memory budget.

Why this module exists: an endpoint that serves several models (f5worker.model.registry) cannot
hold every one on the GPU, nor pay for loading them all at start. The pool holds the engines that
are loaded (the default one from start), routes each model call to its items' model, and makes room
for a model about to load by unloading the least recently used ones, never one that a job still
has work queued for (``in_use``). Loading itself (files found, weights read) is the job layer's to
schedule: downloads off the model thread, the load on it (f5worker.jobs.workflows).

Every engine shares the default engine's vocoder (all F5-TTS layouts decode the same Vocos mel).
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from typing import Callable, Iterator

import numpy as np

from f5worker.inference.engine import EngineCall, TTSEngine
from f5worker.inference.items import ChunkItem

log = logging.getLogger(__name__)


class ModelPool:
    """Loaded engines by model name, least recently used first. ``start_call`` is the batcher's
    model call: every item of a call is of one model (``ChunkItem.batch_key`` holds the name)."""

    def __init__(self, default: str, engine: TTSEngine, *, budget_bytes: int):
        self.default = default
        self.budget_bytes = budget_bytes
        # What every engine shares, kept apart from the engines so that none is held for it
        self.vocoder, self.device, self.dtype = engine.vocoder, engine.device, engine.dtype
        self._engines: OrderedDict[str, TTSEngine] = OrderedDict({default: engine})
        self._in_use: dict[str, int] = {}
        self._lock = threading.Lock()  # the model thread reads, the event loop adds and unloads
        self.unloaded: list[str] = []  # names unloaded to make room, in order, for logs and tests

    @property
    def default_engine(self) -> TTSEngine | None:
        """The default model's engine; None while it is unloaded (to make room for others)."""
        with self._lock:
            return self._engines.get(self.default)

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._engines)

    def get(self, name: str) -> TTSEngine | None:
        """The loaded engine of ``name``, now the most recently used; None when not loaded."""
        with self._lock:
            engine = self._engines.get(name)
            if engine is not None:
                self._engines.move_to_end(name)
            return engine

    def held_bytes(self) -> int:
        with self._lock:
            return sum(e.weight_bytes for e in self._engines.values())

    @contextlib.contextmanager
    def in_use(self, name: str) -> Iterator[None]:
        """While a job has items of ``name`` queued or in a call: its model is not unloaded."""
        with self._lock:
            self._in_use[name] = self._in_use.get(name, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._in_use[name] -= 1
                if not self._in_use[name]:
                    del self._in_use[name]

    def make_room(self, needed_bytes: int, keep: str) -> list[str]:
        """Unload least recently used engines (not ``keep``, none in use) until ``needed_bytes``
        more fit the budget; the names unloaded. When the engines in use alone exceed it, the
        model loads anyway (a job is never refused for memory a finished job would free), logged."""
        gone = []
        with self._lock:
            held = sum(e.weight_bytes for e in self._engines.values())
            for name in list(self._engines):
                if held + needed_bytes <= self.budget_bytes:
                    break
                if name == keep or self._in_use.get(name):
                    continue
                held -= self._engines.pop(name).weight_bytes
                gone.append(name)
            busy = [name for name in self._engines if self._in_use.get(name)]
        self.unloaded.extend(gone)
        if gone:
            log.info("unloaded model(s) %s to keep TTS weights under %.0f MiB", ", ".join(gone), self.budget_bytes / 2**20)
        if held + needed_bytes > self.budget_bytes:
            why = f"{', '.join(busy)} still ha{'s' if len(busy) == 1 else 've'} work in flight" if busy else \
                "the model loading is larger than the budget by itself"
            log.warning("TTS weights will be %.0f MiB, over the %.0f MiB budget: %s", (held + needed_bytes) / 2**20,
                        self.budget_bytes / 2**20, why)
        return gone

    def add(self, name: str, engine: TTSEngine) -> None:
        with self._lock:
            self._engines[name] = engine
            self._engines.move_to_end(name)

    def start_call(self, items: list[ChunkItem], abandoned: Callable[[], bool] | None = None) -> EngineCall:
        """One model call (the batcher's ``ModelCall``, run on the model thread): the items' model
        samples them."""
        name = items[0].model or self.default
        engine = self.get(name)
        if engine is None:  # the job layer loads a model before queueing its items, and holds it
            raise RuntimeError(f"model {name!r} is not loaded")
        return engine.start_call(items, abandoned)

    def run_items(self, items: list[ChunkItem], abandoned: Callable[[], bool] | None = None) -> list[np.ndarray]:
        """``start_call`` run to its end at once."""
        return self.start_call(items, abandoned).advance(lambda: False)
