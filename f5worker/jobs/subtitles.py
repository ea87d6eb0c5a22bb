"""A job's subtitle file (``"subtitles": "srt"`` or ``"vtt"``), made from its words' times.

Why this module exists: a subtitle file is more than words and times; cues follow broadcast
practice (the BBC's and Netflix's guidelines agree on these), which is what video editors and
players expect:

* at most two lines of at most 42 characters (a wide CJK character counts as two);
* a cue ends at a sentence end once it has been up for ``MIN_CUE_SECONDS``, and when the next
  word would not fit (in two lines, or in ``MAX_CUE_SECONDS``) it ends at its latest clause end
  (, ; : and their CJK forms) that keeps at least half its text, else before that word;
* lines break at a clause end where one fits, else where the two lines are most even;
* no cue is up for less than about a second: a short cue is merged into the next where the two
  fit, else held until the next begins (and the next pushed back where it must);
* no cue is up for more than ``MAX_CUE_SECONDS``: an aligned word ends where the next begins, so a
  word before a long pause would otherwise keep its cue up through the silence;
* a word wider than a line (a URL, a long compound) is broken into line-wide pieces, at
  grapheme boundaries, its time shared among them by width.

WebVTT reads cue text as markup: ``&``, ``<`` and ``>`` are written as character references, so
"a<b" shows as written and "-->" cannot end a cue's text.

Files are written with the ``srt`` and ``webvtt-py`` libraries, and read back by them in the tests.
"""
from __future__ import annotations

import datetime
import html
import re
import unicodedata
from dataclasses import dataclass

import regex
import srt
import webvtt

from f5worker.jobs.chunking import CLAUSE_MARKS, SENTENCE_MARKS
from f5worker.jobs.words import Word

SUBTITLE_FORMATS = {"srt": "application/x-subrip", "vtt": "text/vtt"}  # format (and extension) -> content type
SUBTITLE_EXTENSIONS = tuple(f".{name}" for name in SUBTITLE_FORMATS)
LINE_CELLS = 42
MAX_LINES = 2
MIN_CUE_SECONDS = 1.0
MAX_CUE_SECONDS = 7.0
# A shorter cue could round to no time in a file of milliseconds (and SRT's writer drops such a cue).
MIN_VISIBLE_SECONDS = 0.002
CLOSERS = "'\"’”)）」』»"
SENTENCE_END = re.compile(rf"[{re.escape(SENTENCE_MARKS)}][{CLOSERS}]*$")
CLAUSE_END = re.compile(rf"[{re.escape(CLAUSE_MARKS)}][{CLOSERS}]*$")


@dataclass(frozen=True)
class TimedWord:
    word: Word
    start: float  # seconds in the output
    end: float


@dataclass
class Cue:
    words: list[TimedWord]
    start: float
    end: float

    @property
    def lines(self) -> list[str]:
        return cue_lines([w.word for w in self.words])


def cells(text: str) -> int:
    """Display width: East Asian wide and full-width characters take two cells; combining marks
    (Thai vowels and tones, Devanagari's vowel signs) and format characters none."""
    return sum(0 if unicodedata.category(c) in ("Mn", "Me", "Cf") else 2 if unicodedata.east_asian_width(c) in "WF"
               else 1 for c in text)


def joined(words: list[Word]) -> str:
    return "".join((" " if w.space_before and i else "") + w.text for i, w in enumerate(words))


def cue_lines(words: list[Word]) -> list[str]:
    """The cue's text in one line, or two broken at the best place: where both fit (if any
    split does), after a sentence or clause end, then where the two are most even (a lone word
    wider than a line keeps its line)."""
    text = joined(words)
    if len(words) == 1 or cells(text) <= LINE_CELLS:
        return [text]
    widths = [cells(w.text) for w in words]
    spaces = [1 if w.space_before and i else 0 for i, w in enumerate(words)]
    total, left, ranked = sum(widths) + sum(spaces), 0, []
    for k in range(1, len(words)):  # the split before word k
        left += widths[k - 1] + spaces[k - 1]
        right = total - left - spaces[k]
        ends_clause = CLAUSE_END.search(words[k - 1].text) or SENTENCE_END.search(words[k - 1].text)
        ranked.append(((max(left, right) > LINE_CELLS, not ends_clause, abs(left - right)), k))
    k = min(ranked)[1]
    return [joined(words[:k]), joined(words[k:])]


def fits(words: list[Word]) -> bool:
    width = cells(joined(words))
    if width <= LINE_CELLS or width > MAX_LINES * LINE_CELLS + 1:  # one line, or more than two could hold
        return width <= LINE_CELLS
    lines = cue_lines(words)
    return len(lines) <= MAX_LINES and all(cells(line) <= LINE_CELLS for line in lines)


def _must_close(current: list[TimedWord], word: TimedWord) -> bool:
    return (not fits([w.word for w in current] + [word.word])
            or word.end - current[0].start > MAX_CUE_SECONDS)


def _cut(current: list[TimedWord]) -> int:
    """Where a cue that cannot take the next word ends: after its latest clause end that keeps at
    least half its text, else after all of it."""
    total = cells(joined([w.word for w in current]))
    for k in range(len(current) - 1, 0, -1):
        if CLAUSE_END.search(current[k - 1].word.text) and 2 * cells(joined([w.word for w in current[:k]])) >= total:
            return k
    return len(current)


def group_words(words: list[TimedWord]) -> list[list[TimedWord]]:
    """The words in cues, by the rules above (times not yet held)."""
    groups: list[list[TimedWord]] = []
    current: list[TimedWord] = []
    for word in words:
        while current and _must_close(current, word):
            k = _cut(current)
            groups.append(current[:k])
            current = current[k:]
        current.append(word)
        if SENTENCE_END.search(word.word.text) and word.end - current[0].start >= MIN_CUE_SECONDS:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


def line_wide(word: TimedWord) -> list[TimedWord]:
    """``word``, or where it is wider than a line its line-wide pieces (whole graphemes), each
    given a share of its time by width; the pieces after the first join it without a space."""
    if cells(word.word.text) <= LINE_CELLS:
        return [word]
    pieces, piece = [], ""
    for grapheme in regex.findall(r"\X", word.word.text):
        if piece and cells(piece + grapheme) > LINE_CELLS:
            pieces.append(piece)
            piece = ""
        piece += grapheme
    pieces.append(piece)
    total, start, out = cells(word.word.text), word.start, []
    for k, text in enumerate(pieces):
        end = word.end if k == len(pieces) - 1 else start + (word.end - word.start) * cells(text) / total
        out.append(TimedWord(Word(text, word.word.space_before if k == 0 else False), start, end))
        start = end
    return out


def build_cues(words: list[TimedWord], duration: float) -> list[Cue]:
    """The subtitle cues of ``words`` (in order, times monotonic) in audio of ``duration`` seconds."""
    merged: list[list[TimedWord]] = []
    for group in group_words([piece for word in words for piece in line_wide(word)]):
        last = merged[-1] if merged else None
        if (last is not None and last[-1].end - last[0].start < MIN_CUE_SECONDS
                and fits([w.word for w in last + group]) and group[-1].end - last[0].start <= MAX_CUE_SECONDS):
            last.extend(group)
        else:
            merged.append(list(group))
    cues = [Cue(group, group[0].start, group[-1].end) for group in merged]
    return _held(cues, duration)


def _held(cues: list[Cue], duration: float) -> list[Cue]:
    """Each cue up for at least MIN_CUE_SECONDS where the audio allows, and at most MAX_CUE_SECONDS.
    Forward, a short cue is held and the next pushed back as far as needed; backward, nothing
    passes the audio's end, and a cue squeezed there starts earlier (before its first word) rather
    than vanish. Where a cue is left with no time at all, the cues share the audio evenly (``_spread``)."""
    for cue, after in zip(cues, cues[1:]):
        cue.end = max(cue.end, cue.start + MIN_CUE_SECONDS)
        after.start = max(after.start, cue.end)
        after.end = max(after.end, after.start)
    limit = duration
    for cue in reversed(cues):  # at most MAX_CUE_SECONDS: a word's time runs on through the pause after it
        cue.end = min(max(cue.end, cue.start + MIN_CUE_SECONDS), cue.start + MAX_CUE_SECONDS, limit)
        cue.start = max(0.0, min(cue.start, cue.end - MIN_CUE_SECONDS))
        limit = cue.start
    if any(cue.end - cue.start < MIN_VISIBLE_SECONDS for cue in cues):
        cues = _spread(cues, duration)
    for cue in cues:  # the file's milliseconds (rounding keeps the order, so cues stay apart)
        cue.start, cue.end = round(cue.start, 3), round(cue.end, 3)
    return cues


def _spread(cues: list[Cue], duration: float) -> list[Cue]:
    """More cues than the audio has time for (words said faster than anyone speaks): the cues
    share the audio evenly, in order; none at all when the audio is too short to show one."""
    if duration < MIN_VISIBLE_SECONDS:
        return []
    count = min(len(cues), int(duration / MIN_VISIBLE_SECONDS))
    if count < len(cues):  # not even a share each: the last ones join the one before them
        cues[count - 1].words.extend(w for cue in cues[count:] for w in cue.words)
        cues = cues[:count]
    share = duration / len(cues)
    for k, cue in enumerate(cues):
        cue.start, cue.end = k * share, (k + 1) * share
    return cues


# SRT has no escaping, and its readers (ffmpeg's, which players and burn-in tools use) start a cue at
# any line that looks like a timing line and render <font>/<b> tags and {\an8}-style overrides. A
# word joiner (U+2060, invisible) after each such mark keeps the job's text shown as written
# without letting it add a cue of its own, move one or colour it.
_SRT_MARKUP = str.maketrans({"<": "<\u2060", "{": "{\u2060", ">": "\u2060>"})


def _srt_text(line: str) -> str:
    return line.translate(_SRT_MARKUP)


def render(cues: list[Cue], fmt: str) -> str:
    """The file's text in ``fmt`` (srt or vtt): the job's text as text, never as markup or timing."""
    if fmt == "srt":
        return srt.compose([srt.Subtitle(index=n, start=_delta(cue.start), end=_delta(cue.end),
                                         content="\n".join(map(_srt_text, cue.lines)))
                            for n, cue in enumerate(cues, 1)])
    return webvtt.WebVTT(captions=[webvtt.Caption(start=_vtt_time(cue.start), end=_vtt_time(cue.end),
                                                  text="\n".join(html.escape(line, quote=False) for line in cue.lines))
                                   for cue in cues]).content


def _delta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(milliseconds=round(seconds * 1000))


def _vtt_time(seconds: float) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"
