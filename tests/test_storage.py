"""The storage layer (s3_utils) against a real S3 server (SeaweedFS over HTTPS, see
fixtures_s3) and against local folders. No mocks: every S3 call here crosses the wire."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from f5worker.errors import StorageError
from f5worker.settings import (ENV_AWS_ACCESS_KEY_ID, ENV_AWS_CA_BUNDLE, ENV_AWS_ENDPOINT_URL,
                               ENV_AWS_SECRET_ACCESS_KEY, ENV_LOCAL_RETENTION_HOURS,
                               ENV_LOCAL_STORAGE_DIR, ENV_MAX_CONCURRENCY, ENV_MAX_VOICE_BYTES,
                               ENV_PRESIGN_EXPIRY, ENV_S3_BUCKET,
                               ENV_S3_CONNECT_TIMEOUT, ENV_S3_MAX_ATTEMPTS, ENV_S3_READ_TIMEOUT,
                               INCOMING_PREFIX, LOGS_PREFIX, OUTPUT_PREFIX, VOICES_PREFIX, Settings)
from s3_utils import (SWEEP_INTERVAL_S, KeyNotFound, Listing, LocalStorage, ObjectTooLarge, S3Storage,
                      VersionChanged, atomic_write, call_bound_s, make_s3_client, make_storage, past_folder)
from tests.fixtures_worker import worker_ctx

# Headers Backblaze B2 (and other S3-compatible services) reject: boto3 >= 1.36 sends them by
# default unless request_checksum_calculation / response_checksum_validation are "when_required".
B2_REJECTED_PREFIXES = ("x-amz-checksum-", "x-amz-sdk-checksum-algorithm", "x-amz-trailer")
MB = 1024 * 1024


def _write(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(params=["s3", "local"])
def storage(request, tmp_path):
    """Each backend in turn: the behaviour the worker relies on must be the same on both."""
    if request.param == "s3":
        return S3Storage(request.getfixturevalue("s3_env").settings)
    return LocalStorage(tmp_path / "storage")


# --- behaviour shared by both backends ------------------------------------------------------------

def test_file_round_trip(storage, tmp_path):
    src = _write(tmp_path / "in.wav", 300_000)
    key = f"{VOICES_PREFIX}alice.wav"
    assert not storage.exists(key)
    storage.upload_file(key, src, "audio/wav")
    assert storage.exists(key)
    dest = tmp_path / "out" / "nested" / "alice.wav"  # missing parent folders are created
    storage.download_file(key, dest)
    assert _sha(dest) == _sha(src)


def test_text_and_json_round_trip(storage):
    key = f"{VOICES_PREFIX}alice.txt"
    storage.put_text(key, "Grüße, 世界 — done.")
    assert storage.get_text(key) == "Grüße, 世界 — done."
    storage.put_text(key, "replaced")
    assert storage.get_text(key) == "replaced"
    storage.put_json(f"{LOGS_PREFIX}job-1.json", {"status": "ok", "text": "héllo", "n": [1, 2]})
    assert json.loads(storage.get_text(f"{LOGS_PREFIX}job-1.json")) == {
        "status": "ok", "text": "héllo", "n": [1, 2]}


def test_missing_key(storage, tmp_path):
    key = f"{VOICES_PREFIX}nobody.wav"
    dest = tmp_path / "nobody.wav"
    with pytest.raises(KeyNotFound) as info:
        storage.download_file(key, dest)
    assert isinstance(info.value, StorageError) and info.value.key == key
    assert key in str(info.value)
    assert not dest.exists()
    assert storage.get_text(key) is None
    assert storage.exists(key) is False


def test_delete(storage):
    key = f"{OUTPUT_PREFIX}job-2.wav"
    storage.put_text(key, "x")
    storage.delete(key)
    assert not storage.exists(key)
    storage.delete(key)  # deleting what is not there is fine


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "voices/../../x", "voices/./a.wav",
                                 "voices//a.wav", "voices/", "", "voices\\..\\x"])
@pytest.mark.parametrize("backend", ["s3", "local"])
def test_refuses_unsafe_keys(backend, key, tmp_path):
    # Keys are checked before any request: the S3 endpoint is a closed port, so a key that got
    # through would fail with "could not connect" instead.
    storage = LocalStorage(tmp_path / "st") if backend == "local" else S3Storage(Settings.from_env(
        {ENV_S3_BUCKET: "b", ENV_AWS_ENDPOINT_URL: "https://127.0.0.1:9",
         ENV_AWS_ACCESS_KEY_ID: "AK", ENV_AWS_SECRET_ACCESS_KEY: "secret"}))
    for call in (lambda: storage.put_text(key, "x"), lambda: storage.get_text(key),
                 lambda: storage.exists(key), lambda: storage.delete(key),
                 lambda: storage.result_url(key),
                 lambda: storage.download_file(key, tmp_path / "d"),
                 lambda: storage.download_if_changed(key, tmp_path / "d", None),
                 lambda: storage.head(key), lambda: storage.get_range(key, 0, 10),
                 lambda: storage.list_objects(key + "/"),
                 lambda: storage.upload_file(key, _write(tmp_path / "u", 10), "audio/wav")):
        with pytest.raises(StorageError, match="is not allowed"):
            call()


def test_head_describes_without_reading(storage, tmp_path):
    key = f"{VOICES_PREFIX}alice.wav"
    storage.upload_file(key, _write(tmp_path / "a.wav", 1234), "audio/wav")
    info = storage.head(key)
    assert info.key == key and info.size == 1234
    assert info.last_modified.utcoffset().total_seconds() == 0
    assert abs(info.last_modified.timestamp() - time.time()) < 120
    storage.upload_file(key, _write(tmp_path / "b.wav", 1234), "audio/wav")  # same size, new content
    assert storage.head(key).version != info.version
    with pytest.raises(KeyNotFound):
        storage.head(f"{VOICES_PREFIX}nobody.wav")


def test_list_objects_pages_in_key_order(storage, tmp_path):
    names = ["b.wav", "a.wav.txt", "a.wav", "a.wav-2.wav", "c.wav.json", "Z.wav"]
    for i, name in enumerate(names):
        storage.put_text(f"{VOICES_PREFIX}{name}", "x" * (i + 1))
    storage.put_text(f"{VOICES_PREFIX}nested/deep.wav", "not a direct child")
    storage.put_text(f"{OUTPUT_PREFIX}o.wav", "another prefix")
    expected = sorted(f"{VOICES_PREFIX}{n}" for n in names)  # ASCII: byte order is str order
    listing = storage.list_objects(VOICES_PREFIX)
    everything, more = listing.objects, listing.more
    assert [o.key for o in everything] == expected and more is False
    assert {o.key: o.size for o in everything} == {f"{VOICES_PREFIX}{n}": i + 1 for i, n in enumerate(names)}
    assert all(o.version == storage.head(o.key).version for o in everything)
    seen, after = [], None
    while True:
        listing = storage.list_objects(VOICES_PREFIX, after, max_keys=4)
        assert len(listing.objects) <= 4
        seen += [o.key for o in listing.objects]
        if not listing.more:
            break
        after = listing.resume_after
    assert seen == expected
    assert storage.list_objects(f"{LOGS_PREFIX}") == Listing([], False)  # nothing there (or no folder)
    with pytest.raises(StorageError, match="not allowed"):
        storage.list_objects(VOICES_PREFIX, max_keys=1001)

def test_a_listing_of_folders_alone_still_moves_on(storage):
    """S3 counts a folder towards MaxKeys: a listing may hold folders and no key, yet more follow.
    Where it says to go on from is past them, so a paging caller reaches the keys after them
    (it used to ask again from the same key, for ever)."""
    for name in ("a.wav", "b-archive/x.wav", "b-archive/y.wav", "c-old/x.wav", "d.wav", "c-old0.wav"):
        storage.put_text(f"{VOICES_PREFIX}{name}", "x")
    seen, after, listings = [], None, 0
    while True:
        listing = storage.list_objects(VOICES_PREFIX, after, max_keys=1)
        listings += 1
        assert listings < 10, "the listing does not move on"
        seen += [o.key for o in listing.objects]
        if not listing.more:
            break
        assert listing.resume_after is not None and (after is None or listing.resume_after > after)
        after = listing.resume_after
    assert seen == [f"{VOICES_PREFIX}{n}" for n in ("a.wav", "c-old0.wav", "d.wav")]
    assert past_folder(f"{VOICES_PREFIX}b-archive/") > f"{VOICES_PREFIX}b-archive/{chr(0x10FFFF)}"



def test_get_range_reads_part_of_an_object(storage, tmp_path):
    key = f"{VOICES_PREFIX}r.wav"
    src = _write(tmp_path / "r.wav", 10_000)
    storage.upload_file(key, src, "audio/wav")
    data = src.read_bytes()
    assert storage.get_range(key, 0, 100) == data[:100]
    assert storage.get_range(key, 9_990, 100) == data[9_990:]  # fewer at the end
    assert storage.get_range(key, 20_000, 100) == b""  # none past it
    storage.put_text(f"{VOICES_PREFIX}empty.wav", "")
    assert storage.get_range(f"{VOICES_PREFIX}empty.wav", 0, 100) == b""
    with pytest.raises(KeyNotFound):
        storage.get_range(f"{VOICES_PREFIX}nobody.wav", 0, 10)


def test_get_range_of_a_version_refuses_a_replaced_object(storage, tmp_path):
    """Reads of several ranges describe one object (a listing's header reads): a replaced one is said."""
    key = f"{VOICES_PREFIX}rv.wav"
    first, second = _write(tmp_path / "rv1.wav", 4_000), _write(tmp_path / "rv2.wav", 6_000)
    storage.upload_file(key, first, "audio/wav")
    listed = storage.head(key)
    assert storage.get_range(key, 0, 100, version=listed.version) == first.read_bytes()[:100]
    storage.upload_file(key, second, "audio/wav")
    with pytest.raises(VersionChanged):
        storage.get_range(key, 0, 100, version=listed.version)
    assert storage.get_range(key, 0, 100, version=storage.head(key).version) == second.read_bytes()[:100]
    assert storage.get_range(key, 0, 100) == second.read_bytes()[:100]


def test_download_if_changed_transfers_only_a_new_version(storage, tmp_path):
    key = f"{VOICES_PREFIX}v.wav"
    first = _write(tmp_path / "v1.wav", 5_000)
    storage.upload_file(key, first, "audio/wav")
    dest = tmp_path / "staged.wav"
    info = storage.download_if_changed(key, dest, None)
    assert info is not None and info.size == 5_000 and _sha(dest) == _sha(first)
    assert info.version == storage.head(key).version
    dest.unlink()
    assert storage.download_if_changed(key, dest, info.version) is None
    assert not dest.exists()  # nothing transferred, nothing written
    second = _write(tmp_path / "v2.wav", 5_000)
    storage.upload_file(key, second, "audio/wav")
    again = storage.download_if_changed(key, dest, info.version)
    assert again is not None and again.version != info.version and _sha(dest) == _sha(second)
    storage.delete(key)
    with pytest.raises(KeyNotFound):
        storage.download_if_changed(key, dest, again.version)


def test_download_refuses_an_object_over_the_limit(storage, tmp_path):
    key = f"{INCOMING_PREFIX}big.mp3"
    storage.upload_file(key, _write(tmp_path / "big.mp3", 3_000), "audio/mpeg")
    dest = tmp_path / "d.mp3"
    with pytest.raises(ObjectTooLarge) as info:
        storage.download_file(key, dest, max_bytes=2_999)
    assert (info.value.size, info.value.limit) == (3_000, 2_999) and not dest.exists()
    storage.download_file(key, dest, max_bytes=3_000)
    assert dest.stat().st_size == 3_000
    dest.unlink()
    with pytest.raises(ObjectTooLarge) as info:
        storage.download_if_changed(key, dest, None, max_bytes=2_999)
    assert (info.value.size, info.value.limit) == (3_000, 2_999) and not dest.exists()
    assert storage.download_if_changed(key, dest, None, max_bytes=3_000).size == 3_000


def test_probe(storage):
    storage.probe()
    if isinstance(storage, LocalStorage):
        assert list((storage.root / LOGS_PREFIX).iterdir()) == []
    else:
        listed = storage.client.list_objects_v2(Bucket=storage.bucket, Prefix=LOGS_PREFIX)
        assert listed.get("KeyCount", 0) == 0


# --- S3 only --------------------------------------------------------------------------------------

def test_listing_and_head_name_a_missing_bucket(s3_env):
    storage = S3Storage(dataclasses.replace(s3_env.settings, s3_bucket=f"gone-{s3_env.bucket}"))
    for action, call in {"list": lambda: storage.list_objects(VOICES_PREFIX),
                         "head": lambda: storage.head(f"{VOICES_PREFIX}a.wav")}.items():
        with pytest.raises(StorageError, match=f"^S3 bucket 'gone-{s3_env.bucket}' does not exist") as info:
            call()
        assert not isinstance(info.value, KeyNotFound) and f"({action} " in str(info.value)


def test_an_unchanged_object_costs_one_bodiless_answer(s3_env, tmp_path):
    """download_if_changed is one conditional GET: 304 and no body when the version still holds."""
    storage = S3Storage(s3_env.settings)
    key = f"{VOICES_PREFIX}c.wav"
    storage.upload_file(key, _write(tmp_path / "c.wav", 40_000), "audio/wav")
    answers = []  # (operation, status, body length announced); the body itself is left to the code
    storage.client.meta.events.register(
        "after-call.s3.*", lambda http_response, model, **_: answers.append(
            (model.name, http_response.status_code, int(http_response.headers.get("content-length", 0)))))
    info = storage.download_if_changed(key, tmp_path / "d.wav", None)
    assert storage.download_if_changed(key, tmp_path / "d.wav", info.version) is None
    assert answers == [("GetObject", 200, 40_000), ("GetObject", 304, 0)]


def test_make_storage_picks_backend(s3_env, tmp_path):
    assert isinstance(make_storage(s3_env.settings), S3Storage)
    local = make_storage(Settings.from_env({ENV_LOCAL_STORAGE_DIR: str(tmp_path / "st")}))
    assert isinstance(local, LocalStorage) and local.root == (tmp_path / "st").resolve()


def test_s3_describe_has_no_credentials(s3_env):
    text = S3Storage(s3_env.settings).describe()
    assert text.startswith(f"s3://{s3_env.bucket}") and "127.0.0.1" in text
    assert s3_env.server.secret_key not in text and s3_env.server.access_key not in text


def test_upload_sets_content_type(s3_env, tmp_path):
    storage = S3Storage(s3_env.settings)
    storage.upload_file(f"{OUTPUT_PREFIX}a.wav", _write(tmp_path / "a.wav", 1000), "audio/wav")
    head = storage.client.head_object(Bucket=s3_env.bucket, Key=f"{OUTPUT_PREFIX}a.wav")
    assert head["ContentType"] == "audio/wav"


def test_presigned_url_downloads_over_https(s3_env, tmp_path):
    storage = S3Storage(s3_env.settings)
    src = _write(tmp_path / "out.wav", 50_000)
    storage.upload_file(f"{OUTPUT_PREFIX}job.wav", src, "audio/wav")
    url = storage.result_url(f"{OUTPUT_PREFIX}job.wav")
    query = parse_qs(urlsplit(url).query)
    assert url.startswith(s3_env.server.endpoint_url + f"/{s3_env.bucket}/")  # path style
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert query["X-Amz-Expires"] == [str(s3_env.settings.presign_expiry)]
    assert "/us-east-1/s3/aws4_request" in query["X-Amz-Credential"][0]

    got = requests.get(url, verify=s3_env.server.ca_bundle, timeout=10)
    assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == _sha(src)
    # Credentials are enforced: no signature, or a tampered one, is refused.
    plain = url.split("?")[0]
    assert requests.get(plain, verify=s3_env.server.ca_bundle, timeout=10).status_code == 403
    tampered = url.replace(query["X-Amz-Signature"][0], "0" * 64)
    assert requests.get(tampered, verify=s3_env.server.ca_bundle, timeout=10).status_code == 403


def test_presigned_url_expires(s3_env):
    settings = Settings.from_env({**s3_env, ENV_PRESIGN_EXPIRY: "1"})
    storage = S3Storage(settings)
    storage.put_text(f"{LOGS_PREFIX}short.json", "{}")
    url = storage.result_url(f"{LOGS_PREFIX}short.json")
    assert parse_qs(urlsplit(url).query)["X-Amz-Expires"] == ["1"]
    time.sleep(2.5)
    assert requests.get(url, verify=s3_env.server.ca_bundle, timeout=10).status_code == 403


def test_presigned_url_is_sigv4_on_aws_us_east_1():
    """No endpoint, region us-east-1: the case where old botocore presigned with SigV2."""
    settings = Settings.from_env({ENV_S3_BUCKET: "my-bucket", ENV_AWS_ACCESS_KEY_ID: "AKIAEXAMPLE",
                                  ENV_AWS_SECRET_ACCESS_KEY: "not-a-real-secret"})
    url = S3Storage(settings).result_url(f"{OUTPUT_PREFIX}x.wav")  # presigning is offline
    query = parse_qs(urlsplit(url).query)
    assert urlsplit(url).hostname == "my-bucket.s3.amazonaws.com"
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert "/us-east-1/s3/aws4_request" in query["X-Amz-Credential"][0]
    assert "not-a-real-secret" not in url


@pytest.mark.parametrize("wrong", ["secret", "access_key"])
def test_wrong_credentials_give_clean_storage_error(s3_env, tmp_path, wrong):
    real = s3_env.settings
    settings = dataclasses.replace(real, **(
        {"aws_secret_access_key": "WrongSecret" + "x" * 29} if wrong == "secret"
        else {"aws_access_key_id": "AKNOSUCHKEY000000000"}))
    storage = S3Storage(settings)
    src = _write(tmp_path / "a.wav", 1000)
    calls = {
        "put_text": lambda: storage.put_text(f"{LOGS_PREFIX}a.json", "{}"),
        "get_text": lambda: storage.get_text(f"{LOGS_PREFIX}a.json"),
        "exists": lambda: storage.exists(f"{VOICES_PREFIX}a.wav"),
        "upload_file": lambda: storage.upload_file(f"{OUTPUT_PREFIX}a.wav", src, "audio/wav"),
        "download_file": lambda: storage.download_file(f"{VOICES_PREFIX}a.wav", tmp_path / "d"),
        "probe": storage.probe,
    }
    for name, call in calls.items():
        with pytest.raises(StorageError) as info:
            call()
        message = str(info.value)
        assert message.startswith("S3 request failed: "), (name, message)
        assert not isinstance(info.value, KeyNotFound), name
        for secret in (settings.aws_secret_access_key, real.aws_secret_access_key):
            assert secret not in message and secret not in repr(info.value)
        assert "X-Amz-Signature" not in message and "Signature=" not in message


def test_unreachable_endpoint(s3_env):
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = dataclasses.replace(s3_env.settings, aws_endpoint_url=f"https://127.0.0.1:{port}")
    with pytest.raises(StorageError, match="could not connect to the S3 endpoint"):
        S3Storage(settings).put_text(f"{LOGS_PREFIX}x.json", "{}")


def test_untrusted_certificate(s3_env, monkeypatch):
    """The test server's certificate comes from a private CA: without AWS_CA_BUNDLE the sentence
    says so and names the variable that fixes it."""
    monkeypatch.delenv(ENV_AWS_CA_BUNDLE)
    with pytest.raises(StorageError) as info:
        S3Storage(s3_env.settings).get_text(f"{LOGS_PREFIX}x.json")
    assert str(info.value) == (
        "the S3 endpoint's TLS certificate was not accepted; if a private CA signed it, set "
        f"{ENV_AWS_CA_BUNDLE} to that CA's certificate file (get {LOGS_PREFIX}x.json)")


def test_requests_carry_no_headers_b2_rejects(s3_env, tmp_path):
    """Backblaze B2 refuses x-amz-checksum-*, x-amz-sdk-checksum-algorithm and x-amz-trailer
    (boto3's default flexible checksums since 1.36). Record every request the worker's client
    sends and check none carries them and all are SigV4-signed. A file above boto3's 8 MB
    multipart threshold still goes up as one PUT and comes back as one GET (no managed transfer,
    whose extra HEAD and retry loop would break the bound on a call's time)."""
    storage = S3Storage(s3_env.settings)
    sent = []

    def record(request, **_):
        headers = {(k.decode() if isinstance(k, bytes) else k).lower():
                   (v.decode() if isinstance(v, bytes) else str(v))
                   for k, v in request.headers.items()}
        sent.append((request.method, request.url, headers))

    storage.client.meta.events.register("before-send.s3", record)
    big = _write(tmp_path / "big.wav", 12 * MB)  # above boto3's 8 MB multipart threshold
    small = _write(tmp_path / "small.wav", 20_000)
    storage.upload_file(f"{OUTPUT_PREFIX}big.wav", big, "audio/wav")
    storage.upload_file(f"{OUTPUT_PREFIX}small.wav", small, "audio/wav")
    storage.put_text(f"{VOICES_PREFIX}a.txt", "hello")
    storage.put_json(f"{LOGS_PREFIX}a.json", {"a": 1})
    assert storage.get_text(f"{VOICES_PREFIX}a.txt") == "hello"
    storage.download_file(f"{OUTPUT_PREFIX}big.wav", tmp_path / "big-back.wav")
    assert storage.exists(f"{OUTPUT_PREFIX}small.wav")
    storage.delete(f"{VOICES_PREFIX}a.txt")
    storage.probe()

    assert _sha(tmp_path / "big-back.wav") == _sha(big)
    assert not any("uploadId=" in url or "partNumber=" in url for _, url, _ in sent)
    big_requests = [method for method, url, _ in sent if url.split("?")[0].endswith("/big.wav")]
    assert big_requests == ["PUT", "GET"]
    assert sum(method == "PUT" for method, _, _ in sent) == 5
    for method, url, headers in sent:
        bad = [h for h in headers if h.startswith(B2_REJECTED_PREFIXES)]
        assert not bad, f"{method} {url.split('?')[0]} sent {bad}"
        assert "aws-chunked" not in headers.get("content-encoding", "")
        assert headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential="), method
        assert "/us-east-1/s3/aws4_request" in headers["authorization"]
    url = storage.result_url(f"{OUTPUT_PREFIX}big.wav")
    assert parse_qs(urlsplit(url).query)["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]


def test_client_config(s3_env):
    config = make_s3_client(s3_env.settings).meta.config
    assert config.signature_version == "s3v4"
    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"
    assert config.s3["addressing_style"] == "path"
    assert config.retries == {"mode": "standard", "total_max_attempts": 2}
    assert (config.connect_timeout, config.read_timeout) == (5, 15)
    tuned = Settings.from_env({**s3_env, ENV_S3_CONNECT_TIMEOUT: "2.5", ENV_S3_READ_TIMEOUT: "7",
                               ENV_S3_MAX_ATTEMPTS: "4"})
    config = make_s3_client(tuned).meta.config
    assert config.retries["total_max_attempts"] == 4
    assert (config.connect_timeout, config.read_timeout) == (2.5, 7)


def test_call_bound_is_under_a_minute_by_default():
    """The documented worst case of one S3 call with the defaults, and its formula."""
    default = Settings.from_env({})
    assert call_bound_s(default) == 2 * (5 + 1 + 15) + (1 + 5) == 48
    one_try = Settings.from_env({ENV_S3_CONNECT_TIMEOUT: "3", ENV_S3_READ_TIMEOUT: "5",
                                 ENV_S3_MAX_ATTEMPTS: "1"})
    assert call_bound_s(one_try) == 9


@pytest.mark.parametrize("name, value", [(ENV_S3_READ_TIMEOUT, "0"), (ENV_S3_CONNECT_TIMEOUT, "soon"),
                                         (ENV_S3_MAX_ATTEMPTS, "0"), (ENV_S3_MAX_ATTEMPTS, "2.5"),
                                         (ENV_LOCAL_RETENTION_HOURS, "-1"), (ENV_MAX_CONCURRENCY, "many"),
                                         (ENV_MAX_VOICE_BYTES, "0"), (ENV_PRESIGN_EXPIRY, "1.5")])
def test_bad_storage_numbers_name_their_variable(name, value):
    with pytest.raises(ValueError, match=f"^{name} must be a .*not '{value}'$"):
        Settings.from_env({name: value})


# --- local only -----------------------------------------------------------------------------------

def test_local_result_url_is_file_uri(tmp_path):
    storage = LocalStorage(tmp_path / "st")
    storage.put_text(f"{OUTPUT_PREFIX}j.json", "{}")
    url = storage.result_url(f"{OUTPUT_PREFIX}j.json")
    assert url == (tmp_path / "st" / "output" / "j.json").resolve().as_uri()
    assert url.startswith("file:///")


def test_local_refuses_symlink_escape(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "voices").symlink_to(outside)
    storage = LocalStorage(tmp_path / "st")
    with pytest.raises(StorageError, match="is not allowed"):
        storage.put_text(f"{VOICES_PREFIX}a.txt", "x")
    assert list(outside.iterdir()) == []


def test_local_writes_are_atomic(tmp_path):
    storage = LocalStorage(tmp_path / "st")
    src = _write(tmp_path / "a.wav", 100_000)
    storage.upload_file(f"{OUTPUT_PREFIX}a.wav", src, "audio/wav")
    storage.put_text(f"{OUTPUT_PREFIX}a.txt", "one")
    storage.put_json(f"{OUTPUT_PREFIX}a.json", {})
    storage.download_file(f"{OUTPUT_PREFIX}a.wav", tmp_path / "back" / "a.wav")
    assert sorted(p.name for p in (tmp_path / "st" / "output").iterdir()) == [
        "a.json", "a.txt", "a.wav"]
    assert [p.name for p in (tmp_path / "back").iterdir()] == ["a.wav"]

    # A write that fails half-way leaves the old content and no temp file behind.
    def fail_half_way(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(tmp_path / "st" / "output" / "a.txt", fail_half_way)
    assert storage.get_text(f"{OUTPUT_PREFIX}a.txt") == "one"
    assert sorted(p.name for p in (tmp_path / "st" / "output").iterdir()) == [
        "a.json", "a.txt", "a.wav"]


def test_local_missing_upload_source_is_not_a_missing_key(tmp_path):
    storage = LocalStorage(tmp_path / "st")
    with pytest.raises(StorageError) as info:
        storage.upload_file(f"{OUTPUT_PREFIX}a.wav", tmp_path / "nope.wav", "audio/wav")
    assert not isinstance(info.value, KeyNotFound)
    assert str(info.value) == (f"the file to store as {OUTPUT_PREFIX}a.wav could not be read from the worker's "
                               "temp folder (No such file or directory)")


@pytest.mark.parametrize("source", ["nope.wav", "."])
def test_s3_unreadable_upload_source_is_said_as_such(s3_env, tmp_path, source):
    """The staged file missing (or a folder): one sentence naming the temp folder, not "Internal
    error (FileNotFoundError)" from the size check before the upload (and no request is sent)."""
    storage = S3Storage(s3_env.settings)
    storage.check_exists()
    sent = []
    storage.client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request.method))
    with pytest.raises(StorageError) as info:
        storage.upload_file(f"{OUTPUT_PREFIX}a.wav", tmp_path / source, "audio/wav")
    assert str(info.value).startswith(f"the file to store as {OUTPUT_PREFIX}a.wav could not be read from the "
                                      "worker's temp folder (")
    assert sent == []


UNREADABLE = Path("/proc/self/mem")  # opens, and every read from its start fails (EIO): a failing temp disk


@pytest.mark.skipif(not UNREADABLE.exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_staged_file_that_opens_but_cannot_be_read_is_said_as_such(s3_env, tmp_path, backend):
    """The read happened inside PutObject (S3: 'S3 transfer failed locally') or inside the local
    write's mapping (which blamed F5_LOCAL_STORAGE_DIR): the worker's temp file is named instead."""
    storage = LocalStorage(tmp_path / "root") if backend == "local" else S3Storage(s3_env.settings)
    with pytest.raises(StorageError) as info:
        storage.upload_file(f"{OUTPUT_PREFIX}a.wav", UNREADABLE, "audio/wav")
    assert str(info.value) == (f"the file to store as {OUTPUT_PREFIX}a.wav could not be read from the worker's "
                               "temp folder (Input/output error)")
    with pytest.raises(KeyNotFound):
        storage.head(f"{OUTPUT_PREFIX}a.wav")


@pytest.mark.parametrize("root, cause", [
    # mkdir answers ENOENT inside /proc, whoever runs it: a folder that cannot be made, no file missing
    ("/proc/f5-worker-storage", "a folder on the way cannot be created there"),
    ("{file}/storage", "a file stands where a folder is needed"),
])
def test_local_write_failures_name_the_cause(tmp_path, root, cause):
    """An unwritable storage root: every write (an output, a job record, the gate's probe) names
    what stopped it and the variable to fix, never "no such file" or "was not found"."""
    (tmp_path / "a-file").write_text("not a folder")
    staged = _write(tmp_path / "staged.wav", 100)
    storage = LocalStorage(root.format(file=tmp_path / "a-file"))
    writes = (lambda: storage.upload_file(f"{OUTPUT_PREFIX}a.wav", staged, "audio/wav"),
              lambda: storage.put_json(f"{LOGS_PREFIX}job.json", {"status": "error"}))
    for write in writes:
        with pytest.raises(StorageError) as info:
            write()
        assert not isinstance(info.value, KeyNotFound)
        assert str(info.value).startswith(f"local storage could not write under {storage.root}: {cause} (put ")
        assert str(info.value).endswith(f"check that {ENV_LOCAL_STORAGE_DIR} names a folder the worker can write")
    if root.startswith("/proc"):  # (under a file, the probe's first read already fails)
        with pytest.raises(StorageError, match=cause) as info:
            storage.probe()
        assert "not found" not in str(info.value)


def test_a_job_whose_log_record_cannot_be_written_logs_one_line(tiny_models, tiny_whisper, tmp_path, caplog):
    """A refused job on a storage root whose logs/ is a file: answered with its own sentence, and
    the record's failure logged as one line naming the cause, not the exception chain behind it."""
    with worker_ctx(tiny_models, tiny_whisper, tmp_path) as ctx:
        root = ctx.worker.storage.root
        root.mkdir(parents=True, exist_ok=True)
        (root / LOGS_PREFIX.rstrip("/")).write_text("a file where the logs folder should be")
        caplog.set_level("INFO")
        job_id, result = ctx.run({"text": "Too slow.", "local_voice": "basic_ref_en.wav", "speed": 0.1})
    assert result == {"error": "'speed' must be at least 0.3."}
    about_record = [r for r in caplog.records if "log record" in r.getMessage()]
    assert [(r.name, r.levelname, r.getMessage()) for r in about_record] == [(
        "f5worker.jobs.workflows", "WARNING",
        f"could not write the log record of job {job_id}: local storage could not write under {root}: a file "
        f"stands where a folder is needed (put {LOGS_PREFIX}{job_id}.json); check that {ENV_LOCAL_STORAGE_DIR} "
        "names a folder the worker can write")]
    assert [r for r in caplog.records if r.exc_info] == []


# --- local retention (F5_LOCAL_RETENTION_HOURS) ---------------------------------------------------

def _aged(path: Path, hours: float, now: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    os.utime(path, (now - hours * 3600, now - hours * 3600))
    return path


def test_local_retention_removes_old_outputs_and_logs_only(tmp_path):
    now = time.time()
    root = tmp_path / "st"
    storage = make_storage(Settings.from_env({ENV_LOCAL_STORAGE_DIR: str(root),
                                              ENV_LOCAL_RETENTION_HOURS: "24"}))
    outside = _aged(tmp_path / "outside.wav", 48, now)
    expired = [_aged(root / "output" / "old.wav", 25, now), _aged(root / "logs" / "old.json", 25, now),
               _aged(root / "output" / ".old.wav.abc.tmp", 30, now)]  # a crashed write's leftover
    kept = [_aged(root / "voices" / "old.wav", 1000, now), _aged(root / "voices" / "old.wav.txt", 1000, now),
            _aged(root / "output" / "new.wav", 23, now), _aged(root / "logs" / "new.json", 1, now)]
    (root / "output" / "link.wav").symlink_to(outside)  # a symlink is never followed nor removed
    os.utime(root / "output" / "link.wav", (now - 99 * 3600,) * 2, follow_symlinks=False)

    assert storage.sweep_expired(now) == 3
    assert not any(p.exists() for p in expired)
    assert all(p.exists() for p in kept) and outside.exists()
    assert (root / "output" / "link.wav").is_symlink()

    # At most one sweep per SWEEP_INTERVAL_S, however often it is called.
    again = _aged(root / "output" / "later.wav", 25, now)
    assert storage.sweep_expired(now + 60) == 0 and again.exists()
    assert storage.sweep_expired(now + SWEEP_INTERVAL_S) == 1 and not again.exists()


def test_local_retention_is_off_by_default(tmp_path):
    now = time.time()
    storage = make_storage(Settings.from_env({ENV_LOCAL_STORAGE_DIR: str(tmp_path / "st")}))
    old = _aged(tmp_path / "st" / "output" / "old.wav", 10_000, now)
    assert storage.sweep_expired(now) == 0 and old.exists()


def test_local_retention_never_follows_a_prefix_symlink_into_voices(tmp_path):
    now = time.time()
    root = tmp_path / "st"
    voice = _aged(root / "voices" / "alice.wav", 100, now)
    (root / "output").symlink_to(root / "voices")
    assert LocalStorage(root, retention_hours=1).sweep_expired(now) == 0
    assert voice.exists()


def test_s3_sweep_is_a_no_op_without_a_request():
    # The endpoint is a closed port: any request would raise "could not connect".
    storage = S3Storage(Settings.from_env({
        ENV_S3_BUCKET: "b", ENV_AWS_ENDPOINT_URL: "https://127.0.0.1:9", ENV_AWS_ACCESS_KEY_ID: "AK",
        ENV_AWS_SECRET_ACCESS_KEY: "secret", ENV_LOCAL_RETENTION_HOURS: "1"}))
    assert storage.sweep_expired() == 0
