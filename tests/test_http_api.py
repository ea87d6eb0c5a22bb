"""The HTTP face (``F5_SERVE=http``) as OpenAI's own SDK calls it: the real ``openai`` client
against the real FastAPI app under uvicorn on 127.0.0.1, in front of a worker built on the tiny models.

The server runs in this process (uvicorn on a thread) so that the tests can look at the worker
behind it: the batcher's model calls, the temp folder, storage. ``ModelProbe`` wraps the batcher's
real model function (it still runs) to count the chunks sampled and, where a test must see what
happens between two model calls, to hold a call until the test lets it go.
"""
from __future__ import annotations

import base64
import errno
import gc
import io
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files as package_files
from pathlib import Path

import av
import openai
import pytest
import requests
import soundfile as sf
import uvicorn

from f5worker.http.app import ServerState, make_app
from f5worker.http.gate import JSON_BODY_BYTES
from f5worker.inference.batcher import run_whole, whole_calls
from f5worker.jobs import live_encoding
from f5worker.jobs.inputs import MAX_TEXT_CHARS
from f5worker.jobs.voices import BUILTIN_VOICES
from f5worker.settings import ENV_API_KEY
from tests.fixtures_worker import worker_ctx
from tests.processes import free_port, local_session

pytestmark = pytest.mark.usefixtures("loopback_only")

KEY = "sk-test-" + "4" * 24
BUILTIN = "basic_ref_en"  # f5-tts's example voice, as a client names it (no .wav)
NFE = 4
GATE_S = 60  # the longest a held model call waits for its release
LONG_TEXT = " ".join(["The quick brown fox jumps over the lazy dog, and then it runs far away into the woods."] * 6)
SHORT_TEXT = "Hello there, this is a short test."


class ModelProbe:
    """Counts the chunks each model call samples; ``hold()`` makes the calls after the next
    ``after`` wait until ``release()`` (then they run as they would have)."""

    def __init__(self, batcher):
        self.batcher = batcher
        self.real = run_whole(batcher._start_call)
        self.items_sampled = 0
        self.calls = 0
        self.gate = threading.Event()
        self.gate.set()
        self.hold_after: int | None = None
        self.abandoned_when_released: list[bool] = []
        batcher._start_call = whole_calls(self)  # calls run whole: the probe counts and holds them

    def __call__(self, items, abandoned):
        self.calls += 1
        if self.hold_after is not None and self.calls > self.hold_after:
            assert self.gate.wait(GATE_S), "a held model call was never released"
            self.abandoned_when_released.append(bool(abandoned()))
        waves = self.real(items, abandoned)
        self.items_sampled += len(items)
        return waves

    def hold(self, after: int = 0) -> None:
        self.hold_after = self.calls + after
        self.gate.clear()

    def release(self) -> None:
        self.hold_after = None
        self.gate.set()


@pytest.fixture(scope="module")
def served(tiny_models, tiny_whisper, tmp_path_factory):
    """(ctx, base_url, probe, state): the app behind uvicorn on a free loopback port."""
    with worker_ctx(tiny_models, tiny_whisper, tmp_path_factory.mktemp("http-api"),
                    extra={ENV_API_KEY: KEY}) as ctx:
        state = ServerState(ctx.settings)
        state.ready(ctx.worker)
        probe = ModelProbe(ctx.worker.batcher)
        server = uvicorn.Server(uvicorn.Config(make_app(state), host="127.0.0.1", port=free_port(),
                                               log_config=None, lifespan="off"))
        thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        try:
            yield ctx, f"http://127.0.0.1:{server.config.port}", probe, state
        finally:
            probe.release()
            server.should_exit = True
            thread.join(30)


@pytest.fixture
def client(served) -> openai.OpenAI:
    _, base_url, _, _ = served
    http = openai.DefaultHttpx2Client(trust_env=False)  # no proxies: loopback only
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0, http_client=http) as sdk:
        yield sdk


@pytest.fixture(autouse=True)
def _nothing_left(served):
    """Every request leaves the temp folder empty and no slot taken, however it ended."""
    ctx, _, probe, state = served
    yield
    probe.release()
    deadline = time.monotonic() + 10
    while (ctx.tmp_files() or state.in_flight) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ctx.tmp_files() == [], "a request left files in the temp folder"
    assert state.in_flight == 0, "a request kept its slot"


@pytest.fixture
def jobs(monkeypatch) -> list:
    """Every ``SpeechJob`` the server starts during the test, in order."""
    from f5worker.http import speech

    started: list[speech.SpeechJob] = []
    real_init = speech.SpeechJob.__init__

    def recording_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        started.append(self)

    monkeypatch.setattr(speech.SpeechJob, "__init__", recording_init)
    return started


# --- helpers --------------------------------------------------------------------------------------
def speak(client: openai.OpenAI, text: str = SHORT_TEXT, **kw) -> tuple[bytes, str]:
    """The audio of one speech request, and its job id."""
    extra = {"nfe_step": NFE, **kw.pop("extra_body", {})}
    raw = client.audio.speech.with_raw_response.create(model=kw.pop("model", "tts-1"), input=text,
                                                       voice=kw.pop("voice", BUILTIN), extra_body=extra, **kw)
    return raw.http_response.content, raw.headers["x-job-id"]


def record(ctx, job_id: str) -> dict:
    """The job's log record, written once its audio has gone out."""
    deadline = time.monotonic() + 10
    while (text := ctx.get_text(f"logs/{job_id}.json")) is None:
        assert time.monotonic() < deadline, f"no record for {job_id}"
        time.sleep(0.05)
    return json.loads(text)


def decoded_seconds(data: bytes, fmt: str, sample_rate: int = 24000) -> float:
    if fmt == "pcm":
        return len(data) / 2 / sample_rate
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return samples / stream.rate


def api(base_url: str, method: str, path: str, **kw) -> requests.Response:
    with local_session() as session:
        headers = {"Authorization": f"Bearer {KEY}", **kw.pop("headers", {})}
        return session.request(method, f"{base_url}{path}", headers=headers, timeout=60, **kw)


def assert_openai_error(response: requests.Response, status: int, message_start: str, param=None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"].startswith(message_start), error["message"]
    kind = "rate_limit_error" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
    assert error["type"] == kind
    if param is not None:
        assert error["param"] == param


# --- formats --------------------------------------------------------------------------------------
# Lossy codecs add their encoder delay and pad their last frame (LAME, AAC: up to ~100 ms).
LOSSY_SLACK_S = {"mp3": 0.12, "aac": 0.12, "opus": 0.03}


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
def test_every_response_format_decodes_to_the_reported_duration(client, served, fmt):
    ctx, _, _, _ = served
    data, job_id = speak(client, response_format=fmt, extra_body={"seed": 3})
    seconds = record(ctx, job_id)["audio_seconds"]
    assert seconds > 0.5
    # the record rounds to the millisecond
    assert seconds - 0.0005 <= decoded_seconds(data, fmt) <= seconds + 0.0005 + LOSSY_SLACK_S.get(fmt, 0)


def test_flac_is_read_back_from_disk_in_pieces_and_is_the_wav_s_audio(client, served, monkeypatch):
    """A FLAC is sent once complete: it was held in memory (then copied whole), so a chapter's
    FLAC cost hundreds of MB; it is now written to an anonymous file and sent in pieces (4 KiB
    here, so a short job's file takes several) that make exactly the file of the stored audio."""
    ctx, _, _, _ = served
    monkeypatch.setattr(live_encoding, "REST_PIECE_BYTES", 4096)
    flac, job_id = speak(client, response_format="flac", extra_body={"seed": 7})
    wav, _ = speak(client, response_format="wav", extra_body={"seed": 7})
    assert len(flac) > 3 * 4096
    decoded, rate = sf.read(io.BytesIO(flac), dtype="int16")
    assert rate == 24000
    assert decoded.tobytes() == wav[44:]
    assert record(ctx, job_id)["output_bytes"] == len(flac)


def test_pcm_is_the_wav_without_its_header_and_16_bit_24_khz(client):
    pcm, _ = speak(client, response_format="pcm", extra_body={"seed": 5})
    wav, _ = speak(client, response_format="wav", extra_body={"seed": 5})
    assert wav[:4] == b"RIFF" and wav[8:16] == b"WAVEfmt "
    assert int.from_bytes(wav[24:28], "little") == 24000 and int.from_bytes(wav[34:36], "little") == 16
    assert wav[44:] == pcm


def test_sample_rate_knob_and_content_types(client, served):
    _, base_url, _, _ = served
    response = api(base_url, "POST", "/v1/audio/speech",
                   json={"input": SHORT_TEXT, "voice": BUILTIN, "response_format": "opus", "sample_rate": 48000,
                         "nfe_step": NFE})
    assert response.status_code == 200 and response.headers["content-type"] == "audio/ogg; codecs=opus"
    with av.open(io.BytesIO(response.content)) as container:
        assert container.streams.audio[0].codec_context.name == "opus"
    for fmt, content_type in [("mp3", "audio/mpeg"), ("aac", "audio/aac"), ("flac", "audio/flac"), ("pcm", "audio/pcm")]:
        response = api(base_url, "POST", "/v1/audio/speech",
                       json={"input": "Hi there.", "voice": BUILTIN, "response_format": fmt, "nfe_step": 2})
        assert response.headers["content-type"] == content_type


# --- streaming ------------------------------------------------------------------------------------
def test_first_bytes_arrive_while_later_chunks_are_unsampled(client, served):
    ctx, _, probe, _ = served
    probe.hold(after=1)  # the first chunk's call runs; the rest wait until the test has its bytes
    sampled_before = probe.items_sampled
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", input=LONG_TEXT, voice=BUILTIN, response_format="pcm",
            extra_body={"nfe_step": NFE, "seed": 1}) as response:
        chunks = response.iter_bytes(4096)
        first = next(chunks)
        assert first, "no audio"
        assert probe.items_sampled - sampled_before == 1, "the first bytes waited for later chunks"
        probe.release()
        rest = b"".join(chunks)
        job_id = response.headers["x-job-id"]
    chunks_total = record(ctx, job_id)["chunks"]
    assert chunks_total > 1
    assert probe.items_sampled - sampled_before == chunks_total
    whole, _ = speak(client, LONG_TEXT, response_format="pcm", extra_body={"seed": 1})
    assert first + rest == whole  # streamed as it was sampled, the same audio as in one piece


def test_sse_events_carry_the_same_audio(client, served):
    _, base_url, _, _ = served
    body = {"model": "gpt-4o-mini-tts", "input": SHORT_TEXT, "voice": BUILTIN, "response_format": "pcm",
            "stream_format": "sse", "nfe_step": NFE, "seed": 9}
    with local_session() as session:
        response = session.post(f"{base_url}/v1/audio/speech", json=body, stream=True, timeout=60,
                                headers={"Authorization": f"Bearer {KEY}"})
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: "):]) for line in response.iter_lines(decode_unicode=True)
                  if line.startswith("data: ")]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert events[-1]["type"] == "speech.audio.done" and "usage" in events[-1]
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    plain, _ = speak(client, response_format="pcm", extra_body={"seed": 9})
    assert audio == plain


def test_removed_silences_are_sent_as_made_final(client, served):
    ctx, _, _, _ = served
    data, job_id = speak(client, LONG_TEXT, response_format="wav", extra_body={"remove_silence": True, "seed": 2})
    assert abs(decoded_seconds(data, "wav") - record(ctx, job_id)["audio_seconds"]) < 0.001


def test_a_client_that_goes_away_frees_the_batcher(client, served):
    ctx, _, probe, state = served
    probe.hold(after=1)
    released_before = len(probe.abandoned_when_released)
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", input=LONG_TEXT, voice=BUILTIN, response_format="mp3",
            extra_body={"nfe_step": NFE}) as response:
        next(response.iter_bytes(64))
    # closed after its first bytes: its remaining chunks leave the queue, its files and slot go
    deadline = time.monotonic() + 5
    while (ctx.worker.batcher._pending or state.in_flight or ctx.tmp_files()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ctx.worker.batcher._pending == [] and state.in_flight == 0 and ctx.tmp_files() == []
    probe.release()
    deadline = time.monotonic() + 5
    while len(probe.abandoned_when_released) == released_before and time.monotonic() < deadline:
        time.sleep(0.02)
    # the call that held the rest (if it had begun) found no job left to sample for
    assert all(probe.abandoned_when_released[released_before:])
    assert speak(client)[0]  # and the worker serves the next request


# --- flac's temp file -----------------------------------------------------------------------------
def open_files_under(folder: Path) -> list[str]:
    """What this process holds open in ``folder`` (an anonymous file still names its folder)."""
    held = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = fd.readlink()
        except OSError:
            continue
        if str(target).startswith(str(folder)):
            held.append(str(target))
    return held


def post_speech(base_url: str, fmt: str, text: str = SHORT_TEXT, timeout: float = 60) -> requests.Response:
    return requests.post(f"{base_url}/v1/audio/speech", headers={"Authorization": f"Bearer {KEY}"},
                         json={"model": "tts-1", "input": text, "voice": BUILTIN, "response_format": fmt,
                               "nfe_step": NFE}, timeout=timeout)


def test_a_flac_whose_client_left_closes_its_temp_file_at_once(served):
    """The flac is written to an anonymous temp file until complete. The job's coroutine and its
    SpeechJob hold each other, so a job stopped by its client kept the file open until the cycle
    collector ran (a chapter's hundreds of MB on the temp disk); the collector is off here."""
    ctx, base_url, probe, state = served
    probe.hold(after=1)
    gc.collect()
    gc.disable()
    try:
        leaving = ThreadPoolExecutor(1).submit(post_speech, base_url, "flac", LONG_TEXT, 4)
        deadline = time.monotonic() + 10
        while not open_files_under(ctx.tmp_dir):  # the first chunk is in: the file is open
            assert time.monotonic() < deadline and not leaving.done(), "the flac's temp file never opened"
            time.sleep(0.02)
        with pytest.raises(requests.exceptions.ReadTimeout):
            leaving.result()
        deadline = time.monotonic() + 10
        while state.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        assert state.in_flight == 0
        assert open_files_under(ctx.tmp_dir) == []
    finally:
        gc.enable()
        probe.release()


def test_a_flac_without_a_temp_folder_is_answered_as_a_wav_is(served):
    """The flac's temp file was made with the request, before the job: a missing temp folder
    answered a bare '500 Internal Server Error' with no job record, where wav said why."""
    ctx, base_url, _, _ = served
    moved = ctx.tmp_dir.with_name(ctx.tmp_dir.name + "-moved")
    ctx.tmp_dir.rename(moved)
    try:
        answers = {fmt: post_speech(base_url, fmt) for fmt in ("wav", "flac")}
    finally:
        moved.rename(ctx.tmp_dir)
    for answer in answers.values():
        message = answer.json()["error"]["message"]
        assert answer.status_code == answers["wav"].status_code >= 500
        assert message.startswith(f"The worker's temp folder {ctx.tmp_dir} does not exist"), message


class FullTempFile:
    """An anonymous temp file on a disk that fills after ``room`` bytes: a stand-in for a full
    temp folder, which the tests cannot make (that needs a small filesystem mounted)."""

    def __init__(self, real, room: int = 4096):
        self.file, self.room = real, room

    def write(self, data) -> int:
        if self.file.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.file.close()


def test_a_flac_on_a_full_temp_folder_says_so(served, monkeypatch):
    """The stream's steps ran outside the temp folder's error mapping: 'Internal error (OSError)'."""
    ctx, base_url, _, _ = served
    real = live_encoding.tempfile.TemporaryFile
    monkeypatch.setattr(live_encoding.tempfile, "TemporaryFile", lambda **kw: FullTempFile(real(**kw)))
    answer = post_speech(base_url, "flac", LONG_TEXT)
    message = answer.json()["error"]["message"]
    assert answer.status_code >= 500 and message.startswith(f"The worker's temp folder {ctx.tmp_dir} is full"), \
        message


# --- load -----------------------------------------------------------------------------------------
def test_sixteen_at_once_share_model_calls_and_the_seventeenth_gets_429(client, served):
    ctx, base_url, probe, state = served
    limit = ctx.settings.max_concurrency
    assert limit == 16
    probe.hold()  # every model call waits, so all sixteen are in flight together
    calls_before = probe.calls
    with ThreadPoolExecutor(limit) as pool:
        try:
            futures = [pool.submit(speak, client, f"Sentence number {n} of the load test.", response_format="wav")
                       for n in range(limit)]
            deadline = time.monotonic() + 30
            while state.in_flight < limit:
                assert time.monotonic() < deadline, f"only {state.in_flight} requests in flight"
                time.sleep(0.02)
            refused = api(base_url, "POST", "/v1/audio/speech", json={"input": "One more.", "voice": BUILTIN})
            assert_openai_error(refused, 429, "This worker is serving the 16 requests")
            assert refused.headers["retry-after"] == "1"
        finally:
            probe.release()  # a failure above must not leave sixteen calls waiting out their holds
        results = [future.result(timeout=120) for future in futures]
    assert all(data[:4] == b"RIFF" for data, _ in results)
    assert probe.calls - calls_before < limit  # batched: fewer model calls than requests


# --- voices and models ----------------------------------------------------------------------------
def test_voices_uploaded_listed_used_and_deleted_over_http(client, served):
    ctx, base_url, _, _ = served
    clip = builtin_clip()
    uploaded = api(base_url, "POST", "/v1/audio/voices", files={"file": ("me.wav", clip, "audio/wav")},
                   data={"name": "http-alice", "ref_text": "Some call me nature, others call me mother nature."})
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json()["id"] == "http-alice" and uploaded.json()["voice_key"] == "voices/http-alice.wav"
    listed = api(base_url, "GET", "/v1/audio/voices", params={"details": "false"}).json()
    assert "http-alice" in [v["id"] for v in listed["voices"]] and listed["object"] == "list"
    data, _ = speak(client, voice="http-alice", response_format="wav")
    assert data[:4] == b"RIFF"
    data, _ = speak(client, voice={"id": "http-alice"}, response_format="wav")  # the SDK's custom-voice form
    assert data[:4] == b"RIFF"
    deleted = api(base_url, "DELETE", "/v1/audio/voices/http-alice")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert "voices/http-alice.wav" not in ctx.keys()
    with pytest.raises(openai.NotFoundError, match="Voice 'http-alice.wav' was not found"):
        speak(client, voice="http-alice")
    assert_openai_error(api(base_url, "DELETE", "/v1/audio/voices/http-alice"), 404,
                        "Voice 'http-alice.wav' was not found")


def builtin_clip() -> bytes:
    """f5-tts's example voice, as a file a client would upload."""
    return Path(str(package_files("f5_tts").joinpath(BUILTIN_VOICES[f"{BUILTIN}.wav"][0]))).read_bytes()


def test_models_in_openai_shape(client, served):
    ctx, _, _, _ = served
    names = [model.id for model in client.models.list()]
    # the registry (the default first; F5_CKPT_FILE replaced its files), then the default's other names:
    # the checkpoint's stem (what a fine-tune was called before the registry) and OpenAI's
    assert names == ["F5TTS_v1_Base", "F5TTS_Base", "model", "tts-1", "tts-1-hd", "gpt-4o-mini-tts"]
    for name in (names[0], "model"):  # the served model's own names work too
        data, _ = speak(client, model=name)
        assert data
    with pytest.raises(openai.NotFoundError, match="There is no model 'whisper-1' on this endpoint; it serves "
                                                   "F5TTS_v1_Base, F5TTS_Base."):
        speak(client, model="whisper-1")


# --- refusals -------------------------------------------------------------------------------------
def test_a_wrong_key_is_refused_and_ping_needs_none(served):
    _, base_url, _, _ = served
    http = openai.DefaultHttpx2Client(trust_env=False)
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-wrong", max_retries=0, http_client=http) as wrong:
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
    assert_openai_error(api(base_url, "GET", "/v1/models", headers={"Authorization": ""}), 401, "Incorrect or missing API key")
    with local_session() as session:
        assert session.get(f"{base_url}/ping", timeout=10).status_code == 200


HOSTILE = [
    ({"input": SHORT_TEXT, "voice": BUILTIN, "volume": 3}, 400, "Unknown input field 'volume'.", "volume"),
    ({"input": SHORT_TEXT, "voice": BUILTIN, "speed": "fast"}, 400, "'speed' must be a number.", "speed"),
    ({"input": SHORT_TEXT, "voice": BUILTIN, "seed": "7"}, 400, "'seed' must be an integer.", "seed"),
    ({"input": 42, "voice": BUILTIN}, 400, "'input' must be a string.", "input"),
    ({"input": "a" * (MAX_TEXT_CHARS + 1), "voice": BUILTIN}, 400,
     f"'input' is too long: at most {MAX_TEXT_CHARS} characters.", "input"),
    ({"input": "   ", "voice": BUILTIN}, 400, "'input' must not be empty.", "input"),
    ({"input": "\u200b\ufeff", "voice": BUILTIN}, 400, "'input' has nothing to speak", "input"),
    ({"input": SHORT_TEXT, "voice": "../../etc/passwd"}, 400, "'voice' must be a file name", "voice"),
    ({"input": SHORT_TEXT, "voice": BUILTIN, "response_format": "ogg"}, 400, "'response_format' must be mp3",
     "response_format"),
    ({"input": SHORT_TEXT, "voice": BUILTIN, "stream_format": "chunks"}, 400, "Invalid 'stream_format'",
     "stream_format"),
    ({"input": SHORT_TEXT, "voice": BUILTIN, "nfe_step": 0}, 400, "'nfe_step' must be at least 1.", "nfe_step"),
    ({"input": SHORT_TEXT, "voice": BUILTIN, "response_format": "opus", "sample_rate": 44100}, 400,
     "'sample_rate' must be 8000, 16000, 24000 or 48000 for opus audio", "sample_rate"),
    ({"input": SHORT_TEXT}, 400, "Missing required input 'voice'.", "voice"),
    # as the queue face says them, not "There is no model ''" (404)
    ({"input": SHORT_TEXT, "voice": BUILTIN, "model": " "}, 400, "'model' must not be empty.", "model"),
    ({"input": SHORT_TEXT, "voice": BUILTIN, "model": "m" * 65}, 400, "'model' is too long: at most 64", "model"),
    ({"input": SHORT_TEXT, "voice": "nobody-here"}, 404, "Voice 'nobody-here.wav' was not found", None),
    ([1, 2], 400, "The request body must be a JSON object.", None),
    # the union's last branch had named the field: "'voice.constrained-str' must be a string."
    ({"input": SHORT_TEXT, "voice": None}, 400, ''''voice' must be a voice's name or {"id": name}.''', "voice"),
    ({"input": SHORT_TEXT, "voice": {"id": BUILTIN, "name": "x"}}, 400, "'voice' must be a voice's name", "voice"),
    ({"input": SHORT_TEXT, "voice": BUILTIN, "\ud800": 1}, 400, "A field's name is not valid Unicode text", None),
]


@pytest.mark.parametrize("body,status,message,param", HOSTILE, ids=[m[:30] for _, _, m, _ in HOSTILE])
def test_hostile_bodies_get_one_openai_error_and_change_nothing(served, body, status, message, param):
    ctx, base_url, _, _ = served
    keys = ctx.keys(("voices/", "output/"))
    assert_openai_error(api(base_url, "POST", "/v1/audio/speech", json=body), status, message, param)
    assert ctx.keys(("voices/", "output/")) == keys


def test_bodies_that_are_not_json_or_too_large(served):
    _, base_url, _, _ = served
    assert_openai_error(api(base_url, "POST", "/v1/audio/speech", data=b"{not json"), 400,
                        "The request body must be JSON.")
    nested = b"[" * 200_000  # past Python's recursion depth, well under the body limit
    assert_openai_error(api(base_url, "POST", "/v1/audio/speech", data=nested), 400, "The request body must be JSON.")
    # valid JSON with an integer past int()'s 4,300 digits: the field's bound, as the queue face says it
    for digits in ("9" * 5000, "-" + "9" * 5000):
        long_seed = f'{{"input": "Hi.", "voice": "{BUILTIN}", "seed": {digits}}}'.encode()
        assert_openai_error(api(base_url, "POST", "/v1/audio/speech", data=long_seed,
                                headers={"Content-Type": "application/json"}), 400,
                            f"'seed' must be at {'least 0' if digits[0] == '-' else 'most 2147483647'}.", "seed")
    assert_openai_error(api(base_url, "GET", "/v1/audio/voices?cursor=%ED%A0%80"), 400, "'cursor' is not one a list_voices page returned", "cursor")
    huge = json.dumps({"input": "a" * (JSON_BODY_BYTES + 10), "voice": BUILTIN}).encode()
    assert_openai_error(api(base_url, "POST", "/v1/audio/speech", data=huge), 413, "The request body is larger")

    def chunked():  # no Content-Length: refused as the bytes pass the limit, never read whole
        for _ in range(JSON_BODY_BYTES // 65536 + 2):
            yield b" " * 65536
    assert_openai_error(api(base_url, "POST", "/v1/audio/speech", data=chunked()), 413, "The request body is larger")
    assert_openai_error(api(base_url, "GET", "/v1/nothing"), 404, "There is no route")
    # no 307 to a URL built from the request's Host header: a trailing slash is a route that does not exist
    slashed = api(base_url, "GET", "/v1/models/", headers={"Host": "elsewhere.example"}, allow_redirects=False)
    assert_openai_error(slashed, 404, "There is no route '/v1/models/'")
    assert_openai_error(api(base_url, "PUT", "/v1/audio/speech"), 405, "PUT is not allowed")


def test_the_longest_text_a_job_takes_is_not_refused_for_its_json_escaping(served):
    """100,000 characters outside the BMP (CJK Extension B, emoji) are 1.2 MB as json.dumps and
    requests' ``json=`` write them (a surrogate pair each, 12 bytes): the body limit had been 1 MiB,
    so the HTTP face answered 413 for a text the queue face takes. It gets the job's own answer."""
    _, base_url, _, _ = served
    body = {"model": "tts-1", "input": "\U00020000" * 100_000, "voice": "nobody-here", "ref_text": "\U0001F600" * 500}
    assert len(json.dumps(body)) > 1 << 20
    assert_openai_error(api(base_url, "POST", "/v1/audio/speech", json=body), 404, "")


def test_bad_voice_uploads_are_refused_with_nothing_stored(served):
    ctx, base_url, _, _ = served
    keys = ctx.keys(("voices/",))
    assert_openai_error(api(base_url, "POST", "/v1/audio/voices", files={"file": ("x.wav", b"not audio", "audio/wav")},
                            data={"name": "junk"}), 400, "The voice file is not decodable audio")
    assert_openai_error(api(base_url, "POST", "/v1/audio/voices", data={"name": "nofile"}), 400,
                        "The form needs the voice's audio as a 'file' part.")
    assert_openai_error(api(base_url, "POST", "/v1/audio/voices", files={"file": ("x.wav", builtin_clip(), "audio/wav")},
                            data={"name": "../escape"}), 400, "'name' must be a file name", "name")
    assert_openai_error(api(base_url, "GET", "/v1/audio/voices", params={"limit": "lots"}), 400,
                        "'limit' must be an integer.")
    assert_openai_error(api(base_url, "GET", "/v1/audio/voices", params={"limit": "\u00b2"}), 400,
                        "'limit' must be an integer.")  # a digit to str.isdigit, not to int()
    assert_openai_error(api(base_url, "GET", "/v1/audio/voices", params={"limit": "9" * 5000}), 400,
                        "'limit' must be at most")  # past int()'s 4,300 digits: the bound, not a 500
    assert_openai_error(api(base_url, "POST", "/v1/audio/voices", files={"file": ("x.wav", b"", "audio/wav")},
                            data={"name": "empty"}), 400, "'file' must not be empty.", "file")
    assert ctx.keys(("voices/",)) == keys


def test_an_unknown_form_field_or_query_parameter_is_refused_and_shown_clean(served, caplog):
    """A typo in the form (``ref_txt``) would store Whisper's transcript in place of the caller's,
    so it is refused as the queue face refuses an unknown field; a name with a line break or a
    terminal escape is repeated with '?' there, in the answer and in the log."""
    ctx, base_url, _, _ = served
    keys = ctx.keys(("voices/",))
    assert_openai_error(api(base_url, "POST", "/v1/audio/voices", files={"file": ("x.wav", builtin_clip(), "audio/wav")},
                            data={"name": "typo", "ref_txt": "What I said."}), 400,
                        "Unknown form field 'ref_txt'; known: file, name, ref_text.", "ref_txt")
    assert ctx.keys(("voices/",)) == keys
    with caplog.at_level(logging.INFO):
        forged = api(base_url, "GET", "/v1/audio/voices", params={"a\nFAKE LINE\x1b[31m": "1"})
    assert_openai_error(forged, 400, "Unknown query parameter 'a?FAKE LINE?[31m'; known: limit, cursor, details.",
                        "a?FAKE LINE?[31m")
    assert not any("\n" in r.getMessage() or "\x1b" in r.getMessage() for r in caplog.records)


def test_results_are_not_stored_by_default(client, served):
    ctx, _, _, _ = served
    before = ctx.keys(("output/",))
    _, job_id = speak(client, response_format="wav")
    assert record(ctx, job_id)["output_key"] is None
    assert ctx.keys(("output/",)) == before


# --- a client that reads slowly ---------------------------------------------------------------------
def test_the_unsent_bytes_keep_their_order_across_memory_and_disk(tmp_path):
    from f5worker.http.spool import READ_BYTES, ByteSpool

    spool = ByteSpool(tmp_path, memory_bytes=10)
    sent, got = [], []
    pieces = [b"abc", b"defgh", b"ij", b"klmnop", b"q" * (READ_BYTES + 5), b"rs"]
    for k, piece in enumerate(pieces):  # taking one piece for every two put
        spool.put(piece)
        sent.append(piece)
        if k % 2:
            got.append(spool.take())
    assert spool.in_memory <= 10 and spool.on_disk > 0
    while spool:
        got.append(spool.take())
    assert b"".join(got) == b"".join(sent) and spool.take() == b""
    spool.put(b"tu")  # drained: memory again, the file emptied
    assert (spool.in_memory, spool.written) == (2, 0) and spool.take() == b"tu"
    spool.close()


def test_a_slow_reader_costs_the_worker_disk_not_memory(served, monkeypatch, jobs):
    """A client that plays as it reads takes the audio far slower than a GPU samples it, and the
    job does not wait for it: what the client had not read piled up in memory (a 48 kHz chapter's
    PCM about 0.9 GB). Past the spool's memory bound (lowered here to 256 KiB) it waits in a temp
    file, and the client still gets every byte, in order."""
    import http.client
    import socket

    from f5worker.http import spool

    ctx, base_url, _, _ = served
    monkeypatch.setattr(spool, "MEMORY_BYTES", 256 << 10)
    body = json.dumps({"model": "tts-1", "input": " ".join(f"Sentence {i} goes on for a while and ends." for i in range(24)),
                       "voice": BUILTIN, "response_format": "pcm", "sample_rate": 48000, "nfe_step": NFE}).encode()
    port = int(base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 120
        while not jobs or not jobs[0].stream.closed:  # the client reads nothing until the job has sampled it all
            assert time.monotonic() < deadline, "the job did not finish sampling"
            time.sleep(0.05)
        job = jobs[0]
        produced = job.stream.bytes_sent
        # the sockets' kernel buffers take a few MB on loopback; the rest waits on disk, not in memory
        assert job.unsent.in_memory <= 256 << 10 and job.unsent.on_disk > 1 << 20, (produced, job.unsent.in_memory,
                                                                                     job.unsent.on_disk)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # the client reads at last, at speed
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        data = answer.read()
    assert answer.status == 200 and len(data) == produced
    assert record(ctx, answer.getheader("x-job-id"))["audio_seconds"] == pytest.approx(len(data) / 2 / 48000, abs=1e-3)


# --- clients that are slow, silent or gone -------------------------------------------------------
def raw_request(base_url: str, head: str, body: bytes = b"", rcvbuf: int | None = None):
    """A socket that has sent ``head`` (a request line and headers, with the key) and ``body``."""
    import socket

    sock = socket.create_connection(("127.0.0.1", int(base_url.rsplit(":", 1)[1])))
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.sendall(f"{head}\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode() + body)
    return sock


def wait_for(condition, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.mark.parametrize("path,content_type,first_byte", [("/v1/audio/speech", "application/json", b"{"),
                                                          ("/v1/audio/voices", "multipart/form-data; boundary=b", b"-")])
def test_a_body_that_never_arrives_is_refused_with_408_and_frees_its_place(served, monkeypatch, path, content_type,
                                                                           first_byte):
    """A client that sent its headers and one byte of its body, then nothing, held one of the
    worker's F5_MAX_CONCURRENCY places for as long as it kept the connection open: sixteen such
    connections and every other request got 429. The body now has a deadline (lowered here to 1 s)."""
    import http.client

    from f5worker.http import gate

    _, base_url, _, state = served
    monkeypatch.setattr(gate, "BODY_BASE_S", 1)
    monkeypatch.setattr(gate, "SLOWEST_BODY_BYTES_PER_S", 1 << 40)
    with raw_request(base_url, f"POST {path} HTTP/1.1\r\nContent-Type: {content_type}\r\nContent-Length: 100",
                     first_byte) as sock:
        wait_for(lambda: state.in_flight == 1, "the request took no place")
        sock.settimeout(20)
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        body = json.loads(answer.read())
    assert answer.status == 408 and body["error"]["code"] == "request_timeout", body
    assert body["error"]["message"] == "The request body did not arrive within the 1 s this route allows for it."
    wait_for(lambda: state.in_flight == 0, "the slot was kept")


def test_a_client_gone_before_its_body_arrived_is_no_error_in_the_log(served, caplog):
    """uvicorn logged 'Exception in ASGI application' and starlette's ClientDisconnect traceback."""
    _, base_url, _, state = served
    with caplog.at_level("INFO"):
        with raw_request(base_url, "POST /v1/audio/speech HTTP/1.1\r\nContent-Length: 100", b'{"in'):
            wait_for(lambda: state.in_flight == 1, "the request took no place")
        wait_for(lambda: state.in_flight == 0, "the slot was kept")
        wait_for(lambda: any("went away before its request's body arrived" in r.getMessage() for r in caplog.records),
                 "the disconnect was not logged")
    assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records]


def unread_speech_request(base_url: str):
    """A socket that asked for a long 48 kHz PCM answer and reads none of it (a 4 KiB buffer)."""
    body = json.dumps({"model": "tts-1", "input": " ".join(f"Sentence {i} goes on for a while and ends." for i in range(24)),
                       "voice": BUILTIN, "response_format": "pcm", "sample_rate": 48000, "nfe_step": NFE}).encode()
    head = f"POST /v1/audio/speech HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    return raw_request(base_url, head, body, rcvbuf=4096)


def test_a_client_that_reads_nothing_frees_its_place_when_its_job_ends(served, jobs):
    """A client that never read its answer held its place after its job had ended, blocked in
    uvicorn's send for as long as the socket stayed open: four such clients and a worker of
    F5_MAX_CONCURRENCY=4 refused everyone. The place now goes with the job."""
    _, base_url, _, state = served
    with unread_speech_request(base_url):
        wait_for(lambda: jobs and jobs[0].task.done(), "the job did not end", seconds=110)  # within SEND_STALL_S
        assert jobs[0].task.result().error is None  # it ended as a job, not cut by the stall
        wait_for(lambda: state.in_flight == 0, "a client that reads nothing kept its place after its job ended")


def test_an_answer_its_client_takes_nothing_of_is_ended_after_the_stall(served, monkeypatch, jobs):
    """An answer its client takes nothing of for SEND_STALL_S (lowered here to 2 s) is ended, cut
    short, as if the client had gone (its job, if still running, is stopped): before, it waited in
    uvicorn's send for as long as the socket stayed open, holding its unsent audio."""
    import http.client

    from f5worker.http import speech

    _, base_url, _, state = served
    monkeypatch.setattr(speech, "SEND_STALL_S", 2)
    with unread_speech_request(base_url) as sock:
        wait_for(lambda: jobs and jobs[0].task.done(), "the answer was not ended", seconds=120)
        wait_for(lambda: state.in_flight == 0, "the slot was kept")
        sock.settimeout(20)
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        assert answer.status == 200
        with pytest.raises(http.client.IncompleteRead):
            answer.read()


def test_the_sdk_does_not_send_again_a_job_its_deadline_stopped(served, monkeypatch, jobs):
    """A job stopped at its deadline was answered 503 with Retry-After, and OpenAI's client (two
    retries by default) ran it three times: at the 600 s default, 30 minutes of GPU for one call.
    ``x-should-retry: false`` tells it not to."""

    _, base_url, probe, state = served
    monkeypatch.setattr(state.runner.guard, "timeout_s", 1)
    http = openai.DefaultHttpx2Client(trust_env=False)
    probe.hold()  # the model call waits, so the job passes its deadline
    try:
        with openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=2, http_client=http) as sdk:
            with pytest.raises(openai.InternalServerError) as raised:
                sdk.audio.speech.create(model="tts-1", input=SHORT_TEXT, voice=BUILTIN, extra_body={"nfe_step": NFE})
    finally:
        probe.release()
    assert raised.value.status_code == 503 and raised.value.code == "job_stopped"
    assert raised.value.response.headers["x-should-retry"] == "false"
    assert len(jobs) == 1, [job.job_id for job in jobs]


def test_the_sdk_does_not_send_again_a_model_whose_files_cannot_be_had(served, jobs):
    """A registered model whose files are on no volume and cannot be downloaded (this machine
    reaches no hub) was a plain storage error, answered "retry in 1 s": the SDK ran it three
    times, each trying the download again. It is ``model_unavailable``, final, as Whisper's is."""
    ctx, base_url, _, _ = served
    assert "F5TTS_Base" in ctx.worker.models.registry
    http = openai.DefaultHttpx2Client(trust_env=False)
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=2, http_client=http) as sdk:
        with pytest.raises(openai.InternalServerError) as raised:
            sdk.audio.speech.create(model="F5TTS_Base", input=SHORT_TEXT, voice=BUILTIN, extra_body={"nfe_step": NFE})
    assert raised.value.status_code == 503 and raised.value.code == "model_unavailable"
    assert raised.value.response.headers["x-should-retry"] == "false"
    assert "retry-after" not in raised.value.response.headers
    assert len(jobs) == 1, [job.job_id for job in jobs]


def test_which_failures_the_sdk_may_send_again():
    """A shutdown's job may run on another worker, and storage may be back in a second; a
    deadline, a setting to fix or a bug would fail the same way again."""
    from f5worker.errors import ModelFault, ModelUnavailable, StorageError, WorkerError
    from f5worker.http.errors import api_error
    from s3_utils import BucketMissing, Forbidden, StorageUnusable
    from f5worker.jobs.guard import JobStopped
    from f5worker.service import Outcome

    def headers(err: Exception) -> dict:
        return dict(api_error(Outcome({"error": str(err)}, err)).response().headers)

    assert headers(JobStopped("send it again", shutdown=True))["retry-after"] == "1"
    assert "x-should-retry" not in headers(JobStopped("send it again", shutdown=True))
    assert "x-should-retry" not in headers(WorkerError("storage"))
    assert headers(StorageError("timed out"))["retry-after"] == "1"
    for final in (JobStopped("deadline"), ModelUnavailable("no checkpoint"), RuntimeError("bug"),
                  BucketMissing("no bucket"), StorageUnusable("bad name"), Forbidden("403"),  # settings to fix
                  ModelFault("not finite", retry_helps=False)):  # the job's own seed: the same audio again
        assert headers(final)["x-should-retry"] == "false" and "retry-after" not in headers(final), final
    assert "x-should-retry" not in headers(ModelFault("not finite", retry_helps=True))  # another seed is drawn
    assert api_error(Outcome({"error": "x"}, ModelFault("x", retry_helps=True))).status == 500


def test_voice_names_keep_their_case_and_an_oversized_form_file_is_named_as_sent(served, monkeypatch):
    """'Case.WAV' was uploaded as 'Case.WAV' (refused: a stored name ends in '.wav') but deleted as
    'Case.WAV.wav'; both are now 'Case.WAV.wav'. An upload over F5_MAX_VOICE_BYTES named the queue
    face's 'voice_base64' and counted its base64 copy."""
    import dataclasses

    ctx, base_url, _, state = served
    clip = builtin_clip()
    uploaded = api(base_url, "POST", "/v1/audio/voices", files={"file": ("me.wav", clip, "audio/wav")},
                   data={"name": "Case.WAV"})
    assert uploaded.status_code == 200, uploaded.text
    assert (uploaded.json()["id"], uploaded.json()["voice_key"]) == ("Case.WAV", "voices/Case.WAV.wav")
    deleted = api(base_url, "DELETE", "/v1/audio/voices/Case.WAV")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True, deleted.text
    assert "voices/Case.WAV.wav" not in ctx.keys(("voices/",))
    monkeypatch.setattr(state, "settings", dataclasses.replace(state.settings, max_voice_bytes=len(clip) - 1))
    assert_openai_error(api(base_url, "POST", "/v1/audio/voices", files={"file": ("me.wav", clip, "audio/wav")},
                            data={"name": "too-big"}), 400,
                        f"'file' holds {len(clip)} bytes, more than the {len(clip) - 1} allowed", "file")
