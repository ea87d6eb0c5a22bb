"""Imports f5-tts's inference modules without running ``f5_tts/model/__init__.py``.

Why this module exists: that ``__init__`` imports the trainer, which imports wandb, datasets and
accelerate (over a second of a cold start, and packages inference never uses). ``f5_tts.model``
is registered as a package whose real ``__init__`` runs only when something asks it for a name
(``from f5_tts.model import CFM``, as stock f5-tts code does), so both kinds of caller work.

Likewise ``librosa.filters`` (imported by f5-tts's modules for the BigVGAN mel filterbank only; its
import pulls numba and costs about a second) is registered as a module whose ``mel`` imports the
real one on first call.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import threading
import types
from pathlib import Path

_PACKAGE = "f5_tts.model"
_lock = threading.Lock()


def _lazy_package() -> types.ModuleType:
    spec = importlib.util.find_spec("f5_tts")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    init_file = path / "__init__.py"
    module = types.ModuleType(_PACKAGE)
    module.__path__ = [str(path)]
    module.__file__ = str(init_file)
    module.__package__ = _PACKAGE
    module.__spec__ = importlib.machinery.ModuleSpec(_PACKAGE, None, origin=str(init_file), is_package=True)
    module.__spec__.submodule_search_locations = [str(path)]

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        with _lock:
            if not module.__dict__.get("_f5_init_done"):
                module._f5_init_done = True
                exec(compile(init_file.read_text(), str(init_file), "exec"), module.__dict__)
        if name in module.__dict__:
            return module.__dict__[name]
        raise AttributeError(f"module {_PACKAGE!r} has no attribute {name!r}")

    module.__getattr__ = __getattr__
    return module


class _LazyLibrosaFilters(types.ModuleType):
    def _real(self):
        with _lock:
            if sys.modules.get("librosa.filters") is self:
                del sys.modules["librosa.filters"]
            return importlib.import_module("librosa.filters")

    def mel(self, *args, **kwargs):
        return self._real().mel(*args, **kwargs)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._real(), name)


def install() -> None:
    """Idempotent; a no-op for each module already imported for real."""
    with _lock:
        if _PACKAGE not in sys.modules:
            sys.modules[_PACKAGE] = _lazy_package()
        if "librosa.filters" not in sys.modules and importlib.util.find_spec("librosa") is not None:
            stub = _LazyLibrosaFilters("librosa.filters")
            stub.mel = stub.mel  # bound now, so 'from librosa.filters import mel' loads nothing
            sys.modules["librosa.filters"] = stub
