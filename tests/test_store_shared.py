"""The NeuronStore's same-host path (store/shared.py, store/shared_socket.py): records
read by a real store server straight into the caller's shared-memory region equal
the streamed ones (dense and bitmap stores, over the Unix socket and over gRPC);
a region the store cannot see, another caller's tag, a bad name or a read past the
region are refused with their status codes; the socket serves only registered
regions, a socket-registered one only on its own connection; a corrupt record is
DATA_LOSS naming it; named regions (the fallback) are released; a layer
over 512 MiB arrives through the region; resident-only reads return exactly what
the page cache holds (checked, corrupt records named) and nothing for a bitmap
store; the worker's fetcher reads the page cache first, then the store's device
through the region on the same host, and streams where the store cannot see it."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from m2cache import errors, grpc_util
from m2cache.codec.format import RECORDS_FILE, Precision
from m2cache.store.shared import SharedRegion
from m2cache.store.shared_reader import SharedReader
from m2cache.store.shared_socket import SocketClient
from m2cache.worker.fetcher import TierFetcher
from m2cache_client.pb import common_pb2, store_pb2, store_pb2_grpc
from tiers import DramHandle, StoreHandle, drop_page_cache, flip_record_byte

FULL = Precision.FULL


def _rpc(handle: StoreHandle) -> grpc_util.Rpc:
    return grpc_util.Rpc(handle.channel, store_pb2_grpc.NeuronStoreStub, "NeuronStore",
                         grpc_util.RetryPolicy(deadline_s=30, unavailable_s=1))


def _batch(model, layer, ids=(), prec=FULL, all_neurons=False):
    return common_pb2.NeuronBatchRequest(model=model, layer=layer, neuron_ids=list(ids), precision=int(prec),
                                         all_neurons=all_neurons)


def _copy(data, resp):
    return data.tobytes(), list(resp.crc32c), list(resp.record_lengths), resp.verified


def _mapped(handle: StoreHandle, reader: SharedReader) -> bool:
    """Whether the store still maps ``reader``'s named region: asked on its socket (on a
    connection of its own, as any serves a named region), which reads only into regions
    it maps (and never maps one on its own)."""
    client = SocketClient(str(reader.socket.path), 10.0)
    try:
        client.read(store_pb2.SharedReadRequest(batch=_batch("tiny-llama", 0, [1]), region=reader.ref))
        return True
    except errors.FailedPrecondition:
        return False
    finally:
        client.close()


@pytest.mark.parametrize("socket", [True, False])
def test_shared_reads_equal_the_stored_records(store_root, socket):
    handle = StoreHandle(store_root, shared_socket=socket)
    reader = SharedReader(_rpc(handle), 1 << 20, timeout_s=30)
    try:
        assert (reader.socket is not None) == socket and reader.region.anonymous == socket  # memfd with a socket
        for model in ("tiny-llama", "tiny-opt"):
            store = handle.catalog.get(model)
            for prec in Precision:
                ids = np.sort(np.random.default_rng(int(prec)).choice(store.manifest.d_ffn, 40, replace=False))
                payload, crcs, lengths, verified = reader.read(_batch(model, 1, ids.tolist(), prec), _copy)
                assert payload == store.get_neurons(1, ids, prec) and verified
                assert crcs == store.crc_table(1, prec)[ids].tolist() and lengths == []
    finally:
        reader.close()
        handle.stop()


def test_bitmap_records_arrive_as_stored_with_their_lengths_and_offer_no_resident_reads(tmp_path):
    from checkpoints import make_tiny_checkpoint
    from m2cache.convert.prune import PruneSpec
    from m2cache.convert.writer import convert

    root = tmp_path / "root"
    convert(make_tiny_checkpoint("opt", tmp_path / "hf"), root / "opt-p40", progress=False, prune=PruneSpec(0.4))
    handle = StoreHandle(root)
    reader = SharedReader(_rpc(handle), 1 << 20, timeout_s=30)
    try:
        store = handle.catalog.get("opt-p40")
        payload, crcs, lengths, _ = reader.read(_batch("opt-p40", 2, prec=Precision.INT4, all_neurons=True), _copy)
        want_payload, want_lengths = store.get_records(2, range(store.manifest.d_ffn), Precision.INT4)
        assert payload == want_payload and lengths == want_lengths.tolist()
        assert any(n < store.layout.num_bytes(Precision.INT4) for n in lengths)  # some really are bitmaps
        assert crcs == store.crc_table(2, Precision.INT4).tolist()
        # the page cache holds them as stored, not dense: no resident reads, nothing written
        resp = reader.read(_batch("opt-p40", 0, [1, 2]), lambda data, r: r, resident_only=True)
        assert resp.resident_unsupported and resp.nbytes == 0
    finally:
        reader.close()
        handle.stop()


def test_regions_the_store_cannot_see_or_that_are_not_the_callers_are_refused(store_root, tmp_path):
    elsewhere = tmp_path / "other-shm"
    elsewhere.mkdir()
    handle = StoreHandle(store_root, shared_memory_dir=str(elsewhere))  # as a store on another host
    try:
        with pytest.raises(errors.FailedPrecondition, match="not visible to the store"):
            SharedReader(_rpc(handle), 1 << 20, timeout_s=30)
        region = SharedRegion(1 << 16, str(elsewhere))
        try:
            forged = store_pb2.SharedRegion(name=region.name, tag=bytes(16))
            with pytest.raises(errors.FailedPrecondition, match="tag differs"):
                _rpc(handle).unary("OpenShared", forged)
            mine = store_pb2.SharedRegion(name=region.name, tag=region.tag)
            assert _rpc(handle).unary("OpenShared", mine).capacity == 1 << 16
            big = store_pb2.SharedReadRequest(batch=_batch("tiny-llama", 0, prec=FULL, all_neurons=True), region=mine)
            with pytest.raises(errors.InvalidArgument, match="do not fit shared region"):
                _rpc(handle).unary("ReadNeuronsShared", big)
            for name in ("../etc/passwd", "m2cache-xyz", "m2cache-" + "0" * 31):
                with pytest.raises(errors.InvalidArgument, match="not a shared region name"):
                    _rpc(handle).unary("OpenShared", store_pb2.SharedRegion(name=name, tag=region.tag))
        finally:
            region.close()
    finally:
        handle.stop()


def test_the_socket_serves_only_registered_regions_and_goes_with_the_store(store_root):
    handle = StoreHandle(store_root)
    reader = SharedReader(_rpc(handle), 1 << 16, timeout_s=30)
    stranger = SharedRegion(1 << 16)
    try:
        path = reader.socket.path
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        client = SocketClient(path, 10.0)
        try:
            unregistered = store_pb2.SharedReadRequest(batch=_batch("tiny-llama", 0, [1, 2]),
                                                       region=store_pb2.SharedRegion(name=stranger.name,
                                                                                     tag=stranger.tag))
            with pytest.raises(errors.FailedPrecondition, match="not registered"):
                client.read(unregistered)
            with pytest.raises(errors.NotFound, match="unknown model"):
                client.read(store_pb2.SharedReadRequest(batch=_batch("nope", 0, [1]), region=reader.ref))
            with pytest.raises(errors.InvalidArgument, match="out of range"):
                client.read(store_pb2.SharedReadRequest(batch=_batch("tiny-llama", 99, [1]), region=reader.ref))
            mine = store_pb2.SharedReadRequest(batch=_batch("tiny-llama", 0, [1, 2]), region=reader.ref)
            with pytest.raises(errors.FailedPrecondition, match="not registered on this connection"):
                client.read(mine)  # the region was registered on the reader's connection
            assert reader.socket.read(mine).nbytes > 0
        finally:
            client.close()
    finally:
        reader.close()
        stranger.close()
        handle.stop()
    assert not os.path.exists(path)  # removed with the store


def _named(handle: StoreHandle) -> SharedReader:
    """A reader with a named region (the fallback where there is no memfd_create)."""
    return SharedReader(_rpc(handle), 1 << 16, timeout_s=30, anonymous=False)


def test_named_regions_are_released_and_a_dead_callers_region_is_dropped(store_root):
    handle = StoreHandle(store_root, max_regions=4)
    try:
        first = _named(handle)
        keep = _named(handle)
        assert not first.region.anonymous and first.region.path.exists()
        assert _mapped(handle, first) and _mapped(handle, keep)
        socket_path = first.socket.path
        first.close()  # released: unmapped, and its file gone
        first.socket = SocketClient(str(socket_path), 10.0)
        assert not _mapped(handle, first) and not first.region.path.exists()
        keep.region.path.unlink()  # a caller that died without a release
        newer = _named(handle)  # the next registration sweeps it
        assert not _mapped(handle, keep) and _mapped(handle, newer)
        live = [_named(handle) for _ in range(5)]  # over max_regions
        assert not _mapped(handle, newer)  # the least recently used went
        for r in [newer] + live:  # an evicted region registers again at its next read
            payload, *_ = r.read(_batch("tiny-llama", 1, [7, 8]), _copy)
            assert payload == handle.catalog.get("tiny-llama").get_neurons(1, [7, 8], FULL)
        for r in [newer, keep] + live:
            r.close()
        first.socket.close()
    finally:
        handle.stop()


def test_a_corrupt_record_is_data_loss_naming_it(store_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(store_root / "tiny-llama", root / "tiny-llama")
    flip_record_byte(root / "tiny-llama", 0, Precision.INT8, 17)
    handle = StoreHandle(root)
    shared = SharedReader(_rpc(handle), 1 << 20, timeout_s=30)
    try:
        for ids in (range(10, 30), [5, 17, 40]):
            with pytest.raises(errors.ChecksumError, match="layer 0 neuron 17 INT8 fails its checksum"):
                shared.read(_batch("tiny-llama", 0, list(ids), Precision.INT8), _copy)
        assert shared.read(_batch("tiny-llama", 0, [16, 18], Precision.INT8), _copy)[0]
    finally:
        shared.close()
        handle.stop()


def test_a_layer_over_512_mib_arrives_through_the_region(tmp_path):
    from test_store_stream import _big_store

    num, d_model = 2800, 32768  # 2800 x 192 KiB = 550 MB in one layer at one precision
    rb = _big_store(tmp_path / "root" / "big", num, d_model)
    assert num * rb > 512 << 20
    handle = StoreHandle(tmp_path / "root")
    reader = SharedReader(_rpc(handle), 8 << 20, timeout_s=60)
    try:
        step, reads, seen = reader.capacity // rb, 0, []
        for lo in range(0, num, step):
            ids = list(range(lo, min(lo + step, num)))
            stamps = reader.read(_batch("big", 0, ids), lambda data, resp: data.reshape(-1, rb)[:, :8].copy())
            seen.append(stamps.view(np.int64).ravel())
            reads += 1
        assert np.array_equal(np.concatenate(seen), np.arange(num)) and reads > 60
    finally:
        reader.close()
        handle.stop()


def _resident(reader: SharedReader, model: str, layer: int, ids, prec=FULL):
    """(absent rows, the region's rows, verified) of a resident-only read of ``ids``."""
    def take(data, resp):
        assert not resp.resident_unsupported and resp.nbytes == data.size
        return np.asarray(resp.absent, np.int64), data.reshape(len(ids), -1).copy(), resp.verified
    return reader.read(_batch(model, layer, list(ids), prec), take, resident_only=True)


def test_resident_reads_return_what_the_page_cache_holds(store_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(store_root / "tiny-llama", root / "tiny-llama")
    handle = StoreHandle(root)
    reader = SharedReader(_rpc(handle), 1 << 20, timeout_s=30)
    try:
        store = handle.catalog.get("tiny-llama")
        rb = store.layout.num_bytes(Precision.INT8)
        ids = np.arange(0, store.manifest.d_ffn, 2)
        want = np.frombuffer(store.get_neurons(1, ids, Precision.INT8), np.uint8).reshape(ids.size, rb)
        dropped = drop_page_cache(root / "tiny-llama" / RECORDS_FILE)
        absent, rows, verified = _resident(reader, "tiny-llama", 1, ids, Precision.INT8)
        here = np.setdiff1d(np.arange(ids.size), absent)
        assert verified and np.array_equal(rows[here], want[here])
        if dropped:  # nothing was read from the device
            assert absent.size == ids.size
        store.read_into(1, Precision.INT8, ids[:20], np.empty((20, rb), np.uint8))  # now in the page cache
        absent, rows, _ = _resident(reader, "tiny-llama", 1, ids, Precision.INT8)
        assert not np.isin(np.arange(20), absent).any()
        here = np.setdiff1d(np.arange(ids.size), absent)
        assert np.array_equal(rows[here], want[here])
        flip_record_byte(root / "tiny-llama", 1, Precision.INT8, int(ids[3]))  # the written page is cached
        with pytest.raises(errors.ChecksumError, match=f"layer 1 neuron {int(ids[3])} INT8 fails its checksum"):
            _resident(reader, "tiny-llama", 1, ids[:10], Precision.INT8)
    finally:
        reader.close()
        handle.stop()


@pytest.mark.parametrize("where", ["page cache, here", "page cache, by the store", "file, here", "device, by the store",
                                   "another host"])
def test_the_fetcher_reads_the_nearest_copy_on_the_same_host(store_root, redis_proc, tmp_path, where):
    """With the store on this host the fetcher takes what its page cache holds (no Redis,
    no device): read here from the store's records file (short-circuit, its descriptor
    passed; no round trip) or by the store into the region. With page-cache reads off
    the rest of the file is read the same two ways. With the store's shared-memory
    directory elsewhere (another host) the misses stream. Redis holds nothing (budget
    0). The records agree every way."""
    store = StoreHandle(store_root, **({"shared_memory_dir": str(tmp_path)} if where == "another host" else {}))
    dram = DramHandle(store.target, redis_proc.url, budget_bytes=0, num_pinned_layers=0, preload="used")
    fetcher = TierFetcher(dram.channel, "tinystories-656k", "w-shared", shared_memory_bytes=64 << 10,
                          page_cache_first=where.startswith("page cache"), short_circuit=where.endswith("here"))
    try:
        manifest, _ = fetcher.manifest()
        ids = torch.arange(0, manifest.d_ffn, 3)
        want = {}
        for prec in Precision:
            want[prec] = np.empty((ids.numel(), manifest.layout.num_bytes(prec)), np.uint8)
            store.catalog.get("tinystories-656k").read_into(1, prec, ids.numpy(), want[prec])  # pages now cached
        for prec in Precision:
            assert np.array_equal(fetcher.neurons(1, prec, ids, 1).numpy(), want[prec])
        s, n = fetcher.stats, 3 * ids.numel()
        cached = s.page_cache_records if where.startswith("page cache") else s.store_records
        assert cached == n and s.page_cache_records + s.store_records == n
        if where.endswith("here"):  # no round trip at all
            assert s.local_records == n and s.shared_reads == 0
        elif where.endswith("by the store"):  # FULL records alone are more than one 64 KiB region: several reads
            assert s.local_records == 0 and s.shared_reads > len(Precision)
        else:
            assert s.shared_reads == 0 and s.local_records == 0
        assert s.redis_records == 0 and s.bytes == sum(w.nbytes for w in want.values())
    finally:
        fetcher.close()
        dram.stop()
        store.stop()
