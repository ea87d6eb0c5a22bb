"""The synthesis options a job may set, their defaults, and the bound on its ODE steps.

Why this module exists: the job's input rules (``job_input``, which the handler imports at start)
and the CPU job plan (``job_plan``, which needs torch) both need these. Defined here once, below
both and without torch, so reading a job's input never imports torch.
"""
from __future__ import annotations

# The most ODE steps a job may ask for; the fast path's on-device time grid holds MAX_NFE_STEP + 1.
MAX_NFE_STEP = 64

# Each option a job may leave out, with its default (f5-tts's infer_process defaults).
OPTION_DEFAULTS = {
    "speed": 1.0,
    "nfe_step": 32,
    "cfg_strength": 2.0,
    "sway_sampling_coef": -1.0,
    "cross_fade_duration": 0.15,
    "remove_silence": False,
}
