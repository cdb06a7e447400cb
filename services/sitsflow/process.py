"""Process settings of the inference stage (call before torch is imported).

* ``OMP_WAIT_POLICY=PASSIVE``: the next sub-window is read while the network runs; OpenMP
  threads that sleep instead of spinning between batches leave the cores to the reader.
* glibc's allocator keeps freed memory for reuse (``mallopt``: ``M_MMAP_THRESHOLD`` and
  ``M_TRIM_THRESHOLD`` raised to 1 GiB). By default every block of more than 32 MiB (GDAL's decoded
  blocks, the network's batches) is mapped afresh from the system and unmapped when freed: each
  4 KiB page then costs a page fault and a zeroing, every time, about a sixth of the stage's time.
  The process keeps its peak memory instead of returning it, which suits a one-task container.
  Nothing happens on a C library without ``mallopt`` (musl, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

from sitsflow.log import get_logger

log = get_logger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
RETAINED_BYTES = 1 << 30


def tune_for_inference() -> bool:
    """Apply the settings above; True when the allocator took them."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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
