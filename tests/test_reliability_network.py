"""Tests reach nothing but loopback, and a voice URL whose name resolves to a private, link-local or
metadata address is refused at the resolution step, before any connection.

Why this test exists: a test that left the machine, or a URL that reached a private host, would
break the rules above without anyone noticing. The ``loopback_only`` guard (tests/fixtures_http.py)
patches the socket layer so that any connection outside 127.0.0.0/8 and ::1, and any name lookup,
fails the test; the first tests show the guard really bites. test_download.py covers address
literals and a mixed answer; here each name resolves (through a patched resolver, the only way to
make a name answer 169.254.169.254 without a DNS server) to one address that must be refused, and
the guard proves no socket was opened towards it.
"""
from __future__ import annotations

import asyncio
import socket

import pytest

from f5worker.jobs.download import download_to_file
from f5worker.errors import InputError
from f5worker.settings import ENV_ALLOW_PRIVATE_URLS
from tests.fixtures_worker import worker_ctx

pytestmark = pytest.mark.usefixtures("loopback_only")

REFUSED = {  # name -> the one address it resolves to
    "metadata.test": "169.254.169.254",
    "ten.test": "10.1.2.3",
    "home.test": "192.168.0.10",
    "carrier.test": "100.64.0.1",
    "ula.test": "fd00::1",
    "linklocal.test": "fe80::1",
    "mapped.test": "::ffff:169.254.169.254",
    "loopback.test": "127.0.0.1",
}


def test_the_guard_refuses_connections_off_loopback(loopback_only):
    for family, address in ((socket.AF_INET, ("10.255.255.1", 80)), (socket.AF_INET6, ("fd00::1", 80, 0, 0))):
        with socket.socket(family, socket.SOCK_STREAM) as sock, pytest.raises(PermissionError):
            sock.connect(address)
    assert loopback_only == ["connect 10.255.255.1", "connect fd00::1"]
    loopback_only.clear()  # seen and expected: the guard must not fail this test at teardown


def test_the_guard_refuses_name_lookups_but_not_loopback(loopback_only):
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("example.com", 443)
    assert loopback_only == ["lookup example.com"]
    loopback_only.clear()
    assert {info[4][0] for info in socket.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM)} == {"127.0.0.1"}
    with socket.socket() as server, socket.socket() as client:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        client.connect(server.getsockname())  # loopback is allowed


@pytest.fixture
def resolver(monkeypatch):
    """Names in REFUSED resolve to their address; every other lookup goes on to the guard."""
    guarded = socket.getaddrinfo
    looked_up: list[str] = []

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        if host in REFUSED:
            looked_up.append(host)
            address = REFUSED[host]
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sockaddr = (address, port or 0, 0, 0) if family == socket.AF_INET6 else (address, port or 0)
            return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr)]
        return guarded(host, port, family, type, proto, flags)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return looked_up


@pytest.mark.parametrize("name", list(REFUSED))
def test_a_name_resolving_to_a_private_address_is_refused_before_connecting(resolver, tmp_path, name):
    dest = tmp_path / "voice.wav"
    with pytest.raises(InputError) as info:
        download_to_file(f"http://{name}:8080/voice.wav?X-Amz-Signature=secret", dest, max_bytes=10**6,
                         allow_private=False, connect_timeout=1, read_timeout=1, total_timeout=3)
    assert str(info.value) == (f"voice_file_url points to a private or loopback address ({REFUSED[name]}), "
                               "which is refused.")
    assert resolver == [name]  # resolved once, refused there: the guard saw no connection attempt
    assert not dest.exists() and list(tmp_path.iterdir()) == []


def test_the_worker_refuses_a_metadata_url_in_an_upload_job(resolver, tiny_models, tiny_whisper, tmp_path):
    with worker_ctx(tiny_models, tiny_whisper, tmp_path, extra={ENV_ALLOW_PRIVATE_URLS: "false"}) as ctx:
        result = asyncio.run(ctx.handler({"id": "metadata-job", "input": {
            "endpoint": "upload", "voice_file_url": "http://metadata.test/latest/meta-data/iam/security-credentials/",
            "voice_name": "stolen.wav", "ref_text": "Nothing."}}))
        assert result == {"error": "voice_file_url points to a private or loopback address (169.254.169.254), "
                                   "which is refused."}
        assert ctx.tmp_files() == [] and ctx.keys() == set()
