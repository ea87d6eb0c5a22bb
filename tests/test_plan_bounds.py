"""A job's planned audio and piece count are bounded by its text's length (f5worker.jobs.plan), and
the join of its pieces is linear: one job could plan hours of audio from 300 letters (a 12 s voice
whose transcript was "a", at speed 0.3) and join 400 pieces in 20 s on the event loop."""
from __future__ import annotations

import numpy as np
import pytest

from f5worker.jobs import audio
from f5worker.jobs import plan as job_plan
from f5worker.errors import InputError
from f5worker.model.constants import SAMPLE_RATE
from tests.fixtures_models import speechlike
from tests.helpers import request

SR = SAMPLE_RATE


def voice(seconds: float) -> np.ndarray:
    return speechlike(seconds, seed=3)


def test_a_transcript_far_shorter_than_its_voice_cannot_plan_hours():
    req = job_plan.SynthesisRequest(ref_audio=voice(12), ref_sr=SR, ref_text="a", gen_text="A" * 300, seed=0,
                                    speed=0.3)
    with pytest.raises(InputError, match=r"more than a text of 300 bytes may \(300 s, 38 pieces\)"):
        job_plan.plan(req)


def test_a_script_of_many_short_parts_keeps_the_jobs_bounds(ref_wav):
    """Each voice's part is planned as a text of its own, at least one piece and 30 s: a script
    of one-letter parts ("[a]x " * 2000) planned 2,000 pieces where its text may take 500, and
    with a short transcript hours of audio that the same text without tags is refused."""
    parts = [request(ref_wav, "x", 0) for _ in range(2000)]
    with pytest.raises(InputError, match=r"in 2000 pieces, more than a text of 3999 bytes may \(3999 s, 500 pieces\)"
                                         r".*, or the text switches voices too often \(2000 parts, each at least one "
                                         r"piece\)\.$"):
        job_plan.plan_segments(parts)
    tagged = "".join("[a]x " for _ in parts)  # its tags counted, as the worker counts them, it is still refused
    with pytest.raises(InputError, match=r"in 2000 pieces, more than a text of 10000 bytes may \(\d+ s, 1251 pieces\)"):
        job_plan.plan_segments(parts, written_bytes=len(tagged))
    few = job_plan.plan_segments([request(ref_wav, "A sentence said by one voice.", 0),
                                  request(ref_wav, "And another said by the next.", 0)])
    assert len(few.items) == 2  # an ordinary script is planned as before


def test_ordinary_jobs_stay_far_inside_the_bounds(ref_wav):
    text = "The quick brown fox jumps over the lazy dog. " * 40  # 1800 bytes
    for speed in (0.3, 1.0, 3.0):
        plan = job_plan.plan(request(ref_wav, text, 0, speed=speed))
        seconds = job_plan.planned_samples(plan) / SR
        size = len(text.encode())
        assert seconds < 0.6 * job_plan.PLANNED_SECONDS_PER_BYTE * size
        assert len(plan.items) < 0.5 * (1 + size // job_plan.BYTES_PER_CHUNK)


def naive_join(waves, sr, cross_fade_seconds):
    """f5-tts's own loop (infer_batch_process), concatenating at every chunk."""
    out = waves[0]
    for nxt in waves[1:]:
        n = min(int(cross_fade_seconds * sr), len(out), len(nxt))
        if n <= 0:
            out = np.concatenate([out, nxt])
            continue
        faded = out[-n:] * np.linspace(1, 0, n) + nxt[:n] * np.linspace(0, 1, n)
        out = np.concatenate([out[:-n], faded, nxt[n:]])
    return out


@pytest.mark.parametrize("cross_fade", [0.0, 0.15, 2.0])  # 2.0: longer than some pieces
def test_the_join_equals_f5_tts_to_the_bit(cross_fade):
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(int(rng.integers(100, 9000))).astype(np.float32) for _ in range(30)]
    got = audio.cross_fade_join(waves, SR, cross_fade)
    assert np.array_equal(got, naive_join(waves, SR, cross_fade))
    assert len(got) == audio.joined_length([len(w) for w in waves], SR, cross_fade)


def test_the_join_writes_each_sample_once(monkeypatch):
    """Linear, not quadratic: no concatenation of the growing output (counted, not timed)."""
    calls = []
    real = np.concatenate
    monkeypatch.setattr(np, "concatenate", lambda *a, **k: calls.append(1) or real(*a, **k))
    waves = [np.ones(2400, dtype=np.float32)] * 400
    joined = audio.cross_fade_join(waves, SR, 0.015)
    assert calls == [] and len(joined) == 400 * 2400 - 399 * 360
