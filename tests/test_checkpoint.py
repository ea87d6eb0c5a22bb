"""Weights that do not fit their architecture, or are not finite, are refused with one sentence
naming the file and the tensor: by the pre-deploy check (read from disk, model on the meta device)
and by the worker's own loader (``TTSEngine.load``, ``build_worker``)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from f5worker.model.checkpoint import MEL_BUFFERS, ema_weights, read_model_config
from f5worker.inference.engine import TTSEngine
from f5worker.errors import StorageError
from f5worker.model.store import resolve_tts_files
from f5worker.service import build_worker
from f5worker.settings import ENV_CKPT_FILE, ENV_MODEL_CONFIG, ENV_VOCAB_FILE, ENV_VOCODER_DIR, Settings
from f5worker.model.loader import (
    build_model,
    check_model_checkpoint,
    check_vocoder_weights,
    load_model,
    read_state_dict,
)
from tests.helpers import DAMAGES, RAW_TARGET, TARGET, VOCOS_TARGET, damaged_copy, nan_vocoder, nan_weight


def gate_check(env: dict[str, str]) -> None:
    check_model_checkpoint(Path(env[ENV_CKPT_FILE]), Path(env[ENV_MODEL_CONFIG]), Path(env[ENV_VOCAB_FILE]))


def test_intact_checkpoint_fits_and_every_key_is_used(tiny_models):
    gate_check(tiny_models)
    check_vocoder_weights(Path(tiny_models[ENV_VOCODER_DIR]))
    # Strict: every tensor of the file loads into the model and every model tensor comes from the file.
    with torch.device("meta"):
        model = build_model(read_model_config(Path(tiny_models[ENV_MODEL_CONFIG])), Path(tiny_models[ENV_VOCAB_FILE]))
    assert set(read_state_dict(Path(tiny_models[ENV_CKPT_FILE]))) == set(model.state_dict())


def test_ema_bookkeeping_and_old_mel_buffers_are_dropped(tiny_models, tmp_path):
    """f5-tts's key fix-ups: ema_pytorch's entries and the buffers older checkpoints carry are not
    weights, so they are neither loaded nor reported as unexpected."""
    state = load_file(tiny_models[ENV_CKPT_FILE])
    extra = {"initted": torch.tensor(True), "step": torch.tensor(5)}
    extra.update({"ema_model." + name: torch.ones(3) for name in MEL_BUFFERS})
    ckpt = tmp_path / "old.safetensors"
    save_file({**state, **extra}, str(ckpt))
    gate_check({**tiny_models, ENV_CKPT_FILE: str(ckpt)})
    assert set(ema_weights({**state, **extra})) == set(read_state_dict(Path(tiny_models[ENV_CKPT_FILE])))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("damage", DAMAGES)
def test_check_refuses_damaged_checkpoint(tiny_models, tmp_path, damage, suffix):
    env, pattern = damaged_copy(tiny_models, tmp_path, damage, suffix)
    with pytest.raises(StorageError, match=rf"^The checkpoint {env[ENV_CKPT_FILE]} .*{pattern}\.$"):
        gate_check(env)


@pytest.mark.parametrize("damage", DAMAGES)
def test_worker_refuses_damaged_checkpoint(tiny_models, tmp_path, damage):
    env, pattern = damaged_copy(tiny_models, tmp_path, damage)
    with pytest.raises(StorageError, match=rf"^The checkpoint {env[ENV_CKPT_FILE]} .*{pattern}\.$"):
        TTSEngine.load(resolve_tts_files(Settings.from_env(env)), device="cpu")


def test_worker_start_refuses_nan_weights_with_a_sentence(tiny_models, tmp_path):
    """build_worker is what the handler's start-up runs: the sentence every job then gets back."""
    env, pattern = damaged_copy(tiny_models, tmp_path, nan_weight, ".pt")
    with pytest.raises(StorageError, match=rf"^The checkpoint {env[ENV_CKPT_FILE]} has {pattern}\.$"):
        build_worker(Settings.from_env({**env, "F5_DEVICE": "cpu"}))


def test_training_checkpoint_without_ema_weights_loads_its_trained_weights(tiny_models, tmp_path):
    """A .pt saved by f5-tts's trainer without EMA: its model_state_dict (no ema_model. prefix) is used."""
    trained = {k.removeprefix("ema_model."): v for k, v in load_file(tiny_models[ENV_CKPT_FILE]).items()}
    ckpt = tmp_path / "model.pt"
    torch.save({"model_state_dict": trained, "optimizer_state_dict": {}, "update": 7}, str(ckpt))
    env = {**tiny_models, ENV_CKPT_FILE: str(ckpt)}
    gate_check(env)
    assert read_state_dict(ckpt).keys() == read_state_dict(Path(tiny_models[ENV_CKPT_FILE])).keys()
    engine = TTSEngine.load(resolve_tts_files(Settings.from_env(env)), device="cpu")
    loaded = engine.model.state_dict()
    assert loaded.keys() == trained.keys() - set(MEL_BUFFERS)
    assert all(torch.equal(loaded[k], trained[k]) for k in loaded)


def test_checkpoint_with_neither_weights_refused(tiny_models, tmp_path):
    ckpt = tmp_path / "model.pt"
    torch.save({"optimizer_state_dict": {}, "update": 7}, str(ckpt))
    env = {**tiny_models, ENV_CKPT_FILE: str(ckpt)}
    pattern = rf"^The checkpoint {ckpt} has neither ema_model_state_dict nor model_state_dict"
    with pytest.raises(StorageError, match=pattern):
        gate_check(env)
    with pytest.raises(StorageError, match=pattern):
        TTSEngine.load(resolve_tts_files(Settings.from_env(env)), device="cpu")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_vocabulary_that_does_not_fit_is_refused_naming_both_sizes_and_files(tiny_models, tmp_path, suffix):
    """f5-tts's most reported loading failure (a text_embed size mismatch), in one sentence, at
    start and by the gate."""
    vocab = tmp_path / "vocab_other.txt"
    lines = Path(tiny_models[ENV_VOCAB_FILE]).read_text(encoding="utf-8").splitlines()[:50]
    vocab.write_text("\n".join(lines) + "\n", encoding="utf-8")
    env, _ = damaged_copy({**tiny_models}, tmp_path, lambda state: "", suffix)
    env[ENV_VOCAB_FILE] = str(vocab)
    trained = len(Path(tiny_models[ENV_VOCAB_FILE]).read_text(encoding="utf-8").splitlines())
    pattern = (rf"^The vocabulary {vocab} has 50 symbols but the checkpoint {env[ENV_CKPT_FILE]} was trained "
               rf"with {trained}: give the model the vocab.txt it was trained with\.$")
    with pytest.raises(StorageError, match=pattern):
        gate_check(env)
    with pytest.raises(StorageError, match=pattern):
        build_worker(Settings.from_env({**env, "F5_DEVICE": "cpu"}))


def test_nan_vocoder_refused(tiny_models, tmp_path):
    env = nan_vocoder(tiny_models, tmp_path)
    pattern = (rf"^The vocoder weights file {env[ENV_VOCODER_DIR]}/pytorch_model.bin has non-finite values "
               rf"\(NaN or infinity\) in 1 tensor \({VOCOS_TARGET}\)\.$")
    with pytest.raises(StorageError, match=pattern):
        check_vocoder_weights(Path(env[ENV_VOCODER_DIR]))
    with pytest.raises(StorageError, match=pattern):
        TTSEngine.load(resolve_tts_files(Settings.from_env(env)), device="cpu")


def test_weights_beyond_half_range_refused_when_loaded_as_half(tiny_models, tmp_path):
    """Finite in the file, infinite once cast to float16 (what a GPU worker runs): the loader checks
    the weights it will use, after the cast. Run on the CPU: the cast is the same there."""
    state = load_file(tiny_models[ENV_CKPT_FILE])
    state[RAW_TARGET].view(-1)[0] = 1e6
    ckpt = tmp_path / "big.safetensors"
    save_file(state, str(ckpt))
    gate_check({**tiny_models, ENV_CKPT_FILE: str(ckpt)})  # fine in float32
    files = resolve_tts_files(Settings.from_env({**tiny_models, ENV_CKPT_FILE: str(ckpt)}))
    with pytest.raises(StorageError, match=rf"beyond float16 range\) in 1 tensor \({TARGET}\)"):
        load_model(files.model_config, files.ckpt, files.vocab, "cpu", torch.float16)
