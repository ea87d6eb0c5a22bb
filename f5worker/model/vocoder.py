"""The Vocos mel vocoder (charactr/vocos-mel-24khz layout), inference only, in plain torch.

Why this module exists: the ``vocos`` package imports encodec, scipy and torchaudio (for parts the
mel vocoder never uses), a large part of a cold start. This module does what ``vocos.Vocos.decode``
does, operation for operation, under the same module and tensor names, so the hub's
``pytorch_model.bin`` loads into it strictly by key and the audio is the same. Only the layout
f5-tts uses is covered (mel features, VocosBackbone without AdaLayerNorm, ISTFTHead, "center"
padding); ``unsupported_reason`` names what a config asks for beyond that.
"""
from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
import yaml
from torch import nn

from f5worker.model.checkpoint import (VOCODER_CONFIG, VOCODER_WEIGHTS, VOCOS_ARCHITECTURE, require_finite, require_fit,
                                 shapes, vocos_subject)
from f5worker.errors import StorageError
from f5worker.model.mel import LogMelSpectrogram

VOCOS_LOG_FLOOR = 1e-7  # vocos's safe_log; the feature extractor is not used to decode
REQUIRED = object()  # an init_args entry vocos has no default for
# Per part of config.yaml: the class this module implements, and its init_args with vocos's defaults.
PARTS = {
    "feature_extractor": ("vocos.feature_extractors.MelSpectrogramFeatures",
                          dict(sample_rate=24000, n_fft=1024, hop_length=256, n_mels=100, padding="center")),
    "backbone": ("vocos.models.VocosBackbone",
                 dict(input_channels=REQUIRED, dim=REQUIRED, intermediate_dim=REQUIRED, num_layers=REQUIRED,
                      layer_scale_init_value=None, adanorm_num_embeddings=None)),
    "head": ("vocos.heads.ISTFTHead", dict(dim=REQUIRED, n_fft=REQUIRED, hop_length=REQUIRED, padding="same")),
}
# Values other than vocos's defaults that this module does not implement.
ONLY = {("feature_extractor", "padding"): "center", ("head", "padding"): "center",
        ("backbone", "adanorm_num_embeddings"): None}
INITIAL_ONLY = "layer_scale_init_value"  # sets gamma's initial value only; the weights file gives gamma


def init_args(config: Mapping, part: str) -> dict:
    """A part's init_args with vocos's defaults filled in (for a config ``unsupported_reason`` accepts)."""
    return {**PARTS[part][1], **(config[part].get("init_args") or {})}


def unsupported_reason(config) -> str | None:
    """Why this module cannot run the Vocos a parsed config.yaml describes (a phrase that follows
    "The vocoder config ... "), or None when it can."""
    if not isinstance(config, Mapping):
        return "is not a mapping of feature_extractor, backbone and head"
    for part, (class_path, defaults) in PARTS.items():
        section = config.get(part)
        if not isinstance(section, Mapping) or not isinstance(section.get("init_args") or {}, Mapping):
            return f"has no {part} section with a class_path and init_args"
        if section.get("class_path") != class_path:
            return f"names {section.get('class_path')} as its {part}; only {class_path} is supported"
        args = init_args(config, part)
        if unknown := sorted(set(args) - set(defaults)):
            return f"sets unknown {part} init_args ({', '.join(unknown)})"
        for name, value in args.items():
            if value is REQUIRED:
                return f"lacks {part} {name}"
            if (part, name) in ONLY:
                if value != ONLY[part, name]:
                    return f"sets {part} {name} to {value!r}; only {ONLY[part, name]!r} is supported"
            elif name != INITIAL_ONLY and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                return f"sets {part} {name} to {value!r}, which is not a positive whole number"
    return None


class Linear(nn.Linear):
    """Left uninitialised: ``load_vocoder`` gives every value, and random init of the full model's
    14 M parameters would cost a cold start a tenth of a second or more on a CPU."""

    def reset_parameters(self) -> None:
        pass


class Conv1d(nn.Conv1d):
    """Left uninitialised, as ``Linear``."""

    def reset_parameters(self) -> None:
        pass


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, intermediate_dim: int, num_layers: int):
        super().__init__()
        self.dwconv = Conv1d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = Linear(dim, intermediate_dim)  # a 1x1 convolution over [B, T, C]
        self.act = nn.GELU()
        self.pwconv2 = Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1 / num_layers))  # vocos's initial layer scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).transpose(1, 2))
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(y)))
        return x + y.transpose(1, 2)


class VocosBackbone(nn.Module):
    """mel [B, n_mels, frames] -> hidden [B, frames, dim]."""

    def __init__(self, input_channels: int, dim: int, intermediate_dim: int, num_layers: int):
        super().__init__()
        self.embed = Conv1d(input_channels, dim, kernel_size=7, padding=3)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.convnext = nn.ModuleList(ConvNeXtBlock(dim, intermediate_dim, num_layers) for _ in range(num_layers))
        self.final_layer_norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.embed(x).transpose(1, 2)).transpose(1, 2)
        for block in self.convnext:
            x = block(x)
        return self.final_layer_norm(x.transpose(1, 2))


class ISTFT(nn.Module):
    def __init__(self, n_fft: int, hop_length: int):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        self.register_buffer("window", torch.hann_window(n_fft))

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        return torch.istft(spec, self.n_fft, self.hop_length, self.n_fft, self.window, center=True)


class ISTFTHead(nn.Module):
    """hidden [B, frames, dim] -> audio [B, (frames - 1) * hop_length]: log-magnitude and phase per bin."""

    def __init__(self, dim: int, n_fft: int, hop_length: int):
        super().__init__()
        self.out = Linear(dim, n_fft + 2)
        self.istft = ISTFT(n_fft, hop_length)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mag, phase = self.out(x).transpose(1, 2).chunk(2, dim=1)
        mag = torch.clip(torch.exp(mag), max=1e2)  # vocos's guard against huge magnitudes
        return self.istft(mag * (torch.cos(phase) + 1j * torch.sin(phase)))


class Vocoder(nn.Module):
    """``vocos.Vocos`` for a config ``unsupported_reason`` accepts (ValueError otherwise). Its linear
    and convolution weights are uninitialised until loaded: build it with ``load_vocoder``."""

    def __init__(self, config: Mapping):
        super().__init__()
        if reason := unsupported_reason(config):
            raise ValueError(f"The vocoder config {reason}.")
        features = init_args(config, "feature_extractor")
        self.sample_rate = features["sample_rate"]
        self.feature_extractor = LogMelSpectrogram(features["sample_rate"], features["n_fft"], features["hop_length"],
                                                   features["n_mels"], log_floor=VOCOS_LOG_FLOOR)
        backbone, head = init_args(config, "backbone"), init_args(config, "head")
        self.backbone = VocosBackbone(backbone["input_channels"], backbone["dim"], backbone["intermediate_dim"],
                                      backbone["num_layers"])
        self.head = ISTFTHead(head["dim"], head["n_fft"], head["hop_length"])

    @torch.inference_mode()
    def decode(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [B, n_mels, frames] -> audio [B, (frames - 1) * hop_length], as Vocos.decode."""
        return self.head(self.backbone(mel))


def parse_config(path: Path):
    """A config.yaml as YAML gives it (any shape: ``unsupported_reason`` judges it); StorageError
    when it cannot be read."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise StorageError(f"The vocoder config {path} could not be read ({type(err).__name__}).") from err


def read_vocoder_config(path: Path) -> dict:
    """A parsed config.yaml this module can run; StorageError otherwise."""
    config = parse_config(path)
    if reason := unsupported_reason(config):
        raise StorageError(f"The vocoder config {path} {reason}.")
    return config


def load_vocoder(folder: Path, device) -> Vocoder:
    """The vocoder of ``folder`` (config.yaml + pytorch_model.bin) on ``device``, in float32.

    The model takes the file's tensors themselves (no copy), every one of them: the file must name
    exactly the model's parameters and buffers, with their shapes, and hold only finite values, or a
    StorageError says what does not fit. (Not built on the meta device: its first use imports sympy.)"""
    folder = Path(folder)
    config = read_vocoder_config(folder / VOCODER_CONFIG)
    what = vocos_subject(folder)
    try:
        state = torch.load(str(folder / VOCODER_WEIGHTS), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise StorageError(f"{what} could not be read ({type(err).__name__}).") from err
    if not isinstance(state, Mapping) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise StorageError(f"{what} does not hold a state dict of tensors.")
    vocoder = Vocoder(config)
    require_fit(what, VOCOS_ARCHITECTURE, shapes(vocoder.state_dict()), shapes(state))
    vocoder.load_state_dict({name: t.float() for name, t in state.items()}, strict=True, assign=True)
    vocoder = vocoder.eval().to(device)
    require_finite(what, vocoder.state_dict().items())
    return vocoder
