"""A chunk's text as the words that get times (``"timestamps": "word"``) and subtitle cues.

Why this module exists: the aligner, the result's ``words`` and the subtitle cues must agree on
what a word is. A word is what the text writes between spaces, its punctuation attached
("world," stays one word); in scripts written without spaces (Chinese, Japanese kana) each
character is a word, its punctuation attached ("好，").
"""
from __future__ import annotations

import re
from dataclasses import dataclass

UNSPACED = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # kana and CJK ideographs
WORD_RE = re.compile(rf"(\s*)([{UNSPACED}][^\s\w]*|[^\s{UNSPACED}]+)")


@dataclass(frozen=True)
class Word:
    text: str
    space_before: bool  # written after a space: a cue's text puts one back

    @property
    def unspaced(self) -> bool:
        return bool(re.match(f"[{UNSPACED}]", self.text))

    @property
    def as_said(self) -> str:
        """The word as Whisper writes it: a word of a spaced script after a space (" world")."""
        return self.text if self.unspaced else " " + self.text


def split_words(text: str) -> list[Word]:
    return [Word(match.group(2), bool(match.group(1))) for match in WORD_RE.finditer(text)]
