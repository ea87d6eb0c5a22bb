"""Child processes of the tests and the soak: the worker's entry point and SeaweedFS.

Why this module exists: the suite and bench/soak.py start real servers as subprocesses. What they
share is defined once here: which of the developer's variables never reach a child, the worker's variables
on the tiny models, the guard that takes a child down with its parent, a free loopback port, a session that cannot leave loopback,
the worker's local API server started and waited for, and a child stopped politely then surely.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from f5worker.settings import (ENV_ASR_MODEL, ENV_BAKED_MODEL_DIR, ENV_HTTP_HOST, ENV_PORT, ENV_PORT_HEALTH, ENV_SERVE,
                               ENV_TMP_DIR, ENV_VOLUME_PATH)

REPO = Path(__file__).resolve().parent.parent
# Variables a developer's shell may hold that must not reach the worker (it would act on them).
WORKER_ENV_DROP = re.compile(
    r"^(AWS_|BUCKET_|S3_BUCKET$|RUNPOD_|F5_|ASR_MODEL$|HF_|TRANSFORMERS_|TORCH_HOME$|.*_proxy$|.*_PROXY$)")


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without worker/cloud/proxy settings, offline, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not WORKER_ENV_DROP.match(k)}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **(extra or {}))
    return env


def worker_env(tiny_models: dict[str, str], tiny_whisper: Path, volume: Path,
               extra: dict[str, str] | None = None) -> dict[str, str]:
    """A worker on the tiny models with its volume (and temp folder) under ``volume``, no baked models."""
    (volume / "jobtmp").mkdir(parents=True, exist_ok=True)
    return {**tiny_models, ENV_VOLUME_PATH: str(volume), ENV_TMP_DIR: str(volume / "jobtmp"),
            ENV_ASR_MODEL: str(tiny_whisper), ENV_BAKED_MODEL_DIR: str(volume / "no-baked-models"), **(extra or {})}


def die_with_parent() -> None:  # in the child, before exec: no orphaned server if the parent dies
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


ORPHAN_GUARD = die_with_parent if sys.platform == "linux" else None  # Popen's preexec_fn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # no proxies, no .netrc: loopback only
    return session


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM, then SIGKILL if the child is still there after ``grace_s``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def start_api_server(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, str]:
    """``runpod-handler.py --rp_serve_api`` on a free loopback port: the process and its base URL."""
    port = free_port()
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "runpod-handler.py", "--rp_serve_api", "--rp_api_host", "127.0.0.1",
             "--rp_api_port", str(port)],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            preexec_fn=ORPHAN_GUARD)
    return proc, f"http://127.0.0.1:{port}"


def start_http_server(env: dict[str, str], log_path: Path, *, health_apart: bool = False
                      ) -> tuple[subprocess.Popen, str, str]:
    """``F5_SERVE=http runpod-handler.py`` on free loopback ports: the process, the API's base URL
    and /ping's (on a port of its own with ``health_apart``)."""
    port = free_port()
    health = free_port() if health_apart else port
    env = {**env, ENV_SERVE: "http", ENV_HTTP_HOST: "127.0.0.1", ENV_PORT: str(port), ENV_PORT_HEALTH: str(health)}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "runpod-handler.py"], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=ORPHAN_GUARD)
    return proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{health}/ping"


def wait_api_ready(base_url: str, proc: subprocess.Popen, timeout_s: float) -> str | None:
    """None once the server answers, or why it did not within ``timeout_s``."""
    deadline, last = time.monotonic() + timeout_s, "not tried"
    with local_session() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return f"the server exited with status {proc.returncode}"
            try:
                response = session.get(f"{base_url}/docs", timeout=2)  # redirects to the docs page
                if response.status_code == 200:
                    return None
                last = f"HTTP {response.status_code}"
            except requests.RequestException as err:
                last = type(err).__name__
            time.sleep(0.25)
    return f"not ready after {timeout_s:g} s (last: {last})"


ENV_TRITON_INTERPRET = "TRITON_INTERPRET"  # read by Triton itself, at import
INTERPRETED = os.environ.get(ENV_TRITON_INTERPRET) == "1"


def run_interpreted(test_file: str, test_class: str) -> None:
    """Runs ``test_file::test_class`` in a fresh pytest under Triton's interpreter (Triton reads the
    switch once, at import, so it cannot be turned on in this process) and asserts it all passed."""
    env = {**os.environ, ENV_TRITON_INTERPRET: "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          f"{Path(test_file).resolve().relative_to(REPO)}::{test_class}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert re.search(r"\d+ passed", run.stdout) and "skipped" not in run.stdout, run.stdout[-2000:]


def child_env(tiny_models, tiny_whisper, volume: Path) -> dict[str, str]:
    """The entry point's environment: tiny models, local storage, offline, nothing from this shell's
    worker or cloud settings."""
    return clean_env(worker_env(tiny_models, tiny_whisper, volume))
