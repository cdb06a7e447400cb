"""A faulty TCP proxy on 127.0.0.1 for the fault-injection tests (a test helper, not a fake S3).

It sits in front of a real server (the moto S3 server) and forwards every connection, except that,
decided by a seeded random generator in the order connections arrive:

* ``reset``: that fraction of connections is reset (TCP RST): either before any byte of the
  response or after a random part of it, so clients see refused, reset and truncated transfers;
* ``stall``: that fraction is held ``stall_s`` seconds (bounded) before it is served;
* ``fail``: requests matching a predicate (e.g. :func:`is_range_get`, GDAL's block reads) are
  answered ``503 SlowDown`` (S3's throttling reply) instead of being forwarded, at most
  ``fail_budget`` of them (``None``: every one).

Clients reuse connections (HTTP keep-alive); with ``one_request_per_connection`` (forced when
``fail`` is given) every request head gets ``Connection: close``, so each request has its own
connection and the predicate sees every request. Faults are bounded: at most ``max_faults`` of
them (resets + stalls + failures), and the proxy stops by itself after ``lifetime_s`` seconds.
Use it as a context manager; :attr:`stats` counts what it did.
"""

from __future__ import annotations

import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

HEAD_LIMIT = 64 * 1024

_SLOWDOWN = (
    b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>"
    b"<Message>Please reduce your request rate (injected by faultproxy).</Message></Error>"
)


def is_range_get(head: bytes) -> bool:
    """A GET carrying a ``Range`` header (how GDAL's /vsis3/ reads a raster's blocks)."""
    lines = head.split(b"\r\n")
    return lines[0].startswith(b"GET ") and any(h.lower().startswith(b"range:") for h in lines[1:])


@dataclass
class Stats:
    connections: int = 0
    resets: int = 0
    stalls: int = 0
    failed: int = 0
    requests: list[bytes] = field(default_factory=list)  # first line of each request head seen

    @property
    def faults(self) -> int:
        return self.resets + self.stalls + self.failed


class FaultyProxy:
    def __init__(self, target: str, *, reset: float = 0.0, stall: float = 0.0, stall_s: float = 0.5,
                 fail: Callable[[bytes], bool] | None = None, fail_budget: int | None = None,
                 one_request_per_connection: bool = False, seed: int = 0, max_faults: int | None = None,
                 lifetime_s: float = 900.0) -> None:
        host, _, port = target.removeprefix("http://").rstrip("/").partition(":")
        self.target = (host, int(port))
        self.reset, self.stall, self.stall_s = reset, stall, min(float(stall_s), 30.0)
        self.fail, self.fail_budget = fail, fail_budget
        self.one_request = one_request_per_connection or fail is not None
        self.max_faults, self.lifetime_s = max_faults, lifetime_s
        self.stats = Stats()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self._sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, name="faultproxy", daemon=True)

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> FaultyProxy:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def set_faults(self, *, reset: float | None = None, stall: float | None = None,
                   fail: Callable[[bytes], bool] | None | bool = False) -> None:
        """Change the fault rates of connections accepted from now on."""
        with self._lock:
            if reset is not None:
                self.reset = reset
            if stall is not None:
                self.stall = stall
            if fail is not False:
                self.fail = fail  # type: ignore[assignment]

    # -- serving ---------------------------------------------------------------------------------
    def _serve(self) -> None:
        while not self._stop.is_set():
            if time.monotonic() - self._started > self.lifetime_s:
                break  # stops by itself: a forgotten proxy never outlives a test session
            try:
                client, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()
        self._stop.set()

    def _decide(self, head: bytes) -> tuple[str, int]:
        """``(fault, byte offset)`` for a connection whose first request head is ``head``."""
        with self._lock:
            self.stats.connections += 1
            self.stats.requests.append(head.split(b"\r\n", 1)[0])
            budget_left = self.max_faults is None or self.stats.faults < self.max_faults
            if budget_left and self.fail is not None and self.fail(head) and (
                    self.fail_budget is None or self.stats.failed < self.fail_budget):
                self.stats.failed += 1
                return "fail", 0
            draw = self._rng.random()
            if budget_left and draw < self.reset:
                self.stats.resets += 1
                # half of the resets before any response byte, the others after a part of it
                offset = 0 if self._rng.random() < 0.5 else self._rng.randint(1, 64 * 1024)
                return "reset", offset
            if budget_left and draw < self.reset + self.stall:
                self.stats.stalls += 1
                return "stall", 0
            return "pass", 0

    def _handle(self, client: socket.socket) -> None:
        upstream = None
        try:
            client.settimeout(60)
            head = _read_head(client)
            if head is None:
                return
            fault, offset = self._decide(head)
            if fault == "fail":
                body = _SLOWDOWN
                client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                               b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                return
            if fault == "reset" and offset == 0:
                _reset(client)
                return
            if fault == "stall":
                self._stop.wait(self.stall_s)
            if self.one_request:
                head = _close_after(head)
            upstream = socket.create_connection(self.target, timeout=60)
            upstream.sendall(head)
            self._pipe(client, upstream, reset_after=offset if fault == "reset" else None)
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                if sock is not None:
                    try:
                        sock.close()
                    except OSError:
                        pass

    def _pipe(self, client: socket.socket, upstream: socket.socket, reset_after: int | None) -> None:
        sent = 0
        socks = [client, upstream]
        while not self._stop.is_set():
            readable, _, _ = select.select(socks, [], [], 0.5)
            for sock in readable:
                data = sock.recv(65536)
                if not data:
                    return
                if sock is upstream:
                    if reset_after is not None and sent + len(data) >= reset_after:
                        client.sendall(data[: max(0, reset_after - sent)])
                        _reset(client)
                        return
                    sent += len(data)
                    client.sendall(data)
                else:
                    upstream.sendall(data)


def _read_head(sock: socket.socket) -> bytes | None:
    """Bytes up to and including the first request's blank line (plus whatever came with them)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
        if len(data) > HEAD_LIMIT:
            break
    return data


def _close_after(data: bytes) -> bytes:
    """The request head with ``Connection: close`` (the server then ends the connection after it)."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    lines = [h for h in head.split(b"\r\n") if not h.lower().startswith(b"connection:")]
    return b"\r\n".join([*lines, b"Connection: close"]) + sep + rest


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0), not a clean FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
