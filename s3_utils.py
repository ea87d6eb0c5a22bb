"""Where the worker keeps voices, results and job logs: an S3 bucket, or a local folder.

Why this module exists: the handler and the validation script need one small storage interface
that behaves the same on AWS S3, on S3-compatible providers (Backblaze B2, R2, MinIO, SeaweedFS)
and, with no cloud account at all, on a local folder. It is also the one place that

* configures boto3 for those providers: since boto3 1.36 the SDK adds CRC checksum headers
  (``x-amz-checksum-*``, ``x-amz-sdk-checksum-algorithm``, aws-chunked bodies with
  ``x-amz-trailer``) to every upload, which B2 and several others reject; ``when_required``
  turns that off. Signatures are always SigV4, custom endpoints use path-style addressing;
* turns every provider or filesystem failure into a ``StorageError`` whose message is one
  sentence with no credentials and no presigned signature in it.

Keys look like ``voices/alice.wav``, ``output/<job>.wav``, ``logs/<job>.json`` (the prefixes are
defined in ``f5worker.settings``). Both backends refuse keys that are absolute or contain empty,
``.`` or ``..`` segments or backslashes, so a key means the same thing everywhere.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

from f5worker.errors import StorageError
from f5worker.settings import LOGS_PREFIX, Settings

log = logging.getLogger(__name__)

DEFAULT_REGION = "us-east-1"
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
_HTTP_CODE_NAMES = {"400": "HTTP 400 Bad Request", "403": "HTTP 403 Forbidden"}  # HEAD: no body


class KeyNotFound(StorageError):
    """The key does not exist. ``.key`` names it; callers word the message for their caller."""

    def __init__(self, key: str):
        super().__init__(f"'{key}' was not found in storage")
        self.key = key


def check_key(key: str) -> str:
    """Return ``key`` if it is a plain relative key (``a/b.wav``), else raise ``StorageError``."""
    if (not isinstance(key, str) or "\\" in key or "\x00" in key
            or any(part in ("", ".", "..") for part in key.split("/"))):
        raise StorageError(f"storage key {key!r} is not allowed")
    return key


def make_s3_client(settings: Settings):
    """A boto3 S3 client that works with AWS and with S3-compatible providers such as B2."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError

    config = Config(
        signature_version="s3v4",
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        # Custom endpoints: path style (no per-bucket DNS or certificates needed). AWS: botocore's
        # "auto", i.e. virtual-hosted unless the bucket name has dots.
        s3={"addressing_style": "path" if settings.aws_endpoint_url else "auto"},
        # 3 tries in all: botocore reads "max_attempts" here as retries after the first try.
        retries={"total_max_attempts": 3, "mode": "standard"},
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        max_pool_connections=max(10, settings.max_concurrency),
    )
    try:
        # A session of our own: the default one is shared, global state and not thread-safe.
        return boto3.session.Session().client(
            "s3",
            endpoint_url=settings.aws_endpoint_url,
            region_name=settings.aws_region or DEFAULT_REGION,
            aws_access_key_id=settings.aws_access_key_id,
            aws_secret_access_key=settings.aws_secret_access_key,
            config=config,
        )
    except (BotoCoreError, ValueError) as err:
        raise StorageError(f"S3 client could not be configured: {type(err).__name__}") from err


class Storage:
    """The interface the worker uses. Subclasses implement the I/O; probe/put_json are shared."""

    def upload_file(self, key: str, path: str | os.PathLike, content_type: str) -> None:
        raise NotImplementedError

    def download_file(self, key: str, dest_path: str | os.PathLike) -> None:
        """Copy ``key`` to ``dest_path``; ``KeyNotFound`` if it does not exist."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def put_text(self, key: str, text: str) -> None:
        raise NotImplementedError

    def get_text(self, key: str) -> str | None:
        """The UTF-8 text stored at ``key``, or None if there is none."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""
        raise NotImplementedError

    def result_url(self, key: str) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def put_json(self, key: str, obj: Any) -> None:
        self.put_text(key, json.dumps(obj, ensure_ascii=False, indent=2))

    def probe(self) -> None:
        """Write, read back and delete a small object under ``logs/``; raise StorageError if any
        step fails. Used by the validation script to check credentials and permissions."""
        key = f"{LOGS_PREFIX}probe-{uuid.uuid4().hex}.txt"
        text = "f5-tts worker storage probe"
        self.put_text(key, text)
        try:
            if self.get_text(key) != text:
                raise StorageError(f"storage probe read back different content ({self.describe()})")
        finally:
            self.delete(key)
        # Built-in voices and transcript lookups rely on a missing key reading as missing: without
        # s3:ListBucket, S3 answers 403 instead of 404.
        try:
            gone = self.get_text(key)
        except StorageError:
            raise StorageError("storage answers 'forbidden' for a missing key; grant the credentials "
                               f"s3:ListBucket on the bucket ({self.describe()})") from None
        if gone is not None:
            raise StorageError(f"storage probe object was still readable after delete ({self.describe()})")
        log.info("storage probe passed: %s", self.describe())


def _s3_error(err: BaseException, action: str, key: str) -> StorageError | None:
    """The StorageError for a boto3/botocore failure (None: not one of theirs). Each message is
    one sentence built from the error code or type only: botocore's own texts can carry URLs."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import (BotoCoreError, ClientError, ConnectTimeoutError,
                                     EndpointConnectionError, NoCredentialsError,
                                     PartialCredentialsError, ReadTimeoutError, SSLError)
    where = f"({action} {key})"
    if isinstance(err, Boto3Error):  # boto3's transfer layer wraps the real error
        inner = getattr(err, "last_exception", None) or err.__cause__ or err.__context__
        if inner is not None and inner is not err:
            return _s3_error(inner, action, key)
        return StorageError(f"S3 transfer failed: {type(err).__name__} {where}")
    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code") or "unknown")
        if code in _MISSING_CODES:
            return KeyNotFound(key)
        return StorageError(f"S3 request failed: {_HTTP_CODE_NAMES.get(code, code)} {where}")
    if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
        return StorageError(f"S3 credentials are missing or incomplete {where}")
    if isinstance(err, SSLError):
        return StorageError(f"the S3 endpoint's TLS certificate was not accepted {where}")
    if isinstance(err, (EndpointConnectionError, ConnectTimeoutError)):
        return StorageError(f"could not connect to the S3 endpoint {where}")
    if isinstance(err, ReadTimeoutError):
        return StorageError(f"S3 request timed out {where}")
    if isinstance(err, BotoCoreError):
        return StorageError(f"S3 request failed: {type(err).__name__} {where}")
    if isinstance(err, OSError):  # the local side of a transfer: the file read or written
        reason = err.strerror or type(err).__name__
        return StorageError(f"S3 transfer failed locally: {reason} {where}")
    return None


class S3Storage(Storage):
    def __init__(self, settings: Settings, client=None):
        if not settings.s3_bucket:
            raise StorageError("S3 storage needs a bucket name")
        self.bucket = settings.s3_bucket
        self.endpoint_url = settings.aws_endpoint_url
        self.presign_expiry = settings.presign_expiry
        self.client = client if client is not None else make_s3_client(settings)

    @contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        try:
            yield
        except Exception as err:
            mapped = _s3_error(err, action, key)
            if mapped is None:
                raise
            raise mapped from err

    def upload_file(self, key, path, content_type):
        with self._errors("put", check_key(key)):
            self.client.upload_file(os.fspath(path), self.bucket, key,
                                    ExtraArgs={"ContentType": content_type})

    def download_file(self, key, dest_path):
        with self._errors("get", check_key(key)):
            Path(dest_path).parent.mkdir(parents=True, exist_ok=True)
            self.client.download_file(self.bucket, key, os.fspath(dest_path))

    def exists(self, key):
        try:
            with self._errors("head", check_key(key)):
                self.client.head_object(Bucket=self.bucket, Key=key)
        except KeyNotFound:
            return False
        return True

    def put_text(self, key, text):
        with self._errors("put", check_key(key)):
            content_type = ("application/json" if key.endswith(".json")
                            else "text/plain; charset=utf-8")
            self.client.put_object(Bucket=self.bucket, Key=key, Body=text.encode("utf-8"),
                                   ContentType=content_type)

    def get_text(self, key):
        try:
            with self._errors("get", check_key(key)):
                body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
                with body:
                    return body.read().decode("utf-8")
        except KeyNotFound:
            return None

    def delete(self, key):
        with self._errors("delete", check_key(key)):
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def result_url(self, key):
        with self._errors("presign", check_key(key)):
            return self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key},
                ExpiresIn=self.presign_expiry)

    def describe(self):
        if not self.endpoint_url:
            return f"s3://{self.bucket}"
        parts = urlsplit(self.endpoint_url)
        return f"s3://{self.bucket} at {parts.scheme}://{parts.hostname}" + (
            f":{parts.port}" if parts.port else "")


class LocalStorage(Storage):
    """Keys are files under ``root``. Writes are atomic: a temp file beside the target, renamed."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    def path_for(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        if not path.is_relative_to(self.root):  # e.g. through a symlink
            raise StorageError(f"storage key {key!r} is not allowed")
        return path

    @contextmanager
    def _errors(self, action: str, key: str, missing_is_key: bool = True) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError as err:
            if not missing_is_key:  # e.g. the file to upload is gone: not a missing key
                raise StorageError(f"local storage failed: no such file ({action} {key})") from err
            raise KeyNotFound(key) from err
        except OSError as err:
            raise StorageError(f"local storage failed: {err.strerror or type(err).__name__} "
                               f"({action} {key})") from err

    @staticmethod
    def _atomic_write(dest: Path, write) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def upload_file(self, key, path, content_type):
        dest = self.path_for(key)
        with self._errors("put", key, missing_is_key=False):
            with open(path, "rb") as src:
                self._atomic_write(dest, lambda f: shutil.copyfileobj(src, f))

    def download_file(self, key, dest_path):
        src_path = self.path_for(key)
        with self._errors("get", key):
            with open(src_path, "rb") as src:
                self._atomic_write(Path(dest_path), lambda f: shutil.copyfileobj(src, f))

    def exists(self, key):
        return self.path_for(key).is_file()

    def put_text(self, key, text):
        dest = self.path_for(key)
        with self._errors("put", key):
            self._atomic_write(dest, lambda f: f.write(text.encode("utf-8")))

    def get_text(self, key):
        path = self.path_for(key)
        try:
            with self._errors("get", key):
                return path.read_text(encoding="utf-8")
        except KeyNotFound:
            return None

    def delete(self, key):
        path = self.path_for(key)
        with self._errors("delete", key):
            path.unlink(missing_ok=True)

    def result_url(self, key):
        return self.path_for(key).as_uri()

    def describe(self):
        return str(self.root)


def make_storage(settings: Settings) -> Storage:
    """S3 when a bucket is configured, else the local folder ``settings.local_storage_dir``."""
    if settings.s3_bucket:
        return S3Storage(settings)
    return LocalStorage(settings.local_storage_dir)
