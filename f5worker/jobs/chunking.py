"""Text chunking: split a job's text into pieces the model can speak, for any script.

Why this module exists: F5-TTS synthesises one chunk per model call, and a chunk's frames are
proportional to its UTF-8 bytes. f5-tts's own ``chunk_text`` splits only at sentence punctuation
followed by a space, so text with no such punctuation (Chinese without full stops, Thai, a run of
one letter) stayed one huge chunk that overran the model's positions and failed every job batched
with it. Here f5-tts's rule is kept for the text it handles (so ordinary text chunks exactly as
f5-tts chunks it), and any chunk still over the byte budget is split again: at clause punctuation,
then at spaces, then between characters (never inside a grapheme: a base character keeps its
combining marks, emoji their joiners and modifiers). Pure text functions, no torch.
"""
from __future__ import annotations

import re
import unicodedata

# Sentence and clause punctuation of the scripts F5-TTS users write in: Latin, CJK (including the
# enumeration comma), Arabic, Devanagari, Armenian, Ethiopic, Myanmar, Khmer, dashes and ellipses.
# Chunks are cut at both; subtitle cues (jobs.subtitles) end at the first and break lines at either.
SENTENCE_MARKS = ".!?。！？…‥؟।॥։።။។៕"
CLAUSE_MARKS = ",;:、，；：—–،؛፣၊"
CLAUSE_PUNCTUATION = CLAUSE_MARKS + SENTENCE_MARKS
# The marks that also sit inside a token of a spaced script (3.05, 10:30, 1,000, example.com,
# 1990–2000) end a clause only before a space or the end; the others end one wherever they are.
_INSIDE_TOKENS = ",;:.!?–"
_ALWAYS_ENDS = "".join(c for c in CLAUSE_PUNCTUATION if c not in _INSIDE_TOKENS)
# Matched from the start of a run of marks only (the lookbehind): a search from every mark of a run
# would scan the rest of it each time, quadratic in a text of 100,000 full stops, under the GIL.
_CLAUSE_END = re.compile(f"(?<![{re.escape(CLAUSE_PUNCTUATION)}])[{re.escape(CLAUSE_PUNCTUATION)}]*"
                         f"(?:[{re.escape(_ALWAYS_ENDS)}]\\s*|[{re.escape(_INSIDE_TOKENS)}](?:\\s+|$))")
_SPACES = re.compile(r"\s+")
_JOINERS = {"\u200d", "\u034f"}  # zero-width joiner, combining grapheme joiner


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def chunk_text(text: str, max_chars: int = 135) -> list[str]:
    """f5-tts's chunk_text (f5_tts.infer.utils_infer): sentences packed up to ``max_chars`` bytes."""
    chunks, current = [], ""
    for sentence in re.split(r"(?<=[;:,.!?])\s+|(?<=[；：，。！？])", text):
        if not sentence:
            continue
        piece = sentence + " " if len(sentence[-1].encode("utf-8")) == 1 else sentence
        if len(current.encode("utf-8")) + len(sentence.encode("utf-8")) <= max_chars:
            current += piece
        else:
            if current:
                chunks.append(current.strip())
            current = piece
    if current:
        chunks.append(current.strip())
    return chunks


def graphemes(text: str) -> list[str]:
    """User-perceived characters, near enough for splitting: a character with the marks,
    variation selectors and emoji modifiers that follow it, and anything joined by a ZWJ."""
    clusters: list[str] = []
    for char in text:
        attaches = (unicodedata.category(char) in ("Mn", "Mc", "Me") or char in _JOINERS
                    or "\ufe00" <= char <= "\ufe0f" or "\U0001f3fb" <= char <= "\U0001f3ff")
        if clusters and (attaches or clusters[-1][-1] in _JOINERS):
            clusters[-1] += char
        else:
            clusters.append(char)
    return clusters


def _cut_after(pattern: re.Pattern, text: str) -> list[str]:
    """``text`` cut after each match of ``pattern`` (the match stays with the piece before)."""
    cuts = [m.end() for m in pattern.finditer(text) if 0 < m.end() < len(text)]
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


def _pack(pieces: list[str], max_bytes: int) -> list[str]:
    """Consecutive pieces joined while they fit; a piece that alone does not fit stands alone."""
    packed, current = [], ""
    for piece in pieces:
        if current and utf8_len(current + piece) > max_bytes:
            packed.append(current)
            current = piece
        else:
            current += piece
    if current:
        packed.append(current)
    return packed


def split_to_fit(text: str, max_bytes: int) -> list[str]:
    """``text`` in pieces of at most ``max_bytes`` UTF-8 bytes, cut at the coarsest boundary that
    works: clause punctuation, then spaces, then graphemes. A single grapheme larger than
    ``max_bytes`` cannot be cut and is returned whole (the caller's frame check refuses it)."""
    if utf8_len(text) <= max_bytes:
        return [text]
    splitters = (lambda s: _cut_after(_CLAUSE_END, s), lambda s: _cut_after(_SPACES, s), graphemes)
    pieces = [text]
    for split in splitters:
        refined = []
        for piece in pieces:
            refined.extend(_pack(split(piece), max_bytes) if utf8_len(piece) > max_bytes else [piece])
        pieces = refined
        if all(utf8_len(p) <= max_bytes for p in pieces):
            break
    return pieces


def chunk_for_model(text: str, max_bytes: int) -> list[str]:
    """f5-tts's chunks, with any chunk over ``max_bytes`` split further; empty pieces dropped.
    Chunks that already fit are exactly f5-tts's."""
    max_bytes = max(1, max_bytes)
    chunks = []
    for chunk in chunk_text(text, max_chars=max_bytes):
        for piece in split_to_fit(chunk, max_bytes):
            piece = piece.strip()
            if piece:
                chunks.append(piece)
    return chunks


def cuts_between_words(text: str, end: int) -> bool:
    """Whether cutting ``text`` at ``end`` keeps every word whole: at either end, before a space,
    or after a mark that ends a clause wherever it is (``。``, not the ``.`` of ``3.05``)."""
    return end <= 0 or end >= len(text) or text[end].isspace() or text[end - 1] in _ALWAYS_ENDS


def spaced_starts(text: str, chunks: list[str]) -> list[bool]:
    """For each chunk of ``text`` (in order, as the chunker cut it), whether whitespace came
    before it in ``text`` (the first: whether the text begins with some)."""
    spaced, at = [], 0
    for chunk in chunks:
        start = at
        while at < len(text) and text[at].isspace():
            at += 1
        spaced.append(at > start)
        at = offset_after(text, chunk, at)
    return spaced


def offset_after(text: str, chunk: str, start: int = 0) -> int:
    """Where ``chunk`` (the piece of ``text`` from ``start`` on) ends in ``text``. The chunker only
    drops and adds whitespace, so the chunk ends after as many non-space characters of ``text``
    as it has."""
    remaining, at = sum(not c.isspace() for c in chunk), start
    while at < len(text) and remaining:
        remaining -= not text[at].isspace()
        at += 1
    return at
