"""The same-host doorbell of the NeuronStore's shared-memory path.

A gRPC call costs 0.5-1 ms here (Python gRPC on loopback), more than reading a
megabyte of records from the page cache, so a caller that registered a region
(OpenShared, over the authenticated gRPC channel) sends its requests over a Unix
socket instead: each request and answer is one frame, a 4-byte little-endian
length and a SocketRequest / SocketResponse, about 20 us a round trip. Two kinds:
- ``read``: records read by the store into the caller's region (SharedReadRequest);
- ``record_file``: where a layer's records lie and their CRCs, with the records
  file's descriptor attached (SCM_RIGHTS), so the caller reads them itself
  (short-circuit reads, as HDFS's DataNode hands its block files to local clients).
A failed request's ``error_code`` is a gRPC status name, mapped back to the typed
errors of errors.py as a gRPC status would be. The server accepts only peers of
its own uid, and serves only regions registered over gRPC, with their tag; like
the region itself, this exists only on one host (Plasma's design: a Unix socket
for control, shared memory for the bytes).
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import struct
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from m2cache.errors import FailedPrecondition, M2CacheError, Unavailable
from m2cache.grpc_util import error_for_code
from m2cache.store.shared import SHM_DIR, SharedRegion
from m2cache_client.pb import store_pb2

log = logging.getLogger(__name__)
_LEN = struct.Struct("<I")
MAX_FRAME = 64 << 20  # a request names at most 65,536 ids (about 0.4 MB); an answer carries their CRCs


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return bytes(buf)


def _recv_frame(sock: socket.socket) -> bytes | None:
    head = _recv_exact(sock, _LEN.size)
    if head is None:
        return None
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise ValueError(f"frame of {n} bytes over the {MAX_FRAME}-byte limit")
    return _recv_exact(sock, n)


def _send_frame(sock: socket.socket, payload: bytes, fds: list[int] = ()) -> None:
    frame = _LEN.pack(len(payload)) + payload
    if not fds:
        sock.sendall(frame)
        return
    sent = socket.send_fds(sock, [frame], list(fds))  # the descriptors ride on the frame's first bytes
    if sent < len(frame):
        sock.sendall(frame[sent:])


def _recv_frame_fds(sock: socket.socket, max_fds: int) -> tuple[bytes | None, list[int]]:
    """A frame and the descriptors sent with it (each made close-on-exec)."""
    head, fds, _flags, _addr = socket.recv_fds(sock, _LEN.size, max_fds)
    for fd in fds:
        os.set_inheritable(fd, False)
    if not head:
        return None, fds
    if len(head) < _LEN.size:
        rest = _recv_exact(sock, _LEN.size - len(head))
        if rest is None:
            return None, fds
        head += rest
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise ValueError(f"frame of {n} bytes over the {MAX_FRAME}-byte limit")
    return _recv_exact(sock, n), fds


Handler = Callable[[store_pb2.SocketRequest], tuple[store_pb2.SocketResponse, list[int]]]


class SocketServer:
    """Serves SocketRequests on a Unix socket in ``directory``, one thread per peer;
    ``handle`` answers one with the descriptors to pass along (the handler's own: they
    are duplicated into the peer, not closed here)."""

    def __init__(self, directory: str, handle: Handler):
        self.path = Path(directory) / f"m2cache-store-{os.getpid()}-{secrets.token_hex(8)}.sock"
        self.handle = handle
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket file 0600: only this uid connects
        try:
            self._sock.bind(str(self.path))
        finally:
            os.umask(old)
        self._sock.listen(64)
        self._closed = threading.Event()
        self._peers: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="shared-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                peer, _ = self._sock.accept()
            except OSError:
                return  # closed
            uid = struct.unpack("3i", peer.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
            if uid != os.getuid():
                log.warning("shared-memory socket: refused a peer of uid %d", uid)
                peer.close()
                continue
            with self._lock:
                self._peers.add(peer)
            threading.Thread(target=self._serve, args=(peer,), name="shared-peer", daemon=True).start()

    def _serve(self, peer: socket.socket) -> None:
        try:
            while True:
                frame = _recv_frame(peer)
                if frame is None:
                    return
                answer, fds = self._answer(frame)
                _send_frame(peer, answer.SerializeToString(), fds)
        except (OSError, ValueError) as err:
            if not self._closed.is_set():
                log.info("shared-memory socket peer dropped: %s", err)
        finally:
            with self._lock:
                self._peers.discard(peer)
            peer.close()

    def _answer(self, frame: bytes) -> tuple[store_pb2.SocketResponse, list[int]]:
        try:
            return self.handle(store_pb2.SocketRequest.FromString(frame))
        except M2CacheError as err:
            return store_pb2.SocketResponse(error_code=err.code, error=str(err)), []
        except Exception as err:  # the peer gets INTERNAL, the store keeps serving
            log.exception("shared-memory socket request failed")
            return store_pb2.SocketResponse(error_code="INTERNAL", error=f"{type(err).__name__}: {err}"), []

    def close(self) -> None:
        self._closed.set()
        self._sock.close()
        with self._lock:
            for peer in self._peers:
                peer.shutdown(socket.SHUT_RDWR)
        self.path.unlink(missing_ok=True)


class SocketClient:
    """One connection to a store's socket; one request at a time (the caller serialises)."""

    def __init__(self, path: str, timeout_s: float):
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        try:
            self._sock.connect(path)
        except OSError as err:
            self._sock.close()
            raise Unavailable(f"the store's shared-memory socket {path}: {err}") from None

    def request(self, request: store_pb2.SocketRequest, max_fds: int = 0) -> tuple[store_pb2.SocketResponse, list[int]]:
        """The store's answer and the descriptors it passed (at most ``max_fds``; the
        caller's to close), or its typed error; Unavailable when the socket fails."""
        fds: list[int] = []
        try:
            _send_frame(self._sock, request.SerializeToString())
            if max_fds:
                frame, fds = _recv_frame_fds(self._sock, max_fds)
            else:
                frame = _recv_frame(self._sock)
        except (OSError, ValueError) as err:
            _close_all(fds)
            raise Unavailable(f"the store's shared-memory socket {self.path}: {err}") from None
        if frame is None:
            _close_all(fds)
            raise Unavailable(f"the store closed its shared-memory socket {self.path}")
        resp = store_pb2.SocketResponse.FromString(frame)
        if resp.error_code:
            _close_all(fds)
            raise error_for_code(resp.error_code, f"NeuronStore socket {request.WhichOneof('kind')}", resp.error)
        return resp, fds

    def read(self, request: store_pb2.SharedReadRequest) -> store_pb2.SharedReadResponse:
        return self.request(store_pb2.SocketRequest(read=request))[0].read

    def close(self) -> None:
        self._sock.close()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


class SharedReader:
    """A caller's same-host path to one store: a region of ``capacity`` bytes registered
    over gRPC (``rpc``: a grpc_util.Rpc to the NeuronStore), its reads sent on the
    store's socket (over gRPC where the store has none). Thread-safe: one read at a
    time, since every read lands in the one region. Raises FailedPrecondition when
    the store cannot see the region (then stream), OSError when no region can be made."""

    def __init__(self, rpc, capacity: int, timeout_s: float, directory: str = SHM_DIR):
        self.rpc = rpc
        self.timeout_s = timeout_s
        self.region = SharedRegion(capacity, directory)
        self.ref = store_pb2.SharedRegion(name=self.region.name, tag=self.region.tag)
        self.socket: SocketClient | None = None
        self._lock = threading.Lock()
        try:
            self._register()
        except BaseException:
            self.region.close()
            raise

    @property
    def capacity(self) -> int:
        return self.region.capacity

    def _register(self) -> None:
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
        request = store_pb2.SharedReadRequest(batch=batch, region=self.ref, resident_only=resident_only)
        with self._lock:
            if self.region.data is None:
                raise FailedPrecondition(f"shared region {self.region.name} is closed")
            resp = self._read(request)
            return consume(self.region.data[: resp.nbytes], resp)

    def record_file(self, model: str, layer: int, prec: int, want_fd: bool
                    ) -> tuple[store_pb2.RecordFileResponse, int | None]:
        """Where (layer, prec)'s records lie in the model's records file, and with ``want_fd``
        the file's descriptor (the caller's to close). FailedPrecondition where the store has
        no socket or will not share the file."""
        request = store_pb2.RecordFileRequest(model=model, layer=layer, precision=prec, region=self.ref,
                                              want_fd=want_fd)
        with self._lock:
            resp, fds = self._call(request, "record_file", 1 if want_fd else 0)
        fd = fds[0] if fds else None
        _close_all(fds[1:])
        if want_fd and fd is None:
            raise FailedPrecondition(f"the store passed no descriptor for model {model}'s records")
        return resp.record_file, fd

    def _read(self, request):
        return self._call(request, "read")[0].read

    def _call(self, request, kind: str, max_fds: int = 0) -> tuple[store_pb2.SocketResponse, list[int]]:
        for again in (False, True):
            if self.socket is None:  # the store has no socket: reads go over gRPC
                if kind == "read":
                    return store_pb2.SocketResponse(read=self.rpc.unary("ReadNeuronsShared", request)), []
                raise FailedPrecondition("the store has no shared-memory socket: no short-circuit reads")
            try:
                return self.socket.request(store_pb2.SocketRequest(**{kind: request}), max_fds)
            except FailedPrecondition:  # the store dropped its mapping (it keeps a bounded number)
                if again:
                    raise
            except Unavailable:  # the socket broke: the store restarted, or is gone (OpenShared says which)
                if again:
                    raise
                self.socket.close()
                self.socket = None
            self._register()

    def close(self) -> None:
        """Release the region (after a read in flight); later reads are FailedPrecondition."""
        with self._lock:
            if self.region.data is None:
                return
            try:
                self.rpc.stub.ReleaseRegion(self.ref, timeout=2.0)
            except Exception as err:  # the store is gone: it maps nothing of ours any more
                log.debug("ReleaseRegion: %s", err)
            if self.socket is not None:
                self.socket.close()
            self.region.close()
