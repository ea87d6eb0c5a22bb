"""Text to F5-TTS token ids: exactly f5-tts's ``convert_char_to_pinyin`` and ``list_str_to_idx``.

Why this module exists: f5-tts turns text into symbols by running every text, English included,
through the Chinese word segmenter rjieba (f5-tts 1.1.22 imports rjieba, not jieba) and, for Chinese
characters, pypinyin. Importing the two loads their dictionaries (0.6 to 1.5 s and 88 MiB resident,
measured on a busy 2-core machine), and importing ``f5_tts.model.utils`` runs f5-tts's model package.
Here text with no character the Chinese machinery can act on takes a fast path that reproduces
rjieba's cut with two regular expressions; other text takes a slow path that imports rjieba and
pypinyin on first need and calls them exactly as f5-tts does. Both paths feed the same copy of
f5-tts's symbol loop, so they differ only in how the text is cut into segments.

Where the boundary is, and why (rjieba 0.2.2, which embeds jieba-rs 0.11.0, and pypinyin 0.55.0):
- rjieba cuts text into blocks of CJK ideographs and ASCII ``[A-Za-z0-9+#&._%-]``; every other
  character is a segment of its own, except a ``\\r\\n`` pair, which is one segment.
- A block is cut along its dictionary words. The dictionary rjieba embeds (read out of its binary)
  has exactly five entries without an ideograph: ``C#``, ``c#``, ``C++``, ``c++``, ``AT&T``.
  A block with none of them is one run that jieba-rs's HMM step splits into gaps (maximal non
  alphanumeric runs, kept whole) and tokens (an alphanumeric run, then any number of ``.``, ``_``
  or ``-`` each followed by another run, then an optional ``%``): ``_BLOCK_PIECE`` below.
- pypinyin returns a character other than itself only for ideographs, U+3007, the private-use
  U+E815..U+E864 and planes 2 and 3; f5-tts marks U+3100..U+9FFF as Chinese.
So text goes the slow path when it holds any character in U+2E80..U+9FFF (CJK radicals through the
unified ideographs, kana and CJK punctuation included, covering f5-tts's Chinese range and U+3007),
U+D800..U+DFFF (lone surrogates, which f5-tts fails on), U+E000..U+FAFF (private use and CJK
compatibility ideographs) or planes 2 and 3, or any of the five dictionary words. Everything else
(Latin with any accents, Greek, Cyrillic, Arabic, Hangul, fullwidth forms, emoji, punctuation,
whitespace) is cut here, one segment per character outside ASCII blocks, which is what rjieba
does; the tests check this, character by character and on random text.
"""
from __future__ import annotations

import functools
import logging
import re
import threading
from typing import Callable, Iterable, Iterator

import torch
from torch.nn.utils.rnn import pad_sequence

log = logging.getLogger(__name__)

# f5-tts's translation table (convert_char_to_pinyin): applied before segmenting, on both paths.
_TRANSLATION = str.maketrans({";": ",", "“": '"', "”": '"', "‘": "'", "’": "'"})

# Text the fast path cannot reproduce: see the module docstring for each range and word.
_NEEDS_SEGMENTER = re.compile(
    "[\u2e80-\u9fff\ud800-\udfff\ue000-\ufaff\U00020000-\U0003ffff]|C#|c#|C\\+\\+|c\\+\\+|AT&T")
# One rjieba segment outside blocks (``\r\n`` whole, anything else alone), or one whole ASCII block.
_SEGMENT = re.compile(r"[A-Za-z0-9+#&._%-]+|\r\n|.", re.DOTALL)
# jieba-rs's HMM split of a block with no dictionary word: a token, or a gap kept whole.
_BLOCK_PIECE = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*%?|[^A-Za-z0-9]+")

_chinese_lock = threading.Lock()
_chinese_tools: tuple[Callable[[str], list[str]], Callable[[str], list[str]]] | None = None


def load_vocab(path) -> dict[str, int]:
    """f5-tts's ``get_tokenizer(path, "custom")[0]``: line i (its last character dropped) -> i,
    except for the symbols of a vocabulary with repeated lines that f5-tts would send past its text
    embedding.

    The vocabulary size f5-tts builds the embedding for is ``len()`` of this map, but a repeated line
    keeps its last index, so the ids of the last lines run past that size: a job's text with one of
    those symbols failed its model call (on a GPU, a device-side assert that takes the worker down).
    Those symbols are unknown (0) here, which is all f5-tts's own training could have made of them.
    """
    with open(path, "r", encoding="utf-8") as f:
        vocab = {line[:-1]: index for index, line in enumerate(f)}
    size = len(vocab)
    return {symbol: index if index < size else 0 for symbol, index in vocab.items()}


def needs_segmenter(text: str) -> bool:
    """Whether ``text_to_symbols(text)`` loads rjieba and pypinyin (the slow path)."""
    return _NEEDS_SEGMENTER.search(text.translate(_TRANSLATION)) is not None


def text_to_symbols(text: str) -> list[str]:
    """f5-tts's ``convert_char_to_pinyin([text])[0]``: characters, spaces and tone-numbered pinyin."""
    text = text.translate(_TRANSLATION)
    if _NEEDS_SEGMENTER.search(text) is None:
        # Outside U+2E80..U+9FFF and the other slow ranges pypinyin returns each character itself.
        return _symbols(_fast_segments(text), list)
    cut, pinyin = _load_chinese_tools()
    return _symbols(cut(text), pinyin)


def symbols_to_ids(symbol_lists: Iterable[list[str]], vocab: dict[str, int]) -> torch.Tensor:
    """f5-tts's ``list_str_to_idx``: one row of vocab indices per list (unknown -> 0), padded with -1.

    Always int64: f5-tts's gives float32 when a list is empty, which its text embedding cannot take.
    """
    rows = [torch.tensor([vocab.get(symbol, 0) for symbol in symbols], dtype=torch.long)
            for symbols in symbol_lists]
    return pad_sequence(rows, padding_value=-1, batch_first=True)


def _fast_segments(text: str) -> Iterator[str]:
    """rjieba's cut of text that ``_NEEDS_SEGMENTER`` does not match."""
    for segment in _SEGMENT.findall(text):
        if len(segment) > 1 and segment != "\r\n":
            yield from _BLOCK_PIECE.findall(segment)
        else:
            yield segment


def _load_chinese_tools():
    """rjieba's cut and f5-tts's pypinyin call, imported once, on the first text that needs them."""
    global _chinese_tools
    with _chinese_lock:
        if _chinese_tools is None:
            # Imported here, not at the top: their dictionaries cost most of a second and 88 MiB,
            # which neither the worker's start nor an English job should pay.
            import rjieba
            from pypinyin import Style, lazy_pinyin

            log.info("Loading the Chinese segmenter and pinyin tables")
            _chinese_tools = (rjieba.cut,
                              functools.partial(lazy_pinyin, style=Style.TONE3, tone_sandhi=True))
        return _chinese_tools


def _is_chinese(c: str) -> bool:
    return "\u3100" <= c <= "\u9fff"  # f5-tts's range, kept as it is


def _symbols(segments: Iterable[str], pinyin: Callable[[str], list[str]]) -> list[str]:
    """f5-tts's loop over segments (convert_char_to_pinyin, polyphone=True), statement for statement."""
    symbols: list[str] = []
    for segment in segments:
        byte_len = len(bytes(segment, "UTF-8"))
        if byte_len == len(segment):  # ASCII: a space before a multi-character segment
            if symbols and byte_len > 1 and symbols[-1] not in " :'\"":
                symbols.append(" ")
            symbols.extend(segment)
        elif byte_len == 3 * len(segment):  # characters of three UTF-8 bytes each
            segment_pinyin = pinyin(segment)
            for i, c in enumerate(segment):
                if _is_chinese(c):
                    symbols.append(" ")
                symbols.append(segment_pinyin[i])
        else:  # mixed widths
            for c in segment:
                if ord(c) < 256:
                    symbols.extend(c)
                elif _is_chinese(c):
                    symbols.append(" ")
                    symbols.extend(pinyin(c))
                else:
                    symbols.append(c)
    return symbols
