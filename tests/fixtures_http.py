"""HTTP fixtures: a loopback file server, and a guard that keeps a test's traffic on loopback.

``file_server``: a threaded ``http.server`` on 127.0.0.1 (a free port) serving a fresh directory.
Put files in ``file_server.root`` and fetch them at ``file_server.url(name)``. Besides plain files
it answers a few special paths, for the download tests (all under ``/_``, so they never clash with
a file name):

    /_chain/<n>/<name>     n redirects (302) in a row, then the file <name>
    /_loop                 redirects to itself forever
    /_redirect?to=<url>    one 302 to <url> (absolute or relative; URL-encode it)
    /_redirect_nolocation  a 302 without a Location header
    /_status/<code>        an empty answer with that status
    /_drip?n=&delay=       n bytes with a Content-Length, one byte every <delay> seconds
    /_stall?delay=         headers with a Content-Length, then silence for <delay> seconds
    /_huge                 declares a Content-Length of 1 TB, sends 1 KB and closes
    /_chunked?n=           n bytes, chunked transfer encoding, no Content-Length
    /_short                declares 1000 bytes, sends 10 and closes
    /_empty                200 with an empty body

``file_server.requests`` lists every request path (with its query) the server has seen, so a test
can assert that a refused URL never reached it; ``file_server.hosts`` the Host header of each.

``https_file_server``: the same over TLS, with a throw-away certificate for the name
``voice.test`` (made with the ``openssl`` command; the test is skipped without it). Its URLs use
``https://voice.test:<port>/``; the test must make ``voice.test`` resolve to 127.0.0.1 and trust
``.ca_file``.

``loopback_only``: while active, any connection attempt to a non-loopback address and any name
lookup other than ``localhost`` or an IP literal fails (raises ``PermissionError``), and the test
fails at teardown if one was attempted, even if the code under test swallowed the error.
"""
from __future__ import annotations

import http.server
import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import pytest

_HUGE_LENGTH = 10**12


class _Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # needed for chunked bodies; every answer sets its length

    def log_message(self, format, *args):  # keep test output quiet
        pass

    # --- helpers ---
    def _empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _body_headers(self, length: int | None, close: bool = False) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if length is None:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(length))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()

    def _sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, 30.0))  # never hold a thread longer than that

    # --- routing ---
    def do_GET(self):  # noqa: N802, C901 - http.server's naming; a test server's routes
        self.server.requests.append(self.path)
        self.server.hosts.append(self.headers.get("Host", ""))
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        segments = parts.path.split("/")[1:]
        route = segments[0] if segments else ""
        try:
            if route == "_chain" and len(segments) >= 3:
                n, name = int(segments[1]), "/".join(segments[2:])
                if n <= 0:
                    self.path = "/" + name
                    return super().do_GET()
                return self._empty(302, {"Location": f"/_chain/{n - 1}/{name}"})
            if route == "_loop":
                return self._empty(302, {"Location": "/_loop"})
            if route == "_redirect":
                return self._empty(302, {"Location": query["to"]})
            if route == "_redirect_nolocation":
                return self._empty(302)
            if route == "_status" and len(segments) >= 2:
                return self._empty(int(segments[1]))
            if route == "_drip":
                n, delay = int(query.get("n", "100")), float(query.get("delay", "0.05"))
                self._body_headers(n, close=True)
                for _ in range(n):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    self._sleep(delay)
                return None
            if route == "_stall":
                self._body_headers(100, close=True)
                self.wfile.flush()
                self._sleep(float(query.get("delay", "5")))
                return None
            if route == "_huge":
                self._body_headers(_HUGE_LENGTH, close=True)
                self.wfile.write(b"x" * 1024)
                return None
            if route == "_chunked":
                n = int(query.get("n", "100000"))
                self._body_headers(None)
                block = b"y" * 4096
                sent = 0
                while sent < n:
                    piece = block[: min(len(block), n - sent)]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    sent += len(piece)
                self.wfile.write(b"0\r\n\r\n")
                return None
            if route == "_short":
                self._body_headers(1000, close=True)
                self.wfile.write(b"z" * 10)
                return None
            if route == "_empty":
                return self._empty(200)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up: expected in tests
            self.close_connection = True
            return None
        return super().do_GET()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):  # a client hanging up is not an error here
        pass


@dataclass
class FileServer:
    root: Path
    host: str
    port: int
    requests: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)
    scheme: str = "http"
    ca_file: Path | None = None

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        """The URL of ``path`` (a file name under ``root``, or a special ``_...`` path, which may
        carry its own query string). File names are percent-encoded; whatever follows the first
        ``?`` is kept as the query, as given."""
        path = path.lstrip("/")
        if path.startswith("_"):
            return f"{self.base_url}/{path}"
        name, sep, query = path.partition("?")
        return f"{self.base_url}/{quote(name)}{sep}{query}"


def _serve(root: Path, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1",
           ca_file: Path | None = None):
    def handler(*args, **kwargs):
        return _Handler(*args, directory=str(root), **kwargs)

    server = _Server(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    server.requests, server.hosts = [], []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="file_server", daemon=True)
    thread.start()
    try:
        yield FileServer(root=root, host=host, port=server.server_address[1],
                         requests=server.requests, hosts=server.hosts,
                         scheme="https" if tls is not None else "http", ca_file=ca_file)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def file_server(tmp_path_factory):
    yield from _serve(tmp_path_factory.mktemp("http_root"))


TLS_NAME = "voice.test"


@pytest.fixture
def https_file_server(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    certs = tmp_path_factory.mktemp("tls")
    cert, key = certs / "cert.pem", certs / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", f"/CN={TLS_NAME}", "-addext", f"subjectAltName=DNS:{TLS_NAME}"],
        check=True, capture_output=True, timeout=30)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    yield from _serve(tmp_path_factory.mktemp("https_root"), context, host=TLS_NAME,
                      ca_file=cert)


# --- keep traffic on loopback ---------------------------------------------------------------------
def _is_loopback(host) -> bool:
    try:
        return ipaddress.ip_address(str(host).split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _is_numeric_host(name, getaddrinfo) -> bool:
    """An address literal the resolver answers without asking DNS (incl. 127.1, 2130706433)."""
    if name is None:
        return True
    try:
        getaddrinfo(name, None, flags=socket.AI_NUMERICHOST)  # never queries DNS
        return True
    except (socket.gaierror, UnicodeError):
        return False


@pytest.fixture
def loopback_only(monkeypatch):
    """Fail any connection or name lookup that could leave the machine (see module docstring).

    Yields the list of refused attempts (empty when all is well)."""
    attempts: list[str] = []
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def check_address(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            attempts.append(f"connect {address[0]}")
            raise PermissionError(f"test guard: connection to {address[0]} refused")

    def connect(self, address):
        check_address(self, address)
        return real_connect(self, address)

    def connect_ex(self, address):
        check_address(self, address)
        return real_connect_ex(self, address)

    def getaddrinfo(host, port, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name is not None and str(name).lower().rstrip(".") == "localhost":
            name = "127.0.0.1"
        elif not _is_numeric_host(name, real_getaddrinfo):
            attempts.append(f"lookup {name}")
            raise socket.gaierror(socket.EAI_NONAME, "test guard: name lookups are refused")
        return real_getaddrinfo(name, port, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield attempts
    monkeypatch.undo()
    assert not attempts, f"non-loopback network use attempted: {attempts}"
