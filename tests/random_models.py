"""Randomly initialised model files in the exact on-disk formats the worker loads.

Why this module exists: tests and benchmarks cannot reach the model hub. Compute does not depend on
weight values, so a random F5TTS_v1_Base of the real architecture times like the real one, and a
shrunken one exercises every loading and inference path in seconds. Files are written as the hub
ships them: an EMA safetensors checkpoint, vocab.txt, a Vocos config.yaml + pytorch_model.bin.
"""
from __future__ import annotations

from importlib.resources import files as package_files
from pathlib import Path

import torch
import yaml

TINY_ARCH = dict(dim=64, depth=2, heads=2, ff_mult=2, text_dim=32, text_mask_padding=True, qk_norm=None,
                 conv_layers=1, pe_attn_head=None, attn_backend="torch", attn_mask_enabled=False,
                 checkpoint_activations=False)
TINY_VOCOS = dict(dim=32, intermediate_dim=64, num_layers=1)
FULL_VOCOS = dict(dim=512, intermediate_dim=1536, num_layers=8)


def write_model_config(path: Path, arch: dict, name: str = "F5TTS_tiny") -> Path:
    cfg = {"model": {"name": name, "tokenizer": "custom", "backbone": "DiT", "arch": arch,
                     "mel_spec": {"target_sample_rate": 24000, "n_mel_channels": 100, "hop_length": 256,
                                  "win_length": 1024, "n_fft": 1024, "mel_spec_type": "vocos"}}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_f5_checkpoint(path: Path, arch: dict, vocab: Path, seed: int = 0, ema: bool = True) -> Path:
    """An f5-tts checkpoint of random weights: EMA safetensors (as the hub ships them) or, for a
    ``.pt`` path, a training checkpoint (its EMA state, or with ``ema=False`` only the trained weights,
    ``model_state_dict``, as a training run saved without EMA)."""
    from safetensors.torch import save_file

    from f5worker.model import stock as f5_imports

    f5_imports.install()
    from f5_tts.model.backbones.dit import DiT
    from f5_tts.model.cfm import CFM
    from f5_tts.model.utils import get_tokenizer

    torch.manual_seed(seed)
    vocab_map, vocab_size = get_tokenizer(str(vocab), "custom")
    model = CFM(transformer=DiT(**arch, text_num_embeds=vocab_size, mel_dim=100), vocab_char_map=vocab_map)
    # DiT zero-initialises its output projections; random values there make the test signal non-trivial.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 1 and torch.count_nonzero(p) == 0:
                p.normal_(0, 0.02)
    state = {f"ema_model.{k}": v.contiguous() for k, v in model.state_dict().items()
             if not k.startswith("mel_spec.")}
    if path.suffix != ".pt":
        save_file(state, str(path))
    elif ema:
        torch.save({"ema_model_state_dict": {**state, "initted": torch.tensor(True), "step": torch.tensor(9)}},
                   str(path))
    else:
        torch.save({"model_state_dict": {k.removeprefix("ema_model."): v for k, v in state.items()},
                    "optimizer_state_dict": {}, "update": 9}, str(path))
    return path


def write_vocab(path: Path, extra: str) -> Path:
    """A fine-tune's own vocabulary: f5-tts's packaged one with ``extra``'s characters added (so
    its size, and every id past the packaged ones, are its own)."""
    lines = packaged_vocab().read_text(encoding="utf-8").splitlines()
    path.write_text("".join(f"{line}\n" for line in [*lines, *(c for c in extra if c not in lines)]), encoding="utf-8")
    return path


def write_vocos(folder: Path, dims: dict, seed: int = 0) -> Path:
    from vocos import Vocos

    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "feature_extractor": {"class_path": "vocos.feature_extractors.MelSpectrogramFeatures",
                              "init_args": {"sample_rate": 24000, "n_fft": 1024, "hop_length": 256,
                                            "n_mels": 100, "padding": "center"}},
        "backbone": {"class_path": "vocos.models.VocosBackbone",
                     "init_args": {"input_channels": 100, **dims}},
        "head": {"class_path": "vocos.heads.ISTFTHead",
                 "init_args": {"dim": dims["dim"], "n_fft": 1024, "hop_length": 256, "padding": "center"}},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    torch.manual_seed(seed)
    torch.save(Vocos.from_hparams(str(folder / "config.yaml")).state_dict(), str(folder / "pytorch_model.bin"))
    return folder


def packaged_vocab() -> Path:
    return Path(str(package_files("f5_tts").joinpath("infer/examples/vocab.txt")))


# F5TTS_Base's (v0) layout at tiny size: rotary on the first head only, text padding unmasked; and
# F5TTS_Small's shape (more heads, deeper than TINY_ARCH) on v0's attention
TINY_V0_ARCH = dict(TINY_ARCH, heads=3, dim_head=16, text_mask_padding=False, pe_attn_head=1)
TINY_SMALL_ARCH = dict(TINY_ARCH, dim=48, depth=3, heads=3, dim_head=16, text_mask_padding=False, pe_attn_head=1)


def packaged_arch(name: str) -> dict:
    """The model.arch of a config f5-tts ships (F5TTS_v1_Base, F5TTS_Base, ...)."""
    return yaml.safe_load(Path(str(package_files("f5_tts").joinpath(f"configs/{name}.yaml"))).read_text())["model"]["arch"]


def write_model_set(folder: Path, full_size: bool = False, arch: dict | None = None) -> dict[str, str]:
    """Writes a complete model set; returns the worker environment variables that point at it."""
    folder.mkdir(parents=True, exist_ok=True)
    if arch is None:
        arch = packaged_arch("F5TTS_v1_Base") if full_size else TINY_ARCH
    config = write_model_config(folder / "model.yaml", arch)
    vocab = packaged_vocab()
    ckpt = write_f5_checkpoint(folder / "model.safetensors", arch, vocab)
    vocoder = write_vocos(folder / "vocos", FULL_VOCOS if full_size else TINY_VOCOS)
    return {"F5_CKPT_FILE": str(ckpt), "F5_VOCAB_FILE": str(vocab), "F5_MODEL_CONFIG": str(config),
            "F5_VOCODER_DIR": str(vocoder)}
