"""A tiny randomly initialised Whisper folder, written as the hub ships one, for the transcriber tests.

The model hub is unreachable here, so the tokenizer is built from scratch: a byte-level BPE whose
vocabulary is the 256-byte alphabet (no merges) followed by Whisper's special tokens in the real
order (``<|startoftranscript|>`` then every language token, so language ids are
``startoftranscript + 1 + index`` as the tokenizer and ``generate`` assume). Random weights give
garbage text; the point is that the worker's real loading and decoding paths run, offline, in seconds.
"""
from __future__ import annotations

from pathlib import Path

import pytest

MAX_NEW_TOKENS = 8
BUILT_POSITIONS = 64  # the weights are drawn for this many decoder positions, then the table is resized


def _with_positions(model, positions: int, seed: int):
    """``model`` with a decoder position table of ``positions`` rows: its own first rows, the rest
    drawn apart, so that every other weight (and so every transcript) is the same at any size."""
    import torch
    from transformers import WhisperForConditionalGeneration

    state = model.state_dict()
    table = state["model.decoder.embed_positions.weight"]
    extra = torch.randn(max(0, positions - len(table)), table.shape[1], generator=torch.Generator().manual_seed(seed))
    state["model.decoder.embed_positions.weight"] = torch.cat([table, 0.02 * extra])[:positions]
    model.config.max_target_positions = positions
    resized = WhisperForConditionalGeneration(model.config)
    resized.load_state_dict(state)
    return resized.eval()


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (byte-level BPE's base vocabulary)."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_tiny_whisper(folder: Path, seed: int = 0, max_target_positions: int = 448) -> Path:
    """``max_target_positions``: the decoder's positions (448, as every OpenAI checkpoint), which
    bound how many tokens one alignment pass reads."""
    import torch
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizer)
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    specials = (["<|endoftext|>", "<|startoftranscript|>"] + [f"<|{code}|>" for code in LANGUAGES]
                + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>",
                   "<|notimestamps|>"])
    for token in specials:
        vocab[token] = len(vocab)
    tokenizer = WhisperTokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>",
                                 additional_special_tokens=specials[1:])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    assert ids == {t: vocab[t] for t in specials}, "special tokens must keep their vocabulary ids"

    eot, sot, no_ts = ids["<|endoftext|>"], ids["<|startoftranscript|>"], ids["<|notimestamps|>"]
    config = WhisperConfig(
        vocab_size=len(vocab), num_mel_bins=80, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=1500,  # 30 s of 10 ms frames, halved by the conv stem: what the feature extractor pads to
        max_target_positions=BUILT_POSITIONS, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
        decoder_start_token_id=sot,
    )
    torch.manual_seed(seed)
    model = _with_positions(WhisperForConditionalGeneration(config), max_target_positions, seed)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
        is_multilingual=True, lang_to_id={f"<|{code}|>": ids[f"<|{code}|>"] for code in LANGUAGES},
        task_to_id={"translate": ids["<|translate|>"], "transcribe": ids["<|transcribe|>"]},
        no_timestamps_token_id=no_ts, forced_decoder_ids=None, begin_suppress_tokens=[eot],
        # as the real checkpoints do, keep special tokens out of the text (a random model would echo them)
        suppress_tokens=[i for t, i in ids.items() if t != "<|endoftext|>"],
        max_length=MAX_NEW_TOKENS, do_sample=False, num_beams=1,  # whisper counts max_length after the prompt
    )
    model.save_pretrained(folder)
    processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory) -> Path:
    """A folder holding a tiny random Whisper (config, safetensors, tokenizer, feature extractor)."""
    return write_tiny_whisper(tmp_path_factory.mktemp("tiny-whisper"))
