"""Real faults for the fault matrix: an S3 server that can be stopped and restarted, a hung endpoint,
a proxy that answers 503, and a tmpfs small enough to fill.

Why this module exists: the reliability figures must come from faults caused for real on loopback,
not from mocked clients. Each piece is a plain context manager:

``restartable_s3(folder)``   a private SeaweedFS (``weed mini``, HTTPS, its own credentials) whose
                              ``stop()``/``start()`` keep ports, certificate and data;
``hung_endpoint()``          a port that accepts connections and never answers (URL ``http://...``);
``dripping_endpoint()``      a port that answers headers, then one body byte every half second;
``fault_proxy(server, rule)`` a loopback HTTP proxy in front of an S3 server that answers 503 with
                              an S3 error body whenever ``rule(method, path)`` says so, else forwards;
``small_tmpfs(folder, size)`` a tmpfs of ``size`` mounted at ``folder`` (root only; None where
                              mounting is not allowed, so the caller can say so).
"""
from __future__ import annotations

import contextlib
import http.server
import json
import os
import secrets
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import requests

from f5worker.settings import ENV_S3_BUCKET
from tests.fixtures_s3 import (START_TIMEOUT_S, S3Server, _stop, _tail, _wait_ready,
                               _weed_args, _weed_command, _write_certificate)
from tests.processes import ORPHAN_GUARD


# --- an S3 server this test may stop ---------------------------------------------------------------
class RestartableS3:
    """A private SeaweedFS that keeps its ports, certificate, credentials and data across restarts."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        ca, cert, key = _write_certificate(folder)
        access_key, secret_key = "AK" + secrets.token_hex(9).upper(), secrets.token_urlsafe(30)
        config = folder / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "tester", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self.args = _weed_args(folder, cert, key, config)
        self.log_path = folder / "weed.log"
        self.server = S3Server(f"https://127.0.0.1:{self.args['s3.port.https']}", access_key, secret_key, str(ca),
                               self.log_path)
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> float:
        """Start (again) and wait until it answers; returns the seconds that took."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != ENV_S3_BUCKET}
        started = time.monotonic()
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(_weed_command(self.folder, self.args), cwd=self.folder, env=env,
                                         stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                         preexec_fn=ORPHAN_GUARD)
        why = _wait_ready(self.server, self.proc, started + START_TIMEOUT_S)
        if why is not None:
            self.stop()
            raise RuntimeError(f"private SeaweedFS did not start: {why}\n{_tail(self.log_path)}")
        self.starts += 1
        return time.monotonic() - started

    def wait_writable(self, bucket: str, timeout_s: float = 30.0) -> None:
        """Until an object can be written to ``bucket`` and read back: after a restart the S3 API
        lists buckets a little before its volume server has registered again."""
        client, deadline = self.server.client(), time.monotonic() + timeout_s
        while True:
            try:
                client.put_object(Bucket=bucket, Key="ready-probe", Body=b"ok")
                client.get_object(Bucket=bucket, Key="ready-probe")["Body"].read()
                client.delete_object(Bucket=bucket, Key="ready-probe")
                return
            except Exception:  # not ready yet: any error, until the deadline
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc, self.args)
            self.proc = None


@contextlib.contextmanager
def restartable_s3(folder: Path) -> Iterator[RestartableS3]:
    s3 = RestartableS3(folder)
    s3.start()
    try:
        yield s3
    finally:
        s3.stop()


# --- endpoints that never finish an answer ----------------------------------------------------------
@contextlib.contextmanager
def _loopback_endpoint(name: str, on_connection: Callable[[socket.socket, threading.Event], None]) -> Iterator[str]:
    """``http://127.0.0.1:<port>``, each accepted connection handed to ``on_connection(conn,
    stop)`` on the accepting thread; ``stop`` is set when the block ends."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (socket.timeout, OSError):
                continue
            on_connection(conn, stop)

    thread = threading.Thread(target=accept, name=name, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


@contextlib.contextmanager
def hung_endpoint() -> Iterator[str]:
    """``http://127.0.0.1:<port>``: connections are accepted, read from, and never answered."""
    held: list[socket.socket] = []
    try:
        with _loopback_endpoint("hung-endpoint", lambda conn, stop: held.append(conn)) as url:
            yield url
    finally:
        for conn in held:
            conn.close()


def _drip(conn: socket.socket, stop: threading.Event) -> None:
    """Read one request's headers, answer headers promising 1,000 bytes, then a byte each 0.5 s."""
    with conn:
        request = b""
        try:
            while b"\r\n\r\n" not in request and not stop.is_set():
                chunk = conn.recv(4096)
                if not chunk:
                    return
                request += chunk
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\n")
            while not stop.wait(0.5):
                conn.sendall(b"x")
        except OSError:
            return


@contextlib.contextmanager
def dripping_endpoint() -> Iterator[str]:
    """``http://127.0.0.1:<port>``: every request gets headers, then one body byte each half
    second, so no socket read waits long enough for a read timeout."""
    def on_connection(conn: socket.socket, stop: threading.Event) -> None:
        threading.Thread(target=_drip, args=(conn, stop), name="dripping-endpoint-conn", daemon=True).start()

    with _loopback_endpoint("dripping-endpoint", on_connection) as url:
        yield url


# --- a proxy that fails chosen requests -----------------------------------------------------------
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "content-length", "te", "upgrade"}
_SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code>'
              b"<Message>Injected by the test proxy</Message></Error>")


class FaultProxy:
    """Counts what it forwarded and what it failed; ``rule(method, path)`` -> True to answer 503."""

    def __init__(self, upstream: S3Server, rule: Callable[[str, str], bool]):
        self.upstream = upstream
        self.rule = rule
        self.forwarded = 0
        self.failed = 0
        self.lock = threading.Lock()
        self.url = ""


@contextlib.contextmanager
def fault_proxy(upstream: S3Server, rule: Callable[[str, str], bool]) -> Iterator[FaultProxy]:
    """A plain-HTTP proxy on 127.0.0.1 in front of ``upstream`` (HTTPS). The Host header is passed
    through unchanged, so SigV4 signatures made for the proxy's address still verify upstream."""
    proxy = FaultProxy(upstream, rule)
    session = requests.Session()
    session.trust_env = False

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # answers "Expect: 100-continue" as botocore's PUTs ask

        def log_message(self, format, *args):
            pass

        def _relay(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            with proxy.lock:
                fail = proxy.rule(self.command, self.path)
                if fail:
                    proxy.failed += 1
                else:
                    proxy.forwarded += 1
            if fail:
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(_SLOW_DOWN)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(_SLOW_DOWN)
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            answer = session.request(self.command, upstream.endpoint_url + self.path, headers=headers, data=body,
                                     verify=upstream.ca_bundle, timeout=30, allow_redirects=False, stream=True)
            content = answer.raw.read(decode_content=False)
            self.send_response(answer.status_code)
            for name, value in answer.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    self.send_header(name, value)
            if self.command == "HEAD":
                self.send_header("Content-Length", answer.headers.get("Content-Length", "0"))
                self.end_headers()
                return
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address):  # a client giving up is not an error here
            pass

    server = Server(("127.0.0.1", 0), Handler)
    proxy.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fault-proxy",
                              daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
        session.close()
        thread.join(timeout=5)


# --- a disk that fills up -------------------------------------------------------------------------
@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str = "1m") -> Iterator[Path | None]:
    """A tmpfs of ``size`` at ``folder``, or None where mounting is not allowed (not root, no
    CAP_SYS_ADMIN, a container without it)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    try:
        yield folder if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder: Path, leave_bytes: int) -> Path:
    """Fill the file system of ``folder`` until about ``leave_bytes`` are free; returns the filler."""
    filler = folder / "filler.bin"
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(filler, "wb") as out:
        out.write(b"\0" * max(0, free - leave_bytes))
    return filler
