"""The worker behind the runpod SDK's own local API server, as a real subprocess, on a fresh bucket.

``api`` is one server per test module; ``api_server`` starts one with more variables
(``F5_STREAMING`` ...). Storage is the real SeaweedFS S3 server over HTTPS.
"""
from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from f5worker.settings import ENV_ALLOW_PRIVATE_URLS
from tests.fixtures_s3 import ENV_AWS_CA_BUNDLE, REGION
from tests.processes import clean_env, local_session, start_api_server, stop, tail, wait_api_ready, worker_env

READY_TIMEOUT_S = 120
JOB_TIMEOUT_S = 120
NFE = 6  # the steps of the jobs sent to it


@dataclass
class ApiServer:
    base_url: str
    log_path: Path
    proc: subprocess.Popen
    secret: str
    bucket: str
    s3_server: object
    tmp_dir: Path

    def runsync(self, job_input) -> dict:
        with local_session() as session:
            response = session.post(f"{self.base_url}/runsync", json={"input": job_input}, timeout=JOB_TIMEOUT_S)
        assert response.status_code == 200, f"HTTP {response.status_code}: {response.text[:500]}"
        return response.json()

    def download(self, url: str) -> bytes:
        assert url.startswith(self.s3_server.endpoint_url + "/"), url  # a presigned URL of our bucket
        with local_session() as session:
            response = session.get(url, verify=self.s3_server.ca_bundle, timeout=30)
        assert response.status_code == 200, response.status_code
        return response.content

    def keys(self) -> set[str]:
        client, found = self.s3_server.client(), set()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            found.update(obj["Key"] for obj in page.get("Contents", []))
        return found


@pytest.fixture(scope="module")
def api(tiny_models, tiny_whisper, s3_server, tmp_path_factory):
    with api_server(tiny_models, tiny_whisper, s3_server, tmp_path_factory.mktemp("api-server")) as server:
        yield server


@contextlib.contextmanager
def api_server(tiny_models, tiny_whisper, s3_server, folder: Path, extra: dict[str, str] | None = None):
    """The local API server on a fresh bucket; ``extra``: more worker variables (F5_STREAMING ...)."""
    bucket = f"api-{uuid.uuid4().hex[:16]}"
    s3_server.client().create_bucket(Bucket=bucket)
    env = clean_env({
        **worker_env(tiny_models, tiny_whisper, folder / "volume"),
        ENV_ALLOW_PRIVATE_URLS: "true",
        "S3_BUCKET": bucket, "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key, "AWS_REGION": REGION,
        "AWS_ENDPOINT_URL": s3_server.endpoint_url, ENV_AWS_CA_BUNDLE: s3_server.ca_bundle,
        "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(folder / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(folder / "no-aws-credentials"), **(extra or {}),
    })
    log_path = folder / "server.log"
    proc, base_url = start_api_server(env, log_path)
    server = ApiServer(base_url, log_path, proc, s3_server.secret_key, bucket, s3_server, folder / "volume" / "jobtmp")
    started = time.monotonic()
    try:
        why = wait_api_ready(base_url, proc, READY_TIMEOUT_S)
        if why:
            pytest.fail(f"the API server did not start: {why}\n--- {log_path} (tail) ---\n{tail(log_path)}",
                        pytrace=False)
        print(f"API server ready in {time.monotonic() - started:.1f} s")
        yield server
    finally:
        stop(proc)
