"""F5-TTS's fixed numbers: the mel frame grid, the loudness inference works at, the longest sample.

Why this module exists: the jobs above (planning, encoding, input rules) need these as much as the
model does, and the input rules are read at start without torch. Defined once here, torch-free, at
the bottom of the layers (f5-tts's ``f5_tts.infer.utils_infer`` and ``CFM.sample`` values).
"""
from __future__ import annotations

SAMPLE_RATE = 24000  # the mel's and Vocos's rate: every waveform the model sees or makes
N_FFT = 1024
HOP_LENGTH = 256  # samples per mel frame
N_MELS = 100
TARGET_RMS = 0.1  # a quieter reference is raised to this, and its output lowered by as much
MAX_FRAMES = 65536  # CFM.sample's max_duration
