"""A TTS job's audio put together as its chunks are sampled: joined, its long pauses shortened,
resampled and written to its output file piece by piece, and where each chunk lies in it.

Why this module exists: a chapter-length job (100,000 characters, about 100 minutes of audio)
cannot hold its waveform in memory (float64 while joined, float32, resampled, then encoded: well
over 2 GB). Here each chunk's waveform leaves memory as soon as it is written, so a job's memory
does not grow with its text. Every step gives the samples ``jobs.plan.finish`` and
``jobs.resampling.from_model_rate`` give for the whole (tests compare them):

* ``CrossFadeJoin``: ``audio.cross_fade_join`` fed chunk by chunk. The last cross-fade window of
  the join so far is held back until the next chunk fades into it.
* ``SilenceCutter``: ``audio.remove_silences`` (f5-tts's rule: pauses over 1 s shortened to 0.5 s
  on each side, judged in 10 ms steps from the first sample) fed in pieces, holding back only the
  pause it is in (and, until the first sound, what came before it: an all-silent output is kept
  whole, as ``remove_silences`` keeps it, so past ``LEAD_HELD_SAMPLES`` that leading quiet is held in an
  anonymous temp file, read back only if no sound ever comes).
* resampling with soxr's streaming resampler (``resampling.OutputStream``), then the file written
  by libsndfile as it goes (16-bit formats from ``encoding.pcm16``'s integers, as ``encode``).

``segments`` says, for each chunk, its text and its start and end in the output, in seconds: the
boundary between two chunks is the middle of their cross-fade, mapped through any shortened pause
and the output sample rate, so the segments tile the audio exactly from 0 to its duration.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import numpy as np
import soundfile as sf

from f5worker.jobs.audio import SILENCE_CUT_DB, SILENCE_CUT_MS, SILENCE_KEEP_MS, chunk_dbfs, piece_dbfs
from f5worker.jobs.encoding import OutputFormat, pcm16
from f5worker.jobs.options import VERIFY_MAX_RETRIES
from f5worker.jobs.resampling import OutputStream
from f5worker.jobs.subtitles import TimedWord
from f5worker.jobs.words import Word, split_words
from f5worker.model.constants import SAMPLE_RATE

# audio.remove_silences's rule in samples: pauses of at least 1 s below -50 dBFS keep 0.5 s at each side.
SILENCE_STEP = SAMPLE_RATE // 100  # 10 ms
MIN_SILENCE_STEPS = SILENCE_CUT_MS // 10
SILENCE_THRESHOLD_DB = SILENCE_CUT_DB
KEEP_SAMPLES = SAMPLE_RATE * SILENCE_KEEP_MS // 1000
# Quiet from the first sample is held in memory up to this (30 s); beyond it, on disk.
LEAD_HELD_SAMPLES = 30 * SAMPLE_RATE
LEAD_READ_SAMPLES = 2**20  # read back in pieces of this many (4 MiB)
WIDEST_SECONDS = 999999.999  # longer than any job may plan (jobs.plan's bounds)
WIDEST_REASON = "x" * 120  # longer than any of jobs.verify's reasons for a retry
WIDEST_ERROR = 999.999  # an error rate counts insertions too, so it may pass 1; rounded to 3 places


class CrossFadeJoin:
    """``audio.cross_fade_join`` fed one chunk at a time: each ``add`` gives the samples the chunk
    makes final (float64 where faded, as the whole join computes them), ``close`` the rest."""

    def __init__(self, cross_fade_seconds: float):
        self.fade = int(cross_fade_seconds * SAMPLE_RATE)  # cross_fade_join's window
        self.held = np.zeros(0, dtype=np.float32)  # the join's last samples, exactly as it holds them
        self.joined = 0  # samples of the join so far, held ones included
        self.starts: list[int] = []  # where each chunk begins in the join
        self.overlaps: list[int] = []  # the samples each chunk shares with the one before it

    def add(self, wave: np.ndarray) -> np.ndarray:
        n = min(self.fade, self.joined, len(wave)) if self.starts else 0
        if not self.starts:
            region = wave
        elif n <= 0:
            region = np.concatenate([self.held, wave])
        else:  # cross_fade_join's step, on the part of the join that can still change
            faded = self.held[-n:] * np.linspace(1, 0, n) + wave[:n] * np.linspace(0, 1, n)
            region = np.concatenate([self.held[:-n], faded, wave[n:]])
        self.starts.append(self.joined - n)
        self.overlaps.append(n)
        self.joined += len(wave) - n
        keep = min(self.fade, self.joined)
        ready, self.held = region[:len(region) - keep], region[len(region) - keep:]
        return ready

    def close(self) -> np.ndarray:
        held, self.held = self.held, np.zeros(0, dtype=np.float32)
        return held

    def boundaries(self) -> list[int]:
        """Where one chunk hands over to the next in the join (the middle of their cross-fade),
        with 0 first and the join's length last: chunk i spans boundaries i to i + 1 (never
        backwards: a chunk shorter than a fade may span nothing)."""
        bounds = [0]
        for start, overlap in zip(self.starts[1:], self.overlaps[1:]):
            # A chunk shorter than the fade lies inside it: the next hand-over may not come first.
            bounds.append(max(bounds[-1], start + overlap // 2))
        return [*bounds, self.joined]


@dataclass
class SilenceCutter:
    """``audio.remove_silences`` fed in pieces; ``cuts`` are the input ranges it removed.
    ``spill_dir``: where a long leading quiet goes (an anonymous file; None: the system's temp)."""

    spill_dir: Path | None = None
    taken: int = 0  # input samples judged so far (whole 10 ms steps)
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0))  # input not yet a whole step
    run: list[np.ndarray] = field(default_factory=list)  # the quiet run in progress (its kept part)
    run_start: int | None = None
    run_steps: int = 0
    sounded: bool = False  # a loud step was seen: what came before is settled
    cuts: list[tuple[int, int]] = field(default_factory=list)
    lead: BinaryIO | None = None  # the start of a leading quiet run, float32 (the output's type)

    def add(self, samples: np.ndarray) -> np.ndarray:
        data = np.concatenate([self.pending, samples]) if len(self.pending) else samples
        whole = len(data) // SILENCE_STEP * SILENCE_STEP
        self.pending = data[whole:]
        if not whole:
            return data[:0]
        steps = data[:whole]
        quiet = chunk_dbfs(steps, SAMPLE_RATE) < SILENCE_THRESHOLD_DB
        out: list[np.ndarray] = []
        # Runs of equal quietness, each handled at once.
        edges = np.flatnonzero(np.diff(quiet.astype(np.int8))) + 1
        for a, b in zip([0, *edges], [*edges, len(quiet)]):
            piece = steps[a * SILENCE_STEP:b * SILENCE_STEP]
            if quiet[a]:
                self._quiet(piece)
            else:
                out += self._end_run(long_run_to_end=False)
                out.append(piece)
                self.sounded = True
            self.taken += len(piece)
        return np.concatenate(out) if out else data[:0]

    def close(self) -> Iterator[np.ndarray]:
        """The rest, in pieces: a partial last step is judged by its own level, and a quiet one
        belongs to the run it ends (as in ``audio._silent_runs``)."""
        rest, self.pending = self.pending, np.zeros(0)
        if len(rest) and piece_dbfs(rest) >= SILENCE_THRESHOLD_DB:
            yield from self._end_run(long_run_to_end=False)
            yield rest
            return
        if len(rest):
            if self.run_start is None:
                self.run_start, self.run_steps, self.run = self.taken, 0, []
            self.run.append(rest)
            self.taken += len(rest)
        yield from self._end_run(long_run_to_end=True)

    def discard(self) -> None:
        """Nothing more is wanted (the job failed): the held leading quiet is let go."""
        if self.lead is not None:
            self.lead.close()
            self.lead = None

    def _quiet(self, piece: np.ndarray) -> None:
        if self.run_start is None:
            self.run_start, self.run_steps, self.run = self.taken, 0, []
        self.run_steps += len(piece) // SILENCE_STEP
        self.run.append(piece)
        held = sum(map(len, self.run))
        # A long pause after sound keeps only its first and last KEEP_SAMPLES; before any sound
        # everything is kept (the output may be silence throughout, which is kept whole): all but
        # its last KEEP_SAMPLES, which sound would keep, goes to disk once it is long.
        if self.sounded and held > 4 * KEEP_SAMPLES:
            run = np.concatenate(self.run)
            self.run = [run[:KEEP_SAMPLES], run[-KEEP_SAMPLES:]]
        elif not self.sounded and held > LEAD_HELD_SAMPLES:
            run = np.concatenate(self.run)
            if self.lead is None:
                self.lead = tempfile.TemporaryFile(dir=self.spill_dir)
            self.lead.write(run[:-KEEP_SAMPLES].astype(np.float32).tobytes())
            self.run = [run[-KEEP_SAMPLES:]]

    def _read_lead(self) -> Iterator[np.ndarray]:
        if self.lead is None:
            return
        self.lead.seek(0)
        while data := self.lead.read(LEAD_READ_SAMPLES * 4):
            yield np.frombuffer(data, dtype=np.float32)
        self.discard()

    def _end_run(self, *, long_run_to_end: bool) -> Iterable[np.ndarray]:
        """What is kept of the quiet run in progress, now that it ends (at sound, or at the end)."""
        if self.run_start is None:
            return []
        start, end, run, self.run_start = self.run_start, self.taken, self.run, None
        if self.run_steps < MIN_SILENCE_STEPS:
            return run
        held = np.concatenate(run)
        if not self.sounded:  # a run from the first sample keeps only its last part
            if long_run_to_end:  # silence throughout: remove_silences keeps it all
                return itertools.chain(self._read_lead(), [held])
            self.discard()
            self.cuts.append((0, end - KEEP_SAMPLES))
            return [held[-KEEP_SAMPLES:]]
        if long_run_to_end:  # a run to the very end keeps only its first part
            self.cuts.append((start + KEEP_SAMPLES, end))
            return [held[:KEEP_SAMPLES]]
        self.cuts.append((start + KEEP_SAMPLES, end - KEEP_SAMPLES))
        return [held[:KEEP_SAMPLES], held[-KEEP_SAMPLES:]]


def after_cuts(position: int, cuts: list[tuple[int, int]]) -> int:
    """Where ``position`` of the input lies once ``cuts`` are removed (inside one: where it was)."""
    removed = 0
    for a, b in cuts:
        if position <= a:
            break
        removed += min(position, b) - a
    return position - removed


# A RIFF WAV's sizes are 32-bit: past this, libsndfile writes 0xFFFFFFFF and readers see 2**31 - 1
# frames (the rest of a chapter lost to them). Such a file is written as RF64 (EBU Tech 3306),
# a WAV with 64-bit sizes that libsndfile, ffmpeg and sox read; 1 MiB short of 4 GiB, for headers.
RIFF_MOST_DATA_BYTES = 2**32 - 2**20


def container_for(fmt: OutputFormat, most_samples: int) -> str:
    """libsndfile's container for ``fmt`` holding at most ``most_samples`` samples."""
    if fmt.sf_format == "WAV" and fmt.least_bytes(most_samples) > RIFF_MOST_DATA_BYTES:
        return "RF64"
    return fmt.sf_format


class AudioWriter:
    """The output file, written as samples come (16-bit formats from ``pcm16``'s integers);
    ``most_samples``: at most how many it will hold (a WAV past 4 GiB is RF64)."""

    def __init__(self, path: Path, fmt: OutputFormat, sample_rate: int, *, most_samples: int = 0):
        self.pcm = fmt.sf_subtype == "PCM_16"
        self.file = sf.SoundFile(str(path), "w", samplerate=sample_rate, channels=1,
                                 format=container_for(fmt, most_samples), subtype=fmt.sf_subtype)

    def write(self, samples: np.ndarray) -> None:
        if len(samples):
            self.file.write(pcm16(samples) if self.pcm else samples)

    def close(self) -> None:
        self.file.close()


@dataclass(frozen=True)
class Assembled:
    """What a job's audio came to: its length at 24 kHz and at the job's rate, and its segments."""

    model_samples: int
    samples: int
    sample_rate: int
    segments: list[dict]
    words: list[list[TimedWord]]  # each chunk's, where they were aligned (jobs.words; else empty)

    @property
    def duration(self) -> float:
        return self.samples / self.sample_rate


class AudioAssembly:
    """One job's chunk waveforms (24 kHz, in order) in; the output file (``writer``, if any)
    written as they are known. With ``keep`` the final audio at 24 kHz is also kept in ``kept``
    until taken (``take_kept``: for a stream of a job whose silences are removed, taken after
    each chunk and after each piece of ``finish``)."""

    def __init__(self, *, sample_rate: int, cross_fade_seconds: float, remove_silence: bool,
                 writer: AudioWriter | None = None, keep: bool = False, spill_dir: Path | None = None):
        self.sample_rate = sample_rate
        self.join = CrossFadeJoin(cross_fade_seconds)
        self.cutter = SilenceCutter(spill_dir) if remove_silence else None
        self.resampler = OutputStream(sample_rate)
        self.writer = writer
        self.kept: list[np.ndarray] | None = [] if keep else None
        self.model_samples = 0
        self.samples = 0
        self.finished = False  # the end made final (finish)
        self.aligned: dict[int, list[tuple[Word, int, int]]] = {}  # chunk -> its words' join positions

    def add(self, wave: np.ndarray) -> None:
        self._out(self.join.add(wave))

    def add_words(self, index: int, words: list[Word], spans: list[tuple[float, float]]) -> None:
        """Chunk ``index``'s words and their (start, end) in seconds of its own audio, added."""
        begin = self.join.starts[index]
        self.aligned[index] = [(word, begin + round(a * SAMPLE_RATE), begin + round(b * SAMPLE_RATE))
                               for word, (a, b) in zip(words, spans)]

    def finish(self) -> Iterator[bool]:
        """The end of the audio made final a piece at a time, yielding after each (a kept job's
        ``take_kept`` between: a silent output read back from disk is never gathered whole)."""
        if self.finished:
            return
        self.finished = True
        joined = self.join.close()
        if self.cutter is None:
            self._final(joined, last=True)
            return
        self._final(self.cutter.add(joined), last=False)
        for piece in self.cutter.close():
            self._final(piece, last=False)
            yield True
        self._final(np.zeros(0, dtype=np.float32), last=True)

    def close(self, texts: list[str]) -> Assembled:
        """The end of the audio written (``finish``, if not run already) and the file closed;
        ``texts``: each chunk's text."""
        for _ in self.finish():
            pass
        if self.writer is not None:
            self.writer.close()
        cuts = self.cutter.cuts if self.cutter is not None else []
        bounds = self.join.boundaries()
        return Assembled(self.model_samples, self.samples, self.sample_rate, self._segments(texts, bounds, cuts),
                         self._words(len(texts), bounds, cuts))

    def take_kept(self) -> np.ndarray:
        """The final audio (24 kHz) kept since the last call."""
        kept, self.kept = self.kept, []
        return np.concatenate(kept) if kept else np.zeros(0, dtype=np.float32)

    def abandon(self) -> None:
        """The file closed after a failure (the job's temp files are removed after)."""
        if self.cutter is not None:
            self.cutter.discard()
        if self.writer is not None:
            with contextlib.suppress(Exception):  # a full disk fails the flush too; the job says why
                self.writer.close()

    def _out(self, joined: np.ndarray) -> None:
        self._final(self.cutter.add(joined) if self.cutter is not None else joined, last=False)

    def _final(self, joined: np.ndarray, *, last: bool) -> None:
        final = joined.astype(np.float32)  # plan.finish's type
        self.model_samples += len(final)
        if self.kept is not None:
            self.kept.append(final)
        out = self.resampler.resample(final, last=last)
        self.samples += len(out)
        if self.writer is not None:
            self.writer.write(out)

    def _seconds(self, position: int, cuts: list[tuple[int, int]]) -> float:
        """Where a position of the join lies in the output, in seconds (3 places)."""
        if not self.model_samples:
            return 0.0
        # position * samples / model_samples first: the last boundary comes out as the duration exactly
        return round(after_cuts(position, cuts) * self.samples / self.model_samples / self.sample_rate, 3)

    def _segments(self, texts: list[str], bounds: list[int], cuts: list[tuple[int, int]]) -> list[dict]:
        times = [self._seconds(b, cuts) for b in bounds]
        return [{"text": text, "start": start, "end": end}
                for text, start, end in zip(texts, times, times[1:])]

    def _words(self, chunks: int, bounds: list[int], cuts: list[tuple[int, int]]) -> list[list[TimedWord]]:
        """Each chunk's aligned words in output seconds, kept inside their segment (a word said in
        the cross-fade before a chunk's hand-over belongs to that chunk's span)."""
        def inside(position: int, i: int) -> float:
            return self._seconds(min(max(position, bounds[i]), bounds[i + 1]), cuts)

        return [[TimedWord(word, inside(a, i), inside(b, i)) for word, a, b in self.aligned.get(i, [])]
                for i in range(chunks)]


def planned_segments_bytes(texts: list[str], *, verified: bool = False, words: bool = False) -> int:
    """The most bytes a result's ``segments`` for chunks of these texts takes (serialised as the
    runpod SDK does), known before any model call; ``verified``: with each chunk's report and the
    job's (``jobs.verify``) at their widest; ``words``: with each word's times (``jobs.word_times``)."""
    tries = VERIFY_MAX_RETRIES + 1  # every try's reason is listed, the kept one's too
    report = {"error": WIDEST_ERROR, "tries": tries, "kept_try": tries, "retried_because": [WIDEST_REASON] * tries}

    def widest_words(text: str) -> dict:
        if not words:
            return {}
        return {"words": [{"word": w.text, "start": WIDEST_SECONDS, "end": WIDEST_SECONDS} for w in split_words(text)]}

    widest = [{"text": text, "start": WIDEST_SECONDS, "end": WIDEST_SECONDS, **widest_words(text),
               **({"verify": report} if verified else {})} for text in texts]
    summary = {"verify": {"worst_chunk": len(texts), "worst_error": WIDEST_ERROR, "retried_chunks": len(texts),
                          "failed_chunks": len(texts), "out_of_time_chunks": len(texts)}} if verified else {}
    return len(json.dumps({"segments": widest, **summary}, ensure_ascii=False).encode("utf-8"))
