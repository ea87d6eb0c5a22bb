"""One job, input dict to result dict: inputs, options, plan, workflows, output and voices.

Input rules (pydantic, torch-free: the handler imports them at start), synthesis options, the plan
of a job as chunk items and the join of their waveforms, the TTS and voice-library workflows, the
job guard (deadline, SIGTERM), streaming, output encoding, audio I/O, voices and URL downloads.
Imports ``inference`` and ``model`` below it; no re-exports here (torch).
"""
