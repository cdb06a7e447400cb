"""A run's lease on its output path: while ``sitsflow run`` works on ``chain.output_path``, a
second run on the same path is refused (exit 2) with a message that names the first.

The lease is ``<output_path>/config/run.lock``, a JSON record of its holder (host, pid, start
time, run id, expiry). Locally the file is locked with ``flock``: the kernel frees it however its
holder ends (even ``kill -9``), so a lease whose holder is dead is taken over at once. On S3 it
is an object created with a conditional write (``If-None-Match: *``: of two runs, one creates
it), renewed every :data:`RENEW_S` seconds; it is stale, and taken over with a write conditional
on the stale record's ETag (``If-Match``: of two takers, one wins), once its holder is a dead
process on this host or its expiry (:data:`TTL_S` after the last renewal) has passed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from sitsflow import layout, storage
from sitsflow.errors import BadInputError
from sitsflow.log import get_logger

log = get_logger(__name__)

#: Seconds after its last renewal when an S3 lease whose holder is silent is stale.
TTL_S = 600.0
#: Seconds between two renewals of an S3 lease.
RENEW_S = TTL_S / 5


def lease_uri(output_path: str) -> str:
    """Where the lease on ``output_path`` lives."""
    return layout.join(output_path, layout.CONFIG, "run.lock")


def _record() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "run_id": uuid.uuid4().hex,
        "expires": time.time() + TTL_S,
    }


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another run (its record is being written)"
    return f"the run of pid {holder.get('pid')} on host {holder.get('host')!r}, started {holder.get('started')}"


def _refusal(uri: str, holder: dict[str, Any] | None, how: str) -> BadInputError:
    return BadInputError(
        f"output path is in use: {uri} is held by {_describe(holder)}; two runs on one output "
        f"path would overwrite each other's results. Wait for it to end, or use another "
        f"chain.output_path. {how}"
    )


def _dead_here(holder: dict[str, Any]) -> bool:
    """Whether the holder is a process of this host that no longer exists."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, KeyError, TypeError, ValueError):
        return False
    return False


class _LocalLease:
    """``flock`` on the lease file, held as long as the file stays open."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self, record: dict[str, Any]) -> None:
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    how = "(the lock is freed when that process ends, however it ends)"
                    raise _refusal(self.path, self._read(), how) from None
                with contextlib.suppress(FileNotFoundError):  # not removed by a holder meanwhile
                    if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                        break
                os.close(fd)
            if previous := self._read():
                log.warning("taking over the lease %s of %s, which ended", self.path, _describe(previous))
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(record).encode())
        except OSError as exc:
            raise BadInputError(f"cannot take the lease {self.path}: {exc.strerror or exc}") from exc
        self.fd = fd

    def _read(self) -> dict[str, Any] | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                return dict(json.loads(f.read()))
        except (OSError, ValueError, TypeError):
            return None

    def release(self) -> None:
        if self.fd is not None:
            os.unlink(self.path)  # before unlocking, so a waiter never locks a removed file
            os.close(self.fd)
            self.fd = None


class _S3Lease:
    """A lock object written with conditional requests."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.etag: str | None = None

    def _put(self, record: dict[str, Any], *, if_match: str | None = None, if_none_match: bool = False) -> str | None:
        """Write ``record`` under the condition; its ETag, or None when the condition failed."""
        return storage.put_if(
            self.uri,
            json.dumps(record).encode(),
            if_match=if_match,
            if_none_match=if_none_match,
            content_type="application/json",
            op="lease",
        )

    def _read(self) -> tuple[dict[str, Any] | None, str | None]:
        found = storage.get_with_etag(self.uri, op="lease")
        if found is None:
            return None, None
        body, etag = found
        try:
            return dict(json.loads(body)), etag
        except (ValueError, TypeError):
            return {}, etag

    def acquire(self, record: dict[str, Any]) -> None:
        for _ in range(5):
            self.etag = self._put(record, if_none_match=True)
            if self.etag is not None:
                return
            holder, etag = self._read()
            if etag is None:
                continue  # released meanwhile: create it again
            if holder and holder.get("run_id") == record["run_id"]:
                self.etag = etag  # our own write, whose answer was lost and retried
                return
            expired = float((holder or {}).get("expires", 0)) < time.time()
            if not (expired or (holder and _dead_here(holder))):
                raise _refusal(
                    self.uri,
                    holder,
                    f"(a lease its holder stops renewing expires {TTL_S:.0f} s after the last renewal)",
                )
            log.warning("taking over the stale lease %s of %s", self.uri, _describe(holder))
            self.etag = self._put(record, if_match=etag)
            if self.etag is not None:
                return
        raise BadInputError(f"could not take the lease {self.uri}: other runs keep changing it")

    def renew(self, record: dict[str, Any]) -> bool:
        record["expires"] = time.time() + TTL_S
        etag = self._put(record, if_match=self.etag or "")
        if etag is None:
            return False
        self.etag = etag
        return True

    def release(self) -> None:
        if self.etag is None:
            return
        if not storage.delete_if(self.uri, self.etag, op="lease"):
            log.error("lease %s was no longer ours when this run ended", self.uri)
        self.etag = None


@contextlib.contextmanager
def output_lease(output_path: str) -> Iterator[dict[str, Any]]:
    """Hold the lease on ``output_path`` for the duration of the block; yields its record.

    Raises:
        BadInputError: another live run holds it (the message names its host, pid and start).
    """
    uri = lease_uri(output_path)
    lease = _S3Lease(uri) if storage.is_s3(uri) else _LocalLease(storage.local_file(uri))
    record = _record()
    lease.acquire(record)
    log.info("lease %s taken (run %s)", uri, record["run_id"])
    stop = threading.Event()

    def renew(lease: _S3Lease) -> None:
        while not stop.wait(RENEW_S):
            try:
                if not lease.renew(record):
                    log.error("lease %s was taken over by another run while this one works", uri)
                    return
            except Exception as exc:  # noqa: BLE001 - the run goes on; the next renewal retries
                log.warning("could not renew the lease %s: %s", uri, exc)

    renewer = threading.Thread(target=renew, args=(lease,), daemon=True)
    if isinstance(lease, _S3Lease):  # a local lock lasts as long as its process
        renewer.start()
    try:
        yield record
    finally:
        stop.set()
        if renewer.is_alive():
            renewer.join()
        lease.release()
        log.info("lease %s released", uri)
