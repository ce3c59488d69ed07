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
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name)
    except (OSError, TypeError):
        return None


def trim_freed_memory() -> bool:
    """Hand the free pages inside malloc's heaps back to the OS (glibc ``malloc_trim(0)``),
    once a load is done. Buffers under ``THRESHOLD`` come from a heap. A thread that
    loads a model (the worker's compute thread) frees their staging copies in between
    the ones it keeps. The heap's top cannot shrink past those live buffers, so without
    this the freed pages stay resident. After loading SmolLM2-135M that was 10.7 MiB
    of the compute thread's 13 MiB arena, and it took the bench's stack worker from 1.04
    to 1.00 of the 25% memory bound. False where the C library is not glibc."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def return_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds at ``THRESHOLD`` and its arenas at ``ARENAS``
    (once per process: a worker's gRPC and I/O threads otherwise each grow an arena
    that keeps a few MiB of freed message buffers); False where the C library is not
    glibc (nothing changes there)."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, THRESHOLD)) \
        and bool(mallopt(_M_ARENA_MAX, ARENAS))
    if not ok:
        log.debug("mallopt refused the thresholds: freed buffers may stay resident")
    return ok
