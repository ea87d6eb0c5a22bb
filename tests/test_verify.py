"""The guard (``"verify": true``): each chunk judged, the rejected ones sampled again with their next
seed, sharing model calls, the best try kept, and the result saying per chunk why.

A tiny random model says nothing a transcriber could hear, so the job tests put a stand-in in the
worker's Whisper's place (``ScriptedTranscriber``): it "hears" each chunk's text, except for the
tries a test scripts otherwise, telling chunks apart by their length. Everything else is the
worker's: the batcher, the engine, the judging, the assembly on disk. The audio-side checks and
the error measure run on their own first.
"""
from __future__ import annotations

import dataclasses
import io
import json
import time

import numpy as np
import pytest
import soundfile as sf

from f5worker.errors import InputError
from f5worker.jobs.encoding import pcm16
from f5worker.jobs.inputs import MAX_SEED, parse_job_input
from f5worker.jobs.plan import SynthesisRequest, plan
from f5worker.inference.transcriber import Heard
from f5worker.jobs.verify import (GuardOptions, Try, audio_fault, judge, retry_seed, transcript_error)
from f5worker.model.constants import SAMPLE_RATE
from tests.fixtures_worker import worker_ctx
from tests.helpers import CPU_REL_L2, rel_l2

SR = SAMPLE_RATE
FADE = int(0.15 * SR)  # the default cross-fade, in samples


def speechlike(seconds: float, level: float = 0.1) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (level * rng.standard_normal(int(seconds * SR))).astype(np.float32)


# --- the checks on their own -----------------------------------------------------------------------
def test_audio_faults():
    wave = speechlike(2.0)
    assert audio_fault(wave, len(wave)) is None
    bad = wave.copy()
    bad[100] = np.nan
    assert audio_fault(bad, len(wave)) == "its audio has samples that are not finite numbers"
    assert audio_fault(np.zeros_like(wave), len(wave)) == "it is silent"
    assert audio_fault(np.clip(wave * 30, -1, 1), len(wave)).endswith("of its samples are clipped")
    rushed = np.concatenate([wave[: SR // 2], np.zeros(3 * SR // 2, dtype=np.float32)])
    assert audio_fault(rushed, len(rushed)) == "its speech fills only 25% of its time (rushed)"


def test_transcript_error_reads_numbers_and_punctuation_as_the_text_does():
    assert transcript_error("I have 3 cats, Tom!", "i have three cats tom", "en") == (0.0, True)
    error, ending = transcript_error("The quick brown fox jumps.", "the quick brown", "en")
    assert error == pytest.approx(2 / 5) and not ending
    error, ending = transcript_error("今天天气很好。", "今天天很好", "en")  # Chinese: characters
    assert error == pytest.approx(1 / 6) and ending
    assert transcript_error("Hello there.", "", "en") == (1.0, False)
    # What is written but never said: an emoji's joiners and selector, soft hyphens, a zero-width space.
    for said, heard in [("Hello 👨\u200d👩\u200d👧 family.", "Hello family."), ("I love it ❤\ufe0f so much.", "I love it so much."),
                        ("An inter\u00adnational co\u00adoperation deal.", "An international cooperation deal."),
                        ("Word\u200bjoiner here now.", "Wordjoiner here now.")]:
        assert transcript_error(said, heard, "en") == (0.0, True), said
    # Vowel points written to steer the reading, which Whisper's transcript leaves out: every pointed
    # word counted as misheard, so every chunk of such a text was sampled again, 100% in error.
    for said, heard, language in [("ذَهَبَ الوَلَدُ إِلَى المَدْرَسَةِ صَبَاحًا", "ذهب الولد إلى المدرسة صباحا", "ar"),
                                  ("בְּרֵאשִׁית בָּרָא אֱלֹהִים", "בראשית ברא אלהים", "he")]:
        assert transcript_error(said, heard, language) == (0.0, True), said
    assert transcript_error("ذهب الولد", "ذهب البنت", "ar")[0] == pytest.approx(1 / 2)  # the letters still count


def test_judge_says_why():
    wave, options = speechlike(2.0), GuardOptions(max_error=0.3)
    assert judge(wave, "one two three four", "one two three four", seed=1, planned_samples=len(wave),
                 options=options) == Try(1, 0.0, None)
    wrong = judge(wave, "one two three four", "one six seven four", seed=1, planned_samples=len(wave), options=options)
    assert wrong.reason == "its transcript differs from its text by 50% (more than 30%)"
    cut = judge(wave, "one two three four five six", "one two three four five", seed=1,
                planned_samples=len(wave), options=options)
    assert cut.reason == "its last words were not heard" and cut.error == pytest.approx(1 / 6)
    nothing = judge(wave, "one two three four", " . ", seed=1, planned_samples=len(wave),
                    options=GuardOptions(max_error=1.0))  # 1.0 is not above the bound: said as what it is
    assert nothing == Try(1, 1.0, "nothing was heard in it")
    # 10 of 33 words is 30.3 %, above 30 %: the sentence shows the decimal that tells them apart.
    said = " ".join(f"word{i}" for i in range(33))
    heard = " ".join("wrong" if i < 10 else f"word{i}" for i in range(33))
    close = judge(wave, said, heard, seed=1, planned_samples=len(wave), options=options)
    assert close.reason == "its transcript differs from its text by 30.3% (more than 30.0%)"
    # a third of 3 words against a bound of 0.333333: four decimals did not tell them apart
    third = judge(wave, "one two three", "one two four", seed=1, planned_samples=len(wave),
                  options=GuardOptions(max_error=0.333333))
    assert third.reason == "its transcript differs from its text by 33.33333% (more than 33.33330%)", third.reason
    silent = judge(np.zeros_like(wave), "one", None, seed=1, planned_samples=len(wave), options=options)
    assert silent == Try(1, None, "it is silent")
    # Accepted first, then a judged transcript, then the lower error; a failed audio last.
    assert sorted([silent, wrong, cut, Try(1, 0.1, None)], key=lambda t: t.rank) == [Try(1, 0.1, None), cut, wrong,
                                                                                      silent]


def test_retry_seeds_are_no_chunks_own():
    seeds = {retry_seed(7, attempt, MAX_SEED) for attempt in range(1, 6)}
    assert len(seeds) == 5 and all(0 <= s <= MAX_SEED for s in seeds) and not seeds & set(range(7, 7 + 10000))
    assert retry_seed(MAX_SEED, 1, MAX_SEED) < MAX_SEED


def test_verify_inputs():
    job = {"text": "Hi.", "local_voice": "basic_ref_en.wav"}
    assert parse_job_input({**job, "verify": True, "verify_retries": 0}).verify_retries == 0
    for bad, sentence in [({"verify_retries": 2}, "'verify_retries' only applies with 'verify': true"),
                          ({"verify": True, "verify_retries": 6}, "verify_retries"),
                          ({"verify": True, "verify_max_error": 0}, "verify_max_error")]:
        with pytest.raises(InputError, match=sentence):
            parse_job_input({**job, **bad})


# --- jobs ------------------------------------------------------------------------------------------
TEXT = " ".join(f"Sentence number {i} has {'a few ' * (i % 5 + 1)}words in it, said slowly." for i in range(14))
JOB = {"text": TEXT, "local_voice": "basic_ref_en.wav", "nfe_step": 2, "seed": 21, "return_base64": False}


class ScriptedTranscriber:
    """Stands in for Whisper (a tiny model's noise has nothing to hear): chunk k's n-th try is
    heard as ``script[(k, n)]`` if given, else as chunk k's text. A try is told by its audio: the
    nearest of ``candidates`` (each chunk sampled alone with its seed and retry seeds)."""

    def __init__(self, texts: list[str], candidates: dict[tuple[int, int], np.ndarray],
                 script: dict[tuple[int, int], str]):
        self.texts, self.candidates, self.script = texts, candidates, script
        self.heard: list[tuple[int, int]] = []
        self.languages: list[str | None] = []

    def load(self):
        return self

    def transcribe(self, samples, sr) -> str:
        k, n = min((key for key, wave in self.candidates.items() if len(wave) == len(samples)),
                   key=lambda key: rel_l2(samples, self.candidates[key]))
        assert rel_l2(samples, self.candidates[(k, n)]) < CPU_REL_L2
        self.heard.append((k, n))
        return self.script.get((k, n), self.texts[k])

    def hear(self, samples, sr, *, keep: bool = False, language: str | None = None) -> Heard:
        self.languages.append(language)
        return Heard(self.transcribe(samples, sr))


def candidates(ctx, items, tries: int) -> dict[tuple[int, int], np.ndarray]:
    """Each chunk's n-th try (1: its own seed, then its retry seeds), sampled alone."""
    out = {}
    for n in range(1, tries + 1):
        again = [dataclasses.replace(item, seed=item.seed if n == 1 else retry_seed(item.seed, n - 1, MAX_SEED))
                 for item in items]
        out.update({(k, n): wave for k, wave in enumerate(ctx.worker.engine.run_items(again))})
    return out


@pytest.fixture(scope="module")
def ctx(tiny_models, tiny_whisper, tmp_path_factory):
    with worker_ctx(tiny_models, tiny_whisper, tmp_path_factory.mktemp("verify")) as built:
        yield built


def job_plan(ctx, tmp_path):
    voice = ctx.worker.voices.fetch(JOB["local_voice"], tmp_path / "voice.wav")
    ref_text, _ = ctx.worker.voices.known_ref_text(voice, None)
    return plan(SynthesisRequest(ref_audio=voice.used, ref_sr=voice.sr, ref_text=ref_text, gen_text=TEXT,
                                 seed=JOB["seed"], nfe_step=JOB["nfe_step"], prepared_ref=voice.reference))


def test_the_guard_retries_exactly_the_rejected_chunks_and_keeps_the_best(ctx, tmp_path, monkeypatch):
    """Chunks 0 and 1 (one window of the batcher's job window, 2) fail their first tries: both are
    sampled again in one model call, twice; chunk 0 is heard right at its third try, chunk 1 never,
    and its closest try, the second, is kept."""
    job_plan_ = job_plan(ctx, tmp_path)
    assert ctx.worker.batcher.job_window == 2
    tries = candidates(ctx, job_plan_.items, 3)
    texts, n = job_plan_.texts, len(job_plan_.items)
    assert n >= 4, n
    script = {(0, 1): "zzz", (0, 2): " ".join(texts[0].split()[:-1]),  # then heard right
              (1, 1): "wrong words entirely here", (1, 2): " ".join(texts[1].split()[:len(texts[1].split()) // 2]),
              (1, 3): "no"}
    stand_in = ScriptedTranscriber(texts, tries, script)
    monkeypatch.setattr(ctx.worker, "transcriber", stand_in)
    calls_before = len(ctx.worker.batcher.calls)
    _, result = ctx.run({**JOB, "verify": True})
    assert "error" not in result, result
    # The first window's first tries, exactly its rejected chunks' retries, then the other windows.
    assert stand_in.heard == [(0, 1), (1, 1), (0, 2), (1, 2), (0, 3), (1, 3)] + [(k, 1) for k in range(2, n)]
    reports = [s["verify"] for s in result["segments"]]
    assert [r["tries"] for r in reports] == [3, 3] + [1] * (n - 2)
    assert reports[0]["kept_try"] == 3 and reports[0]["error"] == 0.0
    assert reports[0]["retried_because"] == ["its transcript differs from its text by 100% (more than 30%)",
                                             "its last words were not heard"]
    assert reports[1]["kept_try"] == 2 and reports[1]["error"] > 0.3 and len(reports[1]["retried_because"]) == 3
    assert result["verify"] == {"worst_chunk": 1, "worst_error": reports[1]["error"], "retried_chunks": 2,
                                "failed_chunks": 1, "out_of_time_chunks": 0}
    assert "verify_s" in result["timings"]
    # Each window's first tries in one call, the two retries together in one call each time.
    windows = [min(2, n - start) for start in range(0, n, 2)]
    assert ctx.worker.batcher.calls[calls_before:] == [windows[0], 2, 2, *windows[1:]]
    # The file holds each chunk's kept try: chunk 0's third, chunk 1's second, chunk 2's first.
    stored, _ = sf.read(io.BytesIO(ctx.get_bytes(result["output_key"])), dtype="int16")
    for k, kept in ((0, 3), (1, 2), (2, 1)):
        wave = tries[(k, kept)]
        start = sum(len(tries[(j, 1)]) - FADE for j in range(k))  # where the chunk's wave begins in the join
        inner = slice(start + SR // 5, start + len(wave) - SR // 5)  # clear of the fades
        piece = stored[inner].astype(np.float64)
        assert rel_l2(piece, pcm16(wave[inner.start - start:inner.stop - start]).astype(np.float64)) < CPU_REL_L2, k


def test_a_job_whose_chunks_are_heard_right_samples_each_once(ctx, tmp_path, monkeypatch):
    job_plan_ = job_plan(ctx, tmp_path)
    monkeypatch.setattr(ctx.worker, "transcriber",
                        ScriptedTranscriber(job_plan_.texts, candidates(ctx, job_plan_.items, 1), {}))
    _, verified = ctx.run({**JOB, "verify": True})
    _, plain = ctx.run(JOB)
    assert all(s["verify"] == {"error": 0.0, "tries": 1, "kept_try": 1, "retried_because": []}
               for s in verified["segments"])
    assert verified["verify"]["retried_chunks"] == 0 and "verify" not in plain
    assert ctx.worker.transcriber.languages == ["en"] * len(job_plan_.items)  # the model's: none is detected
    # The same audio, within the CPU's batching tolerance (a verified job's chunks share other calls).
    heard, plain_audio = (sf.read(io.BytesIO(ctx.get_bytes(r["output_key"])), dtype="int16")[0].astype(np.float64)
                          for r in (verified, plain))
    assert rel_l2(heard, plain_audio) < CPU_REL_L2


def test_a_quiet_voice_is_judged_at_the_models_level_not_retried_for_its_loudness(ctx, tmp_path):
    """A voice stored by hand (uploads normalise loudness; a person's file in voices/ is as it was
    recorded) quieter than -28 dBFS has its output lowered to its own level: the audio checks read
    the level the model made, so the quiet copy is judged as the loud one (the text is only
    punctuation, so only the audio checks can reject a try)."""
    from f5_tts.api import files

    audio, sr = sf.read(str(files("f5_tts").joinpath("infer/examples/basic/basic_ref_en.wav")), dtype="float32")
    rms = float(np.sqrt(np.mean(np.square(audio))))
    verdicts = {}
    for name, level in (("ordinary", 0.1), ("quiet", 0.004)):  # -20 and -48 dBFS
        clip = tmp_path / f"{name}.wav"
        sf.write(str(clip), audio * (level / rms), sr, subtype="FLOAT")
        ctx.worker.storage.upload_file(f"voices/{name}.wav", clip, "audio/wav")
        transcript = tmp_path / f"{name}.txt"
        transcript.write_text("Some call me nature, others call me mother nature.")
        ctx.worker.storage.upload_file(f"voices/{name}.wav.txt", transcript, "text/plain")
        _, result = ctx.run({"text": "... !!!", "local_voice": f"{name}.wav", "nfe_step": 2, "seed": 5,
                             "verify": True, "return_base64": False})
        assert "error" not in result, result
        verdicts[name] = [segment["verify"] for segment in result["segments"]]
    assert verdicts["quiet"] == verdicts["ordinary"] == [{"error": 0.0, "tries": 1, "kept_try": 1,
                                                          "retried_because": []}]


def test_a_whisper_that_cannot_load_refuses_the_job_before_any_model_call(ctx, tmp_path, monkeypatch):
    from f5worker.inference.transcriber import Transcriber
    from f5worker.settings import Settings

    broken = tmp_path / "broken-whisper"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    monkeypatch.setattr(ctx.worker, "transcriber", Transcriber(Settings.from_env({"ASR_MODEL": str(broken)}), "cpu"))
    calls = len(ctx.worker.batcher.calls)
    _, result = ctx.run({**JOB, "verify": True})
    assert result["error"].startswith(f"The transcription model in {broken} could not be loaded (")
    assert result["error"].endswith("). Leave out 'verify', or set ASR_MODEL to a Whisper model this worker can load.")
    _, result = ctx.run({**JOB, "verify": True, "subtitles": "srt"})
    assert result["error"].endswith(" Leave out 'timestamps' and 'subtitles' and 'verify', or set ASR_MODEL to a "
                                    "Whisper model this worker can load.")
    assert len(ctx.worker.batcher.calls) == calls
    monkeypatch.setattr(ctx.worker, "transcriber", None)
    _, result = ctx.run({**JOB, "verify": True})
    assert result["error"] == "'verify' needs the worker's transcription model, and this worker has none."


class SlowLoadingEcho:
    """Hears each chunk as its text is written (what the job is judged against does not matter
    here); its first ``load`` takes ``load_s``, as a real Whisper's does (seconds for 1.6 GB)."""

    def __init__(self, heard: str | None = None, load_s: float = 0.0):
        self.heard, self.load_s, self.loaded = heard, load_s, False
        self.languages: list[str | None] = []

    def load(self):
        if not self.loaded:
            time.sleep(self.load_s)
            self.loaded = True
        return self

    def hear(self, samples, sr, *, keep: bool = False, language: str | None = None) -> Heard:
        self.languages.append(language)
        return Heard(self.heard if self.heard is not None else ONE_CHUNK["text"])


ONE_CHUNK = {**JOB, "text": "Hello there, this is a short test.", "verify": True}


def test_each_chunk_is_heard_in_its_texts_language(ctx, monkeypatch):
    """Whisper is told the chunk's language (the model's, or the script's for Chinese, Japanese or
    Korean text), not left to guess it from a second or two of speech."""
    ear = SlowLoadingEcho()
    monkeypatch.setattr(ctx.worker, "transcriber", ear)
    for text, language in (("Hello there.", "en"), ("我有三个苹果。", "zh"), ("こんにちは、元気です。", "ja")):
        _, result = ctx.run({**ONE_CHUNK, "text": text, "verify_retries": 0})
        assert "error" not in result, result
        assert ear.languages[-1] == language, (text, ear.languages)


def test_loading_whisper_is_its_own_timing_not_synthesis(ctx, monkeypatch):
    """The first verify job after a start loads Whisper: that wait is ``whisper_load_s``, and
    ``synthesis_s`` and ``rtf`` stay the model's, as ``model_load_s`` keeps the TTS model's load out."""
    monkeypatch.setattr(ctx.worker, "transcriber", SlowLoadingEcho(load_s=3.0))
    _, first = ctx.run(ONE_CHUNK)
    _, second = ctx.run(ONE_CHUNK)
    assert first["timings"]["whisper_load_s"] >= 3.0 > second["timings"]["whisper_load_s"]
    assert first["timings"]["synthesis_s"] < second["timings"]["synthesis_s"] + 2.0, (first["timings"],
                                                                                      second["timings"])
    _, plain = ctx.run({**ONE_CHUNK, "verify": False})
    assert "whisper_load_s" not in plain["timings"] and "verify_s" not in plain["timings"]


def test_a_verify_job_whose_tries_all_fail_their_audio_checks_still_says_verify_s(ctx, monkeypatch):
    import f5worker.jobs.verify as verify

    monkeypatch.setattr(ctx.worker, "transcriber", SlowLoadingEcho())
    monkeypatch.setattr(verify, "audio_fault", lambda wave, planned: "it is silent")  # a voice that makes silence
    _, result = ctx.run({**ONE_CHUNK, "verify_retries": 0})
    assert result["segments"][0]["verify"]["retried_because"] == ["it is silent"]
    assert result["timings"]["verify_s"] == 0.0


def test_a_verify_jobs_record_says_what_the_guard_found(ctx, monkeypatch):
    """The HTTP face answers with the audio alone and names its record (``X-Job-Id``): the record
    is where a client learns that a chunk still failed after its retries (no text in it)."""
    monkeypatch.setattr(ctx.worker, "transcriber", SlowLoadingEcho("something else entirely"))
    job_id, result = ctx.run({**ONE_CHUNK, "verify_retries": 0})
    record = json.loads(ctx.get_text(f"logs/{job_id}.json"))
    assert record["verify"] == result["verify"] and record["verify"]["failed_chunks"] == 1


def test_over_http_a_whisper_that_cannot_load_is_not_answered_retry_in_a_second(ctx, tmp_path, monkeypatch):
    """Its sentence says to leave out 'verify' or fix ASR_MODEL, which no retry heals: a 503 without
    Retry-After (a storage fault's 503 carries one, and OpenAI's SDK and others honour it)."""
    import asyncio

    from f5worker.http.errors import api_error
    from f5worker.inference.transcriber import Transcriber
    from f5worker.service import JobRunner, job_guard
    from f5worker.settings import Settings

    broken = tmp_path / "broken-whisper"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    monkeypatch.setattr(ctx.worker, "transcriber", Transcriber(Settings.from_env({"ASR_MODEL": str(broken)}), "cpu"))
    runner = JobRunner(ctx.worker, None, job_guard(ctx.worker.settings, ctx.worker.storage))
    job = parse_job_input(ONE_CHUNK)
    outcome = asyncio.run(runner.outcome("broken-whisper-http", "tts",
                                         lambda: ctx.worker.tts("broken-whisper-http", job)))
    error = api_error(outcome)
    assert "Leave out 'verify'" in error.message
    assert (error.status, error.code, error.retry_after) == (503, "model_unavailable", None)


class SlowWrongEar(SlowLoadingEcho):
    """Hears every try as something else, taking ``hear_s`` for each (a long chunk on a busy GPU)."""

    def __init__(self, hear_s: float):
        super().__init__("something else entirely")
        self.hear_s, self.calls = hear_s, 0

    def hear(self, samples, sr, *, keep: bool = False, language: str | None = None) -> Heard:
        self.calls += 1
        time.sleep(self.hear_s)
        return super().hear(samples, sr, keep=keep, language=language)


def test_retries_stop_while_the_job_can_still_finish_before_its_deadline(ctx, monkeypatch):
    """Six tries of about 1.2 s each do not fit a 5 s deadline: the guard stops retrying while
    the job still has its reserve, keeps its best try and says so, where it used to retry on and
    be stopped at the deadline with nothing."""
    ear = SlowWrongEar(hear_s=1.0)
    monkeypatch.setattr(ctx.worker, "transcriber", ear)
    monkeypatch.setattr(ctx.worker, "settings", dataclasses.replace(ctx.worker.settings, job_timeout_s=5.0))
    _, result = ctx.run({**ONE_CHUNK, "verify_retries": 5})
    report = result["segments"][0]["verify"]
    assert 1 < report["tries"] < 6 and report["tries"] == ear.calls, report
    assert report["out_of_time"] is True and result["verify"]["out_of_time_chunks"] == 1
    assert result["timings"]["total_s"] < 5.0, result["timings"]
    monkeypatch.setattr(ctx.worker, "settings", dataclasses.replace(ctx.worker.settings, job_timeout_s=0.0))
    ear.calls = 0
    _, unbounded = ctx.run({**ONE_CHUNK, "verify_retries": 2})  # no deadline: every retry is made
    assert unbounded["segments"][0]["verify"]["tries"] == 3 == ear.calls
    assert "out_of_time" not in unbounded["segments"][0]["verify"]
