"""Do the weights on disk fit the model they are meant for? Names, shapes and finite values.

Why this module exists: a checkpoint can be a complete, well-formed file and still be unusable: a
fine-tune saved with renamed tensors, a config of another size, weights gone NaN in training. The
first two fail deep inside ``load_state_dict`` with a torch message; NaN weights load without
complaint and every job returns noise. This module holds f5-tts's key fix-ups (defined here once)
and the comparisons of a file's tensors with the model a config describes (built by
``f5worker.model.loader``, on the ``meta`` device for the pre-deploy gate: no memory, no GPU), so both
the gate (``f5worker.validation``) and the worker's loader refuse such weights with one
StorageError sentence naming the file and the first problems.

The gate reads a checkpoint one tensor at a time (``safe_open``, or a memory-mapped ``torch.load``),
so its peak memory is one tensor; the worker checks the state it loaded anyway, on its device.
"""
from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open

from f5worker.errors import StorageError
from f5worker.settings import VOCODER_FILES

EMA_STATE = "ema_model_state_dict"  # where a .pt training checkpoint keeps the EMA weights
MODEL_STATE = "model_state_dict"  # the trained (not averaged) weights: used where a checkpoint has no EMA
EMA_PREFIX = "ema_model."
TEXT_EMBED = "transformer.text_embed.text_embed.weight"  # [vocabulary size + 1, text_dim]: row 0 is the filler
EMA_BOOKKEEPING = ("initted", "step")  # ema_pytorch's own entries, not weights
# Buffers older checkpoints carry and the model recomputes (f5-tts's patch for 305e3ea).
MEL_BUFFERS = ("mel_spec.mel_stft.mel_scale.fb", "mel_spec.mel_stft.spectrogram.window")
NAMES_SHOWN = 3  # names quoted per problem in a message
VOCODER_CONFIG, VOCODER_WEIGHTS = VOCODER_FILES


def model_key(ckpt_key: str) -> str | None:
    """The model's name for an EMA checkpoint key (f5-tts's ``load_checkpoint`` with use_ema=True),
    or None for an entry that is not loaded."""
    if ckpt_key in EMA_BOOKKEEPING:
        return None
    name = ckpt_key.replace(EMA_PREFIX, "")
    return None if name in MEL_BUFFERS else name


def ema_weights(entries: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The EMA entries of a checkpoint under the model's names."""
    return {name: value for key, value in entries.items() if (name := model_key(key))}


def ema_entries(raw: Mapping, ckpt: Path) -> Mapping:
    """The weights of a loaded .pt checkpoint (a safetensors file is the weights themselves): its EMA
    state, as f5-tts's inference loads (reduced checkpoints keep only that), else the trained
    weights of a training checkpoint saved without EMA."""
    for key in (EMA_STATE, MODEL_STATE):
        entries = raw.get(key) if isinstance(raw, Mapping) else None
        if isinstance(entries, Mapping):
            return entries
    raise StorageError(f"The checkpoint {ckpt} has neither {EMA_STATE} nor {MODEL_STATE}, so it is not an "
                       "f5-tts training checkpoint.")


def require_vocab_fits(ckpt: Path, vocab: Path, vocab_size: int, found: Mapping[str, torch.Size]) -> None:
    """The most reported F5-TTS loading failure, said in words: a checkpoint with another
    vocabulary's text embedding (fine-tunes ship their own vocab.txt)."""
    shape = found.get(TEXT_EMBED)
    if shape is not None and len(shape) == 2 and shape[0] != vocab_size + 1:
        raise StorageError(f"The vocabulary {vocab} has {vocab_size} symbols but the checkpoint {ckpt} was "
                           f"trained with {shape[0] - 1}: give the model the vocab.txt it was trained with.")


def read_model_config(path: Path) -> dict:
    """The ``model`` section of an f5-tts config YAML; only DiT backbones are supported."""
    try:
        model_cfg = yaml.safe_load(Path(path).read_text(encoding="utf-8"))["model"]
        backbone, model_cfg["arch"] = model_cfg["backbone"], dict(model_cfg["arch"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as err:
        raise StorageError(f"The model config {path} is not an f5-tts config with model.backbone and "
                           f"model.arch ({type(err).__name__}).") from err
    if backbone != "DiT":
        raise StorageError(f"The model config {path} names the {backbone} backbone; only DiT is supported.")
    return model_cfg


def model_name(model_cfg: dict, path: Path) -> str:
    return str(model_cfg.get("name") or Path(path).stem)


def cfm_subject(ckpt: Path) -> str:
    """How messages about a TTS checkpoint begin (the gate's and the worker's alike)."""
    return f"The checkpoint {ckpt}"


def vocos_subject(vocoder_dir: Path) -> str:
    return f"The vocoder weights file {Path(vocoder_dir) / VOCODER_WEIGHTS}"


VOCOS_ARCHITECTURE = f"the Vocos of its {VOCODER_CONFIG}"


def shapes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Size]:
    return {name: t.shape for name, t in state.items()}


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:NAMES_SHOWN])
    return shown + (", ..." if len(names) > NAMES_SHOWN else "")


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def fit_problems(expected: Mapping[str, torch.Size], found: Mapping[str, torch.Size]) -> list[str]:
    """What keeps ``found`` (name -> shape) from loading strictly into ``expected``, most telling first."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k}: {list(found[k])} instead of {list(shape)}" for k, shape in expected.items()
             if k in found and tuple(found[k]) != tuple(shape)]
    problems = []
    if missing:
        problems.append(f"{_count(len(missing), 'tensor')} missing ({_names(missing)})")
    if unexpected:
        problems.append(f"{_count(len(unexpected), 'unexpected tensor')} ({_names(unexpected)})")
    if wrong:
        problems.append(f"{_count(len(wrong), 'tensor')} of the wrong shape ({_names(wrong)})")
    return problems


def require_fit(what: str, architecture: str, expected: Mapping[str, torch.Size],
                found: Mapping[str, torch.Size]) -> None:
    problems = fit_problems(expected, found)
    if problems:
        raise StorageError(f"{what} does not fit {architecture}: {'; '.join(problems)}.")


def nonfinite_names(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors holding NaN or infinity.

    Each tensor is reduced to its sum (accumulated in float32), which is NaN or infinite
    exactly when the tensor is, short of finite values so large that they overflow float32 when
    added up (no usable weight is). A sum reads the tensor once and writes nothing: some 60 times
    faster on a CPU than ``isfinite(t).all()``. The sums stay on the tensors' device and are gathered
    with one sync at the end, so a generator that reads tensors one by one keeps one in memory."""
    names, sums = [], []
    for name, tensor in tensors:
        if tensor.is_floating_point():
            names.append(name)
            sums.append(tensor.sum(dtype=torch.float32))
    if not sums:
        return []
    finite = torch.isfinite(torch.stack([s.to(sums[0].device) for s in sums])).tolist()
    return [name for name, ok in zip(names, finite) if not ok]


def require_finite(what: str, tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None) -> None:
    bad = nonfinite_names(tensors)
    if bad:
        kind = "NaN or infinity" if dtype in (None, torch.float32, torch.float64) else \
            f"NaN, infinity or values beyond {str(dtype).removeprefix('torch.')} range"
        raise StorageError(f"{what} has non-finite values ({kind}) in {_count(len(bad), 'tensor')} ({_names(bad)}).")


# --- for the pre-deploy checks: read from disk one tensor at a time, nothing on a GPU ------------

# What safetensors and torch.load raise for a file that is cut short, damaged or of another format.
UNREADABLE = (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile,
              SafetensorError)


@contextmanager
def readable(what: str) -> Iterator[None]:
    """Reading a weights file: what it raises for a damaged file becomes one StorageError sentence
    that names the file (``what``), not an internal error that names nothing."""
    try:
        yield
    except StorageError:
        raise
    except UNREADABLE as err:
        raise StorageError(f"{what} could not be read ({type(err).__name__}).") from err


def is_safetensors(path: Path) -> bool:
    """Whether a checkpoint is read as safetensors (any case: ``model.SAFETENSORS`` too, as the
    gate's header check reads it; anything else is a torch file)."""
    return Path(path).suffix.lower() == ".safetensors"


def load_pt(path: Path) -> Mapping:
    # The zip format is memory-mapped (nothing read until a tensor is used); the legacy one cannot be.
    return torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))


@contextmanager
def open_ema(ckpt: Path) -> Iterator[tuple[dict[str, torch.Size], Callable[[str], torch.Tensor]]]:
    """(model name -> shape, read one tensor by model name) for a checkpoint's EMA weights."""
    if not is_safetensors(ckpt):
        with readable(cfm_subject(ckpt)):
            state = ema_weights(ema_entries(load_pt(ckpt), ckpt))
        yield {name: t.shape for name, t in state.items()}, state.__getitem__
        return
    with ExitStack() as opened:
        with readable(cfm_subject(ckpt)):  # safe_open checks the data its header describes is all there
            f = opened.enter_context(safe_open(str(ckpt), framework="pt", device="cpu"))
            keys = {name: key for key in f.keys() if (name := model_key(key))}
            found = {name: torch.Size(f.get_slice(key).get_shape()) for name, key in keys.items()}
        yield found, lambda name: f.get_tensor(keys[name])
