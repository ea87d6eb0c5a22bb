"""The voice library through the handler: upload sources, normalisation, list, info, delete, and
the cache of prepared voices, on a local folder and on the real SeaweedFS S3 server.

Jobs go through ``make_handler(build_worker(...))`` as runpod sends them. Storage calls are counted
with ``CountingStorage``, a spy that passes every call to the real storage (nothing is faked), and
on S3 also by the HTTP answers botocore's own event hooks see.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from f5worker.jobs import audio
from f5worker.model.constants import TARGET_RMS
from f5worker.jobs.inputs import MAX_LIST_LIMIT
from f5worker.jobs.voices import BUILTIN_VOICES
from s3_utils import KeyNotFound, ObjectInfo
from tests.fixtures_models import SR, speechlike
from tests.fixtures_worker import Ctx, worker_ctx

NFE = 4
BUILTIN = "basic_ref_en.wav"
ONE_SOURCE = "Give exactly one of 'voice_file_url', 'voice_base64' or 'voice_s3_key'."


@pytest.fixture(scope="module", params=["local", "s3"])
def ctx(request, tiny_models, tiny_whisper, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"voices-{request.param}")
    s3_server = request.getfixturevalue("s3_server") if request.param == "s3" else None
    with worker_ctx(tiny_models, tiny_whisper, folder, s3_server, prefix="voices") as built:
        yield built


@pytest.fixture(autouse=True)
def _tmp_dir_left_empty(ctx):
    yield
    assert ctx.tmp_files() == [], "a job left files in the temp dir"


# --- helpers --------------------------------------------------------------------------------------
class CountingStorage:
    """The real storage, every call recorded as (method, first argument, result or the exception
    raised) and passed on."""

    def __init__(self, real):
        self.real = real
        self.calls: list[tuple[str, object, object]] = []

    def __getattr__(self, name):
        attr = getattr(self.real, name)
        if not callable(attr):
            return attr

        def counted(*args, **kwargs):
            try:
                result = attr(*args, **kwargs)
            except Exception as err:
                self.calls.append((name, args[0] if args else None, err))
                raise
            self.calls.append((name, args[0] if args else None, result))
            return result
        return counted


class spying:
    """The voice library's storage replaced by a ``CountingStorage`` of itself for a block."""

    def __init__(self, ctx: Ctx):
        self.library = ctx.worker.voices
        self.spy = CountingStorage(self.library.storage)

    def __enter__(self) -> CountingStorage:
        self.library.storage = self.spy
        return self.spy

    def __exit__(self, *exc):
        self.library.storage = self.spy.real


def name_for(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}.wav"


def wav_bytes(samples: np.ndarray, sr: int = SR, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, sr, format=fmt, subtype=subtype)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def upload_b64(ctx: Ctx, name: str, data: bytes, ref_text: str | None = "What the speaker says.") -> dict:
    job = {"endpoint": "upload", "voice_base64": b64(data), "voice_name": name}
    if ref_text is not None:
        job["ref_text"] = ref_text
    _, result = ctx.run(job)
    assert "error" not in result, result
    return result


def tts(ctx: Ctx, voice: str, seed: int = 7, text: str = "A short sentence to speak.") -> dict:
    _, result = ctx.run({"text": text, "local_voice": voice, "nfe_step": NFE, "seed": seed})
    assert "error" not in result, result
    return result


def put_raw(ctx: Ctx, key: str, data: bytes) -> None:
    """Write ``key`` the way someone else would (another worker, an operator): not through this
    worker's storage object."""
    if ctx.s3 is None:
        path = ctx.settings.local_storage_dir / key
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:  # in place, not by rename: the stat check must still see it
            f.write(data)
    else:
        ctx.s3.server.client().put_object(Bucket=ctx.s3.bucket, Key=key, Body=data)


def snapshot(ctx: Ctx) -> dict[str, str]:
    """Every object under voices/, output/ and incoming/ with its version (changed on any write)."""
    found = {}
    for prefix in ("voices/", "output/", "incoming/"):
        after = None
        while True:
            listing = ctx.worker.storage.list_objects(prefix, after)
            found.update((o.key, o.version) for o in listing.objects)
            if not listing.more:
                break
            after = listing.resume_after
    return found


def refused(ctx: Ctx, job_input, expected: str) -> str:
    """The job is answered with one sentence starting ``expected``, and storage is unchanged."""
    before = snapshot(ctx)
    job_id, result = ctx.run(job_input)
    assert set(result) == {"error"}, result
    message = result["error"]
    assert message.startswith(expected), message
    assert "\n" not in message and message.endswith(".")
    assert not re.search(r"[.!?]\s+[A-Z]", message[:-1]), f"more than one sentence: {message!r}"
    assert snapshot(ctx) == before
    record = json.loads(ctx.get_text(f"logs/{job_id}.json"))
    assert record["status"] == "error" and record["error"] == message
    return message


def stored_reference_rms(data: bytes) -> float:
    """The RMS of the reference synthesis makes of a stored voice."""
    samples, sr = audio.decode(data)
    ref = audio.prepare_reference(samples, sr)
    return float(np.sqrt(np.mean(np.square(ref, dtype=np.float64))))


# --- upload sources -------------------------------------------------------------------------------
def test_base64_upload_is_stored_mono_24k_and_loudness_normalised(ctx):
    """A quiet 44.1 kHz stereo FLAC: stored once as 24 kHz mono, at the RMS synthesis targets."""
    rate = 44100
    left = 0.2 * speechlike(3.0, seed=11, sr=rate)
    stereo = np.stack([left, 0.5 * left], axis=1)
    name = name_for("quiet")
    result = upload_b64(ctx, name, wav_bytes(stereo, rate, "FLAC"), ref_text="Quiet words.")
    assert result["sample_rate"] == 24000 and result["source_duration"] == pytest.approx(3.0, abs=1e-3)
    data = ctx.get_bytes(f"voices/{name}")
    info = sf.info(io.BytesIO(data))
    assert (info.samplerate, info.channels, info.subtype) == (24000, 1, "PCM_16")
    assert info.frames / 24000 == pytest.approx(result["duration"], abs=1e-3)
    assert stored_reference_rms(data) == pytest.approx(TARGET_RMS, rel=0.01)
    assert audio.embedded_transcript(data) == "Quiet words."
    source_rms = float(np.sqrt(np.mean(np.square(stereo.mean(axis=1)))))
    assert source_rms < 0.5 * TARGET_RMS  # so the stored level is the normalisation's doing


def test_loud_upload_is_brought_down_and_never_clips(ctx):
    loud = np.clip(4.0 * speechlike(2.0, seed=12), -1, 1).astype(np.float32)  # clipped, RMS far above 0.1
    name = name_for("loud")
    upload_b64(ctx, name, wav_bytes(loud))
    samples, _ = audio.decode(ctx.get_bytes(f"voices/{name}"))
    assert np.max(np.abs(samples)) <= audio.PEAK_LIMIT + 1 / 32768
    assert stored_reference_rms(ctx.get_bytes(f"voices/{name}")) <= TARGET_RMS * 1.01


def test_an_upload_whose_spike_would_silence_its_speech_is_refused(ctx):
    """One float sample at 1e30 in 3 s of speech: normalised to that peak the speech is gone, so
    every TTS with the voice would say it is almost silent; the upload says why instead."""
    spiked = speechlike(3.0, seed=14).astype(np.float32)
    spiked[SR] = 1e30
    refused(ctx, {"endpoint": "upload", "voice_base64": b64(wav_bytes(spiked, subtype="FLOAT")),
                  "voice_name": name_for("spike"), "ref_text": "Spiked words."},
            "The voice's loudest samples (peak 1e+30 times full scale) are so far above its speech that "
            "bringing them within range would leave the speech almost silent; remove them")


def test_a_float_upload_louder_than_full_scale_is_kept_and_usable(ctx):
    """Speech recorded as float far past full scale (peaks near 3), with overs of 4: legitimate,
    brought down to the target level like any loud upload."""
    loud = (8.0 * speechlike(3.0, seed=15)).astype(np.float32)
    loud[SR] = 4.0 * np.sign(loud[SR] or 1.0)
    name = name_for("float-loud")
    upload_b64(ctx, name, wav_bytes(loud, subtype="FLOAT"), ref_text="Loud float words.")
    assert stored_reference_rms(ctx.get_bytes(f"voices/{name}")) == pytest.approx(TARGET_RMS, rel=0.01)
    assert tts(ctx, name)["duration"] > 0


def test_base64_accepts_line_breaks_and_a_data_uri(ctx):
    data = wav_bytes(speechlike(2.0, seed=13))
    wrapped = "\n".join(b64(data)[i:i + 76] for i in range(0, len(b64(data)), 76))
    for text in (wrapped, "data:audio/wav;base64," + b64(data)):
        name = name_for("b64")
        _, result = ctx.run({"endpoint": "upload", "voice_base64": text, "voice_name": name, "ref_text": "Hi."})
        assert "error" not in result, result
        assert audio.embedded_transcript(ctx.get_bytes(f"voices/{name}")) == "Hi."


def test_bad_base64_is_refused(ctx):
    name = name_for("bad64")
    refused(ctx, {"endpoint": "upload", "voice_base64": "not base64 at all!", "voice_name": name},
            "'voice_base64' is not valid base64")
    refused(ctx, {"endpoint": "upload", "voice_base64": "QUJD", "voice_name": name},  # "ABC": not audio
            "The voice file is not decodable audio")


def test_base64_over_the_size_limit_is_refused_before_decoding(ctx):
    settings = ctx.worker.settings
    ctx.worker.settings = dataclasses.replace(settings, max_voice_bytes=10_000)
    try:
        message = refused(ctx, {"endpoint": "upload", "voice_base64": b64(wav_bytes(speechlike(1.5))),
                                "voice_name": name_for("big")},
                          "'voice_base64' holds 72044 bytes, more than the 10000 allowed")
    finally:
        ctx.worker.settings = settings
    assert "F5_MAX_VOICE_BYTES" in message


@pytest.mark.parametrize("sources", [(), ("voice_file_url", "voice_base64"),
                                     ("voice_base64", "voice_s3_key"),
                                     ("voice_file_url", "voice_base64", "voice_s3_key")])
def test_exactly_one_source(ctx, sources):
    values = {"voice_file_url": "http://127.0.0.1:9/x.wav", "voice_base64": "QUJD",
              "voice_s3_key": "incoming/x.wav"}
    message = refused(ctx, {"endpoint": "upload", "voice_name": name_for("two"),
                            **{s: values[s] for s in sources}}, ONE_SOURCE)
    assert message == ONE_SOURCE


def test_upload_from_a_key_under_incoming(ctx):
    data = wav_bytes(speechlike(2.0, seed=14), fmt="FLAC")
    put_raw(ctx, "incoming/team/carla.flac", data)
    refs = ["incoming/team/carla.flac"]
    if ctx.s3 is not None:
        refs.append(f"s3://{ctx.s3.bucket}/incoming/team/carla.flac")
    for ref in refs:
        name = name_for("carla")
        job_id, result = ctx.run({"endpoint": "upload", "voice_s3_key": ref, "voice_name": name,
                                  "ref_text": "Carla speaks."})
        assert "error" not in result, result
        assert result["source_duration"] == pytest.approx(2.0, abs=1e-3)
        assert audio.embedded_transcript(ctx.get_bytes(f"voices/{name}")) == "Carla speaks."
        assert json.loads(ctx.get_text(f"logs/{job_id}.json"))["source"] == "voice_s3_key"
    assert ctx.get_bytes("incoming/team/carla.flac") == data  # only read, never moved or changed


def test_keys_outside_incoming_and_other_buckets_are_refused(ctx, tmp_path):
    name = name_for("victim")
    upload_b64(ctx, name, wav_bytes(speechlike(2.0, seed=15)))
    for ref in [f"voices/{name}", "logs/x.json", "output/x.wav", "incoming/", "incoming/../voices/a.wav",
                "incoming//a.wav", "/incoming/a.wav", "incoming/./a.wav", "incoming\\a.wav"]:
        refused(ctx, {"endpoint": "upload", "voice_s3_key": ref, "voice_name": name_for("copy")},
                "'voice_s3_key' must be a file under 'incoming/'")
    if ctx.s3 is None:
        refused(ctx, {"endpoint": "upload", "voice_s3_key": "s3://any/incoming/a.wav", "voice_name": name_for("x")},
                "'voice_s3_key' names a bucket, but this worker keeps its files in a local folder")
    else:
        other = f"other-{ctx.s3.bucket}"
        assert refused(ctx, {"endpoint": "upload", "voice_s3_key": f"s3://{other}/incoming/a.wav",
                             "voice_name": name_for("x")},
                       f"'voice_s3_key' must be in this worker's bucket ('{ctx.s3.bucket}'), not '{other}'.")
    refused(ctx, {"endpoint": "upload", "voice_s3_key": "incoming/nobody.wav", "voice_name": name_for("x")},
            "'voice_s3_key' names 'incoming/nobody.wav', which is not in storage.")
    # the caller's key is repeated without its line breaks or escapes: no forged log line
    refused(ctx, {"endpoint": "upload", "voice_s3_key": "incoming/a\nFAKE LOG LINE\x1b[2J.wav",
                  "voice_name": name_for("x")},
            "'voice_s3_key' names 'incoming/a?FAKE LOG LINE?[2J.wav', which is not in storage.")


def test_key_over_the_size_limit_is_refused_without_reading_it(ctx):
    put_raw(ctx, "incoming/huge.wav", wav_bytes(speechlike(2.0, seed=16)))
    settings = ctx.worker.settings
    ctx.worker.settings = dataclasses.replace(settings, max_voice_bytes=1000)
    try:
        refused(ctx, {"endpoint": "upload", "voice_s3_key": "incoming/huge.wav", "voice_name": name_for("huge")},
                "'incoming/huge.wav' is 96044 bytes, more than the 1000 allowed (F5_MAX_VOICE_BYTES).")
    finally:
        ctx.worker.settings = settings


# --- list_voices ----------------------------------------------------------------------------------
def _list_all(ctx: Ctx, **kw) -> list[dict]:
    voices, cursor = [], None
    for _ in range(100):
        job = {"endpoint": "list_voices", **kw, **({"cursor": cursor} if cursor else {})}
        _, page = ctx.run(job)
        assert "error" not in page, page
        assert len(page["voices"]) <= kw.get("limit", 100)
        voices += page["voices"]
        cursor = page["next_cursor"]
        if cursor is None:
            return voices
    raise AssertionError("the listing never ended")


def test_list_voices_pages_through_every_voice_with_its_details(ctx, tiny_models, tiny_whisper, tmp_path):
    # A library of its own (a fresh worker on a fresh folder or bucket): the listing is exact.
    s3_server = ctx.s3.server if ctx.s3 is not None else None
    with worker_ctx(tiny_models, tiny_whisper, tmp_path, s3_server, prefix="listing") as lib:
        assert _list_all(lib) == []
        uploaded = {}
        for i in range(5):
            name = f"up{i}.wav"
            uploaded[name] = upload_b64(lib, name, wav_bytes(speechlike(1.5 + 0.5 * i, seed=i)),
                                        ref_text=f"Upload number {i}.")
        hand = wav_bytes(np.stack([speechlike(2.0, seed=30, sr=16000)] * 2, axis=1), 16000)
        put_raw(lib, "voices/hand.wav", hand)
        put_raw(lib, "voices/hand.wav.txt", " Written by a person. ".encode())
        put_raw(lib, "voices/heard.wav", wav_bytes(speechlike(2.0, seed=31)))
        heard = tts(lib, "heard.wav")  # Whisper's transcript is kept in voices/heard.wav.json
        assert heard["ref_text_source"] == "transcribed"
        put_raw(lib, "voices/orphan.wav.txt", b"A transcript whose voice is gone.")
        put_raw(lib, "voices/Not a voice name.wav", b"x")
        put_raw(lib, "voices/nested/deep.wav", wav_bytes(speechlike(1.0)))

        listed = _list_all(lib, limit=2)
        names = [v["voice_name"] for v in listed]
        assert names == sorted([*uploaded, "hand.wav", "heard.wav"])
        assert _list_all(lib) == listed  # one page or many: the same voices
        by_name = {v["voice_name"]: v for v in listed}
        for name, result in uploaded.items():
            entry = by_name[name]
            assert entry["duration"] == result["duration"] and entry["sample_rate"] == 24000
            assert (entry["transcript"], entry["transcript_source"]) == (result["ref_text"], "embedded")
        assert by_name["hand.wav"]["duration"] == 2.0 and by_name["hand.wav"]["sample_rate"] == 16000
        assert (by_name["hand.wav"]["transcript"], by_name["hand.wav"]["transcript_source"]) == \
            ("Written by a person.", "hand-written")
        learnt = json.loads(lib.get_text("voices/heard.wav.json"))["ref_text"]
        assert (by_name["heard.wav"]["transcript"], by_name["heard.wav"]["transcript_source"]) == (learnt, "whisper")
        for entry in listed:  # size and time as storage has them
            head = lib.worker.storage.head(f"voices/{entry['voice_name']}")
            assert entry["size"] == head.size == len(lib.get_bytes(f"voices/{entry['voice_name']}"))
            assert entry["last_modified"] == head.last_modified.isoformat(timespec="seconds").replace("+00:00", "Z")

        # Replaced by hand, the Whisper transcript no longer describes the audio: not listed as its.
        put_raw(lib, "voices/heard.wav", wav_bytes(speechlike(2.5, seed=32)))
        entry = {v["voice_name"]: v for v in _list_all(lib)}["heard.wav"]
        assert (entry["transcript"], entry["transcript_source"], entry["duration"]) == (None, None, 2.5)

        # Without details: names, sizes and times only, and no voice is read.
        with spying(lib) as spy:
            _, page = lib.run({"endpoint": "list_voices", "details": False, "limit": MAX_LIST_LIMIT})
        assert [v["voice_name"] for v in page["voices"]] == names and page["next_cursor"] is None
        assert set(page["voices"][0]) == {"voice_name", "size", "last_modified"}
        assert {call[0] for call in spy.calls} == {"list_objects"}


@pytest.mark.parametrize("name", ["alice.wav\n", "alice.wav\n\n", "\nalice.wav", "alice.WAV"])
def test_a_voice_name_is_the_whole_string(name):
    from f5worker.jobs.inputs import check_voice_name

    with pytest.raises(ValueError):
        check_voice_name(name)
    assert check_voice_name("alice.wav") == "alice.wav"


def test_list_voices_passes_folders_in_the_voices_prefix(ctx, tiny_models, tiny_whisper, tmp_path):
    """Folders under voices/ (an archive someone made) are no voices, and S3 counts each towards a
    listing's keys: pages of folders alone used to repeat their cursor for ever, or end a first
    page with no cursor, so voices after the folders were never shown."""
    s3_server = ctx.s3.server if ctx.s3 is not None else None
    with worker_ctx(tiny_models, tiny_whisper, tmp_path, s3_server, prefix="folders") as lib:
        voice = wav_bytes(speechlike(1.5, seed=40))
        for key in ("archive/x.wav", "backup/y.wav", "zoe.wav"):
            put_raw(lib, f"voices/{key}", voice)
        assert [v["voice_name"] for v in _list_all(lib, limit=1, details=False)] == ["zoe.wav"]
        put_raw(lib, "voices/cut-short.wav", voice[:30])  # cut off in its header: listed, nothing known
        assert {v["voice_name"]: v["duration"] for v in _list_all(lib)} == {"cut-short.wav": None, "zoe.wav": 1.5}
        lib.worker.storage.delete("voices/cut-short.wav")
        if lib.s3 is not None:  # a key no job can name ('$' once matched before a trailing newline)
            put_raw(lib, "voices/zoe.wav\n", voice)
        for key in ("a.wav", "b-archive/x.wav", "c-old/x.wav", "c-old/z.wav", "d.wav"):
            put_raw(lib, f"voices/{key}", voice)
        expected = ["a.wav", "d.wav", "zoe.wav"]
        assert [v["voice_name"] for v in _list_all(lib, limit=1, details=False)] == expected
        assert [v["voice_name"] for v in _list_all(lib, limit=2)] == expected


def test_list_voices_reads_a_few_kib_per_voice(ctx, tiny_models, tiny_whisper, tmp_path):
    s3_server = ctx.s3.server if ctx.s3 is not None else None
    with worker_ctx(tiny_models, tiny_whisper, tmp_path, s3_server, prefix="listcost") as lib:
        for i in range(3):
            upload_b64(lib, f"v{i}.wav", wav_bytes(speechlike(3.0, seed=40 + i)), ref_text=f"Voice {i}.")
        with spying(lib) as spy:
            _, page = lib.run({"endpoint": "list_voices"})
        assert len(page["voices"]) == 3
        reads = [call for call in spy.calls if call[0] != "list_objects"]
        assert sorted(call[1] for call in reads) == [f"voices/v{i}.wav" for i in range(3)]
        assert all(call[0] == "get_range" and len(call[2]) == audio.SUMMARY_READ_BYTES for call in reads)


def test_a_voice_deleted_while_listed_is_left_out(ctx, tmp_path):
    """Someone deletes a voice between the listing and the reading of its header."""
    from f5worker.jobs.voices import VoiceLibrary

    class DeletingMeanwhile(CountingStorage):
        def list_objects(self, *args, **kwargs):
            listed = self.real.list_objects(*args, **kwargs)
            self.real.delete("voices/gone-meanwhile.wav")
            return listed

    storage = ctx.worker.storage
    for name in ("gone-meanwhile.wav", "kept-meanwhile.wav"):
        put_raw(ctx, f"voices/{name}", wav_bytes(speechlike(1.5, seed=80)))
    voices, _ = VoiceLibrary(DeletingMeanwhile(storage)).list_page(MAX_LIST_LIMIT, None, True)
    names = [v["voice_name"] for v in voices]
    assert "kept-meanwhile.wav" in names and "gone-meanwhile.wav" not in names
    storage.delete("voices/kept-meanwhile.wav")


def test_a_voice_replaced_while_listed_is_described_by_one_take(ctx):
    """Someone replaces a voice between the listing and the reading of its header: its entry had
    the old take's size and time and the new one's transcript, a pair that never existed. Its
    reads now ask for the listed version, and a replaced voice is described whole by its new one."""
    from f5worker.jobs.voices import VoiceLibrary

    name = name_for("mix")
    upload_b64(ctx, name, wav_bytes(speechlike(2.0, seed=81)), ref_text="The old take.")

    class ReplacingMeanwhile(CountingStorage):
        def list_objects(self, *args, **kwargs):
            listed = self.real.list_objects(*args, **kwargs)
            if not hasattr(self, "new"):
                self.new = upload_b64(ctx, name, wav_bytes(speechlike(9.0, seed=82)), ref_text="The new take.")
            return listed

    storage = ReplacingMeanwhile(ctx.worker.storage)
    voices, _ = VoiceLibrary(storage).list_page(MAX_LIST_LIMIT, None, True)
    entry = next(v for v in voices if v["voice_name"] == name)
    now = ctx.worker.storage.head(f"voices/{name}")
    assert (entry["transcript"], entry["duration"]) == ("The new take.", storage.new["duration"])
    assert (entry["size"], entry["last_modified"]) == (now.size, now.last_modified.isoformat(timespec="seconds")
                                                       .replace("+00:00", "Z"))
    assert any(call[0] == "head" for call in storage.calls)  # the new version, asked for once it was seen
    ctx.worker.storage.delete(f"voices/{name}")


@pytest.mark.parametrize("job, expected", [
    ({"limit": 0}, "'limit' must be at least 1."),
    ({"limit": 1001}, "'limit' must be at most 1000."),
    ({"limit": "10"}, "'limit' must be an integer."),
    ({"details": "yes"}, "'details' must be true or false."),
    ({"cursor": "%%%"}, "'cursor' is not one a list_voices page returned"),
    ({"cursor": base64.urlsafe_b64encode(b"../logs/x").decode()}, "'cursor' is not one a list_voices page returned"),
])
def test_bad_listing_inputs_are_refused(ctx, job, expected):
    refused(ctx, {"endpoint": "list_voices", **job}, expected)


# --- voice_info -----------------------------------------------------------------------------------
def test_voice_info_of_an_uploaded_voice(ctx):
    name = name_for("info")
    result = upload_b64(ctx, name, wav_bytes(speechlike(2.5, seed=50)), ref_text="Info words.")
    _, info = ctx.run({"endpoint": "voice_info", "voice_name": name})
    data = ctx.get_bytes(f"voices/{name}")
    head = ctx.worker.storage.head(f"voices/{name}")
    assert info == {"voice_name": name, "voice_key": f"voices/{name}", "duration": result["duration"],
                    "used_duration": result["duration"], "sample_rate": 24000, "transcript": "Info words.",
                    "transcript_source": "embedded", "size": len(data),
                    "last_modified": head.last_modified.isoformat(timespec="seconds").replace("+00:00", "Z"),
                    "sha256": hashlib.sha256(data).hexdigest()}


def test_voice_info_tells_where_a_transcript_comes_from(ctx):
    long_name, short_name = name_for("longhand"), name_for("shorthand")
    put_raw(ctx, f"voices/{long_name}", wav_bytes(speechlike(20.0, seed=51)))
    put_raw(ctx, f"voices/{long_name}.txt", b"Twenty seconds of words.")
    put_raw(ctx, f"voices/{short_name}", wav_bytes(speechlike(3.0, seed=52)))
    put_raw(ctx, f"voices/{short_name}.txt", b"Three seconds of words.")
    _, short = ctx.run({"endpoint": "voice_info", "voice_name": short_name})
    assert (short["transcript"], short["transcript_source"]) == ("Three seconds of words.", "hand-written")
    _, long = ctx.run({"endpoint": "voice_info", "voice_name": long_name})
    assert long["duration"] == 20.0 and long["used_duration"] <= 12.0
    assert (long["transcript"], long["transcript_source"]) == (None, None)  # the .txt is of the whole clip
    # Whisper hears the used part and its transcript is kept (even if the tiny model's random words
    # then make the job fail)
    ctx.run({"text": "Hello there.", "local_voice": long_name, "nfe_step": NFE, "seed": 1})
    _, long = ctx.run({"endpoint": "voice_info", "voice_name": long_name})
    assert long["transcript_source"] == "whisper" and long["transcript"]
    _, builtin = ctx.run({"endpoint": "voice_info", "voice_name": BUILTIN})
    assert (builtin["transcript"], builtin["transcript_source"]) == (BUILTIN_VOICES[BUILTIN][1], "built-in")
    assert builtin["voice_key"] is None and builtin["sha256"] is None


def test_an_unreadable_sidecar_counts_as_no_transcript(ctx, caplog):
    """A hand-placed .txt in Latin-1 and a .json that is not UTF-8 (a UTF-16 byte-order mark): each
    voice reads as one without a transcript (voice_info, the listing, a TTS that has Whisper
    transcribe it), logged once per key; a UTF-8 .txt with a byte-order mark is read without it."""
    latin, utf16, bom = name_for("latin"), name_for("utf16"), name_for("bom")
    for seed, name in enumerate((latin, utf16, bom)):
        put_raw(ctx, f"voices/{name}", wav_bytes(speechlike(3.0, seed=53 + seed)))
    put_raw(ctx, f"voices/{latin}.txt", b"Voil\xe0, caf\xe9")
    put_raw(ctx, f"voices/{utf16}.json", b"\xff\xfe{")
    put_raw(ctx, f"voices/{bom}.txt", "\ufeffVoilà, café".encode("utf-8"))
    caplog.set_level("WARNING", logger="f5worker.jobs.voices")
    for _ in range(2):
        for name in (latin, utf16):
            _, info = ctx.run({"endpoint": "voice_info", "voice_name": name})
            assert (info["transcript"], info["transcript_source"]) == (None, None), info
        listed = {v["voice_name"]: v for v in _list_all(ctx)}
        assert (listed[latin]["transcript"], listed[utf16]["transcript"]) == (None, None)
        assert listed[latin]["duration"] == 3.0
    _, info = ctx.run({"endpoint": "voice_info", "voice_name": bom})
    assert (info["transcript"], info["transcript_source"]) == ("Voilà, café", "hand-written")
    assert listed[bom]["transcript"] == "Voilà, café"
    warnings = [r.getMessage() for r in caplog.records if r.name == "f5worker.jobs.voices"]
    assert sorted(warnings) == sorted(
        f"voice sidecar voices/{key} is not UTF-8 text; it counts as no transcript (sidecars are read as UTF-8)"
        for key in (f"{latin}.txt", f"{utf16}.json")), warnings
    for name in (latin, utf16):  # the no-transcript path: Whisper hears it, and its transcript is kept
        _, result = ctx.run({"text": "Hello there.", "local_voice": name, "nfe_step": NFE, "seed": 1})
        assert "Internal error" not in result.get("error", ""), result
        _, info = ctx.run({"endpoint": "voice_info", "voice_name": name})
        assert info["transcript_source"] == "whisper" and info["transcript"], info


def test_a_stored_voice_larger_than_a_voice_may_be_is_refused_before_it_is_read(ctx, monkeypatch):
    """A WAV put in voices/ by hand is held to F5_MAX_VOICE_BYTES, as an upload's source is: it was
    copied whole to the temp folder and read into memory by every job naming it (300 MiB for a
    long recording) before the length check refused it."""
    data = wav_bytes(speechlike(3.0, seed=41))
    put_raw(ctx, "voices/too-big.wav", data)
    monkeypatch.setattr(ctx.worker.voices, "max_voice_bytes", len(data) - 1)
    reads = []
    real_read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda path: reads.append(path.name) or real_read(path))
    expected = f"The stored voice 'too-big.wav' is {len(data)} bytes, more than the {len(data) - 1} a voice may be"
    refused(ctx, {"endpoint": "voice_info", "voice_name": "too-big.wav"}, expected)
    refused(ctx, {"text": "Hello there.", "local_voice": "too-big.wav", "nfe_step": 2}, expected)
    assert "voice.wav" not in reads
    monkeypatch.setattr(ctx.worker.voices, "max_voice_bytes", len(data))
    _, info = ctx.run({"endpoint": "voice_info", "voice_name": "too-big.wav"})
    assert info["duration"] == 3.0
    ctx.worker.storage.delete("voices/too-big.wav")


def test_voice_info_of_a_missing_voice(ctx):
    refused(ctx, {"endpoint": "voice_info", "voice_name": "nobody-at-all.wav"},
            "Voice 'nobody-at-all.wav' was not found; upload it first with the upload endpoint.")


# --- delete_voice ---------------------------------------------------------------------------------
def test_delete_voice_removes_it_and_what_lies_beside_it(ctx):
    name = name_for("gone")
    put_raw(ctx, f"voices/{name}", wav_bytes(speechlike(2.0, seed=60)))
    put_raw(ctx, f"voices/{name}.txt", b"Hand written.")
    tts(ctx, name)  # cached now
    ctx.worker.storage.put_json(f"voices/{name}.json", {"sha256": "x", "ref_text": "old"})
    neighbour = name_for("stays")
    upload_b64(ctx, neighbour, wav_bytes(speechlike(2.0, seed=61)))
    others = ctx.keys() - {f"voices/{name}", f"voices/{name}.txt", f"voices/{name}.json"}

    job_id, result = ctx.run({"endpoint": "delete_voice", "voice_name": name})
    assert result == {"voice_name": name, "deleted_keys": [f"voices/{name}", f"voices/{name}.txt",
                                                           f"voices/{name}.json"]}
    assert ctx.keys() == others
    assert json.loads(ctx.get_text(f"logs/{job_id}.json"))["status"] == "ok"
    assert ctx.worker.voices.cache.get(name) is None
    # Deleting again changes nothing and says so; the voice is gone for synthesis too.
    refused(ctx, {"endpoint": "delete_voice", "voice_name": name},
            f"Voice '{name}' was not found, so nothing was deleted.")
    refused(ctx, {"text": "Hello.", "local_voice": name}, f"Voice '{name}' was not found")


def test_a_voice_deleted_while_it_is_transcribed_leaves_no_transcript_behind(ctx, monkeypatch):
    """The transcript was written after the delete had removed what lay beside the voice: an
    orphan ``voices/<name>.json`` that no listing shows and no delete could remove ("not found").
    The delete runs inside the transcription, as a delete job on another thread would."""
    name = name_for("heard")
    put_raw(ctx, f"voices/{name}", wav_bytes(speechlike(2.0, seed=62)))
    real = ctx.worker.voices.transcribe
    deleted = []

    def transcribe_while_deleted(samples, sr):
        deleted.append(ctx.worker.voices.delete(name))
        return real(samples, sr)
    monkeypatch.setattr(ctx.worker.voices, "transcribe", transcribe_while_deleted)
    result = tts(ctx, name)
    assert result["ref_text_source"] == "transcribed" and deleted == [[f"voices/{name}"]]
    assert not {k for k in ctx.keys() if k.startswith(f"voices/{name}")}, ctx.keys()


def test_delete_refuses_built_in_and_bad_names(ctx):
    refused(ctx, {"endpoint": "delete_voice", "voice_name": BUILTIN},
            f"Voice '{BUILTIN}' is built in and cannot be deleted.")
    refused(ctx, {"endpoint": "delete_voice", "voice_name": "../logs/x.wav"}, "'voice_name' must be a file name")
    refused(ctx, {"endpoint": "delete_voice"}, "Missing required input 'voice_name'.")


# --- the cache of prepared voices -----------------------------------------------------------------
def _transfers(calls) -> list[tuple[str, object]]:
    """The calls that moved an object's content."""
    return [(name, key) for name, key, result in calls
            if name in ("download_file", "get_text", "get_range")
            or (name == "download_if_changed" and isinstance(result, ObjectInfo))]


def test_a_repeat_voice_costs_no_transfer_and_a_replaced_one_is_used_fresh(ctx):
    name = name_for("cached")
    upload_b64(ctx, name, wav_bytes(speechlike(3.0, seed=70)), ref_text="The first voice.")
    answers = []
    if ctx.s3 is not None:  # what crossed the wire, as botocore saw it
        hook = lambda http_response, model, **_: answers.append((model.name, http_response.status_code))  # noqa: E731
        ctx.worker.storage.client.meta.events.register("after-call.s3.GetObject", hook)
    try:
        with spying(ctx) as spy:
            first = tts(ctx, name)
            assert _transfers(spy.calls) == [("download_if_changed", f"voices/{name}")]
            spy.calls.clear()
            repeat = tts(ctx, name)
            assert spy.calls == [("download_if_changed", f"voices/{name}", None)]  # one bodiless answer
        assert ctx.fetch_url(repeat["audio_url"]) == ctx.fetch_url(first["audio_url"])
        if ctx.s3 is not None:
            assert answers == [("GetObject", 200), ("GetObject", 304)]

        # Replaced by someone else (another worker, an operator): the next job reads the new object.
        put_raw(ctx, f"voices/{name}", audio.voice_wav_bytes(speechlike(2.0, seed=71), SR, "The second voice."))
        with spying(ctx) as spy:
            second = tts(ctx, name)
        assert _transfers(spy.calls) == [("download_if_changed", f"voices/{name}")]
        assert ctx.worker.voices.cache.get(name).sha256 == hashlib.sha256(ctx.get_bytes(f"voices/{name}")).hexdigest()
        assert ctx.fetch_url(second["audio_url"]) != ctx.fetch_url(first["audio_url"])
        # Replaced by this worker's own upload job, too.
        upload_b64(ctx, name, wav_bytes(speechlike(2.5, seed=72)), ref_text="The third voice.")
        third = tts(ctx, name)
        assert ctx.worker.voices.cache.get(name).embedded_text == "The third voice."
        # What the cache serves is what a fresh read gives.
        ctx.worker.voices.cache.drop(name)
        assert ctx.fetch_url(tts(ctx, name)["audio_url"]) == ctx.fetch_url(third["audio_url"])
    finally:
        if ctx.s3 is not None:
            ctx.worker.storage.client.meta.events.unregister("after-call.s3.GetObject", hook)


def test_a_built_in_voice_is_prepared_once(ctx):
    tts(ctx, BUILTIN)
    with spying(ctx) as spy:
        tts(ctx, BUILTIN)
    [(method, key, answer)] = spy.calls  # "is there a stored voice of that name?" is still asked
    assert (method, key, type(answer)) == ("download_if_changed", f"voices/{BUILTIN}", KeyNotFound)
    assert ctx.worker.voices.cache.get(BUILTIN).info is None


def test_cache_size_zero_reads_every_time(ctx):
    name = name_for("uncached")
    upload_b64(ctx, name, wav_bytes(speechlike(2.0, seed=73)))
    library = ctx.worker.voices
    kept = library.cache.capacity
    library.cache.capacity = 0
    library.cache.drop(name)
    try:
        with spying(ctx) as spy:
            tts(ctx, name)
            tts(ctx, name)
        assert _transfers(spy.calls) == [("download_if_changed", f"voices/{name}")] * 2
        assert library.cache.get(name) is None
    finally:
        library.cache.capacity = kept


def test_cache_keeps_the_most_recently_used(tmp_path):
    from f5worker.jobs.voices import VoiceLibrary
    from s3_utils import LocalStorage

    storage = LocalStorage(tmp_path / "st")
    library = VoiceLibrary(storage, cache_size=2)
    for i in range(3):
        storage.upload_file(f"voices/v{i}.wav", _file(tmp_path, f"v{i}.wav", speechlike(1.5, seed=i)), "audio/wav")
    staged = tmp_path / "staged.wav"
    library.fetch("v0.wav", staged)
    library.fetch("v1.wav", staged)
    library.fetch("v0.wav", staged)  # v0 used last: v1 is the oldest
    library.fetch("v2.wav", staged)
    assert len(library.cache) == 2
    assert library.cache.get("v1.wav") is None and library.cache.get("v0.wav") and library.cache.get("v2.wav")
    # A file rewritten in place (same inode) is still seen as new.
    path = storage.path_for("voices/v0.wav")
    inode = path.stat().st_ino
    shutil.copyfile(_file(tmp_path, "new.wav", speechlike(2.5, seed=9)), path)
    assert path.stat().st_ino == inode
    assert library.fetch("v0.wav", staged).seconds == 2.5
    os.utime(path)  # only touched: read again (the version cannot know the content is the same)
    assert library.fetch("v0.wav", staged).seconds == 2.5


def _file(folder: Path, name: str, samples: np.ndarray) -> Path:
    path = folder / name
    sf.write(str(path), samples, SR, subtype="PCM_16")
    return path
