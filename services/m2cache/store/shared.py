"""Shared-memory regions: the NeuronStore's same-host fast path.

A caller (a worker's fetcher, a benchmark) makes a region: a 4 KiB header holding
MAGIC and 16 random bytes (its tag), then the data. It names the region and its
tag in each request; the store maps the region once and reads the records
straight into it, so a read costs what an in-process read costs plus one small
round trip, and no payload passes through protobuf and gRPC's buffers. The same
idea as Triton Inference Server's system shared-memory regions.

Two kinds, so that nothing outlives a caller, even one killed with SIGKILL:
- anonymous (the default where the store has a socket, store/shared_socket.py): a
  memfd (``memfd_create``), never named in /dev/shm, sealed so it cannot shrink under
  the store's writes; its descriptor is passed on the store's Unix socket
  (RegisterRegion) and the store maps it for that connection alone. When the
  connection closes, as it does when the kernel reaps a killed caller, the store
  unmaps every region it registered, and the memory goes with the last mapping.
- named (the fallback: no socket, no memfd_create): a file ``m2cache-<32 hex>`` in
  /dev/shm (tmpfs, mode 0600), registered by name over gRPC (OpenShared). Where the
  store cannot open the name, or finds another tag there (another host, another
  /dev/shm), it answers FAILED_PRECONDITION and the caller streams instead
  (StreamNeurons). The file keeps its name while the region lives: the store opens
  it by name again after dropping it (``max_regions``) or after a restart, and an
  unlinked name is its only sign that the caller is gone. So a named region of a
  killed caller stays in /dev/shm (SharedRegion.close never ran), and the store
  unmaps it once its file is unlinked.

The store keeps at most ``max_regions`` mappings of both kinds (least recently used
dropped first; the caller registers again at its next read).
"""
from __future__ import annotations

import fcntl
import logging
import mmap
import os
import re
import secrets
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable

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
# an anonymous region's size is fixed once made: the store writes into it without a fault
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class SharedRegion:
    """The caller's side: a region of ``capacity`` data bytes, made now. Named: a file in
    ``directory``, unlinked by ``close``. ``anonymous``: a sealed memfd (OSError where the
    kernel has no memfd_create) whose descriptor ``fd`` is passed to the store; no name."""

    def __init__(self, capacity: int, directory: str = SHM_DIR, anonymous: bool = False):
        if capacity < 1:
            raise InvalidArgument(f"a shared region needs a positive capacity, got {capacity}")
        self.tag = secrets.token_bytes(TAG_BYTES)
        self.capacity = capacity
        self.anonymous = anonymous
        size = HEADER_BYTES + capacity
        if anonymous:
            self.name, self.path = "", None
            self.fd: int | None = _sealed_memfd(size)  # kept: the store is passed it at each registration
            fd = self.fd
        else:
            self.name = f"m2cache-{secrets.token_hex(16)}"
            self.path = Path(directory) / self.name
            self.fd = None
            fd = _new_file(self.path, size)
        try:
            self._map = mmap.mmap(fd, size)
        except OSError:
            self.close()
            raise
        finally:
            if not anonymous:
                os.close(fd)
        self._map[: len(MAGIC) + TAG_BYTES] = MAGIC + self.tag
        self.data = np.frombuffer(self._map, dtype=np.uint8, offset=HEADER_BYTES)  # [capacity]

    def close(self) -> None:
        """Unlink the file (close the memfd); the memory goes with the last view of ``data``."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.data = None


def _new_file(path: Path, size: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    return fd


def _sealed_memfd(size: int) -> int:
    fd = os.memfd_create("m2cache-region", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except OSError:
        os.close(fd)
        raise
    return fd


@dataclass(slots=True)
class _Mapped:
    map: mmap.mmap
    peer: Hashable | None = None  # the socket connection that registered it; None: registered by name
    inode: tuple[int, int] | None = None  # (st_dev, st_ino) of a registered descriptor


class RegionMaps:
    """The store's side: the regions callers registered, mapped once each (thread-safe).
    Mappings only: no descriptor stays open, and a dropped mapping is unmapped once the
    last read into it has finished. A region registered on the socket (``register_fd``)
    is served to that connection (``peer``) alone, and goes with it (``release_peer``)."""

    def __init__(self, directory: str = SHM_DIR, max_regions: int = 64):
        self.directory = Path(directory) if directory else None
        self.max_regions = max(1, max_regions)
        self._maps: OrderedDict[str, _Mapped] = OrderedDict()
        self._lock = threading.Lock()

    def check_enabled(self) -> None:
        if self.directory is None:
            raise FailedPrecondition("this store reads into no shared memory (shared_memory_dir is empty)")

    def view(self, name: str, tag: bytes, offset: int, nbytes: int, open_new: bool = True,
             peer: Hashable | None = None) -> np.ndarray:
        """The region's data bytes [offset, offset + nbytes) as a writable uint8 array, for a
        request on connection ``peer`` (None: over gRPC); ``open_new`` False: only a region
        already mapped (registered), True: a named one opened now if need be."""
        self.check_enabled()
        if not NAME_RE.match(name):
            raise InvalidArgument(f"{name!r} is not a shared region name (m2cache-<32 hex digits>)")
        with self._lock:
            region = self._maps.get(name)
            if region is None and not open_new:
                raise FailedPrecondition(f"shared region {name} is not registered with this store")
            if region is None:
                region = self._open(name)
            elif region.peer is not None and region.peer != peer:
                raise FailedPrecondition(f"shared region {name} is not registered on this connection")
            self._maps.move_to_end(name)
        mapped = region.map
        if mapped[len(MAGIC) : len(MAGIC) + TAG_BYTES] != tag:
            raise FailedPrecondition(f"shared region {name} is not the caller's (its tag differs): "
                                     "another host's region of the same name")
        if offset < 0 or nbytes < 0 or HEADER_BYTES + offset + nbytes > len(mapped):
            raise InvalidArgument(f"{nbytes} bytes at {offset} do not fit shared region {name} "
                                  f"({len(mapped) - HEADER_BYTES} data bytes)")
        return np.frombuffer(mapped, dtype=np.uint8, count=nbytes, offset=HEADER_BYTES + offset)

    def capacity(self, name: str) -> int:
        return len(self._maps[name].map) - HEADER_BYTES

    def _open(self, name: str) -> _Mapped:
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
        return self._add(name, _Mapped(mapped))

    def _add(self, name: str, region: _Mapped) -> _Mapped:
        while len(self._maps) >= self.max_regions:
            _unmap(*self._maps.popitem(last=False))
        self._maps[name] = region
        return region

    def _drop_unlinked(self) -> None:
        """Named regions whose file is gone (their caller closed or died without a release)."""
        for name in [n for n, r in self._maps.items() if r.peer is None and not (self.directory / n).exists()]:
            _unmap(name, self._maps.pop(name))

    def register_fd(self, fd: int, tag: bytes, capacity: int, peer: Hashable) -> str:
        """Map the caller's anonymous region (its memfd ``fd``, the caller's to close) for
        connection ``peer`` alone; its name, the same one for a region already registered."""
        self.check_enabled()
        st = os.fstat(fd)
        size = HEADER_BYTES + capacity
        if capacity < 1 or not stat.S_ISREG(st.st_mode) or st.st_size < size:
            raise InvalidArgument(f"the descriptor is no region of {capacity} data bytes "
                                  f"({st.st_size} bytes, mode {st.st_mode:o})")
        if _seals(fd) & fcntl.F_SEAL_SHRINK == 0:
            raise InvalidArgument("a region registered on the socket must be a memfd sealed against shrinking "
                                  "(F_SEAL_SHRINK): the store writes into it")
        inode = (st.st_dev, st.st_ino)
        with self._lock:
            for name, region in self._maps.items():
                if region.peer == peer and region.inode == inode:
                    self._maps.move_to_end(name)
                    return name
        mapped = mmap.mmap(fd, size)
        if mapped[: len(MAGIC) + TAG_BYTES] != MAGIC + tag:
            mapped.close()
            raise InvalidArgument("the registered region's header does not hold its magic and tag")
        name = f"m2cache-{secrets.token_hex(16)}"
        with self._lock:
            self._add(name, _Mapped(mapped, peer, inode))
        return name

    def release(self, name: str) -> bool:
        """Unmap a named region (ReleaseRegion); one registered on the socket goes with its connection."""
        with self._lock:
            region = self._maps.get(name)
            if region is not None and region.peer is None:
                del self._maps[name]
            else:
                region = None
        if region is not None:
            _unmap(name, region)
        return region is not None

    def release_peer(self, peer: Hashable) -> int:
        """Unmap every region connection ``peer`` registered (it closed); how many."""
        with self._lock:
            gone = [(n, r) for n, r in self._maps.items() if r.peer == peer]
            for name, _ in gone:
                del self._maps[name]
        for name, region in gone:
            _unmap(name, region)
        return len(gone)

    def __len__(self) -> int:
        """The regions mapped now (both kinds)."""
        return len(self._maps)


def _seals(fd: int) -> int:
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:  # not a memfd: it takes no seals
        return 0


def _unmap(name: str, region: _Mapped) -> None:
    try:
        region.map.close()
    except BufferError:  # a read into it is still running: unmapped with its last view
        log.debug("shared region %s still in use: unmapped when the read ends", name)
