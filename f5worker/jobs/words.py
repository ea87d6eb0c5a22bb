"""A chunk's text as the words that get times (``"timestamps": "word"``) and subtitle cues.

Why this module exists: the aligner, the result's ``words`` and the subtitle cues must agree on
what a word is. A word is what the text writes between spaces, its punctuation attached
("world," stays one word). Scripts written without spaces (Chinese, Japanese kana, Thai, Lao,
Khmer, Burmese) have no such boundary, and splitting them into dictionary words needs a
dictionary per language: there each character is a word (a grapheme: a Thai consonant with its
vowel and tone marks), with its punctuation attached, opening brackets and quotes to the one
after them ("「你", "好」。").
"""
from __future__ import annotations

from dataclasses import dataclass

import regex

UNSPACED = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}"
OPENING = r"\p{Ps}\p{Pi}"  # ( [ 「 『 “ ‘ and their kin
WORD_RE = regex.compile(rf"(\s*)([{OPENING}]*(?=[{UNSPACED}])\X(?:(?![{UNSPACED}{OPENING}])[^\s\w])*"
                        rf"|[^\s{UNSPACED}]+)")
UNSPACED_RE = regex.compile(rf"[{OPENING}]*[{UNSPACED}]")


@dataclass(frozen=True)
class Word:
    text: str
    space_before: bool  # written after a space: a cue's text puts one back

    @property
    def unspaced(self) -> bool:
        return bool(UNSPACED_RE.match(self.text))

    @property
    def as_said(self) -> str:
        """The word as Whisper writes it: a word of a spaced script after a space (" world")."""
        return self.text if self.unspaced else " " + self.text


def split_words(text: str) -> list[Word]:
    return [Word(match.group(2), bool(match.group(1))) for match in WORD_RE.finditer(text)]
