"""examples/client.py with --local against the worker behind runpod's own local API server.

The server is the one tests/test_api_server.py starts (a real ``runpod-handler.py --rp_serve_api``
subprocess with the tiny random models and the SeaweedFS S3 server over HTTPS); this module gets
its own instance. The client runs in-process through ``main(argv)``, with runpod's real client:
``Endpoint.run``, then the development server's status call, then the download of the presigned
URL (trusting the test CA through REQUESTS_CA_BUNDLE, as a caller of a private endpoint would).
"""
from __future__ import annotations

import base64
import io
import json
import socket
import uuid

import pytest
import soundfile as sf

from examples import client
from f5worker.jobs.inputs import UploadInput
from tests.fixtures_models import SR, speechlike
from tests.fixtures_api import NFE
from tests.helpers import PROXY_VARIABLES, assert_wav_matches


@pytest.fixture
def run(api, monkeypatch):  # noqa: F811 - api: the fixture imported above
    """``main`` against the local server: (exit status, stdout, stderr)."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", api.s3_server.ca_bundle)  # the presigned URLs' CA
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def run_client(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = client.main(["--local", "--local-url", api.base_url, *argv], stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    return run_client


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tts_writes_the_wav(run, tmp_path):
    wav = tmp_path / "out" / "hello.wav"
    code, out, err = run("tts", "Hello from the example client.", "--voice", "basic_ref_en.wav",
                         "--nfe-step", str(NFE), "--seed", "7", "-o", str(wav))
    assert code == 0, err
    result = json.loads(out)
    assert result["seed"] == 7 and result["voice"] == "basic_ref_en.wav" and result["file"] == str(wav)
    assert_wav_matches(wav.read_bytes(), result["duration"])
    assert "COMPLETED" in err  # the status line
    assert [p.name for p in wav.parent.iterdir()] == ["hello.wav"]  # no partial file left


def test_upload_from_a_url_then_tts_with_that_voice(run, file_server, tmp_path):
    sf.write(str(file_server.root / "erin.wav"), speechlike(3.0, seed=11), SR, subtype="PCM_16")
    name = f"erin-{uuid.uuid4().hex[:8]}.wav"
    code, out, err = run("upload", name, file_server.url("erin.wav"), "--ref-text", "Erin reads a sentence.")
    assert code == 0, err
    assert json.loads(out)["voice_key"] == f"voices/{name}"
    assert any(path.startswith("/erin.wav") for path in file_server.requests)  # the worker fetched the URL

    wav = tmp_path / "erin-says.wav"
    code, out, err = run("tts", "Erin says something new.", "--voice", name, "--nfe-step", str(NFE), "-o", str(wav))
    assert code == 0, err
    result = json.loads(out)
    assert result["ref_text_source"] == "stored"
    assert_wav_matches(wav.read_bytes(), result["duration"])


def test_upload_from_a_local_file_inline(run, tmp_path):
    if "voice_base64" not in UploadInput.model_fields:
        pytest.skip("this worker's upload input has no voice_base64 field yet")
    clip = tmp_path / "fern.wav"
    sf.write(str(clip), speechlike(2.5, seed=12), SR, subtype="PCM_16")
    name = f"fern-{uuid.uuid4().hex[:8]}.wav"
    code, out, err = run("upload", name, str(clip), "--ref-text", "Fern reads a sentence.")
    assert code == 0, err
    assert json.loads(out)["voice_key"] == f"voices/{name}"


def test_a_refused_job_shows_the_workers_sentence(run, tmp_path):
    code, out, err = run("tts", "Too slow.", "--voice", "basic_ref_en.wav", "--speed", "0.1",
                         "-o", str(tmp_path / "never.wav"))
    assert code == 1 and out == ""
    assert err.splitlines()[-1] == "'speed' must be at least 0.3."
    assert "Traceback" not in err and not (tmp_path / "never.wav").exists()


def test_stream_against_an_endpoint_that_does_not_stream_leaves_no_file(run, tmp_path):
    """This server runs without F5_STREAMING: its /stream answers runpod's own sentence (the job is
    never run), shown as it came, and no empty <output>.pcm (nor the WAV) is left behind."""
    code, out, err = run("tts", "Streamed, or not.", "--voice", "basic_ref_en.wav", "--nfe-step", str(NFE),
                         "--stream", "-o", str(tmp_path / "long.wav"))
    assert code == 1 and out == ""
    assert err.splitlines()[-1] == "Stream not supported, handler must be a generator.", err
    assert list(tmp_path.iterdir()) == []


def test_no_wait_then_download(run, tmp_path):
    code, out, err = run("tts", "Fetched later.", "--voice", "basic_ref_en.wav", "--nfe-step", str(NFE),
                         "--seed", "3", "--no-wait")
    assert code == 0, err
    job_id = json.loads(out)["id"]
    wav = tmp_path / "later.wav"
    code, out, err = run("download", job_id, "-o", str(wav))
    assert code == 0, err
    result = json.loads(out)
    assert result["id"] == job_id and result["seed"] == 3
    assert_wav_matches(wav.read_bytes(), result["duration"])


# --- no server needed ------------------------------------------------------------------------------

def test_no_server_is_one_sentence(tmp_path):
    err = io.StringIO()
    url = f"http://127.0.0.1:{closed_port()}"
    code = client.main(["--local", "--local-url", url, "tts", "Hi.", "--voice", "basic_ref_en.wav",
                        "-o", str(tmp_path / "x.wav")], stdout=io.StringIO(), stderr=err)
    assert code == 2
    assert err.getvalue() == f"Could not connect to {url} (is runpod-handler.py --rp_serve_api running?).\n"


def test_a_file_too_large_to_send_inline_is_refused_before_sending(tmp_path, monkeypatch):
    monkeypatch.setattr(client, "RUN_PAYLOAD_LIMIT_BYTES", 40_000)  # a real 10 MB file is slow to write
    clip = tmp_path / "long.wav"
    sf.write(str(clip), speechlike(2.0, seed=1), SR, subtype="PCM_16")  # 96 kB
    err = io.StringIO()
    code = client.main(["--local", "--local-url", f"http://127.0.0.1:{closed_port()}", "upload", "long.wav",
                        str(clip)], stdout=io.StringIO(), stderr=err)
    assert code == 1  # refused here: sending would have failed to connect (status 2)
    assert err.getvalue().startswith("long.wav is too large to send inline")


def test_remote_without_an_api_key_is_one_sentence(monkeypatch):
    import runpod

    monkeypatch.delenv(client.ENV_API_KEY, raising=False)
    monkeypatch.setattr(runpod, "api_key", None)  # no credentials file either
    err = io.StringIO()
    code = client.main(["--endpoint", "abc123", "tts", "Hi.", "--voice", "basic_ref_en.wav"],
                       stdout=io.StringIO(), stderr=err)
    assert code == 1 and err.getvalue() == f"No RunPod API key: set {client.ENV_API_KEY} or run `runpod config`.\n"


class FlakyRunPodApi:
    """RunPod's job API on loopback, answering each status poll from ``statuses`` in turn (the last
    one again after): a stand-in, since a gateway's 502 cannot be had from runpod's local server."""

    def __init__(self, statuses: list[tuple[int, dict]]):
        import http.server
        import threading

        self.statuses, self.polls = statuses, 0
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):  # noqa: N802 - /run
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.reply(200, {"id": "job-123", "status": "IN_QUEUE"})

            def do_GET(self):  # noqa: N802 - /status/<id>
                api.polls += 1
                self.reply(*api.statuses[min(api.polls, len(api.statuses)) - 1])

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.server.server_port}/v2"

    def run_client(self, monkeypatch, tmp_path) -> tuple[int, str, str]:
        import runpod

        monkeypatch.setattr(runpod, "endpoint_url_base", self.base_url)
        monkeypatch.setenv(client.ENV_API_KEY, "test-key")
        for name in PROXY_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        out, err = io.StringIO(), io.StringIO()
        code = client.main(["--endpoint", "EP", "--poll", "0.05", "--timeout", "20", "tts", "Hi.", "--voice",
                            "basic_ref_en.wav", "-o", str(tmp_path / "x.wav")], stdout=out, stderr=err)
        self.server.shutdown()
        return code, out.getvalue(), err.getvalue()


def test_a_poll_the_api_fails_to_answer_is_asked_again_and_a_refusal_keeps_the_job_id(monkeypatch, tmp_path):
    """One 502 from RunPod's gateway while polling ended the client (exit 2) without the id of the
    job it had submitted, which went on running and billed, and could no longer be fetched."""
    wav = io.BytesIO()
    sf.write(wav, speechlike(0.5), SR, format="WAV", subtype="PCM_16")
    done = {"id": "job-123", "status": "COMPLETED", "output": {"audio_base64": base64.b64encode(wav.getvalue()).decode()}}
    code, out, err = FlakyRunPodApi([(502, {"error": "bad gateway"}), (429, {}), (503, {}), (200, done)]).run_client(
        monkeypatch, tmp_path)
    assert code == 0 and json.loads(out)["id"] == "job-123", (out, err)
    assert (tmp_path / "x.wav").read_bytes() == wav.getvalue()
    code, out, err = FlakyRunPodApi([(404, {"error": "not found"})]).run_client(monkeypatch, tmp_path)
    assert code == 1 and err == ("The API answered HTTP 404 about job job-123 (check the endpoint); fetch it later "
                                 "with: download job-123\n"), err
