"""Where the worker keeps voices, results and job logs: an S3 bucket, or a local folder.

Why this module exists: the handler and the validation script need one small storage interface
that behaves the same on AWS S3, on S3-compatible providers (Backblaze B2, R2, MinIO, SeaweedFS)
and, with no cloud account at all, on a local folder. It is also the one place that

* configures boto3 for those providers: since boto3 1.36 the SDK adds CRC checksum headers
  (``x-amz-checksum-*``, ``x-amz-sdk-checksum-algorithm``, aws-chunked bodies with
  ``x-amz-trailer``) to every upload, which B2 and several others reject; ``when_required``
  turns that off. Signatures are always SigV4, custom endpoints use path-style addressing;
* bounds how long one storage call can take (``call_bound_s``): every call is one S3 operation
  retried only by botocore, at most ``S3_MAX_ATTEMPTS`` tries of connect + read timeout each.
  boto3's managed transfers (``client.download_file``/``upload_file``) are not used: they add
  a HEAD and a retry loop of their own (five more GETs on read errors) on top of botocore's, which
  is how one hung endpoint once held a job for twelve GETs;
* turns every provider or filesystem failure into a ``StorageError`` whose message is one
  sentence naming the cause (a missing bucket is not a missing voice) with no credentials and no
  presigned signature in it;
* removes old outputs and job records from a local folder when ``F5_LOCAL_RETENTION_HOURS`` is
  set (``sweep_expired``); on S3 the bucket's lifecycle rules do that;
* describes objects without reading them (``head``, ``list_objects``: size, last modified and a
  ``version`` that changes whenever the object is replaced, S3's ETag or the file's inode, mtime
  and size), reads part of one (``get_range``) and reads one only when it changed
  (``download_if_changed``: a conditional GET, so an unchanged object costs one bodiless answer).

Keys look like ``voices/alice.wav``, ``output/<job>.wav``, ``logs/<job>.json`` (the prefixes are
defined in ``f5worker.settings``). Both backends refuse keys that are absolute or contain empty,
``.`` or ``..`` segments or backslashes, so a key means the same thing everywhere.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (BotoCoreError, ClientError, ConnectionClosedError,
                                 ConnectTimeoutError, EndpointConnectionError, IncompleteReadError,
                                 NoCredentialsError, PartialCredentialsError, ReadTimeoutError,
                                 ResponseStreamingError, SSLError)
from botocore.handlers import VALID_BUCKET, VALID_S3_ARN

from f5worker.errors import StorageError, WriteStopped
from f5worker.settings import (ENV_AWS_CA_BUNDLE, ENV_AWS_ENDPOINT_URL, ENV_LOCAL_STORAGE_DIR, ENV_S3_BUCKET,
                               LOGS_PREFIX, OUTPUT_PREFIX, Settings)

log = logging.getLogger(__name__)

DEFAULT_REGION = "us-east-1"
# botocore (standard retry mode) waits before try i+1 at most min(2**i, 20) s, plus up to 5 s more
# when the server asks with x-amz-retry-after; an upload waits up to 1 s for "100 Continue".
BACKOFF_CAP_S = 20.0
RETRY_AFTER_EXTRA_S = 5.0
EXPECT_CONTINUE_WAIT_S = 1.0
COPY_CHUNK_BYTES = 1024 * 1024
# Outputs larger than this are uploaded in parts of this size: S3 and B2 take parts of 5 MiB up
# to 5 GiB (the last may be smaller) and at most 10,000 of them, so up to 160 GiB here; a part is
# one call, sent well within the storage timeouts on any link that carries audio at all.
MULTIPART_PART_BYTES = 16 * 1024 * 1024
MAX_UNABORTED = 16  # uploads whose abort failed, remembered to be tried again (one call each)
SWEEP_INTERVAL_S = 600.0  # a local retention sweep runs at most once per 10 minutes
SWEPT_PREFIXES = (OUTPUT_PREFIX, LOGS_PREFIX)  # never voices/
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
_NOT_MODIFIED_CODES = {"304", "NotModified"}  # a conditional GET whose object has not changed
_CHANGED_CODES = {"412", "PreconditionFailed"}  # a read's If-Match: the object was replaced
_EMPTY_RANGE_CODES = {"416", "InvalidRange"}  # a range past the end (or any range of an empty object)
_FORBIDDEN_CODES = {"403", "AccessDenied"}
_NO_UPLOAD_CODES = {"NoSuchUpload"}  # an upload id already aborted or completed
# Object metadata naming the multipart upload that wrote it: a completion whose answer was lost
# is recognised by it (its retry meets NoSuchUpload, the upload being already complete).
UPLOAD_TOKEN_META = "f5-upload"
_HTTP_CODE_NAMES = {"400": "HTTP 400 Bad Request", "403": "HTTP 403 Forbidden"}  # HEAD: no body
# What a failed local write means, where the system's words would mislead: ENOENT from mkdir is a
# folder that cannot be made (no file is missing), EEXIST and ENOTDIR a file where a folder must go.
_LOCAL_WRITE_REASONS = {errno.ENOENT: "a folder on the way cannot be created there",
                        errno.EEXIST: "a file stands where a folder is needed",
                        errno.ENOTDIR: "a file stands where a folder is needed"}


class KeyNotFound(StorageError):
    """The key does not exist. ``.key`` names it; callers word the message for their caller."""

    def __init__(self, key: str):
        super().__init__(f"'{key}' was not found in storage")
        self.key = key


class VersionChanged(StorageError):
    """The object at ``key`` is no longer the version asked for: it was replaced meanwhile."""

    def __init__(self, key: str):
        super().__init__(f"'{key}' was replaced while it was read")
        self.key = key


class StorageUnusable(StorageError):
    """The storage the settings name cannot be used at all (no such bucket, a bucket name S3 does
    not allow, a local root that is a file or cannot be written): a setting to fix, not a passing
    fault, so a start error."""

    retry_helps = False


class BucketMissing(StorageUnusable):
    """The bucket itself is not there (S3's NoSuchBucket)."""


class Forbidden(StorageError):
    """S3 refused the request (HTTP 403). Without s3:ListBucket that is also how a missing key reads.
    The key's permissions are a setting to fix: the same request is refused again."""

    retry_helps = False


class NotText(StorageError):
    """The object at ``key`` is not UTF-8 text (``get_text``). ``.key`` names it."""

    def __init__(self, key: str):
        super().__init__(f"'{key}' is not UTF-8 text")
        self.key = key


class ObjectTooLarge(StorageError):
    """The object is larger than the caller allowed; nothing was written. ``.size`` is its size."""

    def __init__(self, key: str, size: int, limit: int):
        super().__init__(f"'{key}' is {size} bytes, more than the {limit} allowed")
        self.key, self.size, self.limit = key, size, limit


@dataclass(frozen=True)
class ObjectInfo:
    """What storage says about an object without reading it."""

    key: str
    size: int
    last_modified: datetime  # UTC
    version: str  # changes whenever the object is replaced: S3's ETag; locally inode, mtime (ns), size


@dataclass(frozen=True)
class Listing:
    """One listing's objects, whether more may follow, and where the next listing starts: after the
    last key or folder this one passed (a folder counts towards S3's MaxKeys, so a listing may
    pass folders and hold no key); None when it passed nothing."""

    objects: list[ObjectInfo]
    more: bool
    resume_after: str | None = None


def past_folder(prefix: str) -> str:
    """The least key after every key under ``prefix`` (which ends in '/'): its '/' raised to '0',
    in byte order above anything '/' begins. Only the key ``...0`` itself, never a voice or an
    output (they end in an extension), is passed over with them."""
    return prefix[:-1] + "0"


def _error_code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code") or "unknown")


def decode_text(key: str, data: bytes) -> str:
    """``data`` as UTF-8 text, a leading byte-order mark dropped (some editors write one); ``NotText``
    for anything else, so one hand-placed file in another encoding reads as what it is."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise NotText(key) from None


def check_key(key: str) -> str:
    """Return ``key`` if it is a plain relative key (``a/b.wav``), else raise ``StorageError``."""
    if (not isinstance(key, str) or "\\" in key or "\x00" in key
            or any(part in ("", ".", "..") for part in key.split("/"))):
        raise StorageError(f"storage key {key!r} is not allowed")
    return key


def call_bound_s(settings: Settings) -> float:
    """The longest one S3 storage call can take when the endpoint stops answering (or never
    answers): every try waits out at most the connect timeout (connection, TLS handshake, sending
    the request), an upload's 1 s wait for "100 Continue" and the read timeout (the answer), with
    botocore's longest backoff between tries. With the defaults (5 s, 15 s, 2 tries) that is 48 s.
    The timeouts count silence on the socket: an endpoint that keeps trickling bytes is not cut off
    here (the job's own deadline answers the job then)."""
    tries = settings.s3_max_attempts
    backoff = sum(min(2.0 ** i, BACKOFF_CAP_S) + RETRY_AFTER_EXTRA_S for i in range(tries - 1))
    per_try = settings.s3_connect_timeout + EXPECT_CONTINUE_WAIT_S + settings.s3_read_timeout
    return tries * per_try + backoff


def _timed_out(err: BotoCoreError) -> bool:
    """Whether a dropped connection was our socket timing out (botocore wraps urllib3's
    ``ProtocolError("Connection aborted.", TimeoutError())`` as ConnectionClosedError)."""
    inner = getattr(err, "kwargs", {}).get("error")
    return any(isinstance(arg, TimeoutError) for arg in getattr(inner, "args", ()))


def make_s3_client(settings: Settings):
    """A boto3 S3 client that works with AWS and with S3-compatible providers such as B2, with the
    timeouts and tries of ``settings`` (see ``call_bound_s``)."""
    config = Config(
        signature_version="s3v4",
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        # Custom endpoints: path style (no per-bucket DNS or certificates needed). AWS: botocore's
        # "auto", i.e. virtual-hosted unless the bucket name has dots.
        s3={"addressing_style": "path" if settings.aws_endpoint_url else "auto"},
        # Tries in all, the first included ("max_attempts" would count retries after the first).
        retries={"total_max_attempts": settings.s3_max_attempts, "mode": "standard"},
        connect_timeout=settings.s3_connect_timeout,
        read_timeout=settings.s3_read_timeout,
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


def atomic_write(dest: Path, write: Callable[[Any], None]) -> None:
    """Write ``dest`` through a temp file beside it, renamed into place only once ``write(f)``
    has finished: a failure leaves the old content (or nothing) and no temp file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def staged_file(key: str) -> Iterator[None]:
    """A failure to open or read the worker's own staged file (the one being stored as ``key``),
    said apart from a failure of the storage."""
    try:
        yield
    except OSError as err:
        raise StorageError(f"the file to store as {key} could not be read from the worker's temp folder "
                           f"({err.strerror or type(err).__name__})") from err


class Storage:
    """The interface the worker uses. Subclasses implement the I/O; probe/put_json are shared."""

    # Whether ``result_url`` gives a URL a caller elsewhere can open (a presigned https URL, not a
    # file:// path on the worker); where not, a TTS job returns its audio inline by default.
    result_urls_reach_callers = True

    def upload_file(self, key: str, path: str | os.PathLike, content_type: str, *,
                    stop: threading.Event | None = None) -> None:
        """Store the file at ``path`` as ``key``. A write of several calls (a multipart upload)
        checks ``stop`` before each and, once it is set, aborts what it sent and raises
        ``WriteStopped``; a write of one call is bounded by the storage timeouts and finishes."""
        raise NotImplementedError

    def abort_uploads(self) -> None:
        """The process is about to end: abort every multipart upload still open, and refuse
        further parts, so no part sent is left stored (and billed). One call per open upload."""

    def download_file(self, key: str, dest_path: str | os.PathLike, max_bytes: int | None = None) -> None:
        """Copy ``key`` to ``dest_path``; ``KeyNotFound`` if it does not exist, ``ObjectTooLarge``
        (nothing written) if it is larger than ``max_bytes``."""
        self.download_if_changed(key, dest_path, None, max_bytes=max_bytes)

    def download_if_changed(self, key: str, dest_path: str | os.PathLike, version: str | None, *,
                            max_bytes: int | None = None) -> ObjectInfo | None:
        """Copy ``key`` to ``dest_path`` and describe what was copied, unless the object is still
        ``version``: then None, and nothing is transferred or written. ``KeyNotFound`` if missing,
        ``ObjectTooLarge`` (nothing written) if it is larger than ``max_bytes``."""
        raise NotImplementedError

    def head(self, key: str) -> ObjectInfo:
        """``key`` described without reading it; ``KeyNotFound`` if it does not exist."""
        raise NotImplementedError

    def list_objects(self, prefix: str, start_after: str | None = None, max_keys: int = 1000) -> Listing:
        """At most ``max_keys`` (1-1000) objects directly under ``prefix`` (which ends in '/'; keys
        with a further '/' are not listed), in key order, after the key ``start_after``; whether
        more may follow, and where to go on from (``Listing.resume_after``). One request."""
        raise NotImplementedError

    def get_range(self, key: str, start: int, length: int, *, version: str | None = None) -> bytes:
        """At most ``length`` bytes of ``key`` from byte ``start``; fewer at the end, none past it.
        ``KeyNotFound`` if it does not exist; ``VersionChanged`` if ``version`` is given and the
        object is no longer that version (so reads of several ranges describe one object)."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def put_text(self, key: str, text: str) -> None:
        raise NotImplementedError

    def get_text(self, key: str) -> str | None:
        """The UTF-8 text stored at ``key`` (``decode_text``), or None if there is none; ``NotText``
        if it is not UTF-8."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""
        raise NotImplementedError

    def result_url(self, key: str) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def sweep_expired(self, now: float | None = None) -> int:
        """Remove outputs and job records older than the retention time; returns how many. Cheap to
        call after every job: it does nothing here and on S3 (the bucket's lifecycle rules expire
        objects there), and ``LocalStorage`` runs it at most once per ``SWEEP_INTERVAL_S``."""
        return 0

    def put_json(self, key: str, obj: Any) -> None:
        self.put_text(key, json.dumps(obj, ensure_ascii=False, indent=2))

    def check_exists(self) -> None:
        """Raise StorageError unless the storage is there to write to: the worker checks this at
        start and writes nothing (not even a job record) when it fails. Nothing to check here."""

    def probe(self, *, step: Callable[[str], None] = lambda doing: None,
              also: Callable[[str, str], None] = lambda key, text: None) -> None:
        """Read a key that does not exist, then write, read back and delete a small object under
        ``logs/``; raise StorageError if any step fails. Used by the validation script to check
        the bucket, the credentials and their permissions. The read comes first so that a missing
        bucket is reported as such, never created by the write (some servers create on PUT).
        ``step`` hears what each step is about to do (the gate names the one that did not finish);
        ``also(key, text)`` checks the object more while it is stored (before its delete)."""
        key = f"{LOGS_PREFIX}probe-{uuid.uuid4().hex}.txt"
        text = "f5-tts worker storage probe"
        # Built-in voices and transcript lookups rely on a missing key reading as missing: without
        # s3:ListBucket, S3 answers 403 instead of 404.
        step(f"reading {key}, which does not exist")
        try:
            absent = self.get_text(key)
        except Forbidden:
            raise StorageError("storage answers 'forbidden' for a missing key; grant the credentials "
                               f"s3:ListBucket on the bucket ({self.describe()})") from None
        if absent is not None:
            raise StorageError(f"storage probe found an object under a fresh random key ({self.describe()})")
        step(f"writing {key}")
        self.put_text(key, text)
        try:
            step(f"reading {key} back")
            if self.get_text(key) != text:
                raise StorageError(f"storage probe read back different content ({self.describe()})")
            also(key, text)
        finally:
            step(f"deleting {key}")
            self.delete(key)
        step(f"checking that {key} is gone")
        if self.get_text(key) is not None:
            raise StorageError(f"storage probe object was still readable after delete ({self.describe()})")
        log.info("storage probe passed: %s", self.describe())


class S3Storage(Storage):
    def __init__(self, settings: Settings, client=None):
        if not settings.s3_bucket:
            raise StorageError("S3 storage needs a bucket name")
        if not (VALID_BUCKET.match(settings.s3_bucket) or VALID_S3_ARN.match(settings.s3_bucket)):
            # botocore's own rule, which it would otherwise apply to every request of every job
            raise StorageUnusable(f"{ENV_S3_BUCKET} is not a bucket name S3 allows (letters, digits, '.', '-' "
                                  "and '_', at most 255; or an access point ARN); correct it")
        self.bucket = settings.s3_bucket
        self.endpoint_url = settings.aws_endpoint_url
        self.presign_expiry = settings.presign_expiry
        self.client = client if client is not None else make_s3_client(settings)
        self.part_bytes = MULTIPART_PART_BYTES
        self._bucket_seen = False  # set by check_exists; every write checks it first
        self._uploads_lock = threading.Lock()
        self._open_uploads: dict[str, str] = {}  # multipart upload id -> key, while it runs
        # Uploads whose abort failed (the storage was unreachable): tried again before the next
        # multipart upload and by abort_uploads, so their parts do not wait for a lifecycle rule.
        self._unaborted: dict[str, str] = {}
        self._closing = threading.Event()  # set by abort_uploads: no further part is sent

    def _error(self, err: BaseException, action: str, key: str, waited: float) -> StorageError | None:  # noqa: C901 - one storage error per botocore error kind
        """The StorageError for a botocore failure (None: not one of theirs). Each message is one
        sentence built from the error code or type only: botocore's own texts can carry URLs.
        ``waited``: seconds the call took, all tries together (a timeout names it, since which
        timeout expired, connect or read, depends on where the endpoint went silent)."""
        where = f"({action} {key})"
        waited_s = f"{round(waited, 1):g} s"
        if isinstance(err, ClientError):
            code = _error_code(err)
            if code in _MISSING_CODES:
                return KeyNotFound(key)
            if code == "NoSuchBucket":
                return self._no_bucket(action, key)
            if code in _CHANGED_CODES:
                return VersionChanged(key)
            kind = Forbidden if code in _FORBIDDEN_CODES else StorageError
            return kind(f"S3 request failed: {_HTTP_CODE_NAMES.get(code, code)} {where}")
        if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
            return StorageError(f"S3 credentials are missing or incomplete {where}")
        if isinstance(err, SSLError):
            if "CERTIFICATE_VERIFY_FAILED" in str(err):
                return StorageError(f"the S3 endpoint's TLS certificate was not accepted; if a private CA "
                                    f"signed it, set {ENV_AWS_CA_BUNDLE} to that CA's certificate file {where}")
            return StorageError(f"the TLS handshake with the S3 endpoint failed; check that "
                                f"{ENV_AWS_ENDPOINT_URL} has the right scheme and port, and that {ENV_AWS_CA_BUNDLE}, "
                                f"if set, is the CA's certificate file {where}")
        if isinstance(err, ConnectTimeoutError):
            return StorageError(f"could not connect to the S3 endpoint within {waited_s} {where}")
        if isinstance(err, EndpointConnectionError):
            return StorageError(f"could not connect to the S3 endpoint {where}")
        if isinstance(err, ReadTimeoutError) or (isinstance(err, ConnectionClosedError)
                                                 and _timed_out(err)):  # an upload nobody reads
            return StorageError(f"S3 did not answer within {waited_s} {where}")
        if isinstance(err, (IncompleteReadError, ResponseStreamingError, ConnectionClosedError)):
            return StorageError(f"the connection to S3 broke off during the transfer {where}")
        if isinstance(err, BotoCoreError):
            return StorageError(f"S3 request failed: {type(err).__name__} {where}")
        if isinstance(err, OSError):  # the local side of a transfer: the file read or written
            reason = err.strerror or type(err).__name__
            return StorageError(f"S3 transfer failed locally: {reason} {where}")
        return None

    def _no_bucket(self, action: str, key: str) -> StorageError:
        return BucketMissing(f"S3 bucket '{self.bucket}' does not exist; check {ENV_S3_BUCKET} "
                             f"({action} {key})")

    @contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        except Exception as err:
            mapped = self._error(err, action, key, time.monotonic() - started)
            if mapped is None:
                raise
            raise mapped from err

    def upload_file(self, key, path, content_type, *, stop=None):
        # Up to one part's size, one PutObject, bounded like any other call (botocore rewinds the
        # file for a retry); a larger file (a chapter-length job's) as a multipart upload.
        key = check_key(key)  # before any request
        self._before_write(key)
        with staged_file(key):
            body = open(path, "rb")
        with body:
            if os.fstat(body.fileno()).st_size > self.part_bytes:
                self._upload_parts(key, body, content_type, stop or threading.Event())
                return
            data = self._read_part(body, key)  # read here, so a failing temp disk is said as such
            with self._errors("put", key):
                self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)

    def _upload_parts(self, key: str, body: BinaryIO, content_type: str, stop: threading.Event) -> None:
        """A multipart upload of parts of ``part_bytes`` read one at a time, each part one call
        with the storage timeouts and tries, so no call grows with the file. On any failure, or
        once ``stop`` (or ``abort_uploads``) asks before a part, the upload is aborted, so no part
        is left stored (and billed); the object appears only once every part is in, or not at all."""
        token = uuid.uuid4().hex
        self._abort_unaborted()
        with self._errors("put", key):
            upload_id = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=key, ContentType=content_type,
                Metadata={UPLOAD_TOKEN_META: token})["UploadId"]
        with self._uploads_lock:
            self._open_uploads[upload_id] = key
        completing = False
        try:
            parts, size = [], 0
            while data := self._read_part(body, key):
                size += len(data)
                if stop.is_set() or self._closing.is_set():
                    raise self._stopped(key, upload_id, len(parts))
                number = len(parts) + 1
                with self._errors("put", key):
                    answer = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                     PartNumber=number, Body=data)
                parts.append({"ETag": answer["ETag"], "PartNumber": number})
            completing = True  # past here a failure may still have stored the object: never "nothing stored"
            self._complete(key, upload_id, parts, token, size)
        except WriteStopped:
            raise  # aborted between parts (_stopped)
        except StorageError as err:
            asked = not completing and (stop.is_set() or self._closing.is_set())  # abort_uploads under a part
            # after abort_uploads too: a part in flight when it aborted may have been stored since
            if self._abort_upload(key, upload_id):
                if asked:  # the part failed for the abort (NoSuchUpload), not the storage: say what was asked
                    raise WriteStopped(f"the upload was stopped after {len(parts)} part(s) and aborted, so nothing "
                                       f"was stored (put {key})", undone=True) from err
                raise
            raise StorageError(f"{err}; its upload could not be aborted either, so the parts sent stay stored "
                               "until a later upload of this worker or its exit aborts them, or the bucket's rule for "
                               "incomplete multipart uploads removes them") from err
        except BaseException:
            self._abort_upload(key, upload_id)
            raise
        finally:
            with self._uploads_lock:
                self._open_uploads.pop(upload_id, None)

    def _stopped(self, key: str, upload_id: str, parts: int) -> WriteStopped:
        """The upload aborted between two parts, as asked; what became of its parts, said."""
        if self._abort_upload(key, upload_id):
            return WriteStopped(f"the upload was stopped after {parts} part(s) and aborted, so nothing was "
                                f"stored (put {key})", undone=True)
        return WriteStopped(f"the upload was stopped after {parts} part(s), but its abort failed, so its parts "
                            "stay stored until the bucket's rule for incomplete multipart uploads removes "
                            f"them (put {key})", undone=False)

    def _read_part(self, body: BinaryIO, key: str) -> bytes:
        with staged_file(key):
            return body.read(self.part_bytes)

    def _complete(self, key: str, upload_id: str, parts: list[dict], token: str, size: int) -> None:
        """CompleteMultipartUpload; a NoSuchUpload answer to it is a success when the object is
        this upload's (its token and size): a try that completed it lost its answer, and
        botocore's retry found the upload already complete."""
        with self._errors("put", key):
            try:
                self.client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                      MultipartUpload={"Parts": parts})
            except ClientError as err:
                if _error_code(err) not in _NO_UPLOAD_CODES or not self._written_by(key, token, size):
                    raise
                log.info("the multipart upload of %s was completed by a try whose answer was lost", key)

    def _written_by(self, key: str, token: str, size: int) -> bool:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError):
            return False
        # botocore keeps a metadata name as the server cases it (MinIO answers X-Amz-Meta-F5-Upload)
        metadata = {name.lower(): value for name, value in head.get("Metadata", {}).items()}
        return metadata.get(UPLOAD_TOKEN_META) == token and head.get("ContentLength") == size

    def abort_uploads(self):
        self._closing.set()
        with self._uploads_lock:
            open_uploads = list(self._open_uploads.items())
        for upload_id, key in open_uploads:
            self._abort_upload(key, upload_id)
        self._abort_unaborted()

    def _abort_unaborted(self) -> None:
        """Try again the aborts that failed, once each."""
        with self._uploads_lock:
            waiting = list(self._unaborted.items())
        for upload_id, key in waiting:
            self._abort_upload(key, upload_id)

    def _abort_upload(self, key: str, upload_id: str) -> bool:
        """Whether the upload is gone: aborted now, or already (abort_uploads) or completed. One
        that could not be aborted is remembered (``_unaborted``) and tried again later."""
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except ClientError as err:
            if _error_code(err) not in _NO_UPLOAD_CODES:
                # a refusal (AccessDenied) would be refused again: only a server's failure is retried
                status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                return self._abort_failed(key, upload_id, err, again=status >= 500)
        except Exception as err:  # unreachable, timed out: tried again later
            return self._abort_failed(key, upload_id, err, again=True)
        with self._uploads_lock:
            self._unaborted.pop(upload_id, None)
        return True

    def _abort_failed(self, key: str, upload_id: str, err: Exception, *, again: bool) -> bool:
        # ``again``: tried again later (_abort_unaborted); the bucket's lifecycle rule is the backstop
        mapped = self._error(err, "abort upload", key, 0.0)
        log.warning("could not abort the multipart upload of %s: %s", key, mapped or type(err).__name__)
        with self._uploads_lock:
            if again:
                self._unaborted[upload_id] = key
            else:
                self._unaborted.pop(upload_id, None)
            while len(self._unaborted) > MAX_UNABORTED:  # the oldest are left to the lifecycle rule
                self._unaborted.pop(next(iter(self._unaborted)))
        return False

    @staticmethod
    def _write_body(key: str, response: dict, dest_path, max_bytes: int | None = None) -> None:
        body = response["Body"]
        with body:  # closes the connection on every path, unread or not
            size = response.get("ContentLength")
            if max_bytes is not None and size is not None and size > max_bytes:
                raise ObjectTooLarge(key, size, max_bytes)
            atomic_write(Path(dest_path), lambda f: shutil.copyfileobj(body, f, COPY_CHUNK_BYTES))

    def download_if_changed(self, key, dest_path, version, *, max_bytes=None):
        # A conditional GET (If-None-Match): one request whether or not the object changed, and an
        # unchanged one answers 304 with no body. The body is streamed to the file (botocore checks
        # its length at the end), read with the same read timeout, and not retried.
        with self._errors("get", check_key(key)):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=key,
                                                  **({"IfNoneMatch": version} if version else {}))
            except ClientError as err:
                if version and _error_code(err) in _NOT_MODIFIED_CODES:
                    return None
                raise
            self._write_body(key, response, dest_path, max_bytes)
        return ObjectInfo(key, response["ContentLength"], _utc(response["LastModified"]), response["ETag"])

    def head(self, key):
        try:
            with self._errors("head", check_key(key)):
                response = self.client.head_object(Bucket=self.bucket, Key=key)
        except KeyNotFound:
            if self._bucket_missing(key):
                raise self._no_bucket("head", key) from None
            raise
        return ObjectInfo(key, response["ContentLength"], _utc(response["LastModified"]), response["ETag"])

    def list_objects(self, prefix, start_after=None, max_keys=1000):
        check_key(prefix + "x")  # a prefix is a key's beginning: the same rules apply
        if not prefix.endswith("/") or not 1 <= max_keys <= 1000:
            raise StorageError(f"storage listing of {prefix!r} ({max_keys} keys) is not allowed")
        with self._errors("list", prefix):
            response = self.client.list_objects_v2(
                Bucket=self.bucket, Prefix=prefix, Delimiter="/", MaxKeys=max_keys,
                **({"StartAfter": start_after} if start_after else {}))
        found = [ObjectInfo(item["Key"], item["Size"], _utc(item["LastModified"]), item["ETag"])
                 for item in response.get("Contents", [])]
        passed = [info.key for info in found] + [past_folder(p["Prefix"]) for p in response.get("CommonPrefixes", [])]
        return Listing(found, bool(response.get("IsTruncated")),
                       max(passed, key=lambda key: key.encode("utf-8"), default=None))

    def get_range(self, key, start, length, *, version=None):
        if start < 0 or length < 1:
            raise StorageError(f"byte range {start}+{length} of {key!r} is not allowed")
        with self._errors("get", check_key(key)):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=key,
                                                  Range=f"bytes={start}-{start + length - 1}",
                                                  **({"IfMatch": version} if version else {}))
            except ClientError as err:
                if _error_code(err) in _EMPTY_RANGE_CODES:
                    return b""
                raise
            with response["Body"] as body:
                return body.read()

    def exists(self, key):
        try:
            with self._errors("head", check_key(key)):
                self.client.head_object(Bucket=self.bucket, Key=key)
        except KeyNotFound:
            if self._bucket_missing(key):
                raise self._no_bucket("head", key) from None
            return False
        return True

    def check_exists(self, *, action: str = "get", key: str | None = None):
        """The bucket must exist before anything is written: S3 servers that create a bucket on
        a write (SeaweedFS, some MinIO setups) would otherwise create a mistyped one with the first
        job's record. One GET of a key that is not there tells a missing bucket (NoSuchBucket) from
        a missing key; 'forbidden' (no s3:ListBucket) comes from a bucket that exists. Errors name
        ``action`` and ``key`` (the write this check stands before), else the check's own key."""
        probe = f"{LOGS_PREFIX}start-check-{uuid.uuid4().hex}.txt"
        try:
            with self._errors(action, key or probe):
                self.client.get_object(Bucket=self.bucket, Key=probe)["Body"].close()
        except (KeyNotFound, Forbidden):
            pass
        self._bucket_seen = True

    def _before_write(self, key: str) -> None:
        """A write only into a bucket seen to exist (the start check may have met a storage fault)."""
        if not self._bucket_seen:
            self.check_exists(action="put", key=key)

    def _bucket_missing(self, key: str) -> bool:
        """HEAD answers a bare 404 for a missing key and for a missing bucket alike; ask the bucket.
        Only on the missing-key path, so a found key costs one request."""
        try:
            with self._errors("head", key):
                self.client.head_bucket(Bucket=self.bucket)
        except KeyNotFound:  # the only thing HeadBucket can find missing is the bucket
            return True
        except Forbidden:  # credentials may read objects without being allowed to HEAD the bucket
            return False
        return False

    def put_text(self, key, text):
        key = check_key(key)  # before any request
        self._before_write(key)
        with self._errors("put", key):
            content_type = ("application/json" if key.endswith(".json")
                            else "text/plain; charset=utf-8")
            self.client.put_object(Bucket=self.bucket, Key=key, Body=text.encode("utf-8"),
                                   ContentType=content_type)

    def get_text(self, key):
        try:
            with self._errors("get", check_key(key)):
                body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
                with body:
                    data = body.read()
        except KeyNotFound:
            return None
        return decode_text(key, data)

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


def writable_folder_problem(folder: Path) -> str | None:
    """None if ``folder`` is a folder this process may write, or may create; else why not. Asks the
    system (``os.access``, which also answers for a read-only filesystem) and writes nothing."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if os.access(existing, os.W_OK | os.X_OK):
        return None
    return f"{existing} is not writable" if existing == folder else f"it cannot be made: {existing} is not writable"


class LocalStorage(Storage):
    """Keys are files under ``root``. Writes are atomic: a temp file beside the target, renamed.
    With ``retention_hours`` > 0, ``sweep_expired`` removes outputs and job records older than that."""

    result_urls_reach_callers = False  # file:// paths on this machine

    def __init__(self, root: str | os.PathLike, retention_hours: float = 0.0):
        self.root = Path(root).resolve()
        self.retention_s = retention_hours * 3600.0
        self._next_sweep = 0.0
        self._sweep_lock = threading.Lock()

    def check_exists(self) -> None:
        """``StorageUnusable`` unless the root is a folder the worker can write, or one it can
        create (nothing is created here: the gate calls this too)."""
        problem = writable_folder_problem(self.root)
        if problem:
            raise StorageUnusable(f"{ENV_LOCAL_STORAGE_DIR} ({self.root}) cannot hold voices and outputs: "
                                  f"{problem}; set it to a folder the worker can write")

    def path_for(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        if not path.is_relative_to(self.root):  # e.g. through a symlink
            raise StorageError(f"storage key {key!r} is not allowed")
        return path

    @contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        """Filesystem failures as StorageErrors; on a read, a missing file is ``KeyNotFound``. A
        write ("put") names what stopped it under the root: nothing is "not found" on a write."""
        try:
            yield
        except OSError as err:
            reason = err.strerror or type(err).__name__
            if action == "put":
                raise StorageError(f"local storage could not write under {self.root}: "
                                   f"{_LOCAL_WRITE_REASONS.get(err.errno, reason)} ({action} {key}); check that "
                                   f"{ENV_LOCAL_STORAGE_DIR} names a folder the worker can write") from err
            if isinstance(err, FileNotFoundError):
                raise KeyNotFound(key) from err
            raise StorageError(f"local storage failed: {reason} ({action} {key})") from err

    def upload_file(self, key, path, content_type, *, stop=None):
        # one local write: ``stop`` has no call to stop between
        dest = self.path_for(key)
        with staged_file(key):  # the worker's own staged file, not storage: said apart
            src = open(path, "rb")

        def copy(out: BinaryIO) -> None:
            while True:
                with staged_file(key):
                    data = src.read(COPY_CHUNK_BYTES)
                if not data:
                    return
                out.write(data)

        with src, self._errors("put", key):
            atomic_write(dest, copy)

    @staticmethod
    def _info(key: str, st: os.stat_result) -> ObjectInfo:
        # Writes here replace a file by renaming a new one into place, so the inode alone would
        # tell a replaced file; mtime and size also catch a file rewritten in place by hand.
        return ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, timezone.utc),
                          f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}")

    def download_if_changed(self, key, dest_path, version, *, max_bytes=None):
        src_path = self.path_for(key)
        with self._errors("get", key):
            with open(src_path, "rb") as src:
                # the version of the very file opened, so what is copied is what is described
                info = self._info(key, os.fstat(src.fileno()))
                if version is not None and info.version == version:
                    return None
                if max_bytes is not None and info.size > max_bytes:
                    raise ObjectTooLarge(key, info.size, max_bytes)
                atomic_write(Path(dest_path), lambda f: shutil.copyfileobj(src, f))
        return info

    def head(self, key):
        path = self.path_for(key)
        with self._errors("head", key):
            st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise KeyNotFound(key)
        return self._info(key, st)

    def list_objects(self, prefix, start_after=None, max_keys=1000):
        check_key(prefix + "x")
        if not prefix.endswith("/") or not 1 <= max_keys <= 1000:
            raise StorageError(f"storage listing of {prefix!r} ({max_keys} keys) is not allowed")
        folder = self.path_for(prefix.rstrip("/"))
        after = (start_after or "").encode("utf-8")
        found: list[ObjectInfo] = []
        with self._errors("list", prefix):
            try:
                entries = list(os.scandir(folder))
            except (FileNotFoundError, NotADirectoryError):
                return Listing([], False)
            # Key order as S3 gives it (UTF-8 bytes); names starting with '.' are writes in progress
            # (atomic_write's temp files), not objects.
            names = sorted((e.name for e in entries if not e.name.startswith(".")),
                           key=lambda n: n.encode("utf-8", "surrogateescape"))
            for name in names:
                key = prefix + name
                if key.encode("utf-8", "surrogateescape") <= after:
                    continue
                try:
                    st = self.path_for(key).stat()
                except (StorageError, FileNotFoundError):  # a symlink out of the folder; removed meanwhile
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                if len(found) == max_keys:
                    return Listing(found, True, found[-1].key)
                found.append(self._info(key, st))
        return Listing(found, False, found[-1].key if found else None)

    def get_range(self, key, start, length, *, version=None):
        if start < 0 or length < 1:
            raise StorageError(f"byte range {start}+{length} of {key!r} is not allowed")
        path = self.path_for(key)
        with self._errors("get", key):
            with open(path, "rb") as src:
                if version is not None and self._info(key, os.fstat(src.fileno())).version != version:
                    raise VersionChanged(key)
                src.seek(start)
                return src.read(length)

    def exists(self, key):
        return self.path_for(key).is_file()

    def put_text(self, key, text):
        dest = self.path_for(key)
        with self._errors("put", key):
            atomic_write(dest, lambda f: f.write(text.encode("utf-8")))

    def get_text(self, key):
        path = self.path_for(key)
        try:
            with self._errors("get", key):
                data = path.read_bytes()
        except KeyNotFound:
            return None
        return decode_text(key, data)

    def delete(self, key):
        path = self.path_for(key)
        with self._errors("delete", key):
            path.unlink(missing_ok=True)

    def result_url(self, key):
        return self.path_for(key).as_uri()

    def describe(self):
        return str(self.root)

    def sweep_expired(self, now: float | None = None) -> int:
        """Remove regular files under ``output/`` and ``logs/`` last modified more than the
        retention time before ``now`` (``time.time()``); never anything under ``voices/``, never
        through a symlink. A file that cannot be removed is logged and skipped: a sweep never fails
        a job."""
        if self.retention_s <= 0:
            return 0
        now = time.time() if now is None else now
        with self._sweep_lock:
            if now < self._next_sweep:
                return 0
            self._next_sweep = now + SWEEP_INTERVAL_S
        cutoff = now - self.retention_s
        removed = 0
        for prefix in SWEPT_PREFIXES:
            folder = self.root / prefix.rstrip("/")
            if folder.is_symlink() or not folder.is_dir():  # a symlink could lead into voices/
                continue
            for dirpath, _, names in os.walk(folder):  # does not follow symlinked folders
                for name in names:
                    path = Path(dirpath, name)
                    try:
                        info = path.lstat()
                        if stat.S_ISREG(info.st_mode) and info.st_mtime < cutoff:
                            path.unlink()
                            removed += 1
                    except FileNotFoundError:  # removed meanwhile
                        continue
                    except OSError as err:
                        log.warning("retention sweep could not remove %s: %s", path,
                                    err.strerror or type(err).__name__)
        if removed:
            log.info("retention sweep removed %d file(s) older than %g h from %s", removed,
                     self.retention_s / 3600.0, self.root)
        return removed


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(timezone.utc)


def check_at_start(storage: Storage) -> None:
    """Storage that cannot be used (``StorageUnusable``: a missing bucket, a local root that is a
    file) is a start error, raised; a storage fault meanwhile is not: it is logged, and the storage
    checks again before its first write (it never writes to a bucket it has not seen exist)."""
    try:
        storage.check_exists()
    except StorageUnusable:
        raise
    except StorageError as err:
        log.warning("could not check the storage at start (%s); it is checked again before the first write", err)


def make_storage(settings: Settings) -> Storage:
    """S3 when a bucket is configured, else the local folder ``settings.local_storage_dir``."""
    if settings.s3_bucket:
        return S3Storage(settings)
    return LocalStorage(settings.local_storage_dir, settings.local_retention_hours)
