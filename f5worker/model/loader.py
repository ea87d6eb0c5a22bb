"""The models the sampler runs: the worker's own DiT, mel and Vocos where they cover the files'
architecture, f5-tts's and vocos's own classes where they do not.

Why this module exists: the worker's own model code (``f5worker.model.dit``, ``f5worker.model.mel``,
``f5worker.model.vocoder``, ``f5worker.model.text_tokens``) imports only torch, which keeps seconds of
imports (x_transformers, einx, torchdiffeq, scipy, vocos, pypinyin, jieba) off a cold start. It
covers every DiT layout f5-tts ships (F5TTS_v1_Base, F5TTS_Base, both Small ones) and the Vocos
mel vocoder; for any other layout (another backbone's settings, qk-norm, another mel) the worker
builds stock f5-tts's CFM instead, says why at start, and runs it on
the eager path. The choice is made here once, for the worker's loader and the pre-deploy gate alike,
so both check the very model the worker will run.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from f5worker.model import dit
from f5worker.model import stock
from f5worker.model import vocoder
from f5worker.model.constants import HOP_LENGTH, N_FFT, N_MELS, SAMPLE_RATE
from f5worker.model.checkpoint import (
    VOCODER_CONFIG,
    VOCODER_WEIGHTS,
    VOCOS_ARCHITECTURE,
    cfm_subject,
    load_pt,
    model_name,
    open_ema,
    read_model_config,
    readable,
    require_finite,
    require_fit,
    require_vocab_fits,
    shapes,
    vocos_subject,
)
from f5worker.errors import StorageError
from f5worker.model.mel import LogMelSpectrogram
from f5worker.model.text_tokens import load_vocab

log = logging.getLogger(__name__)

# f5-tts's mel settings for F5TTS_v1_Base (its config's model.mel_spec); the own model covers these.
MEL_SPEC_KWARGS = dict(n_fft=N_FFT, hop_length=HOP_LENGTH, win_length=N_FFT, n_mel_channels=N_MELS,
                       target_sample_rate=SAMPLE_RATE, mel_spec_type="vocos")
TRANSFORMER_PREFIX = "transformer."


class F5Model:
    """What the sampler needs of f5-tts's CFM (``transformer``, ``mel_spec``, ``vocab_char_map``,
    ``num_channels``), with the worker's own DiT and mel. Its state dict is the transformer's under
    the checkpoint's names; the mel's filterbank is computed, not loaded (as CFM's is)."""

    def __init__(self, transformer: dit.DiT, vocab_char_map: dict[str, int], mel_spec: LogMelSpectrogram):
        self.transformer = transformer
        self.vocab_char_map = vocab_char_map
        self.mel_spec = mel_spec
        self.num_channels = transformer.proj_out.out_features

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {TRANSFORMER_PREFIX + k: v for k, v in self.transformer.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.transformer.load_state_dict({k.removeprefix(TRANSFORMER_PREFIX): v for k, v in state.items()},
                                         strict=True)

    def to(self, dtype: torch.dtype) -> "F5Model":
        self.transformer.to(dtype)  # the mel stays float32: the sampler casts its output
        return self

    def eval(self) -> "F5Model":
        self.transformer.eval()
        return self


def model_unsupported_reason(model_cfg: dict) -> str | None:
    """Why the own model cannot run a config's architecture, or None when it can."""
    return dit.unsupported_reason(model_cfg["arch"])


def read_servable_config(path: Path) -> dict:
    """A config's ``model`` section (``read_model_config``), refused with a StorageError when its
    model makes another mel than the one Vocos every model shares decodes: stock f5-tts would build
    it (a BigVGAN mel, say) and every job would come out as noise."""
    model_cfg = read_model_config(Path(path))
    mel = model_cfg.get("mel_spec") or {}
    differing = sorted(k for k, v in MEL_SPEC_KWARGS.items() if k in mel and mel[k] != v)
    if differing:
        raise StorageError(f"The model config {path} makes another mel than the worker's Vocos decodes "
                           f"({', '.join(f'{k}: {mel[k]!r}' for k in differing)[:200]}); only "
                           f"{MEL_SPEC_KWARGS['mel_spec_type']} mels of {SAMPLE_RATE // 1000} kHz, {N_MELS} bands and "
                           f"hop {HOP_LENGTH} are served.")
    return model_cfg


def build_model(model_cfg: dict, vocab: Path):
    """The model for a config, with whatever weights the current default device's init gives (the
    caller picks the device: ``with torch.device(...)``)."""
    if model_unsupported_reason(model_cfg) is not None:
        return build_stock_cfm(model_cfg, vocab)
    vocab_char_map = load_vocab(vocab)
    transformer = dit.DiT(**model_cfg["arch"], text_num_embeds=len(vocab_char_map), mel_dim=N_MELS)
    with torch.device("cpu"):  # tiny; and a Hann window on meta would import torch._dynamo
        mel = LogMelSpectrogram()
    return F5Model(transformer, vocab_char_map, mel)


def build_stock_cfm(model_cfg: dict, vocab: Path):
    """The CFM model f5-tts's ``load_model`` builds (the fallback for layouts the own model lacks)."""
    stock.install()
    # Stock f5-tts imports only here, for a layout the own model does not cover: seconds of imports
    # that the usual start path does without.
    from f5_tts.model.backbones.dit import DiT
    from f5_tts.model.cfm import CFM

    vocab_char_map = load_vocab(vocab)  # get_tokenizer's, with no id past the embedding
    model = CFM(
        transformer=DiT(**model_cfg["arch"], text_num_embeds=len(vocab_char_map),
                        mel_dim=MEL_SPEC_KWARGS["n_mel_channels"]),
        mel_spec_kwargs=MEL_SPEC_KWARGS,
        odeint_kwargs=dict(method="euler"),
        vocab_char_map=vocab_char_map,
    )
    # each item's text embedded at its own length, as the own model does: batches equal items alone
    text_embed = model.transformer.text_embed
    text_embed.forward = dit.rows_alone(text_embed.forward)
    return model


# The vocos classes its fallback may build, per part: vocos builds whatever a class_path names (it
# imports the module and calls the name with init_args), so anything else, ``subprocess.getoutput``
# say, is refused before vocos sees the file. Mel features only: every model decodes F5-TTS's mel,
# and Encodec features would fetch a codec at build time (and need a bandwidth to decode, as does
# AdaLayerNorm). The IMDCT heads are left out: they call scipy.signal.cosine, which the pinned scipy
# no longer has.
STOCK_VOCOS_CLASSES = {
    "feature_extractor": ("vocos.feature_extractors.MelSpectrogramFeatures",),
    "backbone": ("vocos.models.VocosBackbone", "vocos.models.VocosResNetBackbone"),
    "head": ("vocos.heads.ISTFTHead",),
}
# What decoding reads of F5-TTS's mel (the feature extractor is not used to decode): the bands the
# backbone takes in, and the hop the head steps by (the audio's length and pitch follow from it).
DECODED_MEL = {("backbone", "input_channels"): N_MELS, ("head", "hop_length"): HOP_LENGTH}


def stock_vocos_refusal(config) -> str | None:
    """Why vocos must not build a parsed config.yaml (a phrase after "The vocoder config ..."), or
    None when it may: only its own classes."""
    if not isinstance(config, Mapping):
        return "is not a mapping of feature_extractor, backbone and head"
    for part, allowed in STOCK_VOCOS_CLASSES.items():
        section = config.get(part)
        if not isinstance(section, Mapping) or not isinstance(section.get("init_args") or {}, Mapping):
            return f"has no {part} section with a class_path and init_args"
        if section.get("class_path") not in allowed:
            return (f"names {str(section.get('class_path'))[:100]!r} as its {part}, which is not one of "
                    f"{', '.join(allowed)}")
    if (config["backbone"].get("init_args") or {}).get("adanorm_num_embeddings") is not None:
        return "sets backbone adanorm_num_embeddings, which needs a bandwidth to decode"
    return None


def mel_refusal(config: Mapping) -> str | None:
    """Why a config that either vocoder can build does not decode F5-TTS's mel, or None."""
    differing = [f"{part} {name} {got!r}" for (part, name), wanted in DECODED_MEL.items()
                 if (got := (config[part].get("init_args") or {}).get(name)) != wanted]
    if differing:
        return (f"decodes another mel than F5-TTS makes ({', '.join(differing)}; F5-TTS's has {N_MELS} bands "
                f"and a hop of {HOP_LENGTH})")
    return None


def read_servable_vocoder_config(vocoder_dir: Path) -> tuple[dict, str | None]:
    """A folder's parsed config.yaml, and why the own vocoder cannot run it (None: it can, else the
    vocos package's fallback builds it); StorageError when it cannot be read, names a layout vocos
    must not build (``stock_vocos_refusal``) or does not decode F5-TTS's mel (``mel_refusal``)."""
    path = Path(vocoder_dir) / VOCODER_CONFIG
    config = vocoder.parse_config(path)
    own_lacks = vocoder.unsupported_reason(config)
    if reason := (stock_vocos_refusal(config) if own_lacks else None) or mel_refusal(config):
        raise StorageError(f"The vocoder config {path} {reason}.")
    return config, own_lacks


def build_stock_vocos(config: dict, config_path: Path):
    """Vocos as a config that ``read_servable_vocoder_config`` let through describes it (f5-tts's
    load_vocoder with is_local=True), on the CPU."""
    # The vocos package (encodec, scipy) only for a vocoder layout the own one does not cover.
    from vocos import Vocos
    from vocos.pretrained import instantiate_class

    try:  # the config's own dict, checked above, not a second reading of the file
        parts = {part: instantiate_class(args=(), init=config[part]) for part in STOCK_VOCOS_CLASSES}
    except (TypeError, ValueError) as err:  # init_args vocos's class does not take
        raise StorageError(f"The vocoder config {config_path} does not build vocos's model "
                           f"({type(err).__name__}).") from err
    return Vocos(**parts)


# --- the worker's loaders ------------------------------------------------------------------------

def read_state_dict(ckpt: Path, device: str = "cpu") -> dict:
    """The weights (EMA where the file has them) with f5-tts's key fix-ups (load_checkpoint with
    use_ema=True), on ``device``: read a tensor at a time (a .pt memory-mapped), so only the weights
    kept reach the device (a training checkpoint's optimizer state and trained weights, three times
    the EMA weights, were read onto the GPU whole) and a damaged file is a StorageError naming it."""
    with open_ema(Path(ckpt)) as (found, read):
        return {name: read(name).to(device) for name in found}


def load_model(model_config: Path, ckpt: Path, vocab: Path, device: str, dtype: torch.dtype):
    """Build and load the TTS model from resolved files, as f5-tts's load_model does.

    Built directly on the target device (random init of 337 M parameters on a CPU costs seconds,
    on a GPU milliseconds) and loaded from a checkpoint read a tensor at a time to that device.
    Weights that do not fit the config, or are not finite once in ``dtype``, are refused with a
    StorageError. (A model loaded after start is first checked on the meta device, before room is
    made for it: ``require_checkpoint_fits``. Not here: init on meta imports torch._dynamo, seconds
    of a cold start.)"""
    model_cfg = read_servable_config(Path(model_config))
    if reason := model_unsupported_reason(model_cfg):
        log.warning("model %s: the worker's own model does not cover it (%s); running stock f5-tts's, "
                    "on the slower eager path", model_name(model_cfg, model_config), reason)
    state = read_state_dict(Path(ckpt), device)
    require_vocab_fits(Path(ckpt), Path(vocab), len(load_vocab(vocab)), shapes(state))
    with torch.device(device):
        model = build_model(model_cfg, Path(vocab))
    what = cfm_subject(ckpt)
    require_fit(what, model_name(model_cfg, model_config), shapes(model.state_dict()), shapes(state))
    model = model.to(dtype)
    model.load_state_dict(state)
    require_finite(what, model.state_dict().items(), dtype)
    return model.eval()


def load_vocoder(vocoder_dir: Path, device: str):
    """The vocoder of config.yaml + pytorch_model.bin: the own one (f5worker.model.vocoder) where it covers
    the config, stock Vocos otherwise; weights that do not fit or are not finite are refused."""
    config, reason = read_servable_vocoder_config(vocoder_dir)
    if reason is None:
        return vocoder.load_vocoder(Path(vocoder_dir), device)
    model = build_stock_vocos(config, Path(vocoder_dir) / VOCODER_CONFIG)
    log.warning("vocoder %s: the worker's own Vocos does not cover it (it %s); running the vocos package's",
                vocoder_dir, reason)
    what = vocos_subject(vocoder_dir)
    with readable(what):
        state = load_pt(Path(vocoder_dir) / VOCODER_WEIGHTS)
    require_fit(what, VOCOS_ARCHITECTURE, shapes(model.state_dict()), shapes(state))
    model.load_state_dict(state)
    model = model.eval().to(device)
    require_finite(what, model.state_dict().items())
    return model


def weight_bytes(model_config: Path, vocab: Path, dtype: torch.dtype, *, ckpt: Path | None = None) -> int:
    """What a config's model weighs on its device in ``dtype`` (built on the meta device: no memory),
    for the model memory budget before a model is loaded; with ``ckpt``, once the checkpoint is
    found to fit that model (``require_checkpoint_fits``'s check, on the same build)."""
    model_cfg, model = _meta_model(model_config, vocab)
    if ckpt is not None:
        _require_fits(model, model_cfg, ckpt, model_config, vocab, finite=False)
    return sum(t.numel() for t in model.state_dict().values()) * torch.empty((), dtype=dtype).element_size()


# --- shapes only: the worker's check before it makes room or allocates, and the pre-deploy gate's --

def require_checkpoint_fits(ckpt: Path, model_config: Path, vocab: Path, *, finite: bool = False) -> None:
    """Raises StorageError unless the checkpoint's EMA weights load into the config's model (and,
    with ``finite``, are all finite). The model is built on the meta device and the file read a
    header (or a memory map) at a time: shapes only, no memory, milliseconds without ``finite``."""
    model_cfg, model = _meta_model(model_config, vocab)
    _require_fits(model, model_cfg, ckpt, model_config, vocab, finite=finite)


def _meta_model(model_config: Path, vocab: Path):
    """A servable config's model section and its model on the meta device."""
    model_cfg = read_servable_config(Path(model_config))
    with torch.device("meta"):
        return model_cfg, build_model(model_cfg, Path(vocab))


def _require_fits(model, model_cfg: dict, ckpt: Path, model_config: Path, vocab: Path, *, finite: bool) -> None:
    what = cfm_subject(ckpt)
    with open_ema(Path(ckpt)) as (found, read):
        require_vocab_fits(Path(ckpt), Path(vocab), len(load_vocab(vocab)), found)
        require_fit(what, model_name(model_cfg, model_config), shapes(model.state_dict()), found)
        if finite:
            require_finite(what, ((name, read(name)) for name in found))


def check_model_checkpoint(ckpt: Path, model_config: Path, vocab: Path) -> None:
    """The pre-deploy gate's check: ``require_checkpoint_fits``, every value read and found finite."""
    require_checkpoint_fits(ckpt, model_config, vocab, finite=True)


def check_vocoder_weights(vocoder_dir: Path) -> None:
    """Raises StorageError unless the vocoder weights load into the model its config describes and
    are all finite (read memory-mapped, a tensor at a time)."""
    what = vocos_subject(vocoder_dir)
    config, own_lacks = read_servable_vocoder_config(vocoder_dir)
    if own_lacks is None:
        with torch.device("meta"):
            model = vocoder.Vocoder(config)
    else:
        model = build_stock_vocos(config, Path(vocoder_dir) / VOCODER_CONFIG)  # its filterbank cannot be built on meta
    with readable(what):
        state = load_pt(Path(vocoder_dir) / VOCODER_WEIGHTS)
    if not isinstance(state, Mapping):
        raise StorageError(f"{what} does not hold a state dict.")
    require_fit(what, VOCOS_ARCHITECTURE, shapes(model.state_dict()), shapes(state))
    require_finite(what, state.items())
