"""A caller's same-host session with one NeuronStore: its shared region, registered
with the store (on the store's socket, store/shared_socket.py, or over gRPC), and the
requests that use it (reads into the region, short-circuit record-file requests).
The region itself is store/shared.py; the socket's wire, shared_socket.py."""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from m2cache.errors import FailedPrecondition, M2CacheError, Unavailable
from m2cache.store.shared import SHM_DIR, SharedRegion
from m2cache.store.shared_socket import SocketClient, close_fds
from m2cache_client.pb import store_pb2

log = logging.getLogger(__name__)


class SharedReader:
    """A caller's same-host path to one store: a region of ``capacity`` bytes and its reads.
    Where the store has a socket that this host's ``directory`` holds, an anonymous region
    (memfd) registered on it and every request sent there; else (no socket, no memfd, or
    ``anonymous`` False) a named region in ``directory`` registered over gRPC (``rpc``: a
    grpc_util.Rpc to the NeuronStore), its reads on the socket OpenShared names, or over
    gRPC. Thread-safe: one read at a time, since every read lands in the one region.
    Raises FailedPrecondition when the store cannot see the region (then stream), OSError
    when no region can be made."""

    def __init__(self, rpc, capacity: int, timeout_s: float, directory: str = SHM_DIR, anonymous: bool = True):
        self.rpc = rpc
        self.timeout_s = timeout_s
        self.directory = directory
        self.socket: SocketClient | None = None
        self._token = b""
        self._lock = threading.Lock()
        region = self._anonymous_region(capacity) if anonymous else None
        self.region = region if region is not None else SharedRegion(capacity, directory)
        self.ref = store_pb2.SharedRegion(name=self.region.name, tag=self.region.tag)
        try:
            self._register()
        except BaseException:
            self._close_socket()
            self.region.close()
            raise

    @property
    def capacity(self) -> int:
        return self.region.capacity

    def _anonymous_region(self, capacity: int) -> SharedRegion | None:
        """A memfd region, with the store's socket connected; None where either is missing."""
        try:
            info = self.rpc.unary("SharedSocket", store_pb2.SharedSocketRequest())
        except M2CacheError as err:
            if err.code != "UNIMPLEMENTED":
                raise
            return None  # a store older than SharedSocket: a named region
        if not info.socket_path:
            return None
        try:
            region = SharedRegion(capacity, anonymous=True)
        except (AttributeError, OSError) as err:  # no memfd_create here (an old kernel, a sandbox)
            log.info("no anonymous shared region (%s): a named one in %s", err, self.directory)
            return None
        try:
            self._connect(info)
        except Unavailable as err:  # another host's socket (or another /dev/shm): a named region, or streams
            log.info("%s: a named shared region", err)
            region.close()
            return None
        return region

    def _connect(self, info: store_pb2.SharedSocketInfo) -> None:
        """The store's socket, looked for in this caller's shared-memory directory."""
        self.socket = SocketClient(str(Path(self.directory) / Path(info.socket_path).name), self.timeout_s)
        self._token = info.token

    def _register(self) -> None:
        """(Again:) the region registered with the store, and its socket connected."""
        if self.region.anonymous:
            if self.socket is None:  # the socket broke (the store restarted): a new connection
                info = self.rpc.unary("SharedSocket", store_pb2.SharedSocketRequest())
                if not info.socket_path:
                    raise FailedPrecondition("the store has no shared-memory socket any more")
                self._connect(info)
            self.ref = self.socket.register(self.region, self._token).region
            return
        opened = self.rpc.unary("OpenShared", self.ref)
        if self.socket is None and opened.socket_path:
            try:
                self.socket = SocketClient(opened.socket_path, self.timeout_s)
            except Unavailable as err:
                log.warning("%s: shared reads go over gRPC", err)

    def read(self, batch, consume: Callable[[np.ndarray, store_pb2.SharedReadResponse], object],
             resident_only: bool = False):
        """Read ``batch`` (a NeuronBatchRequest) into the region and return
        ``consume(bytes written, answer)``, called before the next read may start.
        ``resident_only``: only what the store's page cache holds (SharedReadRequest)."""
        with self._lock:
            if self.region.data is None:
                raise FailedPrecondition(f"shared region {self.ref.name} is closed")
            request = store_pb2.SharedReadRequest(batch=batch, region=self.ref, resident_only=resident_only)
            resp = self._read(request)
            return consume(self.region.data[: resp.nbytes], resp)

    def record_file(self, model: str, layer: int, prec: int, want_fd: bool
                    ) -> tuple[store_pb2.RecordFileResponse, int | None]:
        """Where (layer, prec)'s records lie in the model's records file, and with ``want_fd``
        the file's descriptor (the caller's to close). FailedPrecondition where the store has
        no socket or will not share the file."""
        with self._lock:
            request = store_pb2.RecordFileRequest(model=model, layer=layer, precision=prec, region=self.ref,
                                                  want_fd=want_fd)
            resp, fds = self._call(request, "record_file", 1 if want_fd else 0)
        fd = fds[0] if fds else None
        close_fds(fds[1:])
        if want_fd and fd is None:
            raise FailedPrecondition(f"the store passed no descriptor for model {model}'s records")
        return resp.record_file, fd

    def _read(self, request):
        return self._call(request, "read")[0].read

    def _call(self, request, kind: str, max_fds: int = 0) -> tuple[store_pb2.SocketResponse, list[int]]:
        for again in (False, True):
            if self.socket is None and self.region.anonymous:  # a reconnection failed before
                self._register()
                request.region.CopyFrom(self.ref)
            if self.socket is None:  # a named region, the store without a socket: reads go over gRPC
                if kind == "read":
                    return store_pb2.SocketResponse(read=self.rpc.unary("ReadNeuronsShared", request)), []
                raise FailedPrecondition("the store has no shared-memory socket: no short-circuit reads")
            try:
                return self.socket.request(store_pb2.SocketRequest(**{kind: request}), max_fds)
            except FailedPrecondition:  # the store dropped its mapping (it keeps a bounded number)
                if again:
                    raise
            except Unavailable:  # the socket broke: the store restarted, or is gone (a new registration says which)
                if again:
                    raise
                self._close_socket()
            self._register()
            request.region.CopyFrom(self.ref)  # an anonymous region's name is the store's: new at each registration

    def _close_socket(self) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None

    def close(self) -> None:
        """Release the region (after a read in flight); later reads are FailedPrecondition.
        An anonymous region goes when the socket closes; a named one is released over gRPC."""
        with self._lock:
            if self.region.data is None:
                return
            if not self.region.anonymous:
                try:
                    self.rpc.stub.ReleaseRegion(self.ref, timeout=2.0)
                except Exception as err:  # the store is gone: it maps nothing of ours any more
                    log.debug("ReleaseRegion: %s", err)
            self._close_socket()
            self.region.close()
