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
    ok = bool(mallopt(M_MMAP_THRESHOLD, RETAINED_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, RETAINED_BYTES))
    log.debug("allocator keeps freed memory: %s", ok)
    return ok
