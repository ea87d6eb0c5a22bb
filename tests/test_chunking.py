"""Text chunking for any script: f5-tts's chunks where they fit, bounded pieces everywhere."""
from __future__ import annotations

import time

import pytest

from f5worker.jobs.chunking import chunk_for_model, chunk_text, graphemes, spaced_starts, split_to_fit, utf8_len

TEXTS = [
    "Hello world. This is fine, really; it is: short! Or? " * 10,
    "word " * 300,
    "汉字" * 1000,
    "你好，世界。今天天气很好！我们去公园吧？" * 40,
    "ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ" * 13,
    "a" * 1000,
    "e\u0301" * 400,  # e + combining acute
    "👍🏽" * 300,
    "مرحبا بالعالم، كيف حالك؟ " * 40,
    "नमस्ते दुनिया। " * 60,
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("max_bytes", [7, 40, 135])
def test_every_piece_fits_and_nothing_is_lost(text, max_bytes):
    chunks = chunk_for_model(text, max_bytes)
    assert chunks and all(c == c.strip() and c for c in chunks)
    longest_grapheme = max(utf8_len(g) for g in graphemes(text))
    assert all(utf8_len(c) <= max(max_bytes, longest_grapheme) for c in chunks)
    assert "".join(chunks).replace(" ", "") == text.replace(" ", "")


def test_chunks_that_fit_are_exactly_f5tts():
    from f5_tts.infer.utils_infer import chunk_text as stock_chunk_text

    text = "One. Two, three; four: five! Six? " * 12
    assert chunk_for_model(text, 60) == stock_chunk_text(text, 60) == chunk_text(text, 60)


def test_cuts_at_the_coarsest_boundary():
    clause = "first part, second part, third part"
    assert split_to_fit(clause, 14) == ["first part, ", "second part, ", "third part"]
    assert split_to_fit("alpha beta gamma delta", 11) == ["alpha beta ", "gamma delta"]
    assert split_to_fit("abcdef", 4) == ["abcd", "ef"]
    assert split_to_fit("汉字汉字，汉字", 15) == ["汉字汉字，", "汉字"]
    # punctuation inside a token (a decimal, a time, a thousands mark, a domain) is not a clause end
    assert split_to_fit("pay 3.05 at 10:30 for 1,000 at example.com now", 20) == [
        "pay 3.05 at 10:30 ", "for 1,000 at ", "example.com now"]


def test_graphemes_are_never_cut():
    assert graphemes("e\u0301a") == ["e\u0301", "a"]
    assert graphemes("👩‍👩‍👧") == ["👩‍👩‍👧"]
    assert graphemes("👍🏽x") == ["👍🏽", "x"]
    assert graphemes("กั") == ["กั"]  # Thai vowel sign stays on its consonant
    for piece in split_to_fit("e\u0301" * 10, 3):
        assert not piece.startswith("\u0301")


@pytest.mark.parametrize("text", TEXTS + ["Yes, I agree. 你好，我的朋友。 " * 20, "  lead and trail  "])
@pytest.mark.parametrize("max_bytes", [7, 40])
def test_spaced_starts_say_where_the_text_had_whitespace_between_chunks(text, max_bytes):
    chunks = chunk_for_model(text, max_bytes)
    spaced = spaced_starts(text, chunks)
    assert len(spaced) == len(chunks) and spaced[0] == text[0].isspace()
    rebuilt = "".join((" " if space and i else "") + chunk for i, (chunk, space) in enumerate(zip(chunks, spaced)))
    assert rebuilt == text.strip()


def test_a_run_of_punctuation_is_cut_in_linear_time():
    """A search from every mark of a run had scanned the rest of the run: '.' * 99,999 + 'x' (a
    valid text) took about four minutes inside one regex search, holding the GIL, so the event
    loop, the model thread and every other job stopped. Linear, it takes well under a second; the
    bound is the complexity's, far from any machine's speed."""
    text = "." * 99_999 + "x"
    started = time.perf_counter()
    chunks = chunk_for_model(text, 200)
    assert time.perf_counter() - started < 10.0
    assert "".join(chunks) == text and all(utf8_len(c) <= 200 for c in chunks)
