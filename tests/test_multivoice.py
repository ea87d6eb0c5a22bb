"""Scripts in several voices: ``voices`` (alias -> stored voice) and ``[alias]`` tags in the text.

A two-voice job is checked against the same segments synthesised one by one with the engine, each
with its own voice and the seeds the job gives its chunks, joined with ``audio.cross_fade_join``
(what ``job_plan.finish`` uses), so a voice or a seed given to the wrong chunk shows. The two voices
are the built-in ones (``basic_ref_en.wav``, ``basic_ref_zh.wav``), on the tiny models, through
``make_handler(build_worker(...))`` as runpod would call it; streaming through the streaming handler.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from f5worker.jobs.audio import cross_fade_join
from f5worker.model.constants import SAMPLE_RATE
from f5worker.errors import InputError
from f5worker.jobs.inputs import MAX_SCRIPT_VOICES, parse_job_input
from f5worker.jobs.plan import SynthesisRequest, plan, plan_segments
from tests.fixtures_worker import Ctx, worker_ctx
from tests.helpers import CPU_REL_L2, Recorder, assert_one_sentence, log_record, pcm_of, rel_l2

NFE = 4
EN, ZH = "basic_ref_en.wav", "basic_ref_zh.wav"
SCRIPT = ("The narrator opens the story with a calm voice. "
          "[zh] 你好，今天天气很好，我们去公园散步吧。 "
          "[en] And the narrator ends it, a little later, with one last sentence.")
SEGMENTS = [(EN, "The narrator opens the story with a calm voice."),
            (ZH, "你好，今天天气很好，我们去公园散步吧。"),
            (EN, "And the narrator ends it, a little later, with one last sentence.")]


@pytest.fixture(scope="module")
def ctx(tiny_models, tiny_whisper, tmp_path_factory):
    with worker_ctx(tiny_models, tiny_whisper, tmp_path_factory.mktemp("multivoice")) as built:
        yield built


def script_job(text=SCRIPT, **kw) -> dict:
    return {"text": text, "local_voice": EN, "voices": {"zh": ZH, "en": EN}, "nfe_step": NFE, "seed": 11,
            "return_base64": False, **kw}


def request_for(ctx: Ctx, name: str, text: str, seed: int, tmp_path) -> SynthesisRequest:
    """The request a job of ``text`` alone in voice ``name`` makes (the voice and its transcript
    as the worker's voice library gives them)."""
    voice = ctx.worker.voices.fetch(name, tmp_path / "voice.wav")
    ref_text, _ = ctx.worker.voices.known_ref_text(voice, None)
    return SynthesisRequest(ref_audio=voice.used, ref_sr=voice.sr, ref_text=ref_text, gen_text=text, seed=seed,
                            nfe_step=NFE, prepared_ref=voice.reference)


def as_stored(wave: np.ndarray) -> np.ndarray:
    """``wave`` as the 16-bit WAV holds it."""
    buffer = io.BytesIO()
    sf.write(buffer, wave, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return sf.read(io.BytesIO(buffer.getvalue()), dtype="float32")[0]


def test_script_is_its_segments_in_their_voices_joined(ctx, tmp_path):
    job_id, result = ctx.run(script_job())
    assert "error" not in result, result
    assert result["voices_used"] == [EN, ZH] and result["voice"] == EN
    assert result["ref_text_source"] == "built-in"
    # Each segment alone, with its voice, chunk i of the job using seed + i over the whole job.
    waves, seed = [], 11
    for name, text in SEGMENTS:
        items = plan(request_for(ctx, name, text, seed, tmp_path)).items
        waves += ctx.worker.engine.run_items(items)
        seed += len(items)
    assert result["chunks"] == len(waves) == seed - 11 >= 3
    expected = as_stored(cross_fade_join(waves, SAMPLE_RATE, 0.15).astype(np.float32))
    stored, sr = sf.read(io.BytesIO(ctx.get_bytes(result["output_key"])), dtype="float32")
    assert sr == SAMPLE_RATE
    assert rel_l2(stored, expected) < CPU_REL_L2  # batched with each other: equal to fp32 rounding
    # The same text in one voice is other audio: the voices were really switched.
    _, one_voice = ctx.run(script_job(SCRIPT.replace("[zh]", "[en]")))
    assert one_voice["voices_used"] == [EN]
    other, _ = sf.read(io.BytesIO(ctx.get_bytes(one_voice["output_key"])), dtype="float32")
    assert len(other) != len(stored) or rel_l2(other, stored) > 0.1
    assert log_record(ctx, job_id)["voices_used"] == [EN, ZH]
    assert ctx.tmp_files() == []


def test_seeds_run_on_over_the_segments(ctx, tmp_path):
    requests = [request_for(ctx, name, text * 4, 100, tmp_path) for name, text in SEGMENTS]
    joined = plan_segments(requests)
    alone = [plan(r).items for r in requests]
    assert [item.seed for item in joined.items] == list(range(100, 100 + sum(map(len, alone))))
    assert len(alone[0]) > 1  # chunk numbers run on inside a segment as well as across them
    assert [item.text for item in joined.items] == [item.text for items in alone for item in items]
    assert joined.request is requests[0]


def test_unknown_alias_is_refused_and_writes_nothing(ctx):
    before = ctx.keys()
    job_id, result = ctx.run(script_job("Hello. [en] Hi. [villain] Who goes there?"))
    assert assert_one_sentence(result) == "Voice tag 2 of the text names no voice in 'voices'; use [zh] or [en]."
    assert ctx.keys() == before and ctx.tmp_files() == []
    assert log_record(ctx, job_id)["error"] == result["error"]


def test_a_dialogue_of_short_lines_is_spoken(ctx):
    """Every part is at least one piece, and the job's bound of 1 + bytes/8 pieces was reckoned from
    the spoken text alone: four short lines (22 bytes without their tags, so 3 pieces) were refused.
    The tags count now, since the caller sent them."""
    _, result = ctx.run(script_job("[en] Hi! [zh] Hello. [en] Ready? [zh] Yes."))
    assert "error" not in result, result
    assert [segment["text"] for segment in result["segments"]] == ["Hi!", "Hello.", "Ready?", "Yes."]


def test_a_tag_without_voices_is_text(ctx):
    calls = len(ctx.worker.batcher.calls)
    _, result = ctx.run({"text": "He said [zh] twice.", "local_voice": EN, "nfe_step": NFE, "seed": 3,
                         "return_base64": False})
    assert "error" not in result and "voices_used" not in result
    assert parse_job_input({"text": "He said [zh] twice.", "local_voice": EN}).segments() == [
        (EN, "He said [zh] twice.")]
    assert len(ctx.worker.batcher.calls) > calls


def test_streamed_script_is_the_stored_audio(ctx):
    recorder = Recorder(ctx.worker)
    calls = len(ctx.worker.batcher.calls)
    *pieces, result = recorder.run(script_job(stream=True))
    assert "error" not in result, result
    assert result["voices_used"] == [EN, ZH] and result["stream_chunks"] == len(pieces) >= 1
    stored, _ = sf.read(io.BytesIO(ctx.get_bytes(result["output_key"])), dtype="int16")
    np.testing.assert_array_equal(pcm_of(pieces), stored)
    assert ctx.worker.batcher.calls[calls] == 1  # the first segment's first chunk alone
    assert [p["chunks_done"] for p in recorder.progress] == list(range(1, result["chunks"] + 1))
    assert {p["chunks_total"] for p in recorder.progress} == {result["chunks"]}


def test_ref_text_is_local_voices_only(ctx):
    # A transcript given for local_voice; the other voice keeps its own (built-in) one.
    _, result = ctx.run(script_job("[zh] 你好。", local_voice="basic_ref_zh.wav", voices={"zh": ZH},
                                   ref_text="对，这就是我，万人敬仰的太乙真人。"))
    assert result["ref_text_source"] == "job"
    _, result = ctx.run(script_job("[zh] 你好。", ref_text="Some call me nature, others call me mother nature."))
    assert result["ref_text_source"] == "built-in" and result["voices_used"] == [ZH]


@pytest.mark.parametrize("voices, text, expected", [
    ({}, "Hi.", f"'voices' must name 1 to {MAX_SCRIPT_VOICES} voices."),
    ({f"v{i}": EN for i in range(MAX_SCRIPT_VOICES + 1)}, "Hi.",
     f"'voices' must name 1 to {MAX_SCRIPT_VOICES} voices."),
    ({"two words": EN}, "Hi.",
     "'voices' may use only aliases of 1 to 32 letters, digits, '_' or '-' (such as 'narrator')."),
    ({"a" * 33: EN}, "Hi.",
     "'voices' may use only aliases of 1 to 32 letters, digits, '_' or '-' (such as 'narrator')."),
    ({"bad": "../x.wav"}, "Hi.", "'voices' maps 'bad' to a voice name that must be a file name such as "
                                 "'my-voice.wav' (letters, digits, '.', '_', '-', starting with a letter or "
                                 "digit, no '..', at most 100 characters, ending in .wav)."),
    ({"bad": 7}, "Hi.", "'voices.bad' must be a string."),
    (["zh"], "Hi.", "'voices' must be an object."),
    ({"zh": ZH}, "[zh]  ", "The text has nothing to speak besides its voice tags."),
])
def test_voices_input_rules_are_one_sentence(voices, text, expected):
    with pytest.raises(InputError) as caught:
        parse_job_input({"text": text, "local_voice": EN, "voices": voices})
    assert str(caught.value) == expected
    assert_one_sentence({"error": str(caught.value)})


def test_segments_follow_the_tags():
    job = parse_job_input({"text": "Intro. [a] One. [b]\n[a] Two [b] three", "local_voice": EN,
                           "voices": {"a": ZH, "b": "other.wav"}})
    assert job.segments() == [(EN, "Intro."), (ZH, "One."), (ZH, "Two"), ("other.wav", "three")]
    starts_tagged = parse_job_input({"text": "[b] Only b.", "local_voice": EN, "voices": {"b": ZH}})
    assert starts_tagged.segments() == [(ZH, "Only b.")]
