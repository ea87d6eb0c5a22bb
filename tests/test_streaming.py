"""Streamed TTS jobs (``F5_STREAMING``, ``"stream": true``) and progress reports.

The audio pieces are checked against what the worker stores: decoded and concatenated, they must be
the stored file's samples exactly, at the model's rate and resampled. The join is checked against
``audio.cross_fade_join`` (what ``job_plan.finish`` uses) on waveforms of awkward lengths. Jobs go
through ``make_handler(build_worker(...), streaming=True)`` on the tiny models, as runpod would
iterate the generator handler, and through runpod's local API server (``/run`` then ``/stream/<id>``,
``/runsync``) with ``F5_STREAMING=1``, also with examples/client.py ``--stream``. That server runs
the whole job inside the ``/stream`` request (it cannot show pieces early) and has nowhere to send
progress reports, so the worker sends none there (``Settings.on_runpod_queue``).
"""
from __future__ import annotations

import asyncio
import io
import json
import time

import numpy as np
import pytest
import soundfile as sf

from examples import client
from f5worker.inference.batcher import run_whole, whole_calls
from f5worker.jobs import resampling
from f5worker.jobs.assembly import planned_segments_bytes
from f5worker.jobs.audio import cross_fade_join
from f5worker.model.constants import SAMPLE_RATE
from f5worker.jobs.chunking import chunk_for_model, offset_after, utf8_len
from f5worker.errors import InputError
from f5worker.jobs.inputs import parse_job_input
from f5worker.jobs.plan import FIRST_CHUNK_SHARE, chunks_with_short_first
from f5worker.jobs.progress import OrderedProgress
from f5worker.service import make_handler
from f5worker.jobs.encoding import RESULT_ALLOWANCE_BYTES
from f5worker.settings import ENV_MAX_RESULT_BYTES, ENV_STREAMING
from f5worker.jobs.streaming import (MAX_PIECE_BASE64_BYTES, PCM_FORMAT, AudioStream, output_bytes, piece,
                                planned_output_bytes)
from tests.fixtures_worker import worker_ctx
from tests.processes import local_session
from tests.fixtures_api import JOB_TIMEOUT_S, api_server
from tests.helpers import PROXY_VARIABLES, Recorder, assert_one_sentence, pcm_of, result_bytes, smallest_accepted

NFE = 4
BUILTIN = "basic_ref_en.wav"
# Long enough for several chunks with the built-in voice.
LONG_TEXT = " ".join(f"This is sentence number {i}, which has a few words in it." for i in range(9))


@pytest.fixture(scope="module")
def ctx(tiny_models, tiny_whisper, tmp_path_factory):
    with worker_ctx(tiny_models, tiny_whisper, tmp_path_factory.mktemp("streaming")) as built:
        yield built


def tts_input(text=LONG_TEXT, **kw) -> dict:
    return {"text": text, "local_voice": BUILTIN, "nfe_step": NFE, "seed": 5, **kw}


def stored_samples(ctx, result: dict) -> tuple[np.ndarray, int]:
    data = ctx.get_bytes(result["output_key"])
    samples, sr = sf.read(io.BytesIO(data), dtype="int16")
    return samples, sr


# --- the join, piece by piece ----------------------------------------------------------------------
@pytest.mark.parametrize("sample_rate", [24000, 44100, 8000])
@pytest.mark.parametrize("lengths, fade", [
    ([12000, 30000, 500, 24000], 0.15),  # one chunk shorter than the cross-fade window
    ([100, 50, 20000], 0.15),  # the join itself shorter than the window
    ([9000, 9000, 9000], 0.0),  # no cross-fade
    ([700000], 0.15),  # one long chunk: several pieces
])
def test_pieces_concatenate_to_the_finished_join(sample_rate, lengths, fade):
    rng = np.random.default_rng(len(lengths))
    waves = [(0.3 * rng.standard_normal(n)).astype(np.float32) for n in lengths]
    expected = resampling.from_model_rate(cross_fade_join(waves, SAMPLE_RATE, fade).astype(np.float32), sample_rate)
    stream = AudioStream(sample_rate, fade)
    pieces = [piece for wave in waves for piece in stream.add(wave)] + stream.close()
    assert [p["chunk"] for p in pieces] == list(range(len(pieces)))
    assert all(len(p["audio_base64"]) <= MAX_PIECE_BASE64_BYTES for p in pieces)
    assert all(p["format"] == PCM_FORMAT and p["sample_rate"] == sample_rate and p["channels"] == 1 for p in pieces)
    buffer = io.BytesIO()
    sf.write(buffer, expected, sample_rate, format="WAV", subtype="PCM_16")
    want, _ = sf.read(io.BytesIO(buffer.getvalue()), dtype="int16")
    np.testing.assert_array_equal(pcm_of(pieces), want)
    if sum(lengths) > 600000:
        assert len(pieces) > 1


def test_short_first_chunk_keeps_the_text():
    budget = 240
    chunks = chunks_with_short_first(LONG_TEXT, budget)
    assert utf8_len(chunks[0]) <= budget * FIRST_CHUNK_SHARE and len(chunks) >= 3
    assert all(utf8_len(c) <= budget for c in chunks)
    assert " ".join(chunks).split() == LONG_TEXT.split()
    assert chunks_with_short_first("Short.", budget) == chunk_for_model("Short.", budget)
    chinese = "今天天气很好，我们去公园散步。然后去吃饭，再去看电影。" * 6
    assert "".join(chunks_with_short_first(chinese, 90)) == chinese


@pytest.mark.parametrize("text", [
    "Visit https://example.com/a/very/long/path/to/the/resource/index.html today and see.",
    "Pneumonoultramicroscopicsilicovolcanoconiosis is a word. And more text follows here.",
    "The price rose to 1.234.567,89 euros in the year 2023, then fell again a lot.",
    " ".join(f"In {1990 + i} it sold 12,{i:03d} units at 3.{i % 10}5 dollars, reported at 10:{i:02d} "
             f"on its website." for i in range(40)),
    # A long token whose short cut lands after a '.' or ',' inside it (the cut was taken so).
    "https://downloads.example.org/releases/v2/installer.x86_64.linux.tar.gz is where you download it.",
    ",".join(str(n) for n in range(1, 120, 7)) + " people came, and many more stayed home that day."])
def test_short_first_chunk_never_cuts_where_the_text_has_no_space(text):
    # The review's cases: the rest was rebuilt from the short pass's pieces with a space after
    # each, so 3.05 was spoken as "3. 05", 10:01 as "10: 01", and long words were split.
    for budget in (72, 100, 200):
        chunks = chunks_with_short_first(text, budget)
        assert " ".join(chunks).split() == text.split()
        if chunks != chunk_for_model(text, budget):
            assert utf8_len(chunks[0]) <= budget * FIRST_CHUNK_SHARE
            assert chunks[1:] == chunk_for_model(text[offset_after(text, chunks[0]):], budget)


# --- jobs through the streaming handler ------------------------------------------------------------
@pytest.mark.parametrize("sample_rate, output_format", [(24000, "wav"), (48000, "wav"), (24000, "flac"),
                                                         (16000, "flac")])
def test_streamed_audio_is_the_stored_audio(ctx, sample_rate, output_format):
    """FLAC too: libsndfile's FLAC writer rounds floats differently (±1 LSB in half the samples),
    so both are written from the same 16-bit integers."""
    recorder = Recorder(ctx.worker)
    calls_before = len(ctx.worker.batcher.calls)
    items = recorder.run(tts_input(stream=True, sample_rate=sample_rate, output_format=output_format))
    *pieces, result = items
    assert "error" not in result, result
    assert result["chunks"] >= 3 and result["stream_chunks"] == len(pieces) >= result["chunks"]
    assert [p["chunk"] for p in pieces] == list(range(len(pieces)))
    assert all(p["format"] == "pcm_s16le" and p["sample_rate"] == sample_rate and p["channels"] == 1
               and len(p["audio_base64"]) <= MAX_PIECE_BASE64_BYTES for p in pieces)
    samples, sr = stored_samples(ctx, result)
    assert sr == sample_rate
    np.testing.assert_array_equal(pcm_of(pieces), samples)
    assert sum(p["seconds"] for p in pieces) == pytest.approx(result["duration"], abs=0.001 * len(pieces))
    # the first chunk had a model call of its own, before the others were queued
    assert ctx.worker.batcher.calls[calls_before] == 1
    assert 0 < result["timings"]["first_audio_s"] < result["timings"]["total_s"]
    # progress: one report per chunk, in order, ending at the whole audio
    assert [p["chunks_done"] for p in recorder.progress] == list(range(1, result["chunks"] + 1))
    assert {p["chunks_total"] for p in recorder.progress} == {result["chunks"]}
    seconds = [p["audio_seconds"] for p in recorder.progress]
    assert seconds == sorted(seconds) and seconds[-1] == pytest.approx(result["duration"], abs=2 / sample_rate + 0.001)


def planned_length(ctx, job_input: dict) -> tuple[int, int]:
    """The planned length (24 kHz samples) and chunks of a streamed job: those of its stored file at
    24 kHz, as nothing is removed from a streamed job's audio."""
    *_, result = Recorder(ctx.worker).run({**job_input, "sample_rate": 24000, "return_base64": False})
    return len(stored_samples(ctx, result)[0]), result["chunks"]


@pytest.mark.parametrize("sample_rate", [24000, 8000, 44100])
def test_planned_output_bounds_what_the_pieces_add(ctx, sample_rate):
    """What a streamed job's pieces add to its output (runpod keeps them all) is at most what its
    plan says, and not by more than a piece's fields per chunk."""
    job = tts_input(stream=True, sample_rate=sample_rate, return_base64=False)
    planned, chunks = planned_length(ctx, job)
    *pieces, result = Recorder(ctx.worker).run(job)
    assert result["chunks"] == chunks
    sent = sum(output_bytes(p) for p in pieces)
    bound = planned_output_bytes(planned, sample_rate, chunks)
    assert sent == len(json.dumps(pieces, ensure_ascii=False))  # "[", ", " between, "]"
    assert sent <= bound <= sent + (chunks + 1 + len(pieces)) * output_bytes(piece(999, sample_rate, "", 12.999))


def test_streamed_job_whose_pieces_cannot_fit_is_refused_before_synthesis(ctx, limit):
    job = tts_input(stream=True)  # local storage: the file also comes inline by default
    *_, stored = Recorder(ctx.worker).run({**job, "return_base64": False})
    planned, chunks = len(stored_samples(ctx, stored)[0]), stored["chunks"]
    # The pieces, and the result's segments beside them (each chunk's text and times)
    bound = planned_output_bytes(planned, 24000, chunks) + planned_segments_bytes(
        [s["text"] for s in stored["segments"]])

    def accepts(max_result_bytes: int) -> bool:
        limit(max_result_bytes)
        calls = len(ctx.worker.batcher.calls)
        *_, result = Recorder(ctx.worker).run(job)
        if "error" in result:
            assert len(ctx.worker.batcher.calls) == calls, "the model ran for a job refused from its plan"
        return "error" not in result

    # Room for the pieces, the segments and the result's other fields at their widest: no less.
    least = smallest_accepted(accepts, bound, bound + RESULT_ALLOWANCE_BYTES + 8192)
    assert bound + RESULT_ALLOWANCE_BYTES < least < bound + RESULT_ALLOWANCE_BYTES + 4096
    limit(least - 1)
    before, calls = ctx.keys(), len(ctx.worker.batcher.calls)
    [refusal] = Recorder(ctx.worker).run(job)
    message = assert_one_sentence(refusal)
    assert message.startswith("A streamed job's output keeps every piece it sends, and this job's pieces would "
                              "take about "), message
    assert message.endswith(f"fit in a RunPod result ({ENV_MAX_RESULT_BYTES}); send a shorter text, choose a lower "
                            "sample_rate, or leave 'stream' out."), message
    assert len(ctx.worker.batcher.calls) == calls
    assert ctx.keys() == before and ctx.tmp_files() == []
    # The file asked for inline beside pieces that just fit: a WAV's size is known from the plan too.
    limit(least + 1000)
    [refusal] = Recorder(ctx.worker).run({**job, "return_base64": True})
    assert assert_one_sentence(refusal).startswith("The wav audio would be at least ")
    assert len(ctx.worker.batcher.calls) == calls
    # At the least room the job streams, and its whole output fits; the default inline copy is
    # left out, with the reason.
    limit(least)
    items = Recorder(ctx.worker).run(job)
    *pieces, result = items
    assert "error" not in result and len(pieces) == result["stream_chunks"]
    assert "audio_base64" not in result and result["audio_base64_omitted"].startswith("The audio is ")
    assert result_bytes(items) <= least


def test_no_progress_report_is_sent_after_the_result(ctx):
    """A job's reports are posted one at a time (jobs.progress); those still waiting when the job
    ends are dropped and the one being posted is waited for, so RunPod never gets an IN_PROGRESS
    after the result. (A sender taking 0.3 s a post: two reports were posted after it.)"""
    posted_at: list[float] = []

    def slow_send(job, update):
        time.sleep(0.3)
        posted_at.append(time.monotonic())

    progress = OrderedProgress(slow_send)
    result = asyncio.run(make_handler(ctx.worker, progress=progress)({"id": "late-reports", "input": tts_input()}))
    returned = time.monotonic()
    time.sleep(1.0)  # what a sender still had would be posted by now
    assert result["chunks"] > 2 and posted_at and progress.idle()
    assert max(posted_at) <= returned


def test_a_job_that_does_not_stream_yields_its_result_once(ctx):
    recorder = Recorder(ctx.worker)
    items = recorder.run(tts_input("One short line.", seed=9))
    assert len(items) == 1 and items[0]["seed"] == 9 and "stream_chunks" not in items[0]
    assert recorder.progress == []  # one chunk: nothing to report


def test_progress_of_a_job_that_does_not_stream(ctx):
    recorder = Recorder(ctx.worker)
    [result] = recorder.run(tts_input())
    assert result["chunks"] > 1
    assert [p["chunks_done"] for p in recorder.progress] == list(range(1, result["chunks"] + 1))


def test_streaming_off_refuses_stream_jobs_with_a_sentence(ctx):
    result = asyncio.run(ctx.handler({"id": "off-1", "input": tts_input(stream=True)}))
    assert result == {"error": f"This endpoint does not stream: set {ENV_STREAMING}=1 on the endpoint to send "
                               "'stream': true jobs, or leave 'stream' out."}


def test_stream_with_remove_silence_is_refused():
    with pytest.raises(InputError, match=r"^Silences are removed from the whole audio at once, so 'remove_silence' "
                                         r"cannot be used with 'stream'; leave one of them out\.$"):
        parse_job_input(tts_input(stream=True, remove_silence=True))


def test_refused_streamed_job_is_one_error_item(ctx):
    items = Recorder(ctx.worker).run(tts_input(stream=True, speed=0.1))
    assert items == [{"error": "'speed' must be at least 0.3."}]


def test_gpu_fault_while_streaming_asks_for_a_new_worker(ctx, monkeypatch):
    recorder = Recorder(ctx.worker)
    real = run_whole(ctx.worker.batcher._start_call)
    calls = []

    def fail_after_the_first_call(items, abandoned=None):
        calls.append(len(items))
        if len(calls) > 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(items, abandoned)

    monkeypatch.setattr(ctx.worker.batcher, "_start_call", whole_calls(fail_after_the_first_call))
    *pieces, last = recorder.run(tts_input(stream=True))
    assert pieces and all(p["format"] == PCM_FORMAT for p in pieces)  # the first chunk went out
    assert last == {"error": "The GPU failed (RuntimeError) during this job; this worker will be replaced.",
                    "refresh_worker": True}
    assert recorder.replacements == 1
    assert ctx.tmp_files() == []


# --- runpod's local API server with F5_STREAMING=1, and the example client --------------------------
@pytest.fixture(scope="module")
def stream_api(tiny_models, tiny_whisper, s3_server, tmp_path_factory):
    with api_server(tiny_models, tiny_whisper, s3_server, tmp_path_factory.mktemp("stream-api"),
                    {ENV_STREAMING: "1"}) as server:
        yield server


def post(server, path: str, body=None) -> dict:
    with local_session() as session:
        response = session.post(f"{server.base_url}{path}", json=body, timeout=JOB_TIMEOUT_S)
    assert response.status_code == 200, f"HTTP {response.status_code}: {response.text[:500]}"
    return response.json()


def test_run_then_stream_through_the_local_api_server(stream_api):
    job_id = post(stream_api, "/run", {"input": tts_input(stream=True, sample_rate=22050)})["id"]
    answer = post(stream_api, f"/stream/{job_id}")
    assert answer["status"] == "COMPLETED", answer
    *pieces, result = [item["output"] for item in answer["stream"]]
    assert "error" not in result and result["stream_chunks"] == len(pieces) >= result["chunks"] >= 3
    assert all(p["format"] == PCM_FORMAT and p["sample_rate"] == 22050 and p["channels"] == 1
               and len(p["audio_base64"]) <= MAX_PIECE_BASE64_BYTES for p in pieces)
    stored, sr = sf.read(io.BytesIO(stream_api.download(result["audio_url"])), dtype="int16")
    assert sr == 22050
    np.testing.assert_array_equal(pcm_of(pieces), stored)


def test_runsync_on_a_streaming_endpoint_is_the_list_of_one_result(stream_api):
    answer = post(stream_api, "/runsync", {"input": tts_input("One line.", seed=4)})
    assert answer["status"] == "COMPLETED", answer
    [result] = answer["output"]
    assert result["seed"] == 4 and "stream_chunks" not in result


@pytest.fixture
def run_client(stream_api, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", stream_api.s3_server.ca_bundle)  # the presigned URLs' CA
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def run(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = client.main(["--local", "--local-url", stream_api.base_url, "--poll", "0.2", *argv],
                           stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    return run


def test_client_stream_writes_the_pcm_as_it_comes_then_the_file(run_client, tmp_path):
    wav = tmp_path / "long.wav"
    code, out, err = run_client("tts", LONG_TEXT, "--voice", BUILTIN, "--nfe-step", str(NFE), "--seed", "2",
                                "--stream", "-o", str(wav))
    assert code == 0, err
    result = json.loads(out)
    assert result["pieces_received"] == result["stream_chunks"] >= result["chunks"] >= 3
    assert result["pcm_file"] == str(tmp_path / "long.pcm") and "STREAMING" in err
    stored, sr = sf.read(str(wav), dtype="int16")
    assert sr == 24000
    np.testing.assert_array_equal(np.frombuffer((tmp_path / "long.pcm").read_bytes(), "<i2"), stored)


def test_client_without_stream_on_a_streaming_endpoint(run_client, tmp_path):
    wav = tmp_path / "one.wav"
    code, out, err = run_client("tts", "One line.", "--voice", BUILTIN, "--nfe-step", str(NFE), "-o", str(wav))
    assert code == 0, err
    assert sf.info(str(wav)).frames / 24000 == pytest.approx(json.loads(out)["duration"], abs=0.001)
    code, out, err = run_client("tts", "Too slow.", "--voice", BUILTIN, "--speed", "0.1", "--stream",
                                "-o", str(tmp_path / "never.wav"))
    assert code == 1 and err.splitlines()[-1] == "'speed' must be at least 0.3."
