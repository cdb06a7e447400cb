"""Process settings: the inference stage's (call before torch is imported), and a clean stop on
SIGTERM for every stage (:func:`stop_on_sigterm`).

Inference:

* ``OMP_WAIT_POLICY=PASSIVE`` with ``GOMP_SPINCOUNT=20000``: OpenMP threads that sleep instead of
  spinning between batches leave the cores to reading (reading threads, or GDAL's decoding threads
  between two parts). They first spin 20,000 rounds (about 0.2 ms in libgomp's estimate): the
  folded L-TAE, made of many short operations, pays a wake-up for each operation otherwise. On the
  2-core Intel Xeon of docs/benchmarks.md the L-TAE's stage made 144 k px/s with 1,000 rounds and
  170-191 k with 20,000 (the MLP's: 218 k and 200-210 k, within the noise); on an earlier
  machine both gave 92 k. Fully active waiting (``OMP_WAIT_POLICY=ACTIVE``) took the cores from
  GDAL's decoding: 157-173 k. Either variable already set is kept.
* glibc's allocator keeps freed memory for reuse (``mallopt``: ``M_MMAP_THRESHOLD`` and
  ``M_TRIM_THRESHOLD`` raised to 1 GiB). By default every block of more than 32 MiB (GDAL's decoded
  blocks, the network's batches) is mapped afresh from the system and unmapped when freed: each
  4 KiB page then costs a page fault and a zeroing, every time, about a sixth of the stage's time.
  The process keeps its peak memory instead of returning it, which suits a one-task container.
  Nothing happens on a C library without ``mallopt`` (musl, macOS).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import threading
from collections.abc import Iterator

from sitsflow.errors import EXIT_TRANSIENT
from sitsflow.log import get_logger

log = get_logger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
RETAINED_BYTES = 1 << 30


CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"
CGROUP_MEMORY_MAX = "/sys/fs/cgroup/memory.max"
CGROUP_V1_MEMORY_LIMIT = "/sys/fs/cgroup/memory/memory.limit_in_bytes"


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity, bounded by a cgroup v2 CPU quota (a pod's limit)."""
    try:
        cpus = len(os.sched_getaffinity(0))  # the CPUs this process may run on
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        with open(CGROUP_CPU_MAX) as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def usable_memory() -> int:
    """Bytes of memory this process may use: the machine's, bounded by a cgroup memory limit (a
    pod's: cgroup v2 ``memory.max``, else v1 ``memory.limit_in_bytes``)."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    for path in (CGROUP_MEMORY_MAX, CGROUP_V1_MEMORY_LIMIT):
        try:
            with open(path) as f:
                limit = f.read().strip()
        except OSError:
            continue
        if limit.isdigit():  # "max" (v2) or a huge number (v1): no limit below the machine's
            total = min(total, int(limit))
        break
    return int(total)


def tune_for_inference() -> bool:
    """Apply the settings above; True when the allocator took them."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("GOMP_SPINCOUNT", "20000")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.debug("no mallopt in this C library: the allocator keeps its defaults")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    trim = bool(mallopt(M_TRIM_THRESHOLD, RETAINED_BYTES))
    # glibc before 2.35 refuses a threshold above 32 MiB (HEAP_MAX_SIZE / 2): take that, then
    mmap = bool(mallopt(M_MMAP_THRESHOLD, RETAINED_BYTES)) or bool(mallopt(M_MMAP_THRESHOLD, 32 << 20))
    log.debug("allocator keeps freed memory: trim %s, mmap threshold %s", trim, mmap)
    return trim and mmap


_LIMIT_LOCK = threading.Lock()
_OPEN_FILES_BUDGET: int | None = None


def open_files_budget() -> int:
    """How many datasets a reading thread may keep open.

    Raises the soft limit of open files to the hard one first (once per process; containers
    usually allow far more than the soft 1024), then allows a quarter of it, less a margin, at
    most 4096 and at least 16.
    """
    global _OPEN_FILES_BUDGET
    with _LIMIT_LOCK:
        if _OPEN_FILES_BUDGET is None:
            soft = 1024
            try:
                import resource

                soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                wanted = hard if hard != resource.RLIM_INFINITY else 65536
                if wanted > soft:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
                    soft = wanted
            except (ImportError, ValueError, OSError):
                pass
            _OPEN_FILES_BUDGET = max(16, min(4096, (soft - 256) // 4))
        return _OPEN_FILES_BUDGET


# -- a clean stop on SIGTERM ------------------------------------------------------------------
#
# Kubernetes sends SIGTERM to a container's first process when its pod is deleted, evicted,
# preempted or its node shuts down, and SIGKILL after the grace period. Without a handler Python
# dies at once (exit 143), or ignores the signal when it runs as PID 1 (then SIGKILL, exit 137).
# With :func:`stop_on_sigterm` the signal raises :class:`Stopped` in the main thread: the stage
# unwinds like after any error (temporary files removed, nothing published half), and the CLI
# exits 75 (EX_TEMPFAIL), which the WorkflowTemplate's retry rule retries. The retried step resumes
# from what was published: training from its last epoch checkpoint, inference from the chunks
# whose manifests exist. A block that must not be cut (writing a checkpoint) runs under
# :func:`stop_deferred`: a SIGTERM that arrives meanwhile stops the process when the block ends.

_STOP = {"requested": False, "deferred": 0}


class Stopped(BaseException):
    """SIGTERM received: the step stops cleanly, exit 75 (a BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` swallows it)."""

    exit_code = EXIT_TRANSIENT


def _on_sigterm(signum: int, frame: object) -> None:
    _STOP["requested"] = True
    if _STOP["deferred"]:
        log.warning("SIGTERM received: stopping once the current write is complete")
        return
    raise Stopped(f"stopped by signal {signal.Signals(signum).name} (pod deleted, evicted or preempted)")


def stop_on_sigterm() -> None:
    """Turn SIGTERM into :class:`Stopped` in the main thread (call once, from the main thread)."""
    if threading.current_thread() is threading.main_thread():
        _STOP["requested"] = False
        signal.signal(signal.SIGTERM, _on_sigterm)


@contextlib.contextmanager
def stop_deferred() -> Iterator[None]:
    """Run a block to its end even if SIGTERM arrives meanwhile; stop right after it then."""
    _STOP["deferred"] += 1
    try:
        yield
    finally:
        _STOP["deferred"] -= 1
    if _STOP["requested"] and not _STOP["deferred"]:
        _STOP["requested"] = False  # raised once, as the signal handler would have
        raise Stopped("stopped by signal SIGTERM after the write it interrupted was complete")
