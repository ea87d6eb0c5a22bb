"""``python runpod-handler.py --test_input '<json>'``: one local job through the runpod SDK, exit 0 or 1.

Runs the real entry point as a subprocess on the tiny models with local storage (no S3), offline.
"""
from __future__ import annotations

import json
import secrets
import subprocess
import sys

import pytest
import soundfile as sf

from f5worker.jobs.inputs import TTSInput, parse_job_input
from tests.processes import REPO, clean_env
from tests.processes import child_env

MARKER = "Frobnitz" + secrets.token_hex(4)


@pytest.fixture(scope="module")
def cli(tiny_models, tiny_whisper, tmp_path_factory):
    volume = tmp_path_factory.mktemp("cli") / "volume"
    env = child_env(tiny_models, tiny_whisper, volume)

    def run(job: dict) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "runpod-handler.py", "--test_input", json.dumps(job)],
                              cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=180)

    run.volume, run.env = volume, env
    return run


def test_valid_tts_job_exits_0_and_writes_the_output(cli):
    done = cli({"input": {"text": f"Hello from the command line {MARKER}.", "local_voice": "basic_ref_en.wav",
                          "nfe_step": 6, "seed": 42}})
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "completed successfully" in log
    output = cli.volume / "storage" / "output" / "local_test.wav"  # runpod names the local job "local_test"
    info = sf.info(str(output))
    assert info.samplerate == 24000 and info.frames > 0
    record = json.loads((cli.volume / "storage" / "logs" / "local_test.json").read_text())
    assert record["status"] == "ok" and record["endpoint"] == "tts"
    assert list((cli.volume / "jobtmp").iterdir()) == []
    assert MARKER not in log  # runpod's DEBUG level would print the job; the entry point keeps it at INFO


@pytest.mark.parametrize("job", [
    {"input": {"text": "No voice given."}},
    {"input": {"text": "Bad steps.", "local_voice": "basic_ref_en.wav", "nfe_step": 0}},
    {"input": {"text": "Seed as text.", "local_voice": "basic_ref_en.wav", "nfe_step": 6, "seed": "7"}},
    {"input": {"text": "Unknown voice.", "local_voice": "not-uploaded.wav", "nfe_step": 6}},
])
def test_invalid_job_exits_non_zero(cli, job):
    done = cli(job)
    log = done.stdout + done.stderr
    assert done.returncode != 0, log[-4000:]
    assert "failed with error" in log, log[-4000:]
    assert list((cli.volume / "jobtmp").iterdir()) == []


def test_repo_test_input_json_is_a_valid_job():
    job = json.loads((REPO / "test_input.json").read_text())
    parsed = parse_job_input(job["input"])
    assert isinstance(parsed, TTSInput)
    assert parsed.local_voice in ("basic_ref_en.wav", "basic_ref_zh.wav")  # runs with no upload first


def test_a_bad_setting_is_one_line_naming_the_variable(tiny_models, tiny_whisper, tmp_path):
    from f5worker.settings import ENV_MAX_CONCURRENCY

    env = {**child_env(tiny_models, tiny_whisper, tmp_path / "volume"), ENV_MAX_CONCURRENCY: "many"}
    run = subprocess.run([sys.executable, "runpod-handler.py", "--test_input", json.dumps({"input": {}})],
                         cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert f"{ENV_MAX_CONCURRENCY} must be a whole number at least 1, not 'many'" in run.stderr
    assert "Traceback" not in run.stderr


def test_the_gate_fails_a_bad_setting_without_a_traceback(tmp_path):
    from f5worker.settings import ENV_PRESIGN_EXPIRY

    env = clean_env({ENV_PRESIGN_EXPIRY: "soon"})
    run = subprocess.run([sys.executable, "validate-storage-config.py", "--skip-s3", "--skip-gpu"], cwd=REPO,
                         env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert f"FAIL  settings  {ENV_PRESIGN_EXPIRY} must be a whole number at least 1, not 'soon'." in run.stdout


@pytest.mark.parametrize("streaming", ["1", "0"])
def test_the_test_job_runs_on_a_streaming_endpoint_and_its_result_is_logged_without_secrets(
        tiny_models, tiny_whisper, tmp_path, streaming):
    """With F5_STREAMING=1 runpod's local mode never ran the job (the handler is a generator) and
    said it succeeded; in both modes it logged the whole result."""
    env = {**child_env(tiny_models, tiny_whisper, tmp_path / "volume"), "F5_STREAMING": streaming}

    def run(job):
        return subprocess.run([sys.executable, "runpod-handler.py", "--test_input", json.dumps(job)], cwd=REPO,
                              env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)

    done = run({"input": {"text": f"Streamed or not {MARKER}.", "local_voice": "basic_ref_en.wav", "nfe_step": 4,
                          "stream": streaming == "1"}})
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "completed successfully" in log and MARKER not in log
    assert (tmp_path / "volume" / "storage" / "output" / "local_test.wav").is_file()  # the job really ran
    assert "audio_base64\": \"<" in log  # inline audio shown by its size only
    failed = run({"input": {"text": "Nobody.", "local_voice": "nobody-here.wav"}})
    assert failed.returncode == 1 and "failed with error" in failed.stdout + failed.stderr


def test_shown_results_carry_no_signature_and_no_words():
    from f5worker.local_job import shown

    result = {"audio_url": "https://b.example/output/x.wav?X-Amz-Signature=abc&X-Amz-Credential=AK",
              "ref_text": "My secret words.", "voices": [{"ref_text": "More words."}], "duration": 1.5,
              "segments": [{"text": "Zebulon said.", "start": 0.0, "end": 1.5,
                            "words": [{"word": "Zebulon", "start": 0.0, "end": 0.8}]}]}  # timestamps: word
    text = json.dumps(shown(result))
    assert "Signature" not in text and "secret" not in text and "More words" not in text and "Zebulon" not in text
    assert "https://b.example/output/x.wav" in text and "1.5" in text


@pytest.mark.parametrize(("text", "expected"), [
    ("not json", "The test input (--test_input) is not JSON: Expecting value at line 1 column 1."),
    ("[" * 100_000, "The test input (--test_input) is not JSON: nested too deeply."),  # was a RecursionError
    ("[1]", 'The test input (--test_input) must be a JSON object such as {"input": {"text": ...}}, not list.'),
    ('"x"', 'The test input (--test_input) must be a JSON object such as {"input": {"text": ...}}, not str.'),
    ('{"id": 5, "input": {}}', "The test input's 'id' (--test_input) must be a string of letters, digits, '_' "
                               "and '-' (it names the job's files), or left out for local_test."),
    ('{"id": "../x", "input": {}}', "The test input's 'id' (--test_input) must be a string of letters, "
                                    "digits, '_' and '-' (it names the job's files), or left out for local_test."),
])
def test_a_test_input_that_cannot_be_run_is_one_sentence(text, expected):
    from f5worker.errors import InputError
    from f5worker.local_job import parse_test_job

    with pytest.raises(InputError) as refused:
        parse_test_job(text, "--test_input")
    assert str(refused.value) == expected
    assert parse_test_job('{"input": {}}', "x") == {"id": "local_test", "input": {}}


def test_a_test_input_integer_past_int_s_4300_digits_meets_its_fields_bound():
    """It was a ValueError from int() (a traceback); now the job refuses it as any seed too large."""
    from f5worker.errors import InputError
    from f5worker.local_job import parse_test_job

    job = parse_test_job('{"input": {"text": "Hi.", "local_voice": "a.wav", "seed": %s}}' % ("9" * 5000), "x")
    with pytest.raises(InputError, match=r"^'seed' must be at most 2147483647\.$"):
        parse_job_input(job["input"])


def test_a_test_input_json_that_is_not_an_object_exits_1_without_a_traceback(cli):
    done = subprocess.run([sys.executable, "runpod-handler.py", "--test_input", "[1]"], cwd=REPO,
                          env=cli.env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)
    log = done.stdout + done.stderr
    assert done.returncode == 1, log[-4000:]
    assert "must be a JSON object such as" in log and "Traceback" not in log
