"""What word alignment (``"timestamps": "word"``, ``"subtitles"``) costs per minute of audio.

    python bench/alignment.py --out OUT.json [--device cuda] [--chunks 6] [--tiny]

Why this module exists: a job with word times runs one Whisper encoder pass and one decoder pass
per chunk (``f5worker.inference.alignment.align_words``), on the model thread between TTS calls.
This times that function on random weights of the worker's default ``ASR_MODEL``'s architecture
(openai/whisper-large-v3-turbo: 32 encoder and 4 decoder layers, width 1280, 128 mel bins; compute
does not depend on the weights), in the worker's number format (fp16 on CUDA, fp32 on the CPU),
over chunks of 20 s of audio with 100 text tokens each (about 75 English words, a chunk's worth).
The tokenizer is the tests' byte-level one (the hub is not reached): its ids index the full-size
vocabulary. ``--tiny`` shrinks the model for a smoke run on the CPU (its figures are not the
real model's). Reproduce on any machine: ``scripts/setup.sh --dev && .venv/bin/python bench/alignment.py``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHUNK_SECONDS = 20
WORDS_PER_CHUNK = 50  # " a" is two byte-level tokens: 100 text tokens
TURBO = dict(d_model=1280, encoder_layers=32, decoder_layers=4, encoder_attention_heads=20,
             decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120, num_mel_bins=128,
             vocab_size=51866)
TINY = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=128, vocab_size=51866)


def build(size: dict, device: str):
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizer

    from f5worker.inference.device import pick_dtype
    from tests.fixtures_whisper import write_tiny_whisper

    with tempfile.TemporaryDirectory() as folder:
        tokenizer = WhisperTokenizer.from_pretrained(write_tiny_whisper(Path(folder)))
    config = WhisperConfig(**size, max_source_positions=1500, max_target_positions=448,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                           decoder_start_token_id=tokenizer.convert_tokens_to_ids("<|startoftranscript|>"))
    torch.manual_seed(0)
    with torch.device(device):  # drawn where it runs: 809M random weights take long on a CPU
        model = WhisperForConditionalGeneration(config).eval().to(dtype=pick_dtype(device))
    return model, tokenizer, WhisperFeatureExtractor(feature_size=size["num_mel_bins"])


def measure(model, tokenizer, features, chunks: int, device: str) -> dict:
    import numpy as np
    import torch

    from f5worker.inference.alignment import align_words

    audio = (0.1 * np.random.default_rng(0).standard_normal(16000 * CHUNK_SECONDS)).astype(np.float32)
    words = [" a"] * WORDS_PER_CHUNK

    def one() -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        spans = align_words(model, tokenizer, features, audio, words, "en")
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        assert len(spans) == len(words)
        return time.perf_counter() - started

    warm = one()  # first pass: kernels chosen, memory allocated
    seconds = [one() for _ in range(chunks)]
    median = statistics.median(seconds)
    return {"first_chunk_s": round(warm, 4), "chunk_s": [round(s, 4) for s in seconds],
            "median_chunk_s": round(median, 4), "seconds_per_audio_minute": round(median * 60 / CHUNK_SECONDS, 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: the GPU when there is one)")
    parser.add_argument("--chunks", type=int, default=6)
    parser.add_argument("--tiny", action="store_true", help="a shrunken model, for a smoke run")
    args = parser.parse_args(argv)


    from f5worker.inference.device import pick_device
    from bench.stack import write_report

    device = pick_device(args.device)
    model, tokenizer, features = build(TINY if args.tiny else TURBO, device)
    result = write_report(args.out, {
        "model": "tiny" if args.tiny else "whisper-large-v3-turbo architecture, random weights",
        "dtype": str(model.dtype), "chunk_audio_s": CHUNK_SECONDS, "text_tokens": 2 * WORDS_PER_CHUNK,
        **measure(model, tokenizer, features, args.chunks, device)}, device=device)
    print(f"alignment: {result['median_chunk_s']} s per {CHUNK_SECONDS} s chunk, "
          f"{result['seconds_per_audio_minute']} s per minute of audio on {result['device']} ({result['dtype']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
