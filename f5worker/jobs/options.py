"""The synthesis options a job may set, and their defaults.

Why this module exists: the job's input rules (``jobs.inputs``, which the handler imports at start)
and the job plan (``jobs.plan``, which needs torch) both need these. Defined here once, torch-free,
so reading a job's input never imports torch. The bound on ``nfe_step`` is the fast path's
(``inference.items.MAX_NFE_STEP``).
"""
from __future__ import annotations

# Each option a job may leave out, with its default (f5-tts's infer_process defaults).
OPTION_DEFAULTS = {
    "speed": 1.0,
    "nfe_step": 32,
    "cfg_strength": 2.0,
    "sway_sampling_coef": -1.0,
    "cross_fade_duration": 0.15,
    "remove_silence": False,
}

# The guard ("verify": true, f5worker.jobs.verify): a chunk whose transcript differs from its text
# by more than this is sampled again, at most this many times (a third of the words wrong is far
# past Whisper's own errors on clean speech; not tuned on F5-TTS's real output).
VERIFY_DEFAULT_MAX_ERROR = 0.3
VERIFY_DEFAULT_RETRIES = 2
VERIFY_MAX_RETRIES = 5
