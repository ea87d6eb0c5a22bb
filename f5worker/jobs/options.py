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
