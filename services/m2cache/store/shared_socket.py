"""The same-host doorbell of the NeuronStore's shared-memory path.

A gRPC call costs 0.5-1 ms here (Python gRPC on loopback), more than reading a
megabyte of records from the page cache, so a caller that registered a region
(OpenShared, over the authenticated gRPC channel) sends its reads over a Unix
socket instead: each request and answer is one frame, a 4-byte little-endian
length and a SharedReadRequest / SharedReadResponse, about 20 us a round trip.
The answer's ``error_code`` is a gRPC status name on failure, mapped back to the
typed errors of errors.py as a gRPC status would be. The server accepts only
peers of its own uid, and reads only into regions registered over gRPC, with
their tag; like the region itself, this exists only on one host (Plasma's
design: a Unix socket for control, shared memory for the bytes).
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


def _send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_LEN.pack(len(payload)) + payload)


class SocketServer:
    """Serves SharedReadRequests on a Unix socket in ``directory``, one thread per peer."""

    def __init__(self, directory: str, handle: Callable[[store_pb2.SharedReadRequest], store_pb2.SharedReadResponse]):
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
                _send_frame(peer, self._answer(frame).SerializeToString())
        except (OSError, ValueError) as err:
            if not self._closed.is_set():
                log.info("shared-memory socket peer dropped: %s", err)
        finally:
            with self._lock:
                self._peers.discard(peer)
            peer.close()

    def _answer(self, frame: bytes) -> store_pb2.SharedReadResponse:
        try:
            return self.handle(store_pb2.SharedReadRequest.FromString(frame))
        except M2CacheError as err:
            return store_pb2.SharedReadResponse(error_code=err.code, error=str(err))
        except Exception as err:  # the peer gets INTERNAL, the store keeps serving
            log.exception("shared-memory read failed")
            return store_pb2.SharedReadResponse(error_code="INTERNAL", error=f"{type(err).__name__}: {err}")

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

    def read(self, request: store_pb2.SharedReadRequest) -> store_pb2.SharedReadResponse:
        """The store's answer, or its typed error; Unavailable when the socket fails."""
        try:
            _send_frame(self._sock, request.SerializeToString())
            frame = _recv_frame(self._sock)
        except (OSError, ValueError) as err:
            raise Unavailable(f"the store's shared-memory socket {self.path}: {err}") from None
        if frame is None:
            raise Unavailable(f"the store closed its shared-memory socket {self.path}")
        resp = store_pb2.SharedReadResponse.FromString(frame)
        if resp.error_code:
            raise error_for_code(resp.error_code, "NeuronStore shared read", resp.error)
        return resp

    def close(self) -> None:
        self._sock.close()


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

    def _read(self, request):
        for again in (False, True):
            if self.socket is None:  # the store has no socket
                return self.rpc.unary("ReadNeuronsShared", request)
            try:
                return self.socket.read(request)
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
