"""One storage layer for local paths, ``s3://bucket/key`` URIs and (read-only) http(s) URLs.

Every stage reads and writes through this module, so a run works the same on a laptop (local
folders) and in a cluster (object storage).

* URIs: local paths (relative or absolute, optionally ``file://``), ``s3://bucket/key`` and,
  for inputs only, ``http://`` / ``https://`` URLs (e.g. the Cloud-Optimized GeoTIFFs of a public
  STAC catalog).
* Three backends behind one interface (:class:`Backend`): :class:`LocalBackend`,
  :class:`S3Backend` and the read-only :class:`HttpBackend`, chosen by :func:`backend` from the
  URI. A backend method is one attempt of one operation; the public functions run it under
  :func:`_retry` and its error mapping.
* S3 access goes through one boto3 client per process (created lazily, thread-safe), configured
  from the standard AWS environment only: the endpoint from ``AWS_ENDPOINT_URL_S3`` or
  ``AWS_ENDPOINT_URL`` (an empty value means unset), credentials from the usual chain
  (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, profiles, web
  identity), the region from ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` (default ``us-east-1``), and
  path-style addressing when a custom endpoint is set.
* Every S3 and local I/O operation goes through :func:`_retry`: transient failures (connection
  trouble, throttling, HTTP 5xx) are retried with exponential backoff and jitter. The number of
  attempts (``SITSFLOW_STORAGE_RETRIES``, default 5) and the base delay in seconds
  (``SITSFLOW_STORAGE_BACKOFF``, default 0.5) are read from the environment at call time. If the
  trouble persists, :class:`~sitsflow.errors.TransientError` (exit 75). A missing object is an
  :class:`~sitsflow.errors.InputNotFoundError`, a missing bucket or denied access a
  :class:`~sitsflow.errors.BadInputError` (exit 2, never retried).
* http(s) URLs are read with the standard library (GET, HEAD, the timeouts boto3 uses): connection
  trouble, timeouts, HTTP 429 and 5xx are transient as above; HTTP 404/410 is an
  :class:`~sitsflow.errors.InputNotFoundError`, 401/403 "access denied" and any other refusal a
  :class:`~sitsflow.errors.BadInputError` naming the URL. Writing, deleting or listing there is
  refused (exit 2): http(s) inputs are read-only.
* Writes are atomic: a local write goes to a hidden temporary file in the destination folder
  (``.<name>.tmp-<uuid>``), is fsynced and renamed over the destination; an S3 put is atomic by
  nature. :func:`list_files` never returns those temporary files. :func:`output_paths` publishes
  several files as a set, all at the end.
* Local file-system trouble is classified the same way everywhere: a full disk (ENOSPC, EDQUOT)
  is :class:`~sitsflow.errors.TransientError` ``no space left on <path>`` at once (the disk does
  not empty itself in seconds: the orchestrator reschedules the task); a read-only file system
  (EROFS) or a denied permission (EACCES, EPERM) is a :class:`~sitsflow.errors.BadInputError`
  naming the path. A writer library that hides the errno (HDF5's "NetCDF: HDF error", GDAL's
  "Write error") is diagnosed by probing the folder it wrote to (:func:`output_path`,
  :func:`scratch_dir`).
* GDAL (rasterio) goes through the same contract: :func:`rasterio_env` carries the GDAL settings,
  built once per process (S3 endpoint, HTTP retries, timeouts shared with boto3), and
  :func:`raster_call` runs a raster open/read with retries and classifies what GDAL raises (see
  there): transient -> retried, then exit 75; missing, denied or damaged rasters -> exit 2
  naming the file (and the date/band the caller names).
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import random
import re
import shutil
import ssl
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeGuard, TypeVar
from urllib.parse import urlsplit

from sitsflow.errors import (
    BadInputError,
    ConfigError,
    InputNotFoundError,
    SitsflowError,
    TransientError,
)
from sitsflow.log import get_logger
from sitsflow.process import usable_cpus, usable_memory

__all__ = [
    "Backend",
    "LocalBackend",
    "S3Backend",
    "HttpBackend",
    "backend",
    "is_s3",
    "is_http",
    "is_remote",
    "read_bytes",
    "read_text",
    "write_bytes",
    "write_text",
    "exists",
    "list_files",
    "delete",
    "stat",
    "copy",
    "upload_tree",
    "local_path",
    "output_path",
    "rasterio_path",
    "rasterio_env",
    "raster_call",
    "output_paths",
    "scratch_dir",
    "reset_clients",
]

log = get_logger(__name__)

T = TypeVar("T")
PathLike = str | os.PathLike[str]

DEFAULT_RETRIES = 5
DEFAULT_BACKOFF_S = 0.5
MAX_DELAY_S = 30.0
DEFAULT_REGION = "us-east-1"
_MIB = 1024 * 1024
MULTIPART_THRESHOLD = 8 * _MIB  # objects at least this large are uploaded/copied in parts
MULTIPART_CHUNKSIZE = 8 * _MIB
CONNECT_TIMEOUT_S = 10  # boto3's connect timeout and GDAL's GDAL_HTTP_CONNECTTIMEOUT
READ_TIMEOUT_S = 60  # boto3's read timeout and GDAL's GDAL_HTTP_LOW_SPEED_TIME (under 1 byte/s)
GDAL_HTTP_MAX_RETRY = "3"  # GDAL's own retries of HTTP 429/5xx and resets, inside each attempt
GDAL_HTTP_RETRY_DELAY = "0.5"
DISK_PROBE_BYTES = 16 * _MIB  # a write of this size failing with ENOSPC means the disk is full

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_TEMP_NAME_RE = re.compile(r"^\..+\.tmp-[0-9a-f]{32}")

# Transient S3 error codes (besides any HTTP 500/502/503/504).
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "RequestTimeTooSkewed",
    }
)
_TRANSIENT_STATUS = frozenset({500, 502, 503, 504})
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404", "NoSuchVersion"})
_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "403",
        "Forbidden",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "AllAccessDisabled",
    }
)
# Local OS errors worth retrying (network file systems, busy devices).
_TRANSIENT_ERRNOS = frozenset({errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.EIO, errno.ESTALE, errno.ETIMEDOUT})

# Local file-system states that retrying cannot mend (see _os_trouble).
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_REFUSED_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})

# Sleep used between attempts (a module attribute so tests can observe the delays).
_sleep: Callable[[float], None] = time.sleep
_jitter = random.Random()


# --------------------------------------------------------------------------------------------
# URIs
# --------------------------------------------------------------------------------------------
def is_s3(uri: PathLike) -> TypeGuard[str]:
    """True when ``uri`` is an ``s3://`` URI (scheme compared case-insensitively)."""
    return isinstance(uri, str) and uri[:5].lower() == "s3://"


def is_http(uri: PathLike) -> TypeGuard[str]:
    """True when ``uri`` is an ``http://`` or ``https://`` URL (scheme compared case-insensitively)."""
    return isinstance(uri, str) and uri[:8].lower().startswith(("http://", "https://"))


def is_remote(uri: PathLike) -> TypeGuard[str]:
    """True for what GDAL reads over the network: ``s3://`` URIs and http(s) URLs."""
    return is_s3(uri) or is_http(uri)


def _http_url(uri: str) -> str:
    """``uri`` if it is a well-formed http(s) URL naming a file (a host and a path)."""
    parts = urlsplit(uri)
    try:
        parts.port  # noqa: B018 (a port that is no number raises here)
    except ValueError:
        parts = parts._replace(netloc="")
    if not parts.hostname or parts.path.rstrip("/") == "" or any(c.isspace() or ord(c) < 32 for c in uri):
        raise BadInputError(
            f"malformed URL {uri!r}: expected http(s)://host[:port]/path/to/file (no blank, a numeric port)"
        )
    return uri


_SIGNERS: dict[str, Callable[[str], str]] = {}  # unsigned http(s) href -> its signer (sign_with)
_SECRETS: set[str] = set()  # query strings kept out of messages (add_secret)


def sign_with(uri: str, signer: Callable[[str], str]) -> None:
    """Request and open the http(s) URL ``uri`` as ``signer(uri)`` (e.g. with a SAS token
    appended), called at each request or open; ``uri`` itself stays what callers see, log and
    fingerprint."""
    _SIGNERS[uri] = signer


def add_secret(text: str) -> None:
    """Keep ``text`` (a token) out of the messages of GDAL failures."""
    _SECRETS.add(text)


def _signed(uri: str) -> str:
    signer = _SIGNERS.get(uri)
    return uri if signer is None else signer(uri)


def redact(text: str) -> str:
    """``text`` with every secret of :func:`add_secret` replaced by ``<token>``."""
    for secret in _SECRETS:
        text = text.replace(secret, "<token>")
    return text


def _base_name(uri: str) -> str:
    """The file name a remote URI ends with (an URL's query string left out)."""
    path = urlsplit(uri).path if is_http(uri) else uri
    return path.rstrip("/").rsplit("/", 1)[-1] or "file"


def _read_only(op: str, uri: str) -> BadInputError:
    return BadInputError(f"{op} {uri}: http(s) inputs are read-only; write outputs to a local path or an s3:// URI")


def _split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``; ``key`` may be empty (the bucket root)."""
    rest = uri[5:]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise BadInputError(f"malformed S3 URI {uri!r}: no bucket; expected s3://bucket/key")
    return bucket, key


def _s3_object(uri: str) -> tuple[str, str]:
    """``(bucket, key)`` of an S3 URI that must name an object (non-empty key, no trailing /)."""
    bucket, key = _split_s3(uri)
    if not key or key.endswith("/"):
        raise BadInputError(f"S3 URI {uri!r} names no object (empty key or a trailing '/'); expected s3://bucket/key")
    return bucket, key


def local_file(uri: PathLike) -> str:
    """The local path of a local URI (``file://`` stripped); other schemes are refused.

    Raises:
        BadInputError: another scheme, or an empty path.
    """
    path = os.fspath(uri)
    match = _SCHEME_RE.match(path)
    if match:
        if match.group(1).lower() != "file":
            raise BadInputError(
                f"unsupported URI scheme {match.group(1)!r} in {path!r}; allowed: local paths, "
                "file://PATH, s3://bucket/key and, where inputs are read, http(s)://host/path"
            )
        path = path[len(match.group(0)) :]
    if not path:
        raise BadInputError(f"empty path in URI {os.fspath(uri)!r}")
    return path


def _s3_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def _is_temp_name(name: str) -> bool:
    return bool(_TEMP_NAME_RE.match(name))


def _temp_sibling(path: str, suffix: str = "") -> str:
    """A hidden temporary path in the folder of ``path``: ``.<name>.tmp-<uuid><suffix>``."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex}{suffix}")


# --------------------------------------------------------------------------------------------
# S3 client and environment
# --------------------------------------------------------------------------------------------
def _env(name: str) -> str | None:
    """An environment variable, with an empty value read as unset."""
    value = os.environ.get(name)
    return value if value else None


def _endpoint_url() -> str | None:
    """The custom S3 endpoint (``AWS_ENDPOINT_URL_S3`` first, then ``AWS_ENDPOINT_URL``)."""
    return _env("AWS_ENDPOINT_URL_S3") or _env("AWS_ENDPOINT_URL")


def _region() -> str:
    return _env("AWS_REGION") or _env("AWS_DEFAULT_REGION") or DEFAULT_REGION


_client_lock = threading.Lock()
_clients: dict[tuple[Any, ...], Any] = {}


def reset_clients() -> None:
    """Drop the cached boto3 clients and GDAL settings (the next call builds them from the
    current environment)."""
    with _client_lock:
        _clients.clear()
        _gdal_envs.clear()


def _client_key() -> tuple[Any, ...]:
    # Kept in memory only (never logged): a changed credential or endpoint gets its own client.
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    return (os.getpid(), _endpoint_url(), _region(), *(_env(n) for n in names))


def _once(store: dict[tuple[Any, ...], Any], key: tuple[Any, ...], build: Callable[[], T]) -> T:
    """``store[key]``, built by ``build()`` the first time (thread-safe)."""
    value = store.get(key)
    if value is None:
        with _client_lock:
            value = store.get(key)
            if value is None:
                value = store[key] = build()
    return value


def _client() -> Any:
    """The process's S3 client for the current AWS environment (built lazily, thread-safe)."""
    return _once(_clients, _client_key(), _new_client)


def _new_client() -> Any:
    import boto3
    from botocore.config import Config

    endpoint = _endpoint_url()
    config = Config(
        region_name=_region(),
        retries={"total_max_attempts": 1, "mode": "standard"},  # _retry decides
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        max_pool_connections=32,
        s3={"addressing_style": "path" if endpoint else "auto"},
        ignore_configured_endpoint_urls=True,  # the endpoint is passed explicitly below
    )
    session = boto3.session.Session()  # a fresh session: the default one is not thread-safe
    client = session.client("s3", endpoint_url=endpoint, config=config)
    log.debug("S3 client created (endpoint=%s, region=%s)", endpoint or "AWS", _region())
    return client


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD,
        multipart_chunksize=MULTIPART_CHUNKSIZE,
        max_concurrency=4,
    )


# --------------------------------------------------------------------------------------------
# Retries and error mapping
# --------------------------------------------------------------------------------------------
def _retry_settings() -> tuple[int, float]:
    """``(attempts, base_delay_s)`` from ``SITSFLOW_STORAGE_RETRIES`` / ``_BACKOFF`` (read now)."""
    raw = os.environ.get("SITSFLOW_STORAGE_RETRIES", "").strip()
    try:
        attempts = int(raw) if raw else DEFAULT_RETRIES
    except ValueError:
        attempts = 0
    if attempts < 1:
        raise ConfigError(
            f"SITSFLOW_STORAGE_RETRIES={raw!r}: expected an integer >= 1 (total attempts of a storage operation)"
        )
    raw = os.environ.get("SITSFLOW_STORAGE_BACKOFF", "").strip()
    try:
        backoff = float(raw) if raw else DEFAULT_BACKOFF_S
    except ValueError:
        backoff = -1.0
    if not backoff >= 0.0 or backoff == float("inf"):
        raise ConfigError(
            f"SITSFLOW_STORAGE_BACKOFF={raw!r}: expected a finite number of seconds >= 0 "
            "(base delay of the exponential backoff)"
        )
    return attempts, backoff


def _client_error_info(exc: BaseException | None) -> tuple[str, int] | None:
    """``(code, http_status)`` of a botocore ClientError (possibly wrapped), else None."""
    from botocore.exceptions import ClientError

    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            return code, status
        exc = exc.__cause__ or exc.__context__  # boto3 wraps upload errors (S3UploadFailedError)
        seen += 1
    return None


def _is_transient(exc: BaseException) -> bool:
    from boto3.exceptions import RetriesExceededError
    from botocore.exceptions import (
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
        ResponseStreamingError,
    )

    transient_types = (
        EndpointConnectionError,
        ConnectionClosedError,
        ReadTimeoutError,
        ConnectTimeoutError,
        ResponseStreamingError,
        RetriesExceededError,
    )
    # boto3's transfers wrap the cause (S3UploadFailedError from a reset connection)
    if any(isinstance(e, transient_types) for e in _chain(exc)):
        return True
    info = _client_error_info(exc)
    if info is not None:
        code, status = info
        return status in _TRANSIENT_STATUS or code in _TRANSIENT_CODES
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code == 429 or exc.code >= 500
    if isinstance(exc, urllib.error.URLError):  # no answer: refused, reset, timed out, unresolved
        return not isinstance(exc.reason, ssl.SSLCertVerificationError)
    if isinstance(exc, http.client.InvalidURL):  # refused before any request: no transport trouble
        return False
    if isinstance(exc, http.client.HTTPException):  # a reply cut short or garbled
        return True
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    return False


def _missing_bucket(exc: BaseException | None, uri: str) -> str:
    """The bucket a NoSuchBucket error is about: from the response, else the first in ``uri``."""
    while exc is not None:
        response = getattr(exc, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("BucketName"):
            return str(response["Error"]["BucketName"])
        exc = exc.__cause__ or exc.__context__
    match = re.search(r"s3://([^/\s]+)", uri)
    return match.group(1) if match else uri


def _permanent_error(exc: BaseException, op: str, uri: str) -> BaseException | None:
    """The sitsflow error a permanent failure maps to, or None to let it through unchanged."""
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError

    if isinstance(exc, SitsflowError):
        return exc
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return BadInputError(
            f"{op} {uri}: no usable AWS credentials (set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, a profile or a role)"
        )
    info = _client_error_info(exc)
    if info is not None:
        code, status = info
        if code == "NoSuchBucket":
            bucket = _missing_bucket(exc, uri)
            return BadInputError(f"{op} {uri}: bucket {bucket!r} does not exist")
        if code in _NOT_FOUND_CODES or status == 404:
            return InputNotFoundError(f"{op} {uri}: no such object")
        if code in _DENIED_CODES or status == 403:
            return BadInputError(
                f"{op} {uri}: access denied ({code or status}); check the credentials and the bucket policy"
            )
        return BadInputError(f"{op} {uri}: S3 refused the request ({code or status}: {exc})")
    if isinstance(exc, urllib.error.HTTPError):
        if exc.code in (404, 410):
            return InputNotFoundError(f"{op} {uri}: no such file (HTTP {exc.code})")
        if exc.code in (401, 403):
            return BadInputError(
                f"{op} {uri}: access denied (HTTP {exc.code}); the URL needs credentials or a "
                "signature, or its signature expired"
            )
        return BadInputError(f"{op} {uri}: the server refused the request (HTTP {exc.code} {exc.reason})")
    if isinstance(exc, urllib.error.URLError):
        return BadInputError(f"{op} {uri}: {exc.reason}")  # a certificate that does not verify
    if isinstance(exc, FileNotFoundError):
        return InputNotFoundError(f"{op} {uri}: no such file or folder ({exc.filename or uri})")
    if isinstance(exc, (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)):
        return BadInputError(f"{op} {uri}: {exc.strerror or exc} ({exc.filename or uri})")
    return None


def _place(path: str) -> str:
    """What a message names for ``path``: the folder of a temporary file, else the path."""
    folder, name = os.path.split(path)
    return (folder or ".") if _is_temp_name(name) else path


def _os_trouble(exc: BaseException, op: str, uri: str) -> SitsflowError | None:
    """The error of a full (exit 75), read-only or forbidden (exit 2) file system, else None."""
    if not isinstance(exc, OSError) or exc.errno not in _FULL_ERRNOS | _REFUSED_ERRNOS:
        return None
    where = _place(os.fspath(exc.filename)) if exc.filename else uri
    what = f"{op} {uri}" if where != uri else op
    if exc.errno in _FULL_ERRNOS:
        return TransientError(f"no space left on {where} ({what}: {exc.strerror})")
    if exc.errno == errno.EROFS:
        return BadInputError(f"{what}: {where} is on a read-only file system; choose a writable path")
    return BadInputError(
        f"{what}: permission denied on {where} ({exc.strerror}); choose a path this "
        "user may write, or fix its permissions"
    )


def _disk_trouble(path: str, op: str, uri: str) -> SitsflowError | None:
    """Diagnose a failed local write whose library hid the errno (HDF5, GDAL).

    Probes the folder of ``path``: creating a file there (EROFS, EACCES, ENOSPC) and reserving
    :data:`DISK_PROBE_BYTES` in it (ENOSPC, EDQUOT). Returns the error the file system gives,
    mapped by :func:`_os_trouble`, or None when the folder takes the probe (the failure was
    something else).
    """
    folder = path if os.path.isdir(path) else (os.path.dirname(path) or ".")
    probe = _temp_sibling(os.path.join(folder, "sitsflow-probe"))
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        exc.filename = folder
        return _os_trouble(exc, op, uri)
    try:
        os.posix_fallocate(fd, 0, DISK_PROBE_BYTES)
    except OSError as exc:
        exc.filename = folder
        return _os_trouble(exc, op, uri)
    finally:
        os.close(fd)
        _remove_quietly(probe)
    return None


def _retry(op: str, uri: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` (one storage operation on ``uri``), retrying transient failures.

    Attempts and base delay come from ``SITSFLOW_STORAGE_RETRIES`` and
    ``SITSFLOW_STORAGE_BACKOFF``; attempt ``n`` (1-based) that fails transiently waits
    ``min(30, base * 2**(n-1)) * U(0.5, 1)`` seconds. Persistent trouble raises
    :class:`TransientError`; permanent failures are mapped to exit-2 errors at once.
    """

    def judge(exc: Exception, last: bool) -> str:
        if not _is_transient(exc):
            mapped = _permanent_error(exc, op, uri)
            if mapped is None:
                raise exc
            raise mapped from exc
        return f"{type(exc).__name__}: {exc}"

    return _attempts(op, uri, fn, judge)


def retry_call(op: str, uri: str, fn: Callable[[], T], transient: Callable[[Exception], bool]) -> T:
    """Run ``fn``, one operation on ``uri`` outside the two backends (e.g. an HTTP request to a
    STAC API), under the storage contract: the failures ``transient`` accepts are retried with
    the backoff of :func:`_retry`, then :class:`TransientError` (exit 75); any other exception
    passes through (the caller maps it)."""

    def judge(exc: Exception, last: bool) -> str:
        if not transient(exc):
            raise exc
        return f"{type(exc).__name__}: {exc}"

    return _attempts(op, uri, fn, judge)


def _attempts(
    op: str,
    uri: str,
    fn: Callable[[], T],
    judge: Callable[[Exception, bool], str],
    before_retry: Callable[[], None] | None = None,
) -> T:
    """The retry loop of :func:`_retry` and :func:`raster_call`: ``judge(exc, last_attempt)``
    raises the error of a permanent failure and returns the description of a transient one."""
    attempts, base = _retry_settings()
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised otherwise
            if isinstance(exc, SitsflowError):
                raise
            trouble = _os_trouble(exc, op, uri)
            if trouble is not None:
                raise trouble from exc
            what = judge(exc, attempt >= attempts)
            if attempt >= attempts:
                raise TransientError(f"{op} {uri}: failed after {attempts} attempt(s), last error {what}") from exc
            delay = min(MAX_DELAY_S, base * 2 ** (attempt - 1)) * _jitter.uniform(0.5, 1.0)
            log.warning("%s %s failed (%s); attempt %d/%d, retrying in %.2f s", op, uri, what, attempt, attempts, delay)
            if before_retry is not None:
                before_retry()
            _sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------------------------
# Local helpers (each called inside _retry)
# --------------------------------------------------------------------------------------------
def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _publish_local(tmp: str, path: str) -> None:
    """fsync ``tmp`` and rename it over ``path`` (same folder), then fsync the folder."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _atomic_local_write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        _publish_local(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def _atomic_local_copy(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    tmp = _temp_sibling(dst)
    try:
        shutil.copyfile(src, tmp)
        _publish_local(tmp, dst)
    except BaseException:
        _remove_quietly(tmp)
        raise


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
class Backend(Protocol):
    """What one kind of storage does for the public functions below, which choose the backend
    from the URI (:func:`backend`) and run every call under :func:`_retry`: each method is one
    attempt of one operation, and raises what its system raises."""

    def read(self, uri: str) -> bytes: ...
    def write(self, uri: str, data: bytes) -> None: ...  # atomic: never a half-written file/object
    def exists(self, uri: str) -> bool: ...
    def listing(self, prefix: str) -> list[str]: ...  # sorted full URIs, temporary files left out
    def delete(self, uri: str) -> None: ...  # what does not exist is no error
    def stat(self, uri: str) -> dict[str, Any]: ...
    def copy_within(self, src: str, dst: str) -> None: ...
    def download(self, uri: str, path: str) -> None: ...  # to the local ``path``, atomically
    def upload(self, path: str, uri: str) -> None: ...  # from the local file ``path``


class LocalBackend:
    """Local paths (``file://`` stripped): atomic writes through a hidden sibling, fsynced."""

    def read(self, uri: str) -> bytes:
        with open(local_file(uri), "rb") as fh:
            return fh.read()

    def write(self, uri: str, data: bytes) -> None:
        _atomic_local_write(local_file(uri), data)

    def exists(self, uri: str) -> bool:
        return os.path.isfile(local_file(uri))

    def listing(self, prefix: str) -> list[str]:
        root = local_file(prefix)
        out: list[str] = []
        if not os.path.isdir(root):
            return out
        for folder, _dirs, files in os.walk(root):
            out.extend(os.path.join(folder, name) for name in files if not _is_temp_name(name))
        return sorted(out)

    def delete(self, uri: str) -> None:
        _remove_quietly(local_file(uri))

    def stat(self, uri: str) -> dict[str, Any]:
        path = local_file(uri)
        st = os.stat(path)
        if not os.path.isfile(path):
            raise BadInputError(f"stat {uri}: not a file")
        return {"size": int(st.st_size), "version": str(st.st_mtime_ns)}

    def copy_within(self, src: str, dst: str) -> None:
        _atomic_local_copy(self._source(src, dst), local_file(dst))

    def download(self, uri: str, path: str) -> None:
        _atomic_local_copy(self._source(uri, path), path)

    def upload(self, path: str, uri: str) -> None:
        _atomic_local_copy(path, local_file(uri))

    @staticmethod
    def _source(src: str, dst: str) -> str:
        path = local_file(src)
        if not os.path.isfile(path):
            raise InputNotFoundError(f"copy {src} -> {dst}: source {src!r} is not a file")
        return path


class S3Backend:
    """``s3://bucket/key`` through the process's boto3 client (puts are atomic by nature)."""

    def read(self, uri: str) -> bytes:
        bucket, key = _s3_object(uri)
        body = _client().get_object(Bucket=bucket, Key=key)["Body"]
        try:
            return body.read()
        finally:
            body.close()

    def write(self, uri: str, data: bytes) -> None:
        bucket, key = _s3_object(uri)
        _client().put_object(Bucket=bucket, Key=key, Body=data)

    def exists(self, uri: str) -> bool:
        from botocore.exceptions import ClientError

        bucket, key = _s3_object(uri)
        try:
            _client().head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            info = _client_error_info(exc)
            if info and (info[1] == 404 or info[0] in _NOT_FOUND_CODES):
                return False
            raise
        return True

    def listing(self, prefix: str) -> list[str]:
        bucket, key = _split_s3(prefix)
        key_prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        out: list[str] = []
        for page in _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix):
            for obj in page.get("Contents", []):
                name = obj["Key"].rsplit("/", 1)[-1]
                if name and not _is_temp_name(name):
                    out.append(_s3_uri(bucket, obj["Key"]))
        return sorted(out)

    def delete(self, uri: str) -> None:
        bucket, key = _s3_object(uri)
        _client().delete_object(Bucket=bucket, Key=key)

    def stat(self, uri: str) -> dict[str, Any]:
        bucket, key = _s3_object(uri)
        head = _client().head_object(Bucket=bucket, Key=key)
        return {"size": int(head["ContentLength"]), "version": str(head["ETag"]).strip('"')}

    def copy_within(self, src: str, dst: str) -> None:
        sb, sk = _s3_object(src)
        db, dk = _s3_object(dst)
        _client().copy({"Bucket": sb, "Key": sk}, db, dk, Config=_transfer_config())

    def download(self, uri: str, path: str) -> None:
        bucket, key = _s3_object(uri)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = _temp_sibling(path)
        try:
            _client().download_file(bucket, key, tmp, Config=_transfer_config())
            _publish_local(tmp, path)
        except BaseException:
            _remove_quietly(tmp)
            raise

    def upload(self, path: str, uri: str) -> None:
        bucket, key = _s3_object(uri)
        _client().upload_file(path, bucket, key, Config=_transfer_config())


# --- http(s): read-only ----------------------------------------------------------------------
HTTP_CHUNK = 1 * _MIB  # streamed downloads are written in pieces of this size
_HTTP_HEAD_REFUSED = frozenset({403, 405, 501})  # HEAD answers of servers that only take GET


class _TimedHTTPConnection(http.client.HTTPConnection):
    """Connects within :data:`CONNECT_TIMEOUT_S`, then waits up to :data:`READ_TIMEOUT_S` for
    each read (boto3's two timeouts; urllib has one)."""

    def connect(self) -> None:
        super().connect()
        self.sock.settimeout(READ_TIMEOUT_S)


class _TimedHTTPSConnection(http.client.HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        self.sock.settimeout(READ_TIMEOUT_S)


class _TimedHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_TimedHTTPConnection, req)


class _TimedHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_TimedHTTPSConnection, req, context=self._context)  # type: ignore[attr-defined]


_http_opener = urllib.request.build_opener(_TimedHTTPHandler, _TimedHTTPSHandler)


def _http_open(uri: str, method: str = "GET", first_byte_only: bool = False) -> http.client.HTTPResponse:
    """One request to ``uri`` (redirects followed, proxies from the environment); HTTP errors
    raise :class:`urllib.error.HTTPError`, which :func:`_retry` classifies."""
    headers = {"User-Agent": "sitsflow", "Accept-Encoding": "identity"}
    if first_byte_only:
        headers["Range"] = "bytes=0-0"
    request = urllib.request.Request(_http_url(_signed(uri)), method=method, headers=headers)
    return _http_opener.open(request, timeout=CONNECT_TIMEOUT_S)


def _http_body(response: http.client.HTTPResponse, sink: Callable[[bytes], object]) -> int:
    """Stream the body of ``response`` to ``sink``; a body shorter than its Content-Length (a
    connection closed early, which http.client reads as the end) raises IncompleteRead."""
    expected = response.headers.get("Content-Length")
    got = 0
    while chunk := response.read(HTTP_CHUNK):
        sink(chunk)
        got += len(chunk)
    if expected is not None and expected.isdigit() and got < int(expected):
        raise http.client.IncompleteRead(b"", int(expected) - got)
    return got


def _http_meta(uri: str) -> tuple[int, str]:
    """``(size, version)`` of ``uri``: by HEAD, or by a one-byte ranged GET when the server
    refuses HEAD (416, no first byte: an empty file); size -1 when the server gives none. The
    version is the ETag, else Last-Modified, else empty."""
    try:
        response = _http_open(uri, "HEAD")
        ranged = False
    except urllib.error.HTTPError as exc:
        if exc.code not in _HTTP_HEAD_REFUSED:
            raise
        exc.close()
        try:
            response = _http_open(uri, first_byte_only=True)
        except urllib.error.HTTPError as empty:
            if empty.code != 416:
                raise
            empty.close()  # no first byte: the file is there and empty
            return 0, (empty.headers.get("ETag") or "").removeprefix("W/").strip('"')
        ranged = True
    with response:  # closed unread: a server ignoring Range would send the whole file
        headers = response.headers
        total = (headers.get("Content-Range") or "").rpartition("/")[2] if ranged and response.status == 206 else ""
        size = total if total.isdigit() else headers.get("Content-Length", "")
        version = (headers.get("ETag") or "").removeprefix("W/").strip('"') or headers.get("Last-Modified") or ""
        return (int(size) if size.isdigit() else -1), version  # -1: a server sending chunks gives no size


class HttpBackend:
    """``http(s)://`` URLs, read-only: GET (whole or streamed), HEAD; every write refused."""

    def read(self, uri: str) -> bytes:
        parts: list[bytes] = []
        with _http_open(uri) as response:
            _http_body(response, parts.append)
        return b"".join(parts)

    def write(self, uri: str, data: bytes) -> None:
        raise _read_only("write", uri)

    def exists(self, uri: str) -> bool:
        try:
            _http_meta(uri)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code in (404, 410):
                return False
            raise
        return True

    def listing(self, prefix: str) -> list[str]:
        raise BadInputError(f"list {prefix}: an http(s) URL cannot be listed (http(s) inputs are read-only files)")

    def delete(self, uri: str) -> None:
        raise _read_only("delete", uri)

    def stat(self, uri: str) -> dict[str, Any]:
        size, version = _http_meta(uri)
        return {"size": size, "version": version}

    def copy_within(self, src: str, dst: str) -> None:
        raise _read_only("copy", dst)

    def download(self, uri: str, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = _temp_sibling(path)
        try:
            with _http_open(uri) as response, open(tmp, "wb") as fh:
                _http_body(response, fh.write)
            _publish_local(tmp, path)
        except BaseException:
            _remove_quietly(tmp)
            raise

    def upload(self, path: str, uri: str) -> None:
        raise _read_only("upload", uri)


_LOCAL = LocalBackend()
_S3 = S3Backend()
_HTTP = HttpBackend()


def backend(uri: PathLike) -> Backend:
    """The backend of ``uri``: :class:`S3Backend` for ``s3://``, :class:`HttpBackend` for
    ``http(s)://``, else :class:`LocalBackend`."""
    if is_s3(uri):
        return _S3
    return _HTTP if is_http(uri) else _LOCAL


def _checked(uri: PathLike) -> str:
    """``uri`` as a string, its form checked before any attempt (a bad URI is no transient trouble)."""
    text = os.fspath(uri)
    if is_s3(text):
        _split_s3(text)
    elif is_http(text):
        _http_url(text)
    else:
        local_file(text)
    return text


def read_bytes(uri: PathLike) -> bytes:
    """The whole content of ``uri``; :class:`InputNotFoundError` (exit 2) when missing."""
    u = _checked(uri)
    return _retry("read", u, lambda: backend(u).read(u))


def read_text(uri: PathLike) -> str:
    """The content of ``uri`` decoded as UTF-8 (BadInputError if it is not UTF-8)."""
    data = read_bytes(uri)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInputError(f"read {uri}: not UTF-8 text ({exc})") from exc


def write_bytes(uri: PathLike, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically (never a half-written object); parents created."""
    u, body = _checked(uri), bytes(data)
    _retry("write", u, lambda: backend(u).write(u, body))


def write_text(uri: PathLike, text: str) -> None:
    """Write ``text`` as UTF-8 to ``uri`` atomically."""
    write_bytes(uri, text.encode("utf-8"))


def exists(uri: PathLike) -> bool:
    """True when ``uri`` names an existing file/object (a local folder is not a file)."""
    u = _checked(uri)
    return _retry("exists", u, lambda: backend(u).exists(u))


def list_files(prefix: PathLike) -> list[str]:
    """Every file under the folder ``prefix``, recursively, as full URIs, sorted.

    ``prefix`` is a folder: ``s3://b/out`` lists ``s3://b/out/...`` (not ``s3://b/out2/...``);
    ``s3://b`` lists the whole bucket. Local results are built on the given prefix (a relative
    prefix gives relative paths). A missing folder lists as ``[]``; temporary files of
    in-flight atomic writes are never returned.
    """
    p = _checked(prefix)
    return _retry("list", p, lambda: backend(p).listing(p))


def delete(uri: PathLike) -> None:
    """Delete the file/object ``uri``; deleting what does not exist is not an error."""
    u = _checked(uri)
    _retry("delete", u, lambda: backend(u).delete(u))


# --- conditional requests on object storage (the run lease) ------------------------------------
def _conditional(op: str, uri: str, request: Callable[[], T], refused: T) -> T:
    """Run the S3 ``request`` under :func:`_retry`; ``refused`` when S3 answers 404 (no object, or
    If-Match on no object) or 412 (the condition failed)."""
    from botocore.exceptions import ClientError

    def call() -> T:
        try:
            return request()
        except ClientError as exc:
            if (_client_error_info(exc) or ("", 0))[1] in (404, 412):
                return refused
            raise

    return _retry(op, uri, call)


def put_if(
    uri: str,
    body: bytes,
    *,
    if_match: str | None = None,
    if_none_match: bool = False,
    content_type: str = "application/octet-stream",
    op: str = "put",
) -> str | None:
    """Write the S3 object ``uri`` only if its ETag is ``if_match`` / only if it does not exist
    (``if_none_match``). Returns the new ETag, or None when the condition failed (retried as
    every storage operation, named ``op``)."""
    bucket, key = _s3_object(uri)
    condition = {"IfNoneMatch": "*"} if if_none_match else {}
    if if_match is not None:
        condition["IfMatch"] = if_match
    return _conditional(
        op,
        uri,
        lambda: str(
            _client().put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type, **condition)["ETag"]
        ),
        None,
    )


def get_with_etag(uri: str, *, op: str = "get") -> tuple[bytes, str] | None:
    """``(body, ETag)`` of the S3 object ``uri``, or None when it does not exist (retried)."""
    bucket, key = _s3_object(uri)

    def get() -> tuple[bytes, str]:
        response = _client().get_object(Bucket=bucket, Key=key)
        return response["Body"].read(), str(response["ETag"])

    return _conditional(op, uri, get, None)


def delete_if(uri: str, etag: str, *, op: str = "delete") -> bool:
    """Delete the S3 object ``uri`` only if its ETag is ``etag``; False when another writer changed
    or removed it (retried)."""
    bucket, key = _s3_object(uri)

    def delete() -> bool:
        _client().delete_object(Bucket=bucket, Key=key, IfMatch=etag)
        return True

    return _conditional(op, uri, delete, False)


def stat(uri: PathLike) -> dict[str, Any]:
    """``{"size": bytes, "version": str}``: the local mtime in ns, or the S3 ETag (no quotes)."""
    u = _checked(uri)
    return _retry("stat", u, lambda: backend(u).stat(u))


def copy(src_uri: PathLike, dst_uri: PathLike) -> None:
    """Copy one file/object, any direction local/S3 or from http(s), atomically at the destination."""
    src, dst = _checked(src_uri), _checked(dst_uri)
    source, target = backend(src), backend(dst)
    if is_http(dst):
        raise _read_only("copy", f"{src} -> {dst}")
    if source is target:
        run = lambda: source.copy_within(src, dst)  # noqa: E731
    elif is_http(src) and is_s3(dst):
        with scratch_dir("sitsflow-copy-") as folder:  # through a local file, each leg retried
            path = os.path.join(folder, _base_name(src))
            _retry("copy", f"{src} -> {path}", lambda: source.download(src, path))
            _retry("copy", f"{path} -> {dst}", lambda: target.upload(path, dst))
        return
    elif is_s3(dst):
        path = LocalBackend._source(src, dst)  # a missing source is bad input, not transient
        run = lambda: target.upload(path, dst)  # noqa: E731
    else:
        run = lambda: source.download(src, local_file(dst))  # noqa: E731
    _retry("copy", f"{src} -> {dst}", run)


def upload_tree(local_dir: PathLike, uri_prefix: PathLike) -> list[str]:
    """Copy every file under the local folder ``local_dir`` to ``uri_prefix/<relative path>``.

    Works towards S3 or another local folder; returns the destination URIs, sorted.
    """
    src = os.fspath(local_dir)
    if is_remote(src):
        raise BadInputError(f"upload_tree: the source {src!r} must be a local folder")
    root = local_file(src)
    if not os.path.isdir(root):
        raise InputNotFoundError(f"upload_tree: local folder {src!r} does not exist")
    base = os.fspath(uri_prefix).rstrip("/")
    out: list[str] = []
    for path in list_files(root):
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        dst = f"{base}/{rel}"
        copy(path, dst)
        out.append(dst)
    return sorted(out)


@contextlib.contextmanager
def local_path(uri: PathLike) -> Iterator[str]:
    """A local file holding ``uri``'s content, for readers that need a path.

    Local: the path itself (InputNotFoundError if missing). S3 or http(s): the object downloaded
    to a temporary file (same base name), removed when the context exits.
    """
    if not is_remote(uri):
        path = local_file(uri)
        if not _retry("open", str(uri), lambda: os.path.exists(path)):
            raise InputNotFoundError(f"open {uri}: no such file")
        yield path
        return
    u = _checked(uri)
    if is_s3(u):
        _s3_object(u)
    folder = tempfile.mkdtemp(prefix="sitsflow-in-")
    try:
        path = os.path.join(folder, _base_name(u))
        _retry("download", u, lambda: backend(u).download(u, path))
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _diagnosed(folders: list[str], op: str, uri: str) -> Iterator[None]:
    """Report a failure of the with-block as a full, read-only or forbidden disk when it is one.

    Libraries that write files (HDF5 under netCDF4, GDAL) often hide the errno ("NetCDF: HDF
    error", "TIFFAppendToStrip: Write error"): the folders written to are probed then.
    """
    try:
        yield
    except Exception as exc:
        if isinstance(exc, SitsflowError):
            raise
        trouble = _os_trouble(exc, op, uri)
        for folder in folders:
            if trouble is not None:
                break
            trouble = _disk_trouble(folder, op, uri)
        if trouble is None:
            raise
        raise trouble from exc


@contextlib.contextmanager
def scratch_dir(prefix: str = "sitsflow-") -> Iterator[str]:
    """A private local temporary folder, removed on exit. A failure of the with-block caused by a
    full, read-only or forbidden disk is reported as such (exit 75 or 2), whatever wrote there."""
    root = tempfile.gettempdir()
    folder = _retry("mkdir", root, lambda: tempfile.mkdtemp(prefix=prefix))
    try:
        with _diagnosed([folder], "write", folder):
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def output_path(uri: PathLike, suffix: str = "") -> Iterator[str]:
    """A local temporary path to write; published atomically to ``uri`` on a clean exit.

    The yielded path does not exist yet and ends with ``suffix`` (give the extension a writer
    needs, e.g. ``".tif"``). Local: a hidden temp file in the destination folder, fsynced and
    renamed over ``uri``. S3: a file in a private temp folder, uploaded (multipart when large)
    and then removed. If the with-block raises, nothing is published and the temp file is
    removed; a writer's failure caused by a full, read-only or forbidden disk is reported as
    such. A clean exit without the file having been written is an error.
    """
    with output_paths() as outputs:
        yield outputs.path(uri, suffix)


class OutputSet:
    """Temporary paths of files published together by :func:`output_paths`."""

    def __init__(self, scratch: str) -> None:
        self._scratch = scratch
        self.pending: list[tuple[str, str]] = []  # (uri, local temporary path)

    def path(self, uri: PathLike, suffix: str = "") -> str:
        """A local path to write the content of ``uri`` to (it does not exist yet)."""
        uri = os.fspath(uri)
        if is_http(uri):
            raise _read_only("write", uri)
        if is_s3(uri):
            _s3_object(uri)
            tmp = os.path.join(self._scratch, uuid.uuid4().hex, uri.rsplit("/", 1)[-1] + suffix)
            os.makedirs(os.path.dirname(tmp))
        else:
            dst = local_file(uri)
            _retry("mkdir", uri, lambda: os.makedirs(os.path.dirname(dst) or ".", exist_ok=True))
            tmp = _temp_sibling(dst, suffix)
        self.pending.append((uri, tmp))
        return tmp

    def folders(self) -> list[str]:
        return sorted({os.path.dirname(tmp) or "." for _, tmp in self.pending})

    def publish(self) -> list[str]:
        for uri, tmp in self.pending:
            if not os.path.isfile(tmp):
                raise SitsflowError(f"output_path {uri}: nothing was written to {tmp}")
        for uri, tmp in self.pending:
            # the lambdas run at once (inside _retry), within this iteration
            if is_s3(uri):
                _retry("upload", uri, lambda: _S3.upload(tmp, uri))  # noqa: B023
            else:
                _retry("write", uri, lambda: _publish_local(tmp, local_file(uri)))  # noqa: B023
        return [uri for uri, _ in self.pending]

    def discard(self) -> None:
        for _, tmp in self.pending:
            _remove_quietly(tmp)


@contextlib.contextmanager
def output_paths() -> Iterator[OutputSet]:
    """Several outputs published as a set: ``outputs.path(uri, suffix)`` gives each a temporary
    local path; only when the with-block exits cleanly are they published, one after the other
    in the order asked, with nothing else in between (a task writes its manifest after them).

    If the block raises, nothing is published and every temporary file is removed; a writer's
    failure caused by a full, read-only or forbidden disk is reported as such (75 or 2).
    """
    scratch = tempfile.mkdtemp(prefix="sitsflow-out-")
    outputs = OutputSet(scratch)
    try:
        with _diagnosed_set(outputs):
            yield outputs
        outputs.publish()
    finally:
        outputs.discard()
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def _diagnosed_set(outputs: OutputSet) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        uri = ", ".join(u for u, _ in outputs.pending) or "outputs"
        with _diagnosed(outputs.folders(), "write", uri):
            raise exc


_COPIES = threading.local()  # {uri: local copy} that rasterio_path answers instead (see _on_local_copies)


def rasterio_path(uri: PathLike) -> str:
    """The path GDAL opens: ``/vsis3/bucket/key`` for S3, ``/vsicurl/<url>`` for http(s) (signed
    when :func:`sign_with` registered the URL), the local path otherwise."""
    copy_ = getattr(_COPIES, "paths", {}).get(os.fspath(uri))
    if copy_ is not None:
        return copy_
    if is_http(uri):
        return f"/vsicurl/{_http_url(_signed(uri))}"
    if is_s3(uri):
        bucket, key = _s3_object(uri)
        return f"/vsis3/{bucket}/{key}"
    return local_file(uri)


def _gdal_s3_options() -> dict[str, str]:
    """GDAL config options for a custom S3 endpoint (none for AWS itself)."""
    options = {}
    endpoint = _endpoint_url()
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        if not parts.netloc:
            raise ConfigError(f"S3 endpoint {endpoint!r}: expected a URL like http://host:port")
        options["AWS_S3_ENDPOINT"] = parts.netloc + parts.path.rstrip("/")
        options["AWS_HTTPS"] = "NO" if parts.scheme.lower() == "http" else "YES"
        options["AWS_VIRTUAL_HOSTING"] = "FALSE"
    return options


def _aws_configured() -> bool:
    names = (
        "AWS_ENDPOINT_URL_S3",
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_NO_SIGN_REQUEST",
    )
    return any(_env(n) for n in names)


#: the default of ``SITSFLOW_GDAL_THREADS`` (GDAL's spelling): every CPU the process may use
ALL_CPUS = "ALL_CPUS"
_GDAL_KNOBS = ("SITSFLOW_GDAL_THREADS", "GDAL_HTTP_MAX_RETRY", "GDAL_HTTP_RETRY_DELAY")
_gdal_envs: dict[tuple[Any, ...], tuple[dict[str, str], Any]] = {}


def decode_threads() -> int:
    """Threads that decode the compressed blocks of one read: ``SITSFLOW_GDAL_THREADS``, by
    default (``ALL_CPUS``) every CPU this process may use: its affinity, bounded by the pod's CPU
    quota (:func:`sitsflow.process.usable_cpus`), for the direct reader's threads; GDAL's own
    count for GDAL's, which gets the setting as ``GDAL_NUM_THREADS``."""
    value = _env("SITSFLOW_GDAL_THREADS") or ALL_CPUS
    if value.upper() == ALL_CPUS:
        return usable_cpus()
    try:
        return max(1, int(value))
    except ValueError:
        raise ConfigError(f"SITSFLOW_GDAL_THREADS={value!r}: expected a number of threads or ALL_CPUS") from None


#: share of the usable memory GDAL's block cache may be raised to (:func:`gdal_cache_at_least`)
GDAL_CACHE_SHARE = 0.25
_gdal_cache_lock = threading.Lock()


def _new_cache_lock() -> None:
    global _gdal_cache_lock
    _gdal_cache_lock = threading.Lock()  # a forked child has none of its parent's threads


os.register_at_fork(after_in_child=_new_cache_lock)


def gdal_cache_allowed() -> int:
    """The largest block cache :func:`gdal_cache_at_least` may give GDAL: its current size, or
    :data:`GDAL_CACHE_SHARE` of the usable memory when larger (``GDAL_CACHEMAX`` set in the
    environment: that, as GDAL read it)."""
    import rasterio.env

    # rasterio reads and sets GDAL_CACHEMAX in bytes, through GDALGetCacheMax64/GDALSetCacheMax64
    current = int(rasterio.env.get_gdal_config("GDAL_CACHEMAX") or 0)
    if _env("GDAL_CACHEMAX") is not None:
        return current
    return max(current, int(GDAL_CACHE_SHARE * usable_memory()))


def gdal_cache_at_least(nbytes: int) -> int:
    """Raise GDAL's block cache to hold ``nbytes`` (never lowered, at most
    :func:`gdal_cache_allowed`); return its size now.

    Reads of single-band files through GDAL decode each block into this cache, where the later
    parts of a chunk find it: when a part's blocks of every file do not fit, every part fetches and
    decodes them again (docs/benchmarks.md, "Single-band files"). GDAL's default is 5 % of the
    memory; it is raised up to :data:`GDAL_CACHE_SHARE` of the usable memory (a pod's limit
    included). A ``GDAL_CACHEMAX`` set in the environment is the user's: it is kept as GDAL read it.
    """
    import rasterio.env

    with _gdal_cache_lock:
        current = int(rasterio.env.get_gdal_config("GDAL_CACHEMAX") or 0)
        wanted = min(int(nbytes), gdal_cache_allowed())
        if wanted > current:
            rasterio.env.set_gdal_config("GDAL_CACHEMAX", wanted)
            log.info("GDAL block cache raised to %d MiB (%d MiB needed)", wanted >> 20, int(nbytes) >> 20)
            current = wanted
        return current


def gdal_options() -> dict[str, str]:
    """The GDAL configuration of this process (see :func:`rasterio_env`)."""
    return dict(_gdal_settings()[0])


def _gdal_settings() -> tuple[dict[str, str], Any]:
    """``(options, AWSSession or None)``, built once per process and AWS environment."""
    return _once(_gdal_envs, (*_client_key(), *(_env(n) for n in _GDAL_KNOBS)), _new_gdal_settings)


def _new_gdal_settings() -> tuple[dict[str, str], Any]:
    options = {
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
        "GDAL_NUM_THREADS": _env("SITSFLOW_GDAL_THREADS") or ALL_CPUS,
        "GDAL_HTTP_MAX_RETRY": _env("GDAL_HTTP_MAX_RETRY") or GDAL_HTTP_MAX_RETRY,
        "GDAL_HTTP_RETRY_DELAY": _env("GDAL_HTTP_RETRY_DELAY") or GDAL_HTTP_RETRY_DELAY,
        "GDAL_HTTP_CONNECTTIMEOUT": str(CONNECT_TIMEOUT_S),
        "GDAL_HTTP_LOW_SPEED_TIME": str(READ_TIMEOUT_S),
        "GDAL_HTTP_LOW_SPEED_LIMIT": "1",
    }
    session = None
    if _aws_configured():
        from rasterio.session import AWSSession

        options |= _gdal_s3_options()
        session = AWSSession(
            aws_access_key_id=_env("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=_env("AWS_SECRET_ACCESS_KEY"),
            aws_session_token=_env("AWS_SESSION_TOKEN"),
            region_name=_region(),
            profile_name=None if _env("AWS_ACCESS_KEY_ID") else _env("AWS_PROFILE"),
            endpoint_url=options.get("AWS_S3_ENDPOINT"),
        )
    log.debug("GDAL settings built: %s", options)
    return options, session


def rasterio_env() -> Any:
    """A ``rasterio.Env`` with this process's GDAL settings, built once (per AWS environment).

    Always: ``GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR``; ``GDAL_NUM_THREADS``
    (``SITSFLOW_GDAL_THREADS``, default ``ALL_CPUS``: compressed blocks of one read are decoded in
    parallel); GDAL's own HTTP retries of 429/5xx replies and connection resets
    (``GDAL_HTTP_MAX_RETRY``, default 3, ``GDAL_HTTP_RETRY_DELAY``, default 0.5 s, taken from
    the environment when set there), and the timeouts boto3 uses (connect
    :data:`CONNECT_TIMEOUT_S`, a transfer slower than 1 byte/s for :data:`READ_TIMEOUT_S`).
    With a custom endpoint: ``AWS_S3_ENDPOINT=host:port``, ``AWS_HTTPS`` from its scheme,
    ``AWS_VIRTUAL_HOSTING=FALSE``; with AWS configured, the credentials and region of the
    standard AWS chain (passed through a rasterio ``AWSSession``, as rasterio requires).
    GDAL's own failures are classified by :func:`raster_call`.
    """
    import rasterio

    options, session = _gdal_settings()
    return rasterio.Env(session=session, **options) if session is not None else rasterio.Env(**options)


# --------------------------------------------------------------------------------------------
# GDAL failures: transient or bad input
# --------------------------------------------------------------------------------------------
_HTTP_CODE_RE = re.compile(r"HTTP (?:response|error) code:?\s*(\d{1,3})", re.I)
_GDAL_TRANSPORT_RE = re.compile(
    r"curl|timed? ?out|connection|recv failure|send failure|transfer closed|could ?n[o']t (?:connect|resolve)"
    r"|slow ?down|reduce your request rate|service unavailable|internal ?error|throttl",
    re.I,
)
_GDAL_MISSING_RE = re.compile(r"no such file|does not exist|nosuchkey|not found", re.I)
_GDAL_DENIED_RE = re.compile(
    r"access ?denied|forbidden|invalidaccesskeyid|signaturedoesnotmatch|expiredtoken|permission denied", re.I
)


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(out) < 12 and cur not in out:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _gdal_text(exc: BaseException) -> str:
    """GDAL's messages of a failure, most general first (rasterio chains them as causes)."""
    seen: list[str] = []
    for e in _chain(exc):
        text = str(e).strip()
        if text and "See previous exception" not in text and text not in seen:
            seen.append(text)
    return redact("; ".join(seen))[:600] or type(exc).__name__


def _gdal_kind(exc: BaseException) -> str | None:
    """``transient``, ``missing``, ``denied`` or ``damaged`` for a GDAL failure; None otherwise."""
    from rasterio._err import CPLE_AWSError, CPLE_BaseError, CPLE_HttpResponseError
    from rasterio.errors import RasterioError

    chain = _chain(exc)
    if not any(isinstance(e, (RasterioError, CPLE_BaseError)) for e in chain):
        return None
    text = "\n".join(str(e) for e in chain)
    codes = [int(c) for c in _HTTP_CODE_RE.findall(text)]
    if 404 in codes:
        return "missing"
    if 403 in codes or 401 in codes:
        return "denied"
    if any(c == 0 or c == 429 or c >= 500 for c in codes):
        return "transient"
    if _GDAL_DENIED_RE.search(text):
        return "denied"
    if any(isinstance(e, (CPLE_AWSError, CPLE_HttpResponseError)) for e in chain) or _GDAL_TRANSPORT_RE.search(text):
        return "transient"
    if _GDAL_MISSING_RE.search(text):
        return "missing"
    return "damaged"


_gdal_lib: Any = None


def _clear_gdal_cache(uris: list[str]) -> None:
    """Forget what GDAL's network layer cached of ``uris``: after a connection reset it may hold
    a truncated block or file size, which every later read would reuse."""
    global _gdal_lib
    import ctypes

    import rasterio._env

    if _gdal_lib is None:
        lib = ctypes.CDLL(rasterio._env.__file__)  # resolves GDAL's symbols through its dependency
        lib.VSICurlPartialClearCache.argtypes = [ctypes.c_char_p]
        lib.VSICurlPartialClearCache.restype = None
        _gdal_lib = lib
    for uri in uris:
        if is_remote(uri):
            _gdal_lib.VSICurlPartialClearCache(rasterio_path(uri).encode())


def _find_damage(path: str) -> tuple[int | None, str] | None:
    """Decode every block of a local raster; ``(band or None, message)`` of the first failure."""
    import rasterio

    try:
        src = rasterio.open(path)
    except Exception as exc:  # noqa: BLE001 - any failure to open is the finding
        return None, _gdal_text(exc)
    with src:
        for _, window in src.block_windows(1):
            try:
                src.read(window=window)
                continue
            except Exception as exc:  # noqa: BLE001
                where = f"block at row {window.row_off}, column {window.col_off}"
                text = _gdal_text(exc)
            for band in range(1, src.count + 1):  # which band: only the failed block again, each
                try:  # time freshly opened (GDAL keeps failed blocks)
                    with rasterio.open(path) as again:
                        again.read(band, window=window)
                except Exception:  # noqa: BLE001
                    return band, f"{where}: {text}"
            return None, f"{where}: {text}"
    return None


def _damage_error(
    op: str, uris: list[str], culprit: str, locate: Callable[[str, int], str] | None, local: dict[str, str]
) -> BadInputError | None:
    """An exit-2 error naming the damaged raster among ``uris`` (``local``: uri -> local path)."""
    for uri in uris:
        found = _find_damage(local[uri])
        if found is None:
            continue
        band, text = found
        if band is None:
            part = culprit
        elif locate is not None:
            part = locate(uri, band)
        else:
            part = f"{culprit}, band {band}" if culprit else f"band {band}"
        named = f"{uri} ({part})" if part else uri
        return BadInputError(f"{op} {named}: damaged or unreadable raster ({text}); replace the file")
    return None


def _verify_remote(
    op: str, uris: list[str], culprit: str, locate: Callable[[str, int], str] | None
) -> BadInputError | None:
    """After GDAL failed on remote rasters again and again: download them (boto3 or GET, retried)
    and decode them locally. A damaged one is bad input; if all decode, the trouble was the transport."""
    with scratch_dir("sitsflow-verify-") as folder:
        local = {}
        for i, uri in enumerate(uris):
            if is_remote(uri):
                local[uri] = os.path.join(folder, f"{i}-{_base_name(uri)}")
                copy(uri, local[uri])
            else:
                local[uri] = local_file(uri)
        return _damage_error(op, uris, culprit, locate, local)


def _on_local_copies(uris: list[str], fn: Callable[[], T]) -> T:
    """Run ``fn`` with :func:`rasterio_path` answering local copies of the remote ``uris``
    (downloaded under the storage retries; the copies are removed afterwards)."""
    log.warning("%s still looks incomplete after the storage attempts: reading a local copy", ", ".join(uris))
    with scratch_dir("sitsflow-verify-") as folder:
        paths = {}
        for i, uri in enumerate(uris):
            if is_remote(uri):
                paths[uri] = os.path.join(folder, f"{i}-{_base_name(uri)}")
                copy(uri, paths[uri])
        before = getattr(_COPIES, "paths", {})
        _COPIES.paths = {**before, **paths}
        try:
            return fn()
        finally:
            _COPIES.paths = before


def raster_call(
    op: str,
    uris: str | list[str],
    fn: Callable[[], T],
    *,
    culprit: str = "",
    locate: Callable[[str, int], str] | None = None,
    on_retry: Callable[[], None] | None = None,
    incomplete: Callable[[T], bool] | None = None,
) -> T:
    """Run ``fn``, a GDAL operation (open, read, mosaic) on the rasters ``uris``, under the contract.

    Failures are classified from GDAL's messages (HTTP status, AWS and curl errors). Remote
    rasters are those on S3 (``/vsis3/``) and at http(s) URLs (``/vsicurl/``), treated alike:

    * transient (HTTP 0/429/5xx, resets, timeouts, throttling): retried with the backoff of
      :func:`_retry`, GDAL's cache of the files cleared and ``on_retry`` called first (to drop
      datasets held open); then :class:`TransientError` (exit 75);
    * missing (404 / no such file) or denied (403): exit 2 at once; a remote "missing" object
      that the storage layer finds (boto3, HEAD) is transport trouble (GDAL mistakes a failed HEAD for absence);
    * damaged (any other GDAL error: truncated file, corrupt block, unknown format): a local
      raster is bad input at once when decoding it confirms the damage (else the exception
      passes through: it is not the file's fault); remotely the same symptom also comes from a connection reset in
      the middle of a block, so it is retried, and when it persists the files are downloaded and
      decoded locally: damaged -> exit 2, intact -> exit 75.

    Exit-2 messages name the raster and ``culprit`` (e.g. the date and band read); for a
    multi-band raster ``locate(uri, band)`` names the culprit of its damaged band (found by decoding
    the failed block band by band). A full, read-only or forbidden local disk is reported as
    such, other exceptions pass through unchanged.

    ``incomplete(result)`` flags a result that a connection reset may have truncated without an
    error (GDAL only warns when it loses e.g. a TIFF's band descriptions while opening): on remote
    storage such a result is read again from a cleared cache, up to ``SITSFLOW_STORAGE_RETRIES`` times in all;
    when it is still incomplete, the files are downloaded (boto3 or GET, retried) and ``fn`` runs once more on
    the local copies, whose answer stands: a genuinely incomplete file is then judged by the caller,
    never a reset that struck every reread (a rare path: it costs one download of the files).
    """
    uri_list = [os.fspath(uris)] if isinstance(uris, (str, os.PathLike)) else [os.fspath(u) for u in uris]
    remote = any(is_remote(u) for u in uri_list)
    if incomplete is not None and remote:
        once = fn

        def fn() -> T:
            found = once()
            # each reread may be reset too: up to the storage attempts, with their backoff
            attempts, base = _retry_settings()
            for attempt in range(1, attempts):
                if not incomplete(found):
                    break
                _sleep(min(MAX_DELAY_S, base * 2 ** (attempt - 1)) * _jitter.uniform(0.5, 1.0))
                _clear_gdal_cache(uri_list)
                found = once()
            if incomplete(found):
                # as persistent as a genuinely incomplete file: judge on local copies, which no reset truncates
                found = _on_local_copies(uri_list, once)
            return found

    named = ", ".join(uri_list) + (f" ({culprit})" if culprit else "")

    def judge(exc: Exception, last: bool) -> str:
        kind = _gdal_kind(exc)
        if kind is None:
            raise exc
        text = _gdal_text(exc)
        if kind == "denied":
            raise BadInputError(
                f"{op} {named}: access denied ({text}); check the credentials, the "
                "bucket policy or the file's permissions"
            ) from exc
        if kind == "missing":
            gone = [u for u in uri_list if not exists(u)]
            if gone or not remote:
                raise InputNotFoundError(f"{op} {named}: no such file or object {(gone or uri_list)[0]}") from exc
            kind = "transient"  # the object is there: GDAL's failed request made it look absent
        if kind == "damaged" and not remote:
            bad = _damage_error(op, uri_list, culprit, locate, {u: local_file(u) for u in uri_list})
            if bad is None:
                raise exc  # every raster decodes: not their fault
            raise bad from exc
        if kind == "damaged" and last:
            bad = _verify_remote(op, uri_list, culprit, locate)
            if bad is not None:
                raise bad from exc
        return text

    def before_retry() -> None:
        _clear_gdal_cache(uri_list)
        if on_retry is not None:
            on_retry()

    return _attempts(op, named, fn, judge, before_retry)
