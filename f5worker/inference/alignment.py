"""Word times by forced alignment: where in a chunk's audio each word of its known text is said.

Why this module exists: a chunk's words are known (they are what it was asked to say), so they
are aligned, not transcribed and guessed at. The worker's Whisper is made to read the text: its
tokens are the decoder's input (nothing is generated), and the cross-attention of the model's
alignment heads, where the decoder looked in the audio for each token, becomes a monotonic
token-to-time path by dynamic time warping. This is openai-whisper's own word-timestamp method
(``whisper/timing.py``: attention normalised per frame, median-filtered over 7 frames, DTW over the
encoder's 20 ms frames), applied to a known text as stable-ts's ``align`` does. It reads every
language Whisper reads, needs no second model (the usual CTC aligner, MMS, is CC-BY-NC: not for a
commercial product) and costs one encoder and one decoder pass per chunk (the encoder's shared
with the chunk's transcript when the job is verified too).

Bottom up: the path (``dtw_path``), the word times it gives (``word_times``), then the encoder
pass (``encode``) and one chunk through the model (``align_words``).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

FRAMES_PER_SECOND = 50  # Whisper's encoder: one frame per 20 ms (two 10 ms mel frames)
MEDIAN_FILTER_WIDTH = 7


def dtw_path(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest monotonic path through ``cost`` [rows, frames] from its first cell to its last
    (steps: both, a row, a frame), as (row, frame) index arrays along it. openai-whisper's
    ``dtw_cpu`` with its ties, computed one anti-diagonal at a time (every cell of one depends
    only on the two before it), so a 100-token chunk takes milliseconds in numpy, not a Python loop
    per cell. ``tests/test_word_times.py`` holds the cell-by-cell reference it must equal."""
    rows, frames = cost.shape
    acc = np.full((rows + 1, frames + 1), np.inf)
    acc[0, 0] = 0.0
    trace = np.zeros((rows + 1, frames + 1), dtype=np.int8)
    trace[0, :], trace[:, 0] = 2, 1  # along the edges the only step back is along the edge
    for diagonal in range(2, rows + frames + 1):
        i = np.arange(max(1, diagonal - frames), min(rows, diagonal - 1) + 1)
        j = diagonal - i
        both, row, frame = acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1]
        step = np.where((both < row) & (both < frame), 0, np.where((row < both) & (row < frame), 1, 2))
        acc[i, j] = cost[i - 1, j - 1] + np.choose(step, [both, row, frame])
        trace[i, j] = step
    return _backtrace(trace)


def _backtrace(trace: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    i, j = trace.shape[0] - 1, trace.shape[1] - 1
    path = []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        step = trace[i, j]
        i, j = (i - 1, j - 1) if step == 0 else (i - 1, j) if step == 1 else (i, j - 1)
    cells = np.array(path[::-1])
    return cells[:, 0], cells[:, 1]


def word_times(matrix: np.ndarray, token_counts: list[int]) -> list[tuple[float, float]]:
    """Each word's (start, end) in seconds from the attention ``matrix`` [tokens + 1, frames]
    (one row per text token, then the end-of-text's) and each word's number of tokens: a word
    starts at the frame where the path reaches its first token and ends where the next word (or
    the end of text) starts, as openai-whisper's ``find_alignment`` reads the path."""
    rows, frames = dtw_path(-matrix.astype(np.float64))
    first = np.flatnonzero(np.diff(rows, prepend=-1))  # where the path reaches each row
    starts = frames[first] / FRAMES_PER_SECOND
    bounds = np.concatenate([[0], np.cumsum(token_counts)])
    return [(float(starts[a]), float(starts[b])) for a, b in zip(bounds[:-1], bounds[1:])]


def median_filter(x: torch.Tensor, width: int) -> torch.Tensor:
    """A median over ``width`` frames along the last axis, edges reflected (openai-whisper's)."""
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    padded = F.pad(x, (pad, pad), mode="reflect")  # x: [heads, rows, frames]
    return padded.unfold(-1, width, 1).median(-1).values


def alignment_heads(model) -> list[tuple[int, int]]:
    """The (layer, head) pairs whose cross-attention follows the audio: the checkpoint's own (every
    OpenAI checkpoint lists them), else every head of the decoder's second half (openai-whisper's
    default for a model without them)."""
    heads = getattr(model.generation_config, "alignment_heads", None)
    if heads:
        return [(int(layer), int(head)) for layer, head in heads]
    layers, per_layer = model.config.decoder_layers, model.config.decoder_attention_heads
    return [(layer, head) for layer in range(layers // 2, layers) for head in range(per_layer)]


def language_token(language: str) -> str:
    """Whisper's token for an ISO 639 code, region left out ('pt_BR' and 'pt-br' are '<|pt|>')."""
    return f"<|{language.replace('-', '_').split('_')[0].lower()}|>"


def prompt_ids(tokenizer, language: str) -> list[int]:
    """Start of transcript, the language (when the model knows it), transcribe, no timestamps."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in
           ("<|startoftranscript|>", language_token(language), "<|transcribe|>", "<|notimestamps|>")]
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


def word_token_ids(tokenizer, words: list[str]) -> list[list[int]]:
    """Each word's tokens; a word carries the space said before it (" world"), as Whisper writes it."""
    return [tokenizer.encode(word, add_special_tokens=False) or [tokenizer.unk_token_id] for word in words]


def token_room(model, tokenizer, language: str) -> int:
    """How many text tokens one pass can align: the decoder's positions less the prompt and end."""
    return model.config.max_target_positions - len(prompt_ids(tokenizer, language)) - 1


@contextlib.contextmanager
def eager_attention(model) -> Iterator[None]:
    """Attention weights exist only in eager attention (SDPA never forms them): the decoder pass
    runs in it, and the model returns to what it was (the caller holds the model's lock)."""
    was = model.config._attn_implementation
    if was != "eager":
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if was != "eager":
            model.set_attn_implementation(was)


@torch.inference_mode()
def encode(model, feature_extractor, audio: np.ndarray):
    """The encoder's output for ``audio`` (mono float32 at the feature extractor's rate, at most one
    30 s window, padded to it as Whisper reads it): the costly pass, in SDPA. Transcribing and
    aligning the same audio share it (``inference.transcriber.Heard``)."""
    features = feature_extractor(audio, sampling_rate=feature_extractor.sampling_rate, return_tensors="pt")
    return model.get_encoder()(features.input_features.to(model.device, model.dtype))


@torch.inference_mode()
def align_words(model, tokenizer, feature_extractor, audio: np.ndarray, words: list[str],
                language: str, *, encoded=None) -> list[tuple[float, float]]:
    """Each word's (start, end) in seconds in ``audio`` (mono float32 at the feature extractor's
    rate, at most 30 s), ``words`` as ``word_token_ids`` takes them; ``encoded``: ``encode``'s
    output for this same audio where the caller has it (else the encoder runs here)."""
    if not words:
        return []
    device = model.device
    counts_ids = word_token_ids(tokenizer, words)
    prompt = prompt_ids(tokenizer, language)
    tokens = [*prompt, *(i for ids in counts_ids for i in ids), tokenizer.eos_token_id]
    frames = max(1, min(len(audio) // feature_extractor.hop_length, feature_extractor.nb_max_frames) // 2)
    if encoded is None:
        encoded = encode(model, feature_extractor, audio)
    with eager_attention(model):
        out = model(encoder_outputs=encoded, decoder_input_ids=torch.tensor([tokens], device=device),
                    output_attentions=True)
    # [heads, rows, frames]: the selected heads' attention, over the audio's own frames
    weights = torch.stack([out.cross_attentions[layer][0, head] for layer, head in alignment_heads(model)])
    # openai-whisper takes the softmax over the audio's own frames; transformers' weights are a
    # softmax over all 1500 (the padding too): cropped and renormalised they are exactly that.
    weights = weights[:, :, :frames].float()
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
    std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)
    weights = median_filter((weights - mean) / std.clamp_min(1e-6), MEDIAN_FILTER_WIDTH)
    # Row p's attention predicts token p + 1: from the prompt's last row, each text token's, then the end's.
    matrix = weights.mean(0)[len(prompt) - 1:-1].cpu().numpy()
    return word_times(matrix, [len(ids) for ids in counts_ids])
