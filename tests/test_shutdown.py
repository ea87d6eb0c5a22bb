"""SIGTERM ends a worker within seconds, even while a job waits on a server that never answers.

Each test runs the real entry point (``runpod-handler.py``) as a subprocess on the tiny models with
local storage, in one of runpod's two serving loops:

* ``queue``: the production loop (runpod's ``JobScaler``), fed by a fake RunPod job API on
  loopback: ``job-take`` hands out the test's job once, ``job-done`` records what the worker
  sends back (the result runpod built, ``stopPod`` included), ``job-stop`` has nothing to stop;
* ``api``: runpod's local API server (``--rp_serve_api``, uvicorn), a job sent to ``/runsync``.

The stuck job is an upload whose voice URL points at a socket that accepts connections and never
answers: the download thread waits out its 30 s read timeout, which (with Python joining every
thread at exit) is what held the exit before.
"""
from __future__ import annotations

import contextlib
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from f5worker.jobs.guard import EXIT_AFTER_S, SHUTDOWN_GRACE_S
from f5worker.settings import ENV_ALLOW_PRIVATE_URLS, ENV_VOCODER_DIR
from tests.processes import ORPHAN_GUARD, REPO, clean_env, free_port, local_session, tail, worker_env

READY_TIMEOUT_S = 180
# SIGTERM -> jobs answered after the grace -> the process gone at most EXIT_AFTER_S later; slack for
# a loaded 2-core machine. Before this bound existed the worker took over 30 s here.
EXIT_BOUND_S = SHUTDOWN_GRACE_S + EXIT_AFTER_S + 4
SHUTDOWN_SENTENCE = "The worker shut down before the job finished (stuck at: download_to_file); send it again."


class BlackHole:
    """Accepts TCP connections on loopback, reads nothing, answers nothing."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.held: list[socket.socket] = []
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/voice.wav"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        with contextlib.suppress(OSError):
            while True:
                self.held.append(self.sock.accept()[0])

    def wait_for_connection(self, proc: subprocess.Popen, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.held:
            assert proc.poll() is None, "the worker exited before the job reached the voice server"
            assert time.monotonic() < deadline, "the job never reached the voice server"
            time.sleep(0.05)
        time.sleep(0.3)  # the download thread is now blocked on its first read

    def close(self):
        for conn in self.held:
            conn.close()
        self.sock.close()


class FakeRunPod:
    """The job API runpod's production loop talks to (``RUNPOD_WEBHOOK_GET_JOB`` and friends)."""

    def __init__(self, job: dict):
        self.job = job
        self.taken = threading.Event()
        self.results: list[dict] = []
        self.answered = threading.Event()
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, body: bytes = b"", content_type: str = "application/json"):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802
                if self.path.startswith(("/job-take/", "/job-take-batch/")) and not api.taken.is_set():
                    api.taken.set()
                    batch = self.path.startswith("/job-take-batch/")
                    return self._reply(200, json.dumps([api.job] if batch else api.job).encode())
                time.sleep(0.5)  # a short long-poll: nothing more to take, nothing to stop
                return self._reply(204)

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path.startswith("/job-done/"):
                    api.results.append(json.loads(body))
                    api.answered.set()
                return self._reply(200, b"{}")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.env = {"RUNPOD_WEBHOOK_GET_JOB": f"{base}/job-take/$ID?gpu=test",
                    "RUNPOD_WEBHOOK_POST_OUTPUT": f"{base}/job-done/$RUNPOD_POD_ID/$ID?gpu=test",
                    "RUNPOD_POD_ID": "shutdown-test", "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
                    "RUNPOD_SKIP_GPU_CHECK": "true"}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def worker_process(args: list[str], env: dict[str, str], log_path: Path):
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "runpod-handler.py", *args], cwd=REPO, env=env,
                                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                preexec_fn=ORPHAN_GUARD)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def terminate_and_time(proc: subprocess.Popen, log_path: Path) -> float:
    started = time.monotonic()
    proc.terminate()  # SIGTERM
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not exit 60 s after SIGTERM\n{tail(log_path)}", pytrace=False)
    return time.monotonic() - started


@pytest.fixture
def env_for(tiny_models, tiny_whisper, tmp_path):
    def make(extra: dict[str, str] | None = None) -> tuple[dict[str, str], Path]:
        volume = tmp_path / "volume"
        env = clean_env({**worker_env(tiny_models, tiny_whisper, volume), ENV_ALLOW_PRIVATE_URLS: "true",
                         **(extra or {})})
        return env, volume / "jobtmp"
    return make


def upload_job(url: str) -> dict:
    return {"endpoint": "upload", "voice_file_url": url, "voice_name": "stuck.wav", "ref_text": "Some words."}


def test_queue_worker_answers_the_stuck_job_and_exits_promptly(env_for, tmp_path):
    hole = BlackHole()
    api = FakeRunPod({"id": "job-stuck-1", "input": upload_job(hole.url)})
    env, job_tmp = env_for(api.env)
    log_path = tmp_path / "worker.log"
    try:
        with worker_process([], env, log_path) as proc:
            assert api.taken.wait(READY_TIMEOUT_S), f"the worker never took the job\n{tail(log_path)}"
            hole.wait_for_connection(proc, timeout=60)
            seconds = terminate_and_time(proc, log_path)
            assert seconds < EXIT_BOUND_S, f"exit took {seconds:.1f} s\n{tail(log_path)}"
            assert api.results == [{"error": SHUTDOWN_SENTENCE}], tail(log_path)
            assert list(job_tmp.iterdir()) == []
    finally:
        api.close()
        hole.close()


def test_api_server_answers_the_stuck_job_and_exits_promptly(env_for, tmp_path):
    hole = BlackHole()
    env, job_tmp = env_for()
    port = free_port()
    log_path = tmp_path / "server.log"
    answers: list[dict] = []

    def runsync():
        with local_session() as session:
            answers.append(session.post(f"http://127.0.0.1:{port}/runsync", json={"input": upload_job(hole.url)},
                                        timeout=120).json())

    try:
        with worker_process(["--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port", str(port)],
                            env, log_path) as proc:
            _wait_listening(proc, port, log_path)
            client = threading.Thread(target=runsync, daemon=True)
            client.start()
            hole.wait_for_connection(proc, timeout=60)
            seconds = terminate_and_time(proc, log_path)
            client.join(timeout=10)
            assert seconds < EXIT_BOUND_S, f"exit took {seconds:.1f} s\n{tail(log_path)}"
            assert len(answers) == 1 and answers[0]["status"] == "FAILED", (answers, tail(log_path))
            assert answers[0]["error"] == SHUTDOWN_SENTENCE
            assert list(job_tmp.iterdir()) == []
    finally:
        hole.close()


def test_queue_worker_that_cannot_start_asks_to_be_replaced(env_for, tmp_path):
    """runpod's own result for the job carries ``stopPod``: RunPod replaces the worker."""
    api = FakeRunPod({"id": "job-on-broken-worker", "input": {"text": "Hello.", "local_voice": "basic_ref_en.wav"}})
    env, _ = env_for({**api.env, ENV_VOCODER_DIR: str(tmp_path / "no-vocoder")})
    log_path = tmp_path / "worker.log"
    try:
        with worker_process([], env, log_path) as proc:
            assert api.answered.wait(READY_TIMEOUT_S), f"no result was sent\n{tail(log_path)}"
            [result] = api.results
            assert result["stopPod"] is True and set(result) == {"error", "stopPod"}, result
            assert result["error"].startswith(f"{ENV_VOCODER_DIR} is set to ") and result["error"].endswith(".")
            assert terminate_and_time(proc, log_path) < EXIT_BOUND_S
    finally:
        api.close()


def _wait_listening(proc: subprocess.Popen, port: int, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    with local_session() as session:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"the server exited\n{tail(log_path)}"
            with contextlib.suppress(requests.RequestException):
                if session.get(f"http://127.0.0.1:{port}/docs", timeout=2).status_code == 200:
                    return
            time.sleep(0.25)
    pytest.fail(f"the API server did not start\n{tail(log_path)}", pytrace=False)


@pytest.mark.parametrize("streaming", ["0", "1"])
def test_queue_worker_with_a_refused_setting_answers_each_job_and_stays(env_for, tmp_path, streaming):
    """Before, the worker exited at start (status 2): RunPod restarted it in a loop and the queue's
    jobs waited, their callers never told why. A new worker reads the same variables, so no
    ``stopPod``: the worker stays, to answer the next job the same way."""
    from f5worker.refusal import refusal_sentence
    from f5worker.settings import ENV_MAX_CONCURRENCY, ENV_STREAMING

    api = FakeRunPod({"id": "job-on-misconfigured-worker", "input": {"text": "Hello.", "local_voice": "x.wav"}})
    env, _ = env_for({**api.env, ENV_MAX_CONCURRENCY: "many", ENV_STREAMING: streaming})
    log_path = tmp_path / "worker.log"
    try:
        with worker_process([], env, log_path) as proc:
            assert api.answered.wait(READY_TIMEOUT_S), f"no result was sent\n{tail(log_path)}"
            sentence = refusal_sentence(f"{ENV_MAX_CONCURRENCY} must be a whole number at least 1, not 'many'")
            [result] = api.results
            assert result == {"error": sentence}, result  # runpod makes a streamed job's error item the job's error
            time.sleep(1.5)  # runpod would have stopped taking jobs by now if it were asked to
            assert proc.poll() is None, tail(log_path)
            assert "Traceback" not in tail(log_path) and "torch" not in tail(log_path)
            assert terminate_and_time(proc, log_path) < EXIT_BOUND_S
    finally:
        api.close()
