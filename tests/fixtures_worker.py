"""An in-process worker on the tiny models, as the handler and reliability tests build it.

Why this module exists: several test modules send jobs through ``make_handler(build_worker(...))``
exactly as runpod would; the worker they build (environment, storage, temp folder) and the helpers
that look at what a job left behind (``Ctx``) live here once. ``worker_ctx`` builds one on a local
folder, or on a fresh bucket of the SeaweedFS server when given ``s3_server``.
"""
from __future__ import annotations

import asyncio
import dataclasses
import contextlib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import pytest
import requests

from f5worker.service import build_worker, make_handler
from f5worker.settings import ENV_ALLOW_PRIVATE_URLS, ENV_FAST_PATH, Settings
from tests.fixtures_s3 import S3Env, S3Server, make_s3_env
from tests.processes import worker_env

VOICE_PREFIXES = ("voices/", "output/")


@dataclass
class Ctx:
    kind: str  # "local" or "s3"
    worker: object
    handler: object
    settings: Settings
    tmp_dir: Path
    s3: S3Env | None

    def run(self, job_input, job_id: str | None = None) -> tuple[str, dict]:
        job_id = job_id or f"t-{uuid.uuid4().hex[:12]}"
        return job_id, asyncio.run(self.handler({"id": job_id, "input": job_input}))

    def keys(self, prefixes=VOICE_PREFIXES) -> set[str]:
        """Every key in storage under ``prefixes``."""
        if self.s3 is None:
            root = self.settings.local_storage_dir
            found = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} if root.exists() else set()
        else:
            client, found = self.s3.server.client(), set()
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.s3.bucket):
                found.update(obj["Key"] for obj in page.get("Contents", []))
        return {k for k in found if k.startswith(tuple(prefixes))}

    def get_text(self, key: str) -> str | None:
        return self.worker.storage.get_text(key)

    def get_bytes(self, key: str) -> bytes | None:
        """The object at ``key`` as the storage holds it, or None."""
        if self.s3 is None:
            path = self.settings.local_storage_dir / key
            return path.read_bytes() if path.is_file() else None
        client = self.s3.server.client()
        try:
            return client.get_object(Bucket=self.s3.bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey:
            return None

    def stored_transcript(self, name: str) -> str | None:
        """The transcript stored inside the voice ``voices/<name>`` (uploads keep it there)."""
        from f5worker.jobs.audio import embedded_transcript

        data = self.get_bytes(f"voices/{name}")
        return None if data is None else embedded_transcript(data)

    def fetch_url(self, url: str) -> bytes:
        """The bytes behind a result URL: a file:// path (local storage) or a presigned https URL."""
        if url.startswith("file://"):
            assert self.s3 is None
            return Path(url2pathname(unquote(urlsplit(url).path))).read_bytes()
        assert self.s3 is not None and url.startswith(self.s3.server.endpoint_url + "/"), url
        with requests.Session() as session:
            session.trust_env = False  # no proxies: loopback only
            response = session.get(url, verify=self.s3.server.ca_bundle, timeout=30)
        assert response.status_code == 200, response.status_code
        return response.content

    def tmp_files(self) -> list[str]:
        return sorted(p.name for p in self.tmp_dir.iterdir())


@contextlib.contextmanager
def worker_ctx(tiny_models, tiny_whisper, folder: Path, s3_server: S3Server | None = None,
               prefix: str = "handler", extra: dict | None = None) -> Iterator[Ctx]:
    """A built worker and its handler; on ``s3_server`` (a fresh bucket) when given, else on a local
    folder under ``folder``. ``extra`` overrides worker variables. The model thread stops on exit."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        s3 = make_s3_env(s3_server, mp, folder, prefix=prefix) if s3_server is not None else None
        env = worker_env(tiny_models, tiny_whisper, folder / "volume",
                         {ENV_FAST_PATH: "1", ENV_ALLOW_PRIVATE_URLS: "true", **(s3 or {}), **(extra or {})})
        settings = Settings.from_env(env)
        worker = build_worker(settings)
        try:
            yield Ctx("s3" if s3 else "local", worker, make_handler(worker), settings, settings.tmp_dir, s3)
        finally:
            worker.batcher.executor.shutdown(wait=True)


@contextlib.contextmanager
def worker_on_storage(request, tiny_models, tiny_whisper, tmp_path_factory, label: str) -> Iterator[Ctx]:
    """``worker_ctx`` on the storage a ``params=["local", "s3"]`` fixture's ``request`` names."""
    s3_server = request.getfixturevalue("s3_server") if request.param == "s3" else None
    with worker_ctx(tiny_models, tiny_whisper, tmp_path_factory.mktemp(f"{label}-{request.param}"), s3_server) as built:
        yield built


@pytest.fixture
def limit(ctx):
    """Sets the worker's F5_MAX_RESULT_BYTES for one test (the real setting, replaced in place).
    Needs the test module's own ``ctx`` fixture (a ``worker_ctx``)."""
    original = ctx.worker.settings

    def set_limit(max_result_bytes: int) -> None:
        ctx.worker.settings = dataclasses.replace(original, max_result_bytes=max_result_bytes)

    yield set_limit
    ctx.worker.settings = original
