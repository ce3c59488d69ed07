"""Process memory: hand freed weight-sized buffers back to the OS.

glibc serves large allocations with mmap, but raises that threshold (up to 32 MiB)
each time such a block is freed, after which buffers of a few MiB come from its heap
and stay resident when freed. A worker frees exactly such buffers once: the unfused
q/k/v after fusing, a dense tensor's staging copy, the slot matrices of a cache it
rebuilds. Fixing the thresholds keeps its RSS at what it holds, not at its high-water
mark (measured on SmolLM2-135M: 32 MiB of q/k/v stayed resident without it).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
THRESHOLD = 256 << 10  # blocks this large are mapped (and unmapped on free): weights, caches, prefill activations
ARENAS = 2  # malloc arenas: one per thread (glibc's default, up to 8 per core) each keeps its freed memory


@functools.cache
def return_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds at ``THRESHOLD`` and its arenas at ``ARENAS``
    (once per process: a worker's gRPC and I/O threads otherwise each grow an arena
    that keeps a few MiB of freed message buffers); False where the C library is not
    glibc (nothing changes there)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, THRESHOLD)) \
        and bool(mallopt(_M_ARENA_MAX, ARENAS))
    if not ok:
        log.debug("mallopt refused the thresholds: freed buffers may stay resident")
    return ok
