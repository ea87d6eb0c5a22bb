"""A job's audio assembled piece by piece (``jobs.assembly``) equals the whole done at once.

The join, the shortened pauses, the resampling and the written file are each compared with the
functions that do the same work on the whole waveform (``audio.cross_fade_join``,
``audio.remove_silences``, ``resampling.from_model_rate``, ``encoding.encode``), on waveforms of
awkward lengths and pauses placed at every edge case of f5-tts's rule; the segments tile the
output exactly, and each lies where its chunk's own samples are.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from f5worker.jobs import assembly as assembly_module
from f5worker.jobs import encoding, resampling
from f5worker.jobs.assembly import (KEEP_SAMPLES, LEAD_HELD_SAMPLES, LEAD_READ_SAMPLES, AudioAssembly, AudioWriter,
                                    CrossFadeJoin, SilenceCutter, after_cuts)
from f5worker.jobs.audio import cross_fade_join, remove_silences
from f5worker.model.constants import SAMPLE_RATE

SR = SAMPLE_RATE
STEP = SR // 100


def sound(rng, n):
    return (0.3 * rng.standard_normal(n)).astype(np.float32)


def hush(n):
    return np.zeros(n, dtype=np.float32)


def with_pauses(rng, layout):
    """Sound and silence of the given lengths ('s', n) / ('q', n), one after another."""
    return np.concatenate([sound(rng, n) if kind == "s" else hush(n) for kind, n in layout])


LAYOUTS = {
    "long pause in the middle": [("s", 30000), ("q", 60000), ("s", 20000)],
    "pause of exactly 1 s": [("s", 24000), ("q", 24000), ("s", 24000)],
    "pause just under 1 s": [("s", 24000), ("q", 23999), ("s", 24001)],
    "off the 10 ms grid": [("s", 12345), ("q", 50001), ("s", 777), ("q", 30000), ("s", 999)],
    "silent start": [("q", 70000), ("s", 30000)],
    "silent end on the grid": [("s", 24000), ("q", 48000)],
    "silent end with a partial step": [("s", 24000), ("q", 48100)],
    "silence throughout": [("q", 72000)],
    "silence throughout, partial step": [("q", 72050)],
    "short silence throughout": [("q", 5000)],
    "no pause": [("s", 50000)],
}


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("piece", [1000, 240, 77777])
def test_silence_cutter_is_remove_silences_fed_in_pieces(name, piece):
    samples = with_pauses(np.random.default_rng(7), LAYOUTS[name]).astype(np.float64)
    cutter = SilenceCutter()
    out = [cutter.add(samples[i:i + piece]) for i in range(0, len(samples), piece)] + [*cutter.close()]
    expected = remove_silences(samples, SR)
    np.testing.assert_array_equal(np.concatenate(out).astype(np.float32), expected)
    # The cuts are exactly what was removed.
    kept = np.ones(len(samples), dtype=bool)
    for a, b in cutter.cuts:
        kept[a:b] = False
    np.testing.assert_array_equal(samples[kept].astype(np.float32), expected)
    assert after_cuts(len(samples), cutter.cuts) == len(expected)


@pytest.mark.parametrize("n", [72000, 72050, 256 * 1874])
def test_audio_silent_throughout_is_kept_whole_on_or_off_the_10_ms_grid(n):
    """A partial last 10 ms step counted as sound, so audio silent throughout that was not a whole
    number of steps (Vocos makes multiples of 256 samples) looked like a pause before sound and was
    cut to its last 0.5 s: a silent job's output was 0.5 s long."""
    assert len(remove_silences(hush(n), SR)) == n
    cutter = SilenceCutter()
    assert sum(map(len, [cutter.add(hush(n)), *cutter.close()])) == n
    # a pause at the end keeps the same part of it whether or not a partial step ends it
    ends = [remove_silences(with_pauses(np.random.default_rng(2), [("s", 24000), ("q", q)]), SR) for q in (48000, 48050)]
    assert len(ends[0]) == len(ends[1]) == 24000 + KEEP_SAMPLES


def test_a_long_pause_is_not_held_in_memory():
    cutter = SilenceCutter()
    cutter.add(sound(np.random.default_rng(1), 20 * STEP))
    for _ in range(200):  # 100 s of silence, a second at a time
        assert len(cutter.add(hush(SR))) == 0
        assert sum(map(len, cutter.run)) <= 4 * KEEP_SAMPLES + SR


@pytest.mark.parametrize("layout", [[("q", 40 * SR)], [("q", 40 * SR + 50)], [("q", 40 * SR), ("s", 30000)],
                                    [("q", 75 * SR), ("s", 30000), ("q", 3 * SR)]])
def test_a_long_silent_start_is_held_on_disk_not_in_memory(layout, tmp_path):
    """Quiet from the first sample may be the whole output (kept whole, as remove_silences keeps
    it), so it was held in memory until sound came: 12 minutes of a near-silent voice held 131 MiB
    as float64. Past 30 s it now waits in an anonymous temp file: the output is the same."""
    samples = with_pauses(np.random.default_rng(5), layout).astype(np.float64)
    cutter = SilenceCutter(tmp_path)
    out = []
    for i in range(0, len(samples), SR):
        out.append(cutter.add(samples[i:i + SR]))
        assert sum(map(len, cutter.run)) <= LEAD_HELD_SAMPLES + SR
    assert list(tmp_path.iterdir()) == []  # the file has no name: nothing to leave behind
    out += cutter.close()
    assert cutter.lead is None
    np.testing.assert_array_equal(np.concatenate(out).astype(np.float32), remove_silences(samples, SR))


@pytest.mark.parametrize("sample_rate", [24000, 44100])
def test_a_silent_output_read_back_from_disk_is_the_whole_job_resampled(tmp_path, sample_rate):
    waves = [hush(15 * SR) + np.float32(1e-5) for _ in range(3)]  # 45 s, all below -50 dBFS
    whole = cross_fade_join(waves, SR, 0.15)
    expected = resampling.from_model_rate(remove_silences(whole, SR).astype(np.float32), sample_rate)
    path = tmp_path / "out.wav"
    assembly = AudioAssembly(sample_rate=sample_rate, cross_fade_seconds=0.15, remove_silence=True,
                             writer=AudioWriter(path, encoding.FORMATS["wav"], sample_rate), spill_dir=tmp_path)
    for wave in waves:
        assembly.add(wave)
    done = assembly.close(["one", "two", "three"])
    assert done.samples == len(expected) and done.model_samples == len(whole)
    written, _ = sf.read(str(path), dtype="float32")
    want, _ = sf.read(io.BytesIO(encoding.encode(expected, sample_rate, encoding.FORMATS["wav"])), dtype="float32")
    np.testing.assert_array_equal(written, want)


def test_a_kept_silent_output_is_taken_a_piece_at_a_time_as_it_is_read_back(tmp_path):
    """A stream of a job whose silences are removed takes the kept audio after each piece of
    ``finish``: a silent output read back from disk was gathered whole in ``kept`` (100 minutes
    at 24 kHz: 576 MB) before any of it was sent. No piece passes what the cutter holds in memory
    (30 s) or reads back at once."""
    waves = [hush(30 * SR) + np.float32(1e-5) for _ in range(4)]  # 2 minutes, all below -50 dBFS
    assembly = AudioAssembly(sample_rate=SR, cross_fade_seconds=0.15, remove_silence=True, keep=True,
                             spill_dir=tmp_path)
    taken = []
    for wave in waves:
        assembly.add(wave)
        taken.append(assembly.take_kept())
    assert sum(map(len, taken)) == 0  # quiet from the start: nothing is final until the end
    pieces = []
    for _ in assembly.finish():
        pieces.append(assembly.take_kept())
    assert len(pieces) > 2 and max(map(len, pieces)) <= max(LEAD_HELD_SAMPLES, LEAD_READ_SAMPLES)
    done = assembly.close(["one", "two", "three", "four"])
    pieces.append(assembly.take_kept())
    expected = remove_silences(cross_fade_join(waves, SR, 0.15), SR).astype(np.float32)
    np.testing.assert_array_equal(np.concatenate(pieces), expected)
    assert done.model_samples == len(expected)


@pytest.mark.parametrize("lengths, fade", [([12000, 30000, 500, 24000], 0.15), ([100, 50, 20000], 0.15),
                                           ([9000, 9000, 9000], 0.0), ([70000], 0.15)])
def test_cross_fade_join_in_pieces_and_its_boundaries(lengths, fade):
    rng = np.random.default_rng(3)
    waves = [sound(rng, n) for n in lengths]
    join = CrossFadeJoin(fade)
    out = np.concatenate([join.add(w) for w in waves] + [join.close()])
    np.testing.assert_array_equal(out, cross_fade_join(waves, SR, fade))
    bounds = join.boundaries()
    assert bounds[0] == 0 and bounds[-1] == len(out) and bounds == sorted(bounds)
    for index, wave in enumerate(waves):  # what is only this chunk's lies inside its segment
        start = join.starts[index]
        last = index + 1 == len(waves)
        plain = (start + join.overlaps[index], start + len(wave) - (0 if last else join.overlaps[index + 1]))
        if min(lengths) > 2 * join.fade:  # else a fade reaches past a whole chunk
            assert bounds[index] <= plain[0] and plain[1] <= bounds[index + 1]
            np.testing.assert_array_equal(out[plain[0]:plain[1]], wave[plain[0] - start:plain[1] - start])


@pytest.mark.parametrize("fmt_name", ["wav", "flac", "mp3"])
@pytest.mark.parametrize("sample_rate", [24000, 44100, 16000])
@pytest.mark.parametrize("remove_silence", [False, True])
def test_assembled_file_is_the_whole_job_encoded(tmp_path, fmt_name, sample_rate, remove_silence):
    rng = np.random.default_rng(11)
    waves = [with_pauses(rng, [("s", 20000), ("q", 40000), ("s", 9000)]), sound(rng, 30011),
             with_pauses(rng, [("q", 30000), ("s", 15000)])]
    fmt = encoding.FORMATS[fmt_name]
    whole = cross_fade_join(waves, SR, 0.15)
    if remove_silence:
        whole = remove_silences(whole, SR)
    expected = resampling.from_model_rate(whole.astype(np.float32), sample_rate)
    path = tmp_path / f"out.{fmt.extension}"
    assembly = AudioAssembly(sample_rate=sample_rate, cross_fade_seconds=0.15, remove_silence=remove_silence,
                             writer=AudioWriter(path, fmt, sample_rate))
    for wave in waves:
        assembly.add(wave)
    done = assembly.close(["one", "two", "three"])
    assert done.samples == len(expected) and done.model_samples == len(whole)
    written, rate = sf.read(str(path), dtype="float32")
    assert rate == sample_rate
    if not fmt.lossy:
        want, _ = sf.read(io.BytesIO(encoding.encode(expected, sample_rate, fmt)), dtype="float32")
        np.testing.assert_array_equal(written, want)
    segments = done.segments
    assert [s["text"] for s in segments] == ["one", "two", "three"]
    assert segments[0]["start"] == 0 and segments[-1]["end"] == round(done.duration, 3)
    assert all(a["end"] == b["start"] for a, b in zip(segments, segments[1:]))
    assert all(s["start"] < s["end"] for s in segments)
    if remove_silence:  # the first chunk's 40000-sample pause is shortened to 24000
        assert segments[0]["end"] < (20000 + 40000 + 9000) / SR - 0.5


def test_segments_in_seconds_at_every_rate():
    rng = np.random.default_rng(5)
    waves = [sound(rng, 48000), sound(rng, 24000)]
    ends = []
    for rate in (8000, 24000, 48000):
        assembly = AudioAssembly(sample_rate=rate, cross_fade_seconds=0.15, remove_silence=False)
        for wave in waves:
            assembly.add(wave)
        ends.append(assembly.close(["a", "b"]).segments[0]["end"])
    # The hand-over is in the middle of the 0.15 s fade after the first 2 s.
    assert all(abs(end - (2 - 0.075)) <= 0.001 for end in ends), ends


def test_a_wav_planned_past_4_gib_is_written_as_rf64_and_reads_back_the_same(tmp_path):
    """A RIFF WAV's 32-bit sizes overflow past 4 GiB, where libsndfile writes 0xFFFFFFFF and its
    readers see 2**31 - 1 frames: a chapter planned that long (100,000 CJK characters at 48 kHz
    and a slow speed, or numbers as words) is written as RF64. Writing 4 GiB here would take the
    CI's disk; the choice is made from the plan, so a plan past the bound is what is tested."""
    rng = np.random.default_rng(5)
    wave = sound(rng, 48000)
    wav = encoding.FORMATS["wav"]
    past = (assembly_module.RIFF_MOST_DATA_BYTES - encoding.WAV_HEADER_BYTES) // 2 + 1
    for most_samples, container in [(0, "WAV"), (past - 1, "WAV"), (past, "RF64")]:
        path = tmp_path / f"{most_samples}.wav"
        writer = AudioWriter(path, wav, SR, most_samples=most_samples)
        writer.write(wave)
        writer.close()
        assert sf.info(str(path)).format == container
        written, rate = sf.read(str(path), dtype="int16")
        assert rate == SR and np.array_equal(written, encoding.pcm16(wave))
    assert assembly_module.container_for(encoding.FORMATS["flac"], 10 * past) == "FLAC"  # 64-bit sizes already


@pytest.mark.parametrize("sample_rate", [8000, 16000, 22050, 24000, 44100, 48000])
def test_the_most_output_length_bounds_the_resampled_length(sample_rate):
    rng = np.random.default_rng(sample_rate)
    for n in [1, 2, 239, 24000, 24001, 99991]:
        made = len(resampling.from_model_rate(sound(rng, n), sample_rate))
        assert resampling.least_output_length(n, sample_rate) <= made <= resampling.most_output_length(n, sample_rate)
