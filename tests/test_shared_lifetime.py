"""Nothing of a same-host caller outlives it (store/shared.py, store/shared_socket.py), on
a real store server: a caller's region is a sealed memfd registered on the store's Unix
socket, never a name in /dev/shm; a caller killed with SIGKILL leaves no file there and,
once the kernel has closed its connection, no mapping in the store. A region registered
on one connection is served on that connection alone (reads, short-circuit proof, not
over gRPC either); a registration needs the token given over gRPC, one descriptor of a
memfd sealed against shrinking, holding the region's magic and tag; registering again
keeps the name, an evicted region registers again at its next read, and a closed
reader's region is unmapped."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from m2cache import errors, grpc_util
from m2cache.codec.format import Precision
from m2cache.store.shared import HEADER_BYTES, MAGIC, SharedRegion
from m2cache.store.shared_reader import SharedReader
from m2cache.store.shared_socket import SocketClient, SocketServer
from m2cache_client.pb import common_pb2, store_pb2, store_pb2_grpc
from tiers import StoreHandle, wait_for

MODEL = "tinystories-656k"
IDS = [3, 5, 8]
# A worker's same-host path, in a process of its own: registers a region, reads IDS of
# layer 1 into it, says what it read, and waits to be killed.
CALLER = """
import json, sys, time
from m2cache import grpc_util
from m2cache.codec.format import Precision
from m2cache.store.shared_reader import SharedReader
from m2cache_client.pb import common_pb2, store_pb2_grpc

target, model, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
rpc = grpc_util.Rpc(grpc_util.channel(target), store_pb2_grpc.NeuronStoreStub, "NeuronStore",
                    grpc_util.RetryPolicy(deadline_s=30, unavailable_s=1))
reader = SharedReader(rpc, 1 << 20, timeout_s=30)
batch = common_pb2.NeuronBatchRequest(model=model, layer=1, neuron_ids=ids, precision=int(Precision.FULL))
payload = reader.read(batch, lambda data, resp: data.tobytes())
print(json.dumps({"anonymous": reader.region.anonymous, "payload": payload.hex()}), flush=True)
time.sleep(600)
"""


@pytest.fixture
def make_store(store_root):
    """Factory of real store servers over the session's stores; each stopped at teardown."""
    handles: list[StoreHandle] = []

    def make(**overrides) -> StoreHandle:
        handles.append(StoreHandle(store_root, **overrides))
        return handles[-1]

    yield make
    for handle in handles:
        handle.stop()


def _reader(handle: StoreHandle, capacity: int = 1 << 16) -> SharedReader:
    rpc = grpc_util.Rpc(handle.channel, store_pb2_grpc.NeuronStoreStub, "NeuronStore",
                        grpc_util.RetryPolicy(deadline_s=30, unavailable_s=1))
    return SharedReader(rpc, capacity, timeout_s=30)


def _read(ref: store_pb2.SharedRegion, ids=IDS) -> store_pb2.SharedReadRequest:
    batch = common_pb2.NeuronBatchRequest(model=MODEL, layer=1, neuron_ids=list(ids), precision=int(Precision.FULL))
    return store_pb2.SharedReadRequest(batch=batch, region=ref)


def _region_files(pid: int) -> tuple[set[str], set[int]]:
    """The /dev/shm files process ``pid`` maps or holds open, and the inodes of its memfds."""
    links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    with open(f"/proc/{pid}/maps") as maps:
        mapped = [line.split(maxsplit=5) for line in maps]
    paths = [m[5].strip() for m in mapped if len(m) == 6] + links
    memfds = {int(m[4]) for m in mapped if len(m) == 6 and m[5].startswith("/memfd:m2cache-region")}
    return {p for p in paths if p.startswith("/dev/shm/")}, memfds


def _store_maps(inodes: set[int]) -> bool:
    """Whether this process (the store's) still maps a memfd of one of ``inodes``."""
    with open("/proc/self/maps") as maps:
        fields = [line.split(maxsplit=5) for line in maps]
    return any(len(f) == 6 and f[5].startswith("/memfd:") and int(f[4]) in inodes for f in fields)


def _start_caller(handle: StoreHandle, log_path: Path) -> tuple[subprocess.Popen, dict]:
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-c", CALLER, handle.target, MODEL, json.dumps(IDS)],
                            stdout=subprocess.PIPE, stderr=log, text=True)
    log.close()
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    line = proc.stdout.readline() if ready else ""
    assert line, f"the caller said nothing: {log_path.read_text()}"
    return proc, json.loads(line)


def test_a_killed_callers_region_leaves_nothing_behind(make_store, tmp_path):
    handle = make_store()
    proc = None
    try:
        proc, said = _start_caller(handle, tmp_path / "caller.log")
        want = handle.catalog.get(MODEL).get_neurons(1, IDS, Precision.FULL)
        assert bytes.fromhex(said["payload"]) == want and said["anonymous"]
        files, memfds = _region_files(proc.pid)
        assert memfds and not files  # its region is a memfd: nothing named in /dev/shm, so nothing left there
        assert handle.regions_mapped() == 1 and _store_maps(memfds)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
        wait_for(lambda: handle.regions_mapped() == 0 and not _store_maps(memfds), 5.0,
                 "the store to unmap the killed caller's region")
    finally:
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc is not None:
            proc.stdout.close()


def test_a_socket_region_is_its_connections_alone(make_store):
    handle = make_store()
    reader = _reader(handle)
    try:
        client = SocketClient(str(reader.socket.path), 10.0)
        assert reader.region.anonymous and reader.region.path is None and handle.regions_mapped() == 1
        assert reader.socket.read(_read(reader.ref)).nbytes > 0
        with pytest.raises(errors.FailedPrecondition, match="not registered on this connection"):
            client.read(_read(reader.ref))
        with pytest.raises(errors.FailedPrecondition, match="not registered on this connection"):
            client.request(store_pb2.SocketRequest(record_file=store_pb2.RecordFileRequest(
                model=MODEL, layer=0, precision=int(Precision.FULL), region=reader.ref, want_fd=True)), max_fds=1)
        with pytest.raises(errors.FailedPrecondition, match="not registered on this connection"):
            reader.rpc.unary("ReadNeuronsShared", _read(reader.ref))
        handle.stub.ReleaseRegion(reader.ref, timeout=10)  # only a named region is released over gRPC
        assert handle.regions_mapped() == 1 and reader.socket.read(_read(reader.ref)).nbytes > 0
        token = handle.stub.SharedSocket(store_pb2.SharedSocketRequest(), timeout=10).token
        assert reader.socket.register(reader.region, token).region == reader.ref  # registered already
        with pytest.raises(errors.FailedPrecondition, match="token"):
            reader.socket.register(reader.region, bytes(16))
        assert handle.regions_mapped() == 1
        client.close()
    finally:
        reader.close()
    wait_for(lambda: handle.regions_mapped() == 0, 5.0, "the closed reader's region to be unmapped")


def _register_fd(client: SocketClient, fd_list: list[int], capacity: int, tag: bytes, token: bytes):
    request = store_pb2.RegisterRegion(capacity=capacity, tag=tag, token=token)
    return client.request(store_pb2.SocketRequest(register=request), fds=fd_list)


def test_only_a_sealed_memfd_holding_its_tag_registers(make_store, tmp_path):
    handle = make_store()
    info = handle.stub.SharedSocket(store_pb2.SharedSocketRequest(), timeout=10)
    client = SocketClient(info.socket_path, 10.0)
    region = SharedRegion(4096, anonymous=True)
    named = SharedRegion(4096, str(tmp_path))
    unsealed = os.memfd_create("m2cache-region", os.MFD_CLOEXEC)
    try:
        os.ftruncate(unsealed, HEADER_BYTES + 4096)
        os.pwrite(unsealed, MAGIC + region.tag, 0)
        with pytest.raises(errors.InvalidArgument, match="the region's descriptor, and only it"):
            _register_fd(client, [], 4096, region.tag, info.token)
        with pytest.raises(errors.InvalidArgument, match="sealed against shrinking"):  # it could shrink under a write
            _register_fd(client, [unsealed], 4096, region.tag, info.token)
        named_fd = os.open(named.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            with pytest.raises(errors.InvalidArgument, match="sealed against shrinking"):  # a file takes no seals
                _register_fd(client, [named_fd], 4096, named.tag, info.token)
        finally:
            os.close(named_fd)
        with pytest.raises(errors.InvalidArgument, match="magic and tag"):
            _register_fd(client, [region.fd], 4096, bytes(16), info.token)
        with pytest.raises(errors.InvalidArgument, match="no region of 8192 data bytes"):
            _register_fd(client, [region.fd], 8192, region.tag, info.token)
        assert handle.regions_mapped() == 0
        resp, _ = _register_fd(client, [region.fd], 4096, region.tag, info.token)
        assert resp.registered.capacity == 4096 and handle.regions_mapped() == 1
    finally:
        os.close(unsealed)
        named.close()
        region.close()
        client.close()
    wait_for(lambda: handle.regions_mapped() == 0, 5.0, "the connection's region to be unmapped")


def test_an_evicted_socket_region_registers_again_at_its_next_read(make_store):
    handle = make_store(max_regions=2)
    readers: list[SharedReader] = []
    try:
        for _ in range(3):  # the first one's mapping went to make room for the third
            readers.append(_reader(handle))
        first = readers[0].ref.name
        assert handle.regions_mapped() == 2
        with pytest.raises(errors.FailedPrecondition, match="not registered"):
            readers[0].socket.read(_read(readers[0].ref))
        want = handle.catalog.get(MODEL).get_neurons(1, IDS, Precision.FULL)
        for reader in readers:
            assert reader.read(_read(reader.ref).batch, lambda data, resp: data.tobytes()) == want
        assert readers[0].ref.name != first and handle.regions_mapped() == 2
    finally:
        for reader in readers:
            reader.close()
    wait_for(lambda: handle.regions_mapped() == 0, 5.0, "the closed readers' regions to be unmapped")


def test_a_new_store_removes_the_sockets_of_stores_that_were_killed(tmp_path):
    """A store killed with SIGKILL cannot unlink its socket; the next one on the host does."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"m2cache-store-{int(gone.stdout)}-00000000deadbeef.sock"
    alive = tmp_path / f"m2cache-store-{os.getpid()}-00000000cafef00d.sock"
    other = tmp_path / "m2cache-store-notapid-x.sock"
    for path in (dead, alive, other):
        path.touch()
    server = SocketServer(str(tmp_path), lambda request, fds, peer: None)
    try:
        assert not dead.exists() and alive.exists() and other.exists() and server.path.exists()
    finally:
        server.close()
    assert not server.path.exists()
