"""Storage faults a deployment meets, caused for real: an S3 endpoint that accepts connections and
never answers (a socket server on 127.0.0.1), a bucket that does not exist and a private CA without
AWS_CA_BUNDLE (the SeaweedFS server of fixtures_s3). Each must end within a bound that can be
stated beforehand, with one sentence naming the cause."""
from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from typing import Iterator

import pytest

from f5worker import validation
from f5worker.errors import StorageError
from f5worker.settings import (ENV_AWS_ACCESS_KEY_ID, ENV_AWS_CA_BUNDLE, ENV_AWS_ENDPOINT_URL,
                               ENV_AWS_SECRET_ACCESS_KEY, ENV_S3_BUCKET, ENV_S3_CONNECT_TIMEOUT,
                               ENV_S3_MAX_ATTEMPTS, ENV_S3_READ_TIMEOUT, ENV_VOLUME_PATH,
                               LOGS_PREFIX, OUTPUT_PREFIX, VOICES_PREFIX, Settings)
from f5worker.jobs.voices import VoiceLibrary
from s3_utils import KeyNotFound, S3Storage, call_bound_s
from tests.fixtures_faults import dripping_endpoint

GATE_TIMEOUT_S = 6  # the gate's --timeout against endpoints that never finish an answer
GATE_SLACK_S = 4  # its checks after the stuck one, and the interpreter's own start


class HungServer:
    """Accepts every TCP connection on 127.0.0.1 and never sends a byte (nor reads one)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            with self._lock:
                self.held.append(conn)

    def connections(self) -> int:
        """Connections accepted so far, once the accept loop has caught up with the kernel."""
        deadline = time.monotonic() + 1
        count = -1
        while time.monotonic() < deadline:
            with self._lock:
                now = len(self.held)
            if now == count:
                break
            count = now
            time.sleep(0.1)
        return count

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        self.sock.close()
        self._thread.join(timeout=5)
        with self._lock:
            for conn in self.held:
                conn.close()


@pytest.fixture
def hung_server() -> Iterator[HungServer]:
    server = HungServer()
    yield server
    server.close()


def _hung_env(server: HungServer, scheme: str = "http") -> dict[str, str]:
    return {ENV_S3_BUCKET: "voices-bucket", ENV_AWS_ENDPOINT_URL: f"{scheme}://127.0.0.1:{server.port}",
            ENV_AWS_ACCESS_KEY_ID: "AKHUNGTEST0000000000", ENV_AWS_SECRET_ACCESS_KEY: "hung-secret",
            ENV_S3_CONNECT_TIMEOUT: "0.5", ENV_S3_READ_TIMEOUT: "0.5", ENV_S3_MAX_ATTEMPTS: "2"}


@pytest.mark.parametrize("scheme", ["http", "https"])  # https: the TLS handshake is what hangs
def test_every_call_on_a_hung_endpoint_ends_within_the_bound(hung_server, tmp_path, monkeypatch, scheme):
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    settings = Settings.from_env(_hung_env(hung_server, scheme))
    bound = call_bound_s(settings)
    assert bound == 2 * (0.5 + 1 + 0.5) + (1 + 5)
    storage = S3Storage(settings)
    src = tmp_path / "out.wav"
    src.write_bytes(b"RIFF" + bytes(40_000))
    calls = {
        ("get", f"{VOICES_PREFIX}x.wav"): lambda k: storage.download_file(k, tmp_path / "x.wav"),
        ("head", f"{VOICES_PREFIX}x.wav"): storage.exists,
        ("get", f"{VOICES_PREFIX}x.wav.txt"): storage.get_text,
        ("put", f"{VOICES_PREFIX}x.wav.txt"): lambda k: storage.put_text(k, "hello"),
        ("put", f"{OUTPUT_PREFIX}job.wav"): lambda k: storage.upload_file(k, src, "audio/wav"),
        ("delete", f"{LOGS_PREFIX}job.json"): storage.delete,
    }
    for (action, key), call in calls.items():
        before = hung_server.connections()
        started = time.monotonic()
        with pytest.raises(StorageError) as info:
            call(key)
        took = time.monotonic() - started
        waited = _waited(str(info.value), action, key)
        assert settings.s3_read_timeout <= took <= bound and abs(waited - took) < 0.5, (action, key, took)
        # Exactly the configured tries: no second retry loop on top of botocore's (boto3's managed
        # download once made twelve GETs of one voice this way).
        assert hung_server.connections() - before == settings.s3_max_attempts, (action, key)
    assert not (tmp_path / "x.wav").exists()


def test_a_stalled_upload_ends_within_the_bound(hung_server, tmp_path, monkeypatch):
    """An output larger than the socket buffers: the endpoint accepts the connection, reads
    nothing, and the send stalls (botocore reports that as a dropped connection)."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    settings = Settings.from_env(_hung_env(hung_server))
    src = tmp_path / "big.wav"
    src.write_bytes(os.urandom(16 * 1024 * 1024))
    key = f"{OUTPUT_PREFIX}big.wav"
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        S3Storage(settings).upload_file(key, src, "audio/wav")
    took = time.monotonic() - started
    assert _waited(str(info.value), "put", key) <= took <= call_bound_s(settings)
    assert hung_server.connections() == settings.s3_max_attempts


def _waited(message: str, action: str, key: str) -> float:
    """The seconds named by "S3 did not answer within N s (action key)"; fails on any other text."""
    found = re.fullmatch(rf"S3 did not answer within ([0-9.]+) s \({action} {re.escape(key)}\)", message)
    assert found, message
    return float(found[1])


def _run_gate(env: dict[str, str], tmp_path, monkeypatch, capsys, *args: str) -> tuple[int, float, dict]:
    for name, value in {**env, ENV_VOLUME_PATH: str(tmp_path / "volume"),
                        "AWS_EC2_METADATA_DISABLED": "true",
                        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
                        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials")}.items():
        monkeypatch.setenv(name, value)
    started = time.monotonic()
    code = validation.main(["--json", "--skip-gpu", "--require-s3", *args])
    took = time.monotonic() - started
    return code, took, {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}


def test_validation_reports_a_hung_endpoint_within_its_timeout(hung_server, tmp_path, monkeypatch, capsys):
    """validate-storage-config.py once sat 186 s without output on such an endpoint. It probes with
    the worker's own settings (here the defaults: 48 s a call), within its --timeout."""
    env = _hung_env(hung_server)
    for name in (ENV_S3_CONNECT_TIMEOUT, ENV_S3_READ_TIMEOUT, ENV_S3_MAX_ATTEMPTS):
        env.pop(name)
    code, took, checks = _run_gate(env, tmp_path, monkeypatch, capsys, "--timeout", str(GATE_TIMEOUT_S))
    assert code == 1 and took < GATE_TIMEOUT_S + GATE_SLACK_S, took
    s3 = checks["S3 storage"]
    assert s3["status"] == "fail"
    assert re.search(rf"did not finish within [0-9.]+ s \(it was reading {LOGS_PREFIX}probe-[0-9a-f]+\.txt, "
                     r"which does not exist\)", s3["message"]), s3["message"]
    assert "hung-secret" not in s3["message"]
    assert hung_server.connections() == 1  # the worker's 15 s read timeout had not yet run out


def test_validation_is_bounded_against_an_endpoint_that_trickles(hung_server, tmp_path, monkeypatch, capsys):
    """One byte every half second never trips a read timeout; the gate ran on past 90 s. Its bound
    holds for the whole run, and the check names the step it was at."""
    with dripping_endpoint() as url:
        env = {**_hung_env(hung_server), ENV_AWS_ENDPOINT_URL: url, ENV_S3_READ_TIMEOUT: "5", ENV_S3_MAX_ATTEMPTS: "1"}
        code, took, checks = _run_gate(env, tmp_path, monkeypatch, capsys, "--timeout", str(GATE_TIMEOUT_S))
    assert code == 1 and took < GATE_TIMEOUT_S + GATE_SLACK_S, took
    s3 = checks["S3 storage"]
    assert s3["status"] == "fail" and f"(it was reading {LOGS_PREFIX}probe-" in s3["message"], s3["message"]
    assert list(checks)[-1] == "Fused kernels"  # every check after it still reported


# --- against the real S3 server -------------------------------------------------------------------

def test_missing_bucket_is_not_a_missing_voice(s3_env, tmp_path):
    """HEAD answers a bare 404 for a missing key and a missing bucket alike; the sentence must say
    which. Every call names the bucket, none reads as KeyNotFound."""
    missing = f"gone-{s3_env.bucket}"
    settings = Settings.from_env({**s3_env, ENV_S3_BUCKET: missing})
    storage = S3Storage(settings)
    key = f"{VOICES_PREFIX}a.wav"
    calls = {
        "get": lambda: storage.download_file(key, tmp_path / "d.wav"),
        "head": lambda: storage.exists(key),
    }
    for action, call in calls.items():
        with pytest.raises(StorageError) as info:
            call()
        assert not isinstance(info.value, KeyNotFound)
        assert str(info.value) == (f"S3 bucket '{missing}' does not exist; check {ENV_S3_BUCKET} "
                                   f"({action} {key})")
    # (Writes are left out: SeaweedFS creates a missing bucket on PUT where AWS answers NoSuchBucket.)
    for call in (lambda: storage.get_text(key), lambda: storage.delete(key)):
        with pytest.raises(StorageError, match=f"^S3 bucket '{missing}' does not exist"):
            call()

    # What a job sees: the voice library passes the bucket's sentence on, not "upload it first".
    library = VoiceLibrary(storage)
    with pytest.raises(StorageError, match=f"^S3 bucket '{missing}' does not exist"):
        library.fetch("a.wav", tmp_path / "staged.wav")


def test_missing_key_in_an_existing_bucket_is_still_missing(s3_env, tmp_path):
    storage = S3Storage(s3_env.settings)
    assert storage.exists(f"{VOICES_PREFIX}nobody.wav") is False
    with pytest.raises(KeyNotFound):
        storage.download_file(f"{VOICES_PREFIX}nobody.wav", tmp_path / "n.wav")


def test_validation_names_a_missing_bucket(s3_env, tmp_path, monkeypatch, capsys):
    for name, value in {**s3_env, ENV_S3_BUCKET: f"gone-{s3_env.bucket}",
                        ENV_VOLUME_PATH: str(tmp_path / "volume")}.items():
        monkeypatch.setenv(name, value)
    code = validation.main(["--json", "--skip-gpu", "--require-s3"])
    s3 = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}["S3 storage"]
    assert code == 1 and s3["status"] == "fail"
    assert f"S3 bucket 'gone-{s3_env.bucket}' does not exist" in s3["message"]


def test_validation_names_aws_ca_bundle_for_an_untrusted_certificate(s3_env, tmp_path, monkeypatch, capsys):
    for name, value in {**s3_env, ENV_VOLUME_PATH: str(tmp_path / "volume")}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(ENV_AWS_CA_BUNDLE)
    code = validation.main(["--json", "--skip-gpu", "--require-s3"])
    s3 = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}["S3 storage"]
    assert code == 1 and s3["status"] == "fail"
    assert "TLS certificate was not accepted" in s3["message"] and ENV_AWS_CA_BUNDLE in s3["message"]


def test_tls_to_a_plain_http_port_says_so(hung_server):
    """Not every TLS failure is a certificate: https:// to a port that answers in plain HTTP."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]

        def answer_plain_http():
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

        thread = threading.Thread(target=answer_plain_http, daemon=True)
        thread.start()
        settings = Settings.from_env({**_hung_env(hung_server, "https"), ENV_S3_MAX_ATTEMPTS: "1",
                                      ENV_AWS_ENDPOINT_URL: f"https://127.0.0.1:{port}"})
        with pytest.raises(StorageError) as info:
            S3Storage(settings).get_text(f"{LOGS_PREFIX}x.json")
        thread.join(timeout=5)
    assert str(info.value) == (f"the TLS handshake with the S3 endpoint failed; check that "
                               f"{ENV_AWS_ENDPOINT_URL} has the right scheme and port, and that {ENV_AWS_CA_BUNDLE}, "
                               f"if set, is the CA's certificate file (get {LOGS_PREFIX}x.json)")
