"""The same-host doorbell of the NeuronStore's shared-memory path.

A gRPC call costs 0.5-1 ms here (Python gRPC on loopback), more than reading a
megabyte of records from the page cache, so a same-host caller sends its requests
over the store's Unix socket instead: each request and answer is one frame, a
4-byte little-endian length and a SocketRequest / SocketResponse, about 20 us a
round trip. Three kinds:
- ``register``: the caller's anonymous region (a sealed memfd, store/shared.py),
  its descriptor attached (SCM_RIGHTS), presenting the token the caller got over
  the authenticated gRPC channel (SharedSocket). The store maps it for this
  connection alone, and unmaps it when the connection closes (EOF or error), as it
  does when a caller is killed: nothing of a caller outlives it;
- ``read``: records read by the store into the caller's region (SharedReadRequest);
- ``record_file``: where a layer's records lie and their CRCs, with the records
  file's descriptor attached, so the caller reads them itself (short-circuit
  reads, as HDFS's DataNode hands its block files to local clients).
A failed request's ``error_code`` is a gRPC status name, mapped back to the typed
errors of errors.py as a gRPC status would be. The server accepts only peers of
its own uid, and serves a region, with its tag, only on the connection that
registered it (or any connection for a named region registered over gRPC, the
fallback: OpenShared); like the region itself, this exists only on one host
(Plasma's design: a Unix socket for control, shared memory for the bytes). A
caller looks for the socket the store names in its own shared-memory directory,
so it finds it only where the two share that directory (/dev/shm).
"""
from __future__ import annotations

import itertools
import logging
import os
import secrets
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from m2cache.errors import M2CacheError, Unavailable
from m2cache.grpc_util import error_for_code
from m2cache.store.shared import SharedRegion
from m2cache_client.pb import store_pb2

log = logging.getLogger(__name__)
_LEN = struct.Struct("<I")
MAX_FRAME = 64 << 20  # a request names at most 65,536 ids (about 0.4 MB); an answer carries their CRCs
MAX_PASSED_FDS = 1  # descriptors a request may carry (RegisterRegion's); the kernel drops any more


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
    """A frame and the descriptors sent with it (each made close-on-exec; closed here
    if the frame fails)."""
    head, fds, _flags, _addr = socket.recv_fds(sock, _LEN.size, max_fds)
    try:
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
    except BaseException:
        close_fds(fds)
        raise


@dataclass(frozen=True, slots=True)
class Peer:
    """One connection to the socket: what it registers is its alone, and goes with it."""

    pid: int     # the peer's process (SO_PEERCRED), for the logs
    serial: int  # this server's count of connections: two connections are never equal


# (request, the descriptors that came with it, its connection) -> (answer, descriptors to pass)
Handler = Callable[[store_pb2.SocketRequest, list[int], Peer], tuple[store_pb2.SocketResponse, list[int]]]


class SocketServer:
    """Serves SocketRequests on a Unix socket in ``directory``, one thread per peer;
    ``handle`` answers one with the descriptors to pass along (the handler's own: they
    are duplicated into the peer, not closed here); the descriptors a request brought
    are closed once it is answered. ``on_close(peer)`` once a connection has ended.
    ``token``: what a registration presents (given out over gRPC)."""

    def __init__(self, directory: str, handle: Handler, on_close: Callable[[Peer], object] = lambda peer: None):
        _sweep_dead_sockets(Path(directory))
        self.path = Path(directory) / f"m2cache-store-{os.getpid()}-{secrets.token_hex(8)}.sock"
        self.handle = handle
        self.on_close = on_close
        self.token = secrets.token_bytes(16)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket file 0600: only this uid connects
        try:
            self._sock.bind(str(self.path))
        finally:
            os.umask(old)
        self._sock.listen(64)
        self._closed = threading.Event()
        self._peers: set[socket.socket] = set()
        self._serials = itertools.count()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="shared-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if uid != os.getuid():
                log.warning("shared-memory socket: refused a peer of uid %d", uid)
                conn.close()
                continue
            with self._lock:
                self._peers.add(conn)
            peer = Peer(pid, next(self._serials))
            threading.Thread(target=self._serve, args=(conn, peer), name="shared-peer", daemon=True).start()

    def _serve(self, conn: socket.socket, peer: Peer) -> None:
        try:
            while True:
                frame, fds = _recv_frame_fds(conn, MAX_PASSED_FDS)  # one recvmsg for the head, as recv was
                try:
                    if frame is None:
                        return
                    answer, out_fds = self._answer(frame, fds, peer)
                finally:
                    close_fds(fds)
                _send_frame(conn, answer.SerializeToString(), out_fds)
        except (OSError, ValueError) as err:
            if not self._closed.is_set():
                log.info("shared-memory socket peer %d dropped: %s", peer.pid, err)
        finally:
            with self._lock:
                self._peers.discard(conn)
            conn.close()
            self.on_close(peer)

    def _answer(self, frame: bytes, fds: list[int], peer: Peer) -> tuple[store_pb2.SocketResponse, list[int]]:
        try:
            return self.handle(store_pb2.SocketRequest.FromString(frame), fds, peer)
        except M2CacheError as err:
            return store_pb2.SocketResponse(error_code=err.code, error=str(err)), []
        except Exception as err:  # the peer gets INTERNAL, the store keeps serving
            log.exception("shared-memory socket request failed")
            return store_pb2.SocketResponse(error_code="INTERNAL", error=f"{type(err).__name__}: {err}"), []

    def close(self) -> None:
        self._closed.set()
        self._sock.close()
        with self._lock:
            for conn in self._peers:
                conn.shutdown(socket.SHUT_RDWR)
        self.path.unlink(missing_ok=True)


def _sweep_dead_sockets(directory: Path) -> None:
    """Unlink this uid's store sockets whose store process is gone (killed before it could)."""
    for path in directory.glob("m2cache-store-*-*.sock"):
        try:
            pid = int(path.name.split("-")[2])
            if path.lstat().st_uid != os.getuid():
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            log.info("removed %s: its store (pid %d) is gone", path, pid)
        except (ValueError, OSError):
            continue


class SocketClient:
    """One connection to a store's socket; one request at a time (the caller serialises)."""

    def __init__(self, path: str, timeout_s: float):
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        try:
            self._sock.connect(str(path))
        except OSError as err:
            self._sock.close()
            raise Unavailable(f"the store's shared-memory socket {path}: {err}") from None

    def request(self, request: store_pb2.SocketRequest, max_fds: int = 0, fds: list[int] = ()
                ) -> tuple[store_pb2.SocketResponse, list[int]]:
        """The store's answer and the descriptors it passed (at most ``max_fds``; the
        caller's to close), or its typed error; Unavailable when the socket fails.
        ``fds``: descriptors passed with the request (still the caller's)."""
        got: list[int] = []
        try:
            _send_frame(self._sock, request.SerializeToString(), fds)
            if max_fds:
                frame, got = _recv_frame_fds(self._sock, max_fds)
            else:
                frame = _recv_frame(self._sock)
        except (OSError, ValueError) as err:
            close_fds(got)
            raise Unavailable(f"the store's shared-memory socket {self.path}: {err}") from None
        if frame is None:
            close_fds(got)
            raise Unavailable(f"the store closed its shared-memory socket {self.path}")
        resp = store_pb2.SocketResponse.FromString(frame)
        if resp.error_code:
            close_fds(got)
            raise error_for_code(resp.error_code, f"NeuronStore socket {request.WhichOneof('kind')}", resp.error)
        return resp, got

    def read(self, request: store_pb2.SharedReadRequest) -> store_pb2.SharedReadResponse:
        return self.request(store_pb2.SocketRequest(read=request))[0].read

    def register(self, region: SharedRegion, token: bytes) -> store_pb2.RegionRegistered:
        """Pass the anonymous ``region``'s memfd to the store: its name there, for this connection."""
        request = store_pb2.RegisterRegion(capacity=region.capacity, tag=region.tag, token=token)
        return self.request(store_pb2.SocketRequest(register=request), fds=[region.fd])[0].registered

    def close(self) -> None:
        self._sock.close()


def close_fds(fds: list[int]) -> None:
    """Close descriptors passed over the socket (the receiver's to close)."""
    for fd in fds:
        os.close(fd)
