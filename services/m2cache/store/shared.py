"""Shared-memory regions: the NeuronStore's same-host fast path (ReadNeuronsShared).

A caller (a worker's fetcher, a benchmark) makes a region, a file
``m2cache-<32 hex>`` in /dev/shm (tmpfs, mode 0600): a 4 KiB header holding
MAGIC and 16 random bytes (its tag), then the data. It names the region and
its tag in each request; the store maps the region once and reads the records
straight into it, so a read costs what an in-process read costs plus one small
RPC, and no payload passes through protobuf and gRPC's buffers. Where the store
cannot open the name, or finds another tag there (another host, another
/dev/shm), it answers FAILED_PRECONDITION and the caller streams instead
(StreamNeurons). The same idea as Triton Inference Server's system
shared-memory regions.

The store keeps at most ``max_regions`` mappings and drops a region's mapping
when it is released, or once its file is unlinked (a caller that died), so a
caller's memory is not held after the caller is gone.
"""
from __future__ import annotations

import logging
import mmap
import os
import re
import secrets
import stat
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from m2cache.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)
SHM_DIR = "/dev/shm"
DEFAULT_REGION_BYTES = 1 << 20  # a worker's region: its misses land here, this much per read; resident
#                                 in the worker all along (a small model's memory slack is a few MiB)
HEADER_BYTES = 4096
MAGIC = b"M2CSHM01"
TAG_BYTES = 16
NAME_RE = re.compile(r"^m2cache-[0-9a-f]{32}$")


class SharedRegion:
    """The caller's side: a region of ``capacity`` data bytes, made now, unlinked by ``close``."""

    def __init__(self, capacity: int, directory: str = SHM_DIR):
        if capacity < 1:
            raise InvalidArgument(f"a shared region needs a positive capacity, got {capacity}")
        self.name = f"m2cache-{secrets.token_hex(16)}"
        self.tag = secrets.token_bytes(TAG_BYTES)
        self.capacity = capacity
        self.path = Path(directory) / self.name
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, HEADER_BYTES + capacity)
            self._map = mmap.mmap(fd, HEADER_BYTES + capacity)
        except OSError:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        os.close(fd)
        self._map[: len(MAGIC) + TAG_BYTES] = MAGIC + self.tag
        self.data = np.frombuffer(self._map, dtype=np.uint8, offset=HEADER_BYTES)  # [capacity]

    def close(self) -> None:
        """Unlink the file; the memory goes with the last view of ``data``."""
        self.path.unlink(missing_ok=True)
        self.data = None


class RegionMaps:
    """The store's side: the regions callers named, mapped once each (thread-safe).
    Mappings only: no descriptor stays open, and a dropped mapping is unmapped
    once the last read into it has finished."""

    def __init__(self, directory: str = SHM_DIR, max_regions: int = 64):
        self.directory = Path(directory) if directory else None
        self.max_regions = max(1, max_regions)
        self._maps: OrderedDict[str, mmap.mmap] = OrderedDict()
        self._lock = threading.Lock()

    def view(self, name: str, tag: bytes, offset: int, nbytes: int, open_new: bool = True) -> np.ndarray:
        """The region's data bytes [offset, offset + nbytes) as a writable uint8 array;
        ``open_new`` False: only a region already mapped (registered)."""
        if self.directory is None:
            raise FailedPrecondition("this store reads into no shared memory (shared_memory_dir is empty)")
        if not NAME_RE.match(name):
            raise InvalidArgument(f"{name!r} is not a shared region name (m2cache-<32 hex digits>)")
        with self._lock:
            mapped = self._maps.get(name)
            if mapped is None and not open_new:
                raise FailedPrecondition(f"shared region {name} is not registered with this store (OpenShared)")
            if mapped is None:
                mapped = self._open(name)
            self._maps.move_to_end(name)
        if mapped[len(MAGIC) : len(MAGIC) + TAG_BYTES] != tag:
            raise FailedPrecondition(f"shared region {name} is not the caller's (its tag differs): "
                                     "another host's region of the same name")
        if offset < 0 or nbytes < 0 or HEADER_BYTES + offset + nbytes > len(mapped):
            raise InvalidArgument(f"{nbytes} bytes at {offset} do not fit shared region {name} "
                                  f"({len(mapped) - HEADER_BYTES} data bytes)")
        return np.frombuffer(mapped, dtype=np.uint8, count=nbytes, offset=HEADER_BYTES + offset)

    def capacity(self, name: str) -> int:
        return len(self._maps[name]) - HEADER_BYTES

    def _open(self, name: str) -> mmap.mmap:
        self._drop_unlinked()
        try:
            fd = os.open(self.directory / name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as err:
            raise FailedPrecondition(f"shared region {name} is not visible to the store ({err.strerror}): "
                                     "the caller is on another host or /dev/shm") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < HEADER_BYTES:
                raise InvalidArgument(f"{name} in {self.directory} is not a shared region")
            mapped = mmap.mmap(fd, st.st_size)
        finally:
            os.close(fd)
        if mapped[: len(MAGIC)] != MAGIC:
            mapped.close()
            raise InvalidArgument(f"{name} in {self.directory} has no shared-region header")
        while len(self._maps) >= self.max_regions:
            _unmap(*self._maps.popitem(last=False))
        self._maps[name] = mapped
        return mapped

    def _drop_unlinked(self) -> None:
        """Regions whose file is gone (their caller closed or died without a release)."""
        for name in [n for n in self._maps if not (self.directory / n).exists()]:
            _unmap(name, self._maps.pop(name))

    def release(self, name: str) -> bool:
        with self._lock:
            mapped = self._maps.pop(name, None)
        if mapped is not None:
            _unmap(name, mapped)
        return mapped is not None

    def __len__(self) -> int:
        return len(self._maps)


def _unmap(name: str, mapped: mmap.mmap) -> None:
    try:
        mapped.close()
    except BufferError:  # a read into it is still running: unmapped with its last view
        log.debug("shared region %s still in use: unmapped when the read ends", name)
