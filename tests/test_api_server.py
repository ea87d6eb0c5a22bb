"""The worker behind the runpod SDK's own local API server, as a real subprocess.

``python runpod-handler.py --rp_serve_api`` starts the SDK's FastAPI "development worker" with our
handler; storage is the real SeaweedFS S3 server over HTTPS. Jobs go in through ``POST /runsync``
(raw HTTP) and through the SDK's real client (``runpod.Endpoint(...).run_sync``); results come back
as presigned URLs that are downloaded and checked.

The local server has no ``/<endpoint_id>/`` prefix, while the client posts to
``{endpoint_url_base}/{endpoint_id}/runsync``. The endpoint id ``"."`` bridges the two with
configuration only: the URL ``http://127.0.0.1:<port>/./runsync`` is normalised (RFC 3986 dot
segments, done by requests/urllib3 when the request is prepared) to ``/runsync``.
"""
from __future__ import annotations

import re
import secrets
import sys
import uuid

import pytest
import soundfile as sf

from tests.fixtures_models import SR, speechlike
from tests.processes import tail
from tests.fixtures_api import JOB_TIMEOUT_S, NFE
from tests.helpers import assert_wav_matches

MARKER = "Quillibet" + secrets.token_hex(4)  # in every job's text; must never reach the server's log


@pytest.fixture(autouse=True)
def _server_log_on_failure(request, api):
    """A failed test gets the server's log tail on the terminal (not capturable: written at teardown)."""
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed:
        sys.__stderr__.write(f"\n--- API server log ({api.log_path}), tail ---\n{tail(api.log_path)}\n")
        sys.__stderr__.flush()


def tts_input(text: str, **kw) -> dict:
    return {"text": f"{text} {MARKER}.", "local_voice": "basic_ref_en.wav", "nfe_step": NFE, **kw}


# --- tests ----------------------------------------------------------------------------------------
def test_runsync_tts_with_builtin_voice(api):
    answer = api.runsync(tts_input("Hello from the local API server", seed=7))
    assert answer["status"] == "COMPLETED", answer
    output = answer["output"]
    assert output["seed"] == 7 and output["ref_text_source"] == "built-in" and output["sample_rate"] == 24000
    assert output["output_key"] == f"output/{answer['id']}.wav" and output["output_key"] in api.keys()
    assert_wav_matches(api.download(output["audio_url"]), output["duration"])
    assert f"logs/{answer['id']}.json" in api.keys()
    assert list(api.tmp_dir.iterdir()) == []


@pytest.mark.parametrize("job_input, expected", [
    (tts_input("Bad voice", local_voice="../etc/passwd.wav"), "'local_voice' must be a file name"),
    (tts_input("Too few steps", nfe_step=0), "'nfe_step' must be at least 1."),
    (tts_input("Unknown field", volume=11), "Unknown input field 'volume'."),
    ({"endpoint": "nope"}, "Unknown endpoint"),
])
def test_runsync_bad_input_fails_with_a_sentence(api, job_input, expected):
    before = {k for k in api.keys() if k.startswith(("voices/", "output/"))}
    answer = api.runsync(job_input)
    assert answer["status"] == "FAILED" and "output" not in answer, answer
    error = answer["error"]
    assert isinstance(error, str) and error.startswith(expected), error
    assert "\n" not in error and error.endswith(".") and not re.search(r"[.!?]\s+[A-Z]", error[:-1])
    assert {k for k in api.keys() if k.startswith(("voices/", "output/"))} == before
    assert list(api.tmp_dir.iterdir()) == []


def test_upload_then_tts_through_runsync(api, file_server):
    sf.write(str(file_server.root / "dave.wav"), speechlike(3.0, seed=9), SR, subtype="PCM_16")
    name = f"dave-{uuid.uuid4().hex[:8]}.wav"
    answer = api.runsync({"endpoint": "upload", "voice_file_url": file_server.url("dave.wav"), "voice_name": name,
                          "ref_text": "Dave reads a sentence aloud."})
    assert answer["status"] == "COMPLETED", answer
    assert answer["output"]["voice_key"] == f"voices/{name}"
    assert answer["output"]["duration"] == pytest.approx(3.0, abs=1e-3)
    assert f"voices/{name}" in api.keys()  # the transcript travels inside the voice object

    answer = api.runsync(tts_input("Dave says something new", local_voice=name))
    assert answer["status"] == "COMPLETED", answer
    output = answer["output"]
    assert output["voice"] == name and output["ref_text_source"] == "stored" and isinstance(output["seed"], int)
    assert_wav_matches(api.download(output["audio_url"]), output["duration"])


def test_real_runpod_client_run_sync(api, monkeypatch):
    import runpod

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)  # the client's session reads the environment
    monkeypatch.setattr(runpod, "api_key", "local-test")
    monkeypatch.setattr(runpod, "endpoint_url_base", api.base_url)
    endpoint = runpod.Endpoint(".")  # {base}/./runsync is normalised to {base}/runsync (module docstring)
    output = endpoint.run_sync({"input": tts_input("Sent by the real client", seed=3)}, timeout=JOB_TIMEOUT_S)
    assert isinstance(output, dict) and "error" not in output, output
    assert output["seed"] == 3 and output["sample_rate"] == 24000
    assert_wav_matches(api.download(output["audio_url"]), output["duration"])

    # a refused job: runsync answers FAILED, for which the client returns no output at all
    assert endpoint.run_sync({"input": tts_input("Refused", speed=0.1)}, timeout=JOB_TIMEOUT_S) is None


def test_server_log_holds_no_secret_and_no_job_text(api):
    """Runs last (file order): everything the server printed while serving the jobs above."""
    api.runsync(tts_input("One more job for the log check", seed=1))
    log = api.log_path.read_text(errors="replace")
    assert "Started." in log or "runsync" in log.lower() or "worker ready" in log  # the log is really this server's
    assert api.secret not in log
    assert MARKER not in log
    assert "X-Amz-Signature" not in log  # no presigned URL printed either
