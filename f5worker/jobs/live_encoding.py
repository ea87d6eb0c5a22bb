"""A job's audio encoded while it is synthesised: the bytes of an HTTP response (``f5worker.http``).

Why this module exists: OpenAI's speech API answers with the audio file itself, in mp3, opus, aac,
flac, wav or pcm, and a client plays it while the rest is synthesised. ``EncodedStream`` takes the
job's chunk waveforms (as ``jobs.streaming.JoinedAudio`` joins them: the samples of the stored
file) and gives out the file's bytes as they are known. What each format is, said once in
``LIVE_FORMATS``:

* ``wav``: 16-bit PCM after a header whose sizes say "to the end of the stream" (0xFFFFFFFF), the
  length being unknown when the header is sent; libsndfile and FFmpeg read such a file to its end.
* ``pcm``: the same samples with no header: 16-bit signed little-endian mono, 24 kHz unless the
  request asks for another ``sample_rate`` (OpenAI's ``pcm``).
* ``mp3`` (LAME), ``opus`` (libopus in Ogg) and ``aac`` (FFmpeg's AAC in ADTS): PyAV, whose wheel
  bundles FFmpeg with these encoders (libsndfile has no AAC), muxing into a sink that cannot seek,
  so each muxer writes as it goes. Ogg pages are cut every ``OGG_PAGE_US`` so a page never holds
  back more than that of audio.
* ``flac`` is sent when complete: its header (STREAMINFO) holds the length and an MD5 of the audio,
  written at the end, and a FLAC without them is refused by libsndfile (soundfile), which Python
  clients read audio with. Choose another format for audio that starts at once. Until then it is
  written to an anonymous temp file (a chapter's FLAC is hundreds of MB) and read back in pieces
  of ``REST_PIECE_BYTES`` as it is sent (``EncodedStream.rest``).

The lossy codecs add their encoder delay as every encoder does, fixed in samples (LAME about 1,105 at
MPEG-2 and 2.5 rates, AAC 1,024), so longer at low rates: mp3 46 ms at 24 kHz and 138 ms at 8 kHz. Only Opus says how much (its pre-skip, which decoders drop); a streamed mp3 has no
Xing/LAME tag (written at the end of a seekable file) and ADTS has no such field, so their
decoders keep the priming.
"""
from __future__ import annotations

import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Protocol

import av
import numpy as np

from f5worker.jobs.encoding import pcm16
from f5worker.jobs.streaming import JoinedAudio

OGG_PAGE_US = 100_000  # an Ogg page every 100 ms of audio at most
STREAM_SIZE = 0xFFFFFFFF  # a WAV size field's "unknown, to the end"
REST_PIECE_BYTES = 1 << 20  # a file sent once complete goes out in pieces of this many bytes


@dataclass(frozen=True)
class LiveFormat:
    name: str  # the request's response_format
    content_type: str
    container: str | None  # FFmpeg's muxer, through PyAV; None: written here
    codec: str | None
    sample_format: str  # the PyAV sample format the codec is fed
    live: bool  # bytes sent as chunks are sampled; False: sent once complete
    stored_as: str  # jobs.encoding's format of a stored copy (F5_HTTP_STORE_RESULTS)


LIVE_FORMATS: dict[str, LiveFormat] = {fmt.name: fmt for fmt in (
    LiveFormat("mp3", "audio/mpeg", "mp3", "libmp3lame", "fltp", live=True, stored_as="mp3"),
    LiveFormat("opus", "audio/ogg; codecs=opus", "ogg", "libopus", "flt", live=True, stored_as="opus"),
    LiveFormat("aac", "audio/aac", "adts", "aac", "fltp", live=True, stored_as="wav"),
    LiveFormat("flac", "audio/flac", "flac", "flac", "s16", live=False, stored_as="flac"),
    LiveFormat("wav", "audio/wav", None, None, "s16", live=True, stored_as="wav"),
    LiveFormat("pcm", "audio/pcm", None, None, "s16", live=True, stored_as="wav"),
)}
DEFAULT_LIVE_FORMAT = "mp3"  # OpenAI's default


class Encoder(Protocol):
    def add(self, samples: np.ndarray) -> bytes:
        """The bytes ``samples`` (mono float32, the next ones) complete."""

    def close(self) -> bytes:
        """The rest of the file (or none of it, for a file sent once complete: ``rest``)."""

    def size(self) -> int:
        """After ``close``: the bytes ``rest`` will give."""

    def rest(self) -> Iterator[bytes]:
        """After ``close``: a file sent once complete, read in pieces; nothing for the others."""

    def discard(self) -> None:
        """What it holds let go (a file sent once complete), whether or not all was sent."""


class PcmEncoder:
    def __init__(self, sample_rate: int):
        self.sample_rate = sample_rate

    def add(self, samples: np.ndarray) -> bytes:
        return pcm16(samples).tobytes()  # the stored WAV's conversion

    def close(self) -> bytes:
        return b""

    def size(self) -> int:
        return 0

    def rest(self) -> Iterator[bytes]:
        return iter(())

    def discard(self) -> None:
        pass


class WavEncoder(PcmEncoder):
    def __init__(self, sample_rate: int):
        super().__init__(sample_rate)
        self.header: bytes | None = wav_stream_header(sample_rate)

    def add(self, samples: np.ndarray) -> bytes:
        header, self.header = self.header or b"", None
        return header + super().add(samples)

    def close(self) -> bytes:
        return self.add(np.zeros(0, dtype=np.float32))  # a job of no samples still sends its header


def wav_stream_header(sample_rate: int) -> bytes:
    """A 16-bit mono WAV's header for a stream of unknown length."""
    fmt = struct.pack("<HHIIHH", 1, 1, sample_rate, sample_rate * 2, 2, 16)
    return (b"RIFF" + struct.pack("<I", STREAM_SIZE) + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
            + b"data" + struct.pack("<I", STREAM_SIZE))


class _Sink:
    """A write-only file for PyAV: it cannot seek, so the muxer writes in order, and what it wrote
    is taken as it comes."""

    def __init__(self):
        self.parts: list[bytes] = []

    def write(self, data) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data


class AvEncoder:
    """mp3, opus, aac and flac through PyAV (FFmpeg)."""

    def __init__(self, fmt: LiveFormat, sample_rate: int, spill_dir: Path | None = None):
        self.fmt = fmt
        self.sample_rate = sample_rate
        self.spill_dir = spill_dir
        self.sink: _Sink | BinaryIO | None = None  # opened with the first samples, inside the job
        self.container = self.stream = None
        self.pts = 0

    def add(self, samples: np.ndarray) -> bytes:
        if len(samples):
            self._mux(self._opened().encode(self._frame(samples)))
        return self._taken()

    def close(self) -> bytes:
        self._mux(self._opened().encode(None))
        self.container.close()
        return self._taken()

    def size(self) -> int:
        return self.sink.seek(0, 2) if self._spilled() else 0

    def rest(self) -> Iterator[bytes]:
        if not self._spilled():
            return
        with self.sink:
            self.sink.seek(0)
            while data := self.sink.read(REST_PIECE_BYTES):
                yield data

    def discard(self) -> None:
        if self._spilled():
            self.sink.close()  # an open container then skips its trailer (PyAV's close_output)

    def _opened(self):
        """The codec's stream; the muxer and its sink made on first use. A file written at once
        (flac) seeks back to its header: an anonymous file, not memory, made in the job, where a
        temp folder that is full or gone is said as such."""
        if self.stream is None:
            self.sink = _Sink() if self.fmt.live else tempfile.TemporaryFile(dir=self.spill_dir)
            options = {"page_duration": str(OGG_PAGE_US)} if self.fmt.container == "ogg" else {}
            self.container = av.open(self.sink, mode="w", format=self.fmt.container, options=options)
            self.stream = self.container.add_stream(self.fmt.codec, rate=self.sample_rate, layout="mono")
            self.stream.codec_context.format = self.fmt.sample_format
        return self.stream

    def _spilled(self) -> bool:
        return self.sink is not None and not isinstance(self.sink, _Sink)

    def _frame(self, samples: np.ndarray) -> av.AudioFrame:
        if self.fmt.sample_format == "s16":
            data = pcm16(samples)[None, :]
        else:
            data = np.ascontiguousarray(samples, dtype=np.float32)[None, :]
        frame = av.AudioFrame.from_ndarray(data, format=self.fmt.sample_format, layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self.pts
        self.pts += len(samples)
        return frame

    def _mux(self, packets) -> None:
        for packet in packets:
            self.container.mux(packet)

    def _taken(self) -> bytes:
        return self.sink.take() if isinstance(self.sink, _Sink) else b""


def make_encoder(fmt: LiveFormat, sample_rate: int, spill_dir: Path | None = None) -> Encoder:
    if fmt.name == "wav":
        return WavEncoder(sample_rate)
    if fmt.name == "pcm":
        return PcmEncoder(sample_rate)
    return AvEncoder(fmt, sample_rate, spill_dir)


class EncodedStream:
    """One job's chunk waveforms (24 kHz, in order) in, the response's bytes out: a
    ``jobs.streaming.LiveAudio`` whose output a RunPod result never keeps."""

    result_bytes = 0

    def __init__(self, fmt: LiveFormat, sample_rate: int, cross_fade_seconds: float,
                 spill_dir: Path | None = None):
        self.fmt = fmt
        self.audio = JoinedAudio(sample_rate, cross_fade_seconds)
        self.encoder = make_encoder(fmt, sample_rate, spill_dir)
        self.bytes_sent = 0
        self.samples_sent = 0
        self.closed = False

    def add(self, wave: np.ndarray) -> list[bytes]:
        return self._out(self.encoder.add(self._counted(self.audio.add(wave))))

    def add_joined(self, samples: np.ndarray) -> list[bytes]:
        return self._out(self.encoder.add(self._counted(self.audio.add_joined(samples))))

    def close(self) -> list[bytes]:
        """The rest of a live file, always as one item (maybe empty): whoever receives it knows
        from ``closed`` that the audio is complete, and then sends ``rest``."""
        data = self.encoder.add(self._counted(self.audio.close())) + self.encoder.close()
        self.closed = True
        self.bytes_sent += len(data) + self.encoder.size()
        return [data]

    def rest(self) -> Iterator[bytes]:
        """After ``close``: the file that is sent once complete (flac), in pieces read from disk."""
        return self.encoder.rest()

    def discard(self) -> None:
        """The answer and its job have ended: the file sent once complete is let go, even if it
        was never sent (a failed job, a client gone)."""
        self.encoder.discard()

    def planned_result_bytes(self, samples: int, chunks: int) -> int:
        return 0

    def _counted(self, samples: np.ndarray) -> np.ndarray:
        self.samples_sent += len(samples)
        return samples

    def _out(self, data: bytes) -> list[bytes]:
        self.bytes_sent += len(data)
        return [data] if data else []
