"""Fetch a caller-supplied URL (a voice file) to a local file, safely.

Why this module exists: a job may name a ``voice_file_url``, which makes the worker fetch an
arbitrary URL from inside the provider's network. Left unchecked that is a server-side request
forgery hole (cloud metadata at 169.254.169.254, services on localhost or the private network),
a way to fill the disk or hang a worker forever, and a way to leak presigned URLs into logs.
Every rule lives here, once:

* only ``http``/``https``; no ``user:pass@`` in the URL; a host is required;
* every address the host resolves to must be public, unless ``allow_private`` is set (the operator
  switch :data:`f5worker.settings.ENV_ALLOW_PRIVATE_URLS`); the check runs before any connection,
  and again inside the connection itself, which connects only to an address it has just checked
  (so a DNS answer that changes between check and connect cannot reach a private address);
* redirects are followed by hand, at most :data:`MAX_REDIRECTS`, each hop checked like the first;
* the size cap is enforced on ``Content-Length`` and again while streaming; a connect timeout, a
  per-read timeout and a total deadline bound the time spent;
* the body goes to a temporary file beside ``dest`` and is renamed into place only on success; on
  any failure neither the temporary file nor ``dest`` is left behind;
* every failure is one :class:`~f5worker.errors.InputError` sentence (a local disk failure is a
  :class:`~f5worker.errors.StorageError`) that names at most the host, never the query string,
  which may carry a signature. Logs use :func:`describe_url` for the same reason, and exceptions
  are raised ``from None`` so a logged traceback cannot carry the library's message (it quotes
  the full URL).

Environment proxies and ``.netrc`` are ignored (``Session.trust_env = False``): a proxy would make
the address check meaningless and ``.netrc`` could attach credentials to a caller-chosen host.
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import urljoin, urlsplit

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from f5worker.errors import InputError, StorageError
from f5worker.settings import ENV_ALLOW_PRIVATE_URLS

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 5
CHUNK_BYTES = 64 * 1024
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_URL_FORBIDDEN_CHARS = frozenset(" \t\r\n\\\x00")


# --- describing URLs safely -----------------------------------------------------------------------
def describe_url(url: str) -> str:
    """``scheme://host[:port]/path`` of ``url``: no user info, query or fragment. For logs."""
    try:
        parts = urlsplit(str(url))
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<invalid URL>"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else "<invalid URL>"


def _format_limit(max_bytes: int) -> str:
    mb = 1024 * 1024
    if max_bytes >= mb:
        value = max_bytes / mb
        return f"{value:.0f} MB" if value == int(value) else f"{value:.1f} MB"
    if max_bytes >= 1024 and max_bytes % 1024 == 0:
        return f"{max_bytes // 1024} KB"
    return f"{max_bytes}-byte"


# --- address checks -------------------------------------------------------------------------------
def _address_refused(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for anything but a plain public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d reaches a.b.c.d
            return _address_refused(ip.ipv4_mapped)
        if ip.sixtofour is not None:  # 2002:aabb:ccdd:: tunnels to a.b.c.d
            return _address_refused(ip.sixtofour)
        if ip in _NAT64:  # DNS64/NAT64: judge the IPv4 address it stands for
            return _address_refused(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
            or ip.is_reserved or ip.is_unspecified or not ip.is_global)


def _resolve(host: str, port: int, field: str) -> list[tuple]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError):
        raise InputError(f"{field} host {host} could not be resolved.") from None
    if not infos:
        raise InputError(f"{field} host {host} could not be resolved.")
    return infos


def _check_addresses(infos: list[tuple], field: str, redirected: bool) -> None:
    """Raise if any resolved address is not public. Each info is a getaddrinfo 5-tuple."""
    for info in infos:
        address = str(info[4][0]).split("%", 1)[0]
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            raise InputError(f"{field} resolves to an address that cannot be checked, "
                             "which is refused.") from None
        if _address_refused(ip):
            verb = "redirected to" if redirected else "points to"
            logger.warning("Refused a download to %s (set %s to allow private addresses)",
                           address, ENV_ALLOW_PRIVATE_URLS)
            raise InputError(f"{field} {verb} a private or loopback address ({address}), "
                             "which is refused.")


def _check_url(url: str, field: str, allow_private: bool, redirected: bool) -> None:
    """Scheme, credentials, host and (unless allowed) addresses of one hop; connects to nothing."""
    where = f"{field} redirected to a URL that" if redirected else field
    if any(ch in _URL_FORBIDDEN_CHARS for ch in url):
        raise InputError(f"{field} is not a valid URL." if not redirected
                         else f"{where} is not valid.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise InputError(f"{field} is not a valid URL." if not redirected
                         else f"{where} is not valid.") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise InputError(f"{field} must be an http or https URL." if not redirected
                         else f"{where} is not http or https, which is refused.")
    if "@" in parts.netloc or parts.username is not None or parts.password is not None:
        raise InputError(f"{field} must not contain a user name or password." if not redirected
                         else f"{where} contains a user name or password, which is refused.")
    host = parts.hostname
    if not host:
        raise InputError(f"{field} has no host name." if not redirected
                         else f"{where} has no host name.")
    if allow_private:
        return
    port = port if port is not None else (443 if scheme == "https" else 80)
    _check_addresses(_resolve(host, port, field), field, redirected)


# --- connections that only reach checked addresses ------------------------------------------------
def _session(field: str, allow_private: bool, sockets: list | None = None) -> requests.Session:
    """A session whose connections resolve, check, then connect to the checked address itself.
    Each socket it opens is appended to ``sockets`` (for the deadline watchdog)."""

    def pinned_new_conn(conn, parent_new_conn):
        host = conn._dns_host  # what urllib3 itself would resolve (brackets and dot stripped)
        infos = _resolve(host, conn.port, field)
        if not allow_private:
            _check_addresses(infos, field, redirected=False)
        original, last_error = conn._dns_host, None
        try:
            for info in infos:
                conn._dns_host = str(info[4][0])
                try:
                    sock = parent_new_conn(conn)
                    if sockets is not None:
                        sockets.append(sock)
                    return sock
                except (urllib3.exceptions.NewConnectionError,
                        urllib3.exceptions.ConnectTimeoutError) as exc:
                    last_error = exc
            raise last_error  # type: ignore[misc]
        finally:
            conn._dns_host = original

    class _HTTPConn(HTTPConnection):
        def _new_conn(self):
            return pinned_new_conn(self, HTTPConnection._new_conn)

    class _HTTPSConn(HTTPSConnection):
        def _new_conn(self):
            return pinned_new_conn(self, HTTPSConnection._new_conn)

    class _HTTPPool(HTTPConnectionPool):
        ConnectionCls = _HTTPConn

    class _HTTPSPool(HTTPSConnectionPool):
        ConnectionCls = _HTTPSConn

    class _Adapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}

    session = requests.Session()
    session.trust_env = False  # no environment proxies, no .netrc credentials
    adapter = _Adapter(max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


# --- the download ---------------------------------------------------------------------------------
def _remaining(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise InputError(f"Downloading the {what} timed out.")
    return left


def _set_read_timeout(resp: requests.Response, seconds: float) -> None:
    """Shrink the socket timeout so a read cannot outlive the total deadline (best effort)."""
    try:
        sock = resp.raw.connection.sock
        if sock is not None:
            sock.settimeout(max(seconds, 0.001))
    except (AttributeError, OSError):
        pass


def _stream_body(resp: requests.Response, out, *, max_bytes: int, deadline: float,
                 read_timeout: float, what: str) -> int:
    limit_text = _format_limit(max_bytes)
    length = resp.headers.get("Content-Length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            declared = None
        if declared is not None and declared > max_bytes:
            raise InputError(f"The {what} is larger than the {limit_text} limit.")
    written = 0
    while True:
        _set_read_timeout(resp, min(read_timeout, _remaining(deadline, what)))
        chunk = resp.raw.read1(CHUNK_BYTES, decode_content=True)
        if not chunk:
            break
        written += len(chunk)
        if written > max_bytes:
            raise InputError(f"The {what} is larger than the {limit_text} limit.")
        try:
            out.write(chunk)
        except OSError:
            raise StorageError(f"The {what} could not be saved on the worker.") from None
        _remaining(deadline, what)
    return written


def _fetch(session: requests.Session, url: str, out, *, max_bytes: int, allow_private: bool,
           connect_timeout: float, read_timeout: float, deadline: float, field: str,
           what: str) -> int:
    current = url
    for hop in range(MAX_REDIRECTS + 1):
        _check_url(current, field, allow_private, redirected=hop > 0)
        host = urlsplit(current).hostname
        left = _remaining(deadline, what)
        try:
            resp = session.get(
                current, stream=True, allow_redirects=False,
                timeout=(min(connect_timeout, left), min(read_timeout, left)),
                headers={"Accept-Encoding": "identity"},
            )
        except (requests.exceptions.ConnectTimeout, requests.exceptions.ReadTimeout):
            raise InputError(f"Downloading the {what} timed out.") from None
        except requests.exceptions.SSLError:
            raise InputError(f"Downloading the {what} failed: the TLS connection to {host} "
                             "could not be verified.") from None
        except requests.exceptions.ConnectionError:
            raise InputError(f"Downloading the {what} failed: could not connect to "
                             f"{host}.") from None
        except requests.exceptions.RequestException:
            raise InputError(f"Downloading the {what} failed: the request to {host} "
                             "could not be made.") from None
        with resp:
            status = resp.status_code
            if status in _REDIRECT_CODES:
                location = resp.headers.get("Location")
                if not location:
                    raise InputError(f"Downloading the {what} failed: the server answered "
                                     f"HTTP {status} without a redirect location.")
                current = urljoin(current, location.strip())
                logger.info("Download redirected (HTTP %s) to %s", status, describe_url(current))
                continue
            if not 200 <= status < 300:
                raise InputError(f"Downloading the {what} failed: the server answered "
                                 f"HTTP {status}.")
            try:
                written = _stream_body(resp, out, max_bytes=max_bytes, deadline=deadline,
                                       read_timeout=read_timeout, what=what)
            except (urllib3.exceptions.ReadTimeoutError, socket.timeout,
                    requests.exceptions.ReadTimeout):
                raise InputError(f"Downloading the {what} timed out.") from None
            except (urllib3.exceptions.HTTPError, requests.exceptions.RequestException,
                    ConnectionError):
                raise InputError(f"Downloading the {what} failed: the connection to {host} "
                                 "was interrupted.") from None
            if written == 0:
                raise InputError(f"Downloading the {what} failed: the server sent an "
                                 "empty file.")
            return written
    raise InputError(f"Downloading the {what} failed: more than {MAX_REDIRECTS} redirects.")


def download_to_file(url: str, dest: Path, *, max_bytes: int, allow_private: bool,
                     connect_timeout: float = 10, read_timeout: float = 30,
                     total_timeout: float = 120, field: str = "voice_file_url",
                     what: str = "voice file") -> int:
    """Download ``url`` to ``dest`` under every rule in this module's docstring.

    Returns the number of bytes written. ``field`` (the job input's name) and ``what`` (what is
    being fetched) only shape the error sentences. On any failure ``dest`` does not exist
    afterwards (even if it existed before) and no temporary file is left beside it.
    """
    dest = Path(dest)
    safe = describe_url(url)
    deadline = time.monotonic() + total_timeout
    tmp_path: str | None = None
    ok = False
    try:
        url = _checked_url(url, field, allow_private)  # before anything: a refused URL touches nothing
        logger.info("Downloading %s (limit %s bytes)", safe, max_bytes)
        fd, tmp_path = _temp_file_beside(dest, what)
        written = _fetch_before_deadline(fd, url, deadline, max_bytes=max_bytes, allow_private=allow_private,
                                         connect_timeout=connect_timeout, read_timeout=read_timeout,
                                         field=field, what=what)
        try:
            os.replace(tmp_path, dest)
        except OSError:
            raise StorageError(f"The {what} could not be saved on the worker.") from None
        ok = True
        logger.info("Downloaded %s bytes from %s", written, safe)
        return written
    except InputError as exc:
        logger.warning("Download of %s refused or failed: %s", safe, exc)
        raise
    except StorageError as exc:
        logger.error("Download of %s could not be stored: %s", safe, exc)
        raise
    except OSError:  # e.g. disk full while closing the temporary file
        logger.error("Download of %s could not be stored", safe)
        raise StorageError(f"The {what} could not be saved on the worker.") from None
    finally:
        if not ok:
            _remove(tmp_path, dest)


def _checked_url(url, field: str, allow_private: bool) -> str:
    if not isinstance(url, str) or not url.strip():
        raise InputError(f"{field} must be an http or https URL.")
    url = url.strip()
    _check_url(url, field, allow_private, redirected=False)
    return url


def _temp_file_beside(dest: Path, what: str) -> tuple[int, str]:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError:
        raise StorageError(f"The {what} could not be saved on the worker.") from None


@contextlib.contextmanager
def _deadline_watchdog(deadline: float, sockets: list) -> Iterator[threading.Event]:
    """Shuts the download's sockets down at ``deadline``: per-read timeouts cannot bound a server
    that trickles headers, and a shut-down socket ends any blocked read at once. Yields the event
    that says it fired."""
    expired = threading.Event()

    def stop_at_deadline():
        expired.set()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), stop_at_deadline)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield expired
    finally:
        watchdog.cancel()


def _fetch_before_deadline(fd: int, url: str, deadline: float, *, max_bytes: int, allow_private: bool,
                           connect_timeout: float, read_timeout: float, field: str, what: str) -> int:
    """``_fetch`` into the open temp file ``fd``, ended by the watchdog at ``deadline``."""
    sockets: list = []
    with _deadline_watchdog(deadline, sockets) as expired:
        try:
            with os.fdopen(fd, "wb") as out, _session(field, allow_private, sockets) as session:
                return _fetch(session, url, out, max_bytes=max_bytes, allow_private=allow_private,
                              connect_timeout=connect_timeout, read_timeout=read_timeout,
                              deadline=deadline, field=field, what=what)
        except (InputError, StorageError, OSError, requests.RequestException, urllib3.exceptions.HTTPError):
            if expired.is_set():
                raise InputError(f"Downloading the {what} timed out.") from None
            raise


def _remove(*paths) -> None:
    """What a failed download leaves: its temp file and any ``dest`` (even one from before)."""
    for leftover in paths:
        if leftover is not None:
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass
            except OSError:
                logger.warning("Could not remove %s after a failed download", leftover)
