"""The guard's audio checks and the subtitle pause rules on real speech, made by espeak-ng.

Why this module exists: a tiny random model's output is noise, so the thresholds of ``jobs.verify``
(speech louder than -40 dBFS per 10 ms, in at least 35 % of the planned time; the whole not below
-45 dBFS; at most 1 % clipped) were only ever tried on noise. espeak-ng (Debian's package; the
test script installs it) speaks real words at real rates. What cannot run here is Whisper itself:
no machine of this project's CI has its weights (the hub is not reached), so the transcript half of
the chain, and the alignment's accuracy, are judged on a GPU machine with the real model
(bench/RESULTS.md says what was measured where).
"""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from f5worker.jobs.audio import remove_silences
from f5worker.jobs.resampling import to_model_rate
from f5worker.jobs.verify import MIN_VOICED_SHARE, audio_fault
from f5worker.model.constants import SAMPLE_RATE

TEXT = "The quick brown fox jumps over the lazy dog, and then it runs far away into the woods."


@pytest.fixture(scope="module")
def espeak():
    path = shutil.which("espeak-ng")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("espeak-ng is missing: scripts/test.sh installs it (apt-get install espeak-ng)")
        pytest.skip("espeak-ng is not installed (scripts/test.sh installs it on Debian)")
    return path


def speak(espeak: str, tmp_path, text: str, words_per_minute: int = 175) -> np.ndarray:
    """``text`` spoken by espeak-ng, at 24 kHz like the model's output."""
    out = tmp_path / f"speech-{words_per_minute}.wav"
    subprocess.run([espeak, "-s", str(words_per_minute), "-w", str(out), text], check=True, timeout=60)
    wave, sr = sf.read(out, dtype="float32")
    return to_model_rate(wave, sr)


@pytest.mark.parametrize("words_per_minute", [120, 175, 260])
def test_real_speech_passes_the_audio_checks_at_its_own_pace(espeak, tmp_path, words_per_minute):
    wave = speak(espeak, tmp_path, TEXT, words_per_minute)
    assert audio_fault(wave, planned_samples=len(wave)) is None


def test_real_speech_in_far_more_time_than_it_fills_is_rushed(espeak, tmp_path):
    """The same words said in a third of the time the plan gave them: what F5-TTS's rushed chunks do."""
    wave = speak(espeak, tmp_path, TEXT)
    planned = int(len(wave) / MIN_VOICED_SHARE * 1.5)
    padded = np.concatenate([wave, np.zeros(planned - len(wave), dtype=np.float32)])
    assert audio_fault(padded, planned_samples=planned).endswith("of its time (rushed)")
    assert audio_fault(0.002 * wave, planned_samples=len(wave)) == "it is silent"  # far too quiet
    assert audio_fault(np.clip(40 * wave, -1, 1), planned_samples=len(wave)).endswith("clipped")


def test_remove_silence_keeps_real_speech_and_shortens_only_the_long_pause(espeak, tmp_path):
    first, second = speak(espeak, tmp_path, "First sentence."), speak(espeak, tmp_path, "Second sentence.")
    pause = np.zeros(3 * SAMPLE_RATE, dtype=np.float32)
    joined = np.concatenate([first, pause, second])
    shortened = remove_silences(joined, SAMPLE_RATE)
    removed = len(joined) - len(shortened)
    # The quiet run is the 3 s pause and espeak-ng's own quiet edges around it (a few hundred ms);
    # 0.5 s of it stays at each side, so 2 s and a little more go; every loud sample stays.
    assert 2.0 * SAMPLE_RATE <= removed <= 2.6 * SAMPLE_RATE, removed / SAMPLE_RATE
    assert np.sum(np.abs(shortened) > 0.05) == np.sum(np.abs(joined) > 0.05)
