"""f5worker.jobs.download: every rule of download_to_file, against a loopback server only.

Refusals are checked with ``allow_private=False`` on addresses that must be refused before any
connection; the ``loopback_only`` guard fails a test that tries to reach anything but loopback,
and ``no_requests`` fails one where requests sends anything at all.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import socket
import time
from pathlib import Path

import pytest
import requests

from f5worker.jobs import download
from f5worker.jobs.download import MAX_REDIRECTS, describe_url, download_to_file
from f5worker.errors import InputError, StorageError
from f5worker.settings import VARS

pytestmark = pytest.mark.usefixtures("loopback_only")

SECRET = "X-Amz-Signature=topsecret0123456789"
FAST = {"connect_timeout": 2, "read_timeout": 2, "total_timeout": 5}


# --- helpers --------------------------------------------------------------------------------------
@pytest.fixture
def dest(tmp_path) -> Path:
    return tmp_path / "out" / "voice.wav"


@pytest.fixture
def voice(file_server) -> bytes:
    data = os.urandom(200_000)
    (file_server.root / "voice.wav").write_bytes(data)
    return data


@pytest.fixture
def no_requests(monkeypatch):
    """Fail if requests sends anything: the refusal must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a request was sent for a URL that should have been refused")
    monkeypatch.setattr(requests.Session, "send", refuse)


@pytest.fixture
def loopback_is_public(monkeypatch):
    """Treat 127.0.0.1 (only) as a public address, so a refusal after a first allowed hop can be
    tested without ever reaching a real non-loopback host."""
    original = download._address_refused
    server_ip = ipaddress.ip_address("127.0.0.1")
    monkeypatch.setattr(download, "_address_refused",
                        lambda ip: False if ip == server_ip else original(ip))


def assert_nothing_left(dest: Path) -> None:
    assert not dest.exists()
    if dest.parent.exists():
        assert list(dest.parent.iterdir()) == [], "a temporary file was left behind"


def fetch(url, dest, *, max_bytes=VARS["max_voice_bytes"].default, allow_private=True, **kwargs):
    return download_to_file(url, dest, max_bytes=max_bytes, allow_private=allow_private,
                            **{**FAST, **kwargs})


def refused(url, dest, match, **kwargs) -> InputError:
    with pytest.raises(InputError, match=match) as info:
        fetch(url, dest, **kwargs)
    assert_nothing_left(dest)
    return info.value


# --- successful downloads -------------------------------------------------------------------------
def test_downloads_a_file(file_server, voice, dest):
    assert fetch(file_server.url("voice.wav"), dest) == len(voice)
    assert dest.read_bytes() == voice
    assert list(dest.parent.iterdir()) == [dest]


def test_replaces_an_existing_file(file_server, voice, dest):
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"old")
    fetch(file_server.url("voice.wav"), dest)
    assert dest.read_bytes() == voice


def test_file_names_are_quoted(file_server, dest):
    (file_server.root / "my voice #1.wav").write_bytes(b"abc")
    assert fetch(file_server.url("my voice #1.wav"), dest) == 3


def test_size_exactly_at_the_cap_is_allowed(file_server, voice, dest):
    assert fetch(file_server.url("voice.wav"), dest, max_bytes=len(voice)) == len(voice)


def test_chunked_body_under_the_cap(file_server, dest):
    assert fetch(file_server.url("_chunked?n=50000"), dest, max_bytes=50_000) == 50_000
    assert dest.read_bytes() == b"y" * 50_000


def test_query_string_reaches_the_server(file_server, voice, dest):
    fetch(file_server.url("voice.wav") + "?" + SECRET, dest)
    assert file_server.requests == ["/voice.wav?" + SECRET]


# --- redirects ------------------------------------------------------------------------------------
def test_follows_up_to_five_redirects(file_server, voice, dest):
    assert MAX_REDIRECTS == 5
    fetch(file_server.url("_chain/5/voice.wav"), dest)
    assert dest.read_bytes() == voice
    assert len(file_server.requests) == 6


def test_refuses_a_sixth_redirect(file_server, voice, dest):
    refused(file_server.url("_chain/6/voice.wav"), dest, "more than 5 redirects")
    assert len(file_server.requests) == 6


def test_refuses_a_redirect_loop(file_server, dest):
    refused(file_server.url("_loop"), dest, "more than 5 redirects")


def test_follows_an_absolute_redirect(file_server, voice, dest):
    target = requests.utils.quote(file_server.url("voice.wav"), safe="")
    fetch(file_server.url(f"_redirect?to={target}"), dest)
    assert dest.read_bytes() == voice


def test_refuses_a_redirect_without_location(file_server, dest):
    refused(file_server.url("_redirect_nolocation"), dest, "without a redirect location")


@pytest.mark.parametrize("target, match", [
    ("ftp://127.0.0.1/voice.wav", "is not http or https"),
    ("file:///etc/passwd", "is not http or https"),
    ("http://user:pw@127.0.0.1/voice.wav", "contains a user name or password"),
])
def test_rechecks_scheme_and_credentials_on_each_hop(file_server, dest, target, match):
    quoted = requests.utils.quote(target, safe="")
    refused(file_server.url(f"_redirect?to={quoted}"), dest, match)
    assert len(file_server.requests) == 1


@pytest.mark.parametrize("target_host", ["169.254.169.254", "10.1.2.3", "127.0.0.2", "[::1]"])
def test_rechecks_addresses_on_each_hop(file_server, dest, loopback_is_public, target_host):
    target = f"http://{target_host}/latest/meta-data?{SECRET}"
    quoted = requests.utils.quote(target, safe="")
    err = refused(file_server.url(f"_redirect?to={quoted}"), dest,
                  r"^voice_file_url redirected to a private or loopback address \(.+\), "
                  r"which is refused\.$", allow_private=False)
    assert SECRET not in str(err) and "meta-data" not in str(err)
    assert len(file_server.requests) == 1


# --- address refusals, before any connection ------------------------------------------------------
@pytest.mark.parametrize("host, shown", [
    ("127.0.0.1", "127.0.0.1"),
    ("localhost", "127.0.0.1"),
    ("127.1", "127.0.0.1"),
    ("2130706433", "127.0.0.1"),
    ("10.0.0.5", "10.0.0.5"),
    ("172.16.3.4", "172.16.3.4"),
    ("192.168.1.1", "192.168.1.1"),
    ("100.64.0.1", "100.64.0.1"),
    ("169.254.169.254", "169.254.169.254"),
    ("0.0.0.0", "0.0.0.0"),
    ("224.0.0.1", "224.0.0.1"),
    ("240.0.0.1", "240.0.0.1"),
    ("[::1]", "::1"),
    ("[::]", "::"),
    ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1"),
    ("[::ffff:169.254.169.254]", "::ffff:169.254.169.254"),
    ("[fe80::1]", "fe80::1"),
    ("[fc00::1]", "fc00::1"),
    ("[2002:7f00:1::]", "2002:7f00:1::"),
])
def test_refuses_private_addresses_before_connecting(dest, no_requests, host, shown):
    err = refused(f"http://{host}:8080/voice.wav?{SECRET}", dest,
                  "private or loopback address", allow_private=False)
    assert str(err) == (f"voice_file_url points to a private or loopback address ({shown}), "
                        "which is refused.")


def test_refuses_the_file_server_itself_without_the_switch(file_server, voice, dest):
    refused(file_server.url("voice.wav"), dest, "private or loopback", allow_private=False)
    assert file_server.requests == []


def test_refuses_if_any_resolved_address_is_private(monkeypatch, dest, no_requests,
                                                    loopback_is_public):
    real = socket.getaddrinfo

    def fake(host, port, *args, **kwargs):
        if host == "mixed.test":
            return real("127.0.0.1", port, *args, **kwargs) + real("10.0.0.1", port, *args,
                                                                   **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    refused("http://mixed.test/voice.wav", dest, r"\(10\.0\.0\.1\)", allow_private=False)


def test_connection_is_pinned_to_the_checked_address(monkeypatch, file_server, dest,
                                                     loopback_is_public):
    """DNS rebinding: the name answers a public address when checked, then a private one. The
    connection resolves and checks again itself, so it refuses rather than connect."""
    real = socket.getaddrinfo
    answers = iter(["127.0.0.1"])

    def fake(host, port, *args, **kwargs):
        if host == "rebind.test":
            return real(next(answers, "127.0.0.2"), port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    (file_server.root / "voice.wav").write_bytes(b"abc")
    refused(f"http://rebind.test:{file_server.port}/voice.wav", dest,
            r"^voice_file_url points to a private or loopback address \(127\.0\.0\.2\)",
            allow_private=False)
    assert file_server.requests == []


def test_connection_uses_its_own_checked_lookup(monkeypatch, file_server, voice, dest):
    """urllib3 never looks the name up itself: it is handed the address just checked."""
    real = socket.getaddrinfo
    looked_up = []

    def fake(host, port, *args, **kwargs):
        looked_up.append(host)
        return real("127.0.0.1" if host == "voice.test" else host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    fetch(f"http://voice.test:{file_server.port}/voice.wav", dest)
    assert dest.read_bytes() == voice
    assert looked_up.count("voice.test") == 1
    assert file_server.hosts == [f"voice.test:{file_server.port}"]  # the name, not the address


@pytest.fixture
def trust_test_ca(monkeypatch, https_file_server):
    """Resolve voice.test and other.test to 127.0.0.1 and trust the test certificate."""
    real = socket.getaddrinfo

    def fake(host, port, *args, **kwargs):
        if host in ("voice.test", "other.test"):
            host = "127.0.0.1"
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    make_session = download._session

    def session_trusting_ca(*args, **kwargs):
        session = make_session(*args, **kwargs)
        session.verify = str(https_file_server.ca_file)
        return session

    monkeypatch.setattr(download, "_session", session_trusting_ca)
    return https_file_server


def test_https_checks_the_certificate_against_the_name(trust_test_ca, dest):
    """The socket goes to the checked address; TLS still verifies the name from the URL."""
    server = trust_test_ca
    (server.root / "voice.wav").write_bytes(b"tls voice")
    assert fetch(server.url("voice.wav"), dest) == 9
    assert dest.read_bytes() == b"tls voice"


def test_https_refuses_a_certificate_for_another_name(trust_test_ca, dest):
    server = trust_test_ca
    (server.root / "voice.wav").write_bytes(b"tls voice")
    refused(f"https://other.test:{server.port}/voice.wav?{SECRET}", dest,
            r"^Downloading the voice file failed: the TLS connection to other\.test could not "
            r"be verified\.$")


def test_unresolvable_host(monkeypatch, dest, no_requests):
    real = socket.getaddrinfo

    def fake(host, port, *args, **kwargs):
        if host == "no-such-host.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    refused("http://no-such-host.invalid/voice.wav", dest,
            r"^voice_file_url host no-such-host\.invalid could not be resolved\.$",
            allow_private=False)


@pytest.mark.parametrize("address, is_refused", [
    ("8.8.8.8", False),
    ("2606:4700:4700::1111", False),
    ("::ffff:8.8.8.8", False),
    ("64:ff9b::808:808", False),
    ("::ffff:10.0.0.1", True),
    ("64:ff9b::a00:1", True),
    ("2002:0a00:0001::", True),
    ("198.18.0.1", True),
    ("255.255.255.255", True),
    ("ff02::1", True),
])
def test_address_classification(address, is_refused):
    assert download._address_refused(ipaddress.ip_address(address)) is is_refused


def test_public_address_passes_the_check_without_connecting():
    download._check_url("https://8.8.8.8/voice.wav", "voice_file_url", allow_private=False,
                        redirected=False)  # a numeric host: no lookup, no connection


# --- URL shape ------------------------------------------------------------------------------------
@pytest.mark.parametrize("url", [
    "ftp://127.0.0.1/voice.wav", "file:///etc/passwd", "gopher://127.0.0.1/", "127.0.0.1/x.wav",
    "javascript:alert(1)", "", "   ",
])
def test_refuses_other_schemes(dest, no_requests, url):
    err = refused(url, dest, "must be an http or https URL")
    assert str(err) == "voice_file_url must be an http or https URL."


@pytest.mark.parametrize("url", [
    "http://user:pass@127.0.0.1/voice.wav", "http://user@127.0.0.1/voice.wav",
    "https://:pass@127.0.0.1/voice.wav", "http://@127.0.0.1/voice.wav",
])
def test_refuses_credentials_even_when_private_is_allowed(dest, no_requests, url):
    err = refused(url, dest, "must not contain a user name or password", allow_private=True)
    assert "pass" not in str(err).replace("password", "")


@pytest.mark.parametrize("url", ["http:///voice.wav", "http://:80/voice.wav", "https://?x=1"])
def test_refuses_a_missing_host(dest, no_requests, url):
    refused(url, dest, "has no host name")


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999/x", "http://127.0.0.1:abc/x",
                                 "http://127.0.0.1\\@10.0.0.1/x", "http://127.0.0.1/a b",
                                 "http://[::1/x"])
def test_refuses_malformed_urls(dest, no_requests, url):
    refused(url, dest, "is not a valid URL", allow_private=True)


# --- HTTP errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [400, 403, 404, 500, 503])
def test_refuses_http_errors(file_server, dest, code):
    err = refused(file_server.url(f"_status/{code}?{SECRET}"), dest, "server answered")
    assert str(err) == f"Downloading the voice file failed: the server answered HTTP {code}."


def test_missing_file_is_a_404(file_server, dest):
    refused(file_server.url("nope.wav"), dest,
            r"^Downloading the voice file failed: the server answered HTTP 404\.$")


def test_refuses_an_empty_body(file_server, dest):
    refused(file_server.url("_empty"), dest, "empty file")
    refused(file_server.url("_status/204"), dest, "empty file")


def test_refuses_a_truncated_body(file_server, dest):
    refused(file_server.url("_short"), dest, r"connection to 127\.0\.0\.1 was interrupted")


def test_connection_refused(dest):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    refused(f"http://127.0.0.1:{port}/voice.wav?{SECRET}", dest,
            r"^Downloading the voice file failed: could not connect to 127\.0\.0\.1\.$")


# --- size cap -------------------------------------------------------------------------------------
def test_refuses_a_file_over_the_cap(file_server, voice, dest):
    err = refused(file_server.url("voice.wav"), dest, "larger than", max_bytes=len(voice) - 1)
    assert str(err).startswith("The voice file is larger than the ")


def test_limit_is_shown_in_megabytes(file_server, dest):
    refused(file_server.url("_huge"), dest,
            r"^The voice file is larger than the 50 MB limit\.$",
            max_bytes=VARS["max_voice_bytes"].default)


def test_refuses_a_huge_content_length_early(file_server, dest):
    started = time.monotonic()
    refused(file_server.url("_huge"), dest, "larger than", max_bytes=10_000)
    assert time.monotonic() - started < 2


def test_refuses_a_chunked_body_over_the_cap(file_server, dest):
    # no Content-Length: the cap is enforced while streaming, and the partial file removed
    refused(file_server.url("_chunked?n=300000"), dest, "larger than", max_bytes=100_000)


def test_failure_removes_an_existing_destination(file_server, dest):
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"stale")
    refused(file_server.url("_chunked?n=300000"), dest, "larger than", max_bytes=100_000)


# --- time limits ----------------------------------------------------------------------------------
def test_read_timeout(file_server, dest):
    started = time.monotonic()
    err = refused(file_server.url(f"_stall?delay=5&{SECRET}"), dest, "timed out",
                  read_timeout=0.3, total_timeout=10)
    assert str(err) == "Downloading the voice file timed out."
    assert time.monotonic() - started < 2


def test_total_deadline_while_streaming(file_server, dest):
    # each byte arrives well within the read timeout, but the whole body would take 4 s
    started = time.monotonic()
    refused(file_server.url("_drip?n=200&delay=0.02"), dest, "timed out",
            read_timeout=2, total_timeout=0.5)
    assert time.monotonic() - started < 1.5


def test_total_deadline_bounds_a_stalled_read(file_server, dest):
    # the read timeout alone would wait 5 s; the deadline cuts the read short
    started = time.monotonic()
    refused(file_server.url("_stall?delay=5"), dest, "timed out",
            read_timeout=5, total_timeout=0.5)
    assert time.monotonic() - started < 1.5


# --- what errors and logs reveal ------------------------------------------------------------------
def test_errors_and_logs_never_carry_the_query_string(file_server, voice, dest, caplog):
    caplog.set_level(logging.DEBUG, logger="f5worker")
    cases = [
        dict(url=file_server.url(f"nope.wav?{SECRET}")),
        dict(url=file_server.url(f"_chunked?n=300000&{SECRET}"), max_bytes=1000),
        dict(url=file_server.url(f"_stall?delay=5&{SECRET}"), read_timeout=0.2),
        dict(url=file_server.url(f"voice.wav?{SECRET}"), allow_private=False),
        dict(url=f"ftp://127.0.0.1/voice.wav?{SECRET}"),
        dict(url=f"http://user:{SECRET}@127.0.0.1/voice.wav?{SECRET}"),
    ]
    for case in cases:
        url = case.pop("url")
        with pytest.raises(InputError) as info:
            fetch(url, dest, **case)
        err = info.value
        assert "topsecret" not in str(err)
        # raised "from None": a logged traceback cannot show the library's message (full URL)
        assert err.__cause__ is None
        assert err.__context__ is None or err.__suppress_context__
    fetch(file_server.url(f"voice.wav?{SECRET}"), dest)  # and a success
    ours = [r for r in caplog.records if r.name.startswith("f5worker")]
    assert ours, "expected download logs"
    assert not any("topsecret" in r.getMessage() for r in ours)


def test_describe_url():
    assert describe_url(f"https://u:p@bucket.s3.amazonaws.com:8443/voices/a.wav?{SECRET}#x") \
        == "https://bucket.s3.amazonaws.com:8443/voices/a.wav"
    assert describe_url("http://[::1]/a") == "http://[::1]/a"
    assert describe_url("http://Example.COM") == "http://example.com"
    assert describe_url("http://127.0.0.1:99999/x?y") == "<invalid URL>"
    assert describe_url("no scheme") == "<invalid URL>"


# --- local storage --------------------------------------------------------------------------------
def test_creates_the_destination_folder(file_server, voice, tmp_path):
    dest = tmp_path / "a" / "b" / "voice.wav"
    fetch(file_server.url("voice.wav"), dest)
    assert dest.read_bytes() == voice


def test_unwritable_destination_is_a_storage_error(file_server, voice, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(StorageError, match="could not be saved"):
        fetch(file_server.url("voice.wav"), blocker / "voice.wav")  # parent is a file


def test_trickled_headers_cannot_outlive_the_deadline(tmp_path):
    """A server sending one header line at a time, each within the read timeout, is stopped by
    the total deadline (a raw loopback socket: http.server cannot trickle headers)."""
    import socket as socket_mod
    import threading
    import time as time_mod

    from f5worker.jobs.download import download_to_file
    from f5worker.errors import InputError

    server = socket_mod.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    stop = threading.Event()

    def trickle():
        conn, _ = server.accept()
        try:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            while not stop.is_set():
                conn.sendall(b"X-Slow: 1\r\n")
                time_mod.sleep(0.1)
        except OSError:
            pass
        finally:
            conn.close()

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    started = time_mod.monotonic()
    try:
        with pytest.raises(InputError, match="timed out"):
            download_to_file(f"http://127.0.0.1:{server.getsockname()[1]}/v.wav", tmp_path / "v.wav",
                             max_bytes=10_000, allow_private=True, read_timeout=5, total_timeout=1)
        assert time_mod.monotonic() - started < 3
        assert not list(tmp_path.iterdir())
    finally:
        stop.set()
        server.close()
