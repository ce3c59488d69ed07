"""Short-circuit reads (worker/short_circuit.py, RecordFileRequest on the store's socket),
on a real store server on loopback: the store passes its records file's descriptor
(read-only, close-on-exec) with where each layer's records lie and their CRCs; it
refuses callers without a registered region, bitmap stores and a store with sharing
off (the fetcher then reads through the region); the fetcher reads cold records from
the file itself and names a corrupt one as DATA_LOSS; and with the store stopped it
goes on reading what the page cache holds."""
from __future__ import annotations

import errno
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
from m2cache_client.pb import store_pb2, store_pb2_grpc
from tiers import DramHandle, StoreHandle, drop_page_cache, flip_record_byte

MODEL = "tinystories-656k"


def _reader(handle: StoreHandle) -> SharedReader:
    rpc = grpc_util.Rpc(handle.channel, store_pb2_grpc.NeuronStoreStub, "NeuronStore",
                        grpc_util.RetryPolicy(deadline_s=30, unavailable_s=1))
    return SharedReader(rpc, 1 << 20, timeout_s=30)


def _fetcher(dram: DramHandle, **kw) -> TierFetcher:
    return TierFetcher(dram.channel, MODEL, "w-short", shared_memory_bytes=64 << 10, unavailable_s=1.0, **kw)


def test_the_store_passes_its_records_file_and_where_each_layer_lies(store_root):
    handle = StoreHandle(store_root)
    reader = _reader(handle)
    fd = None
    try:
        store = handle.catalog.get(MODEL)
        resp, fd = reader.record_file(MODEL, 1, int(Precision.INT8), want_fd=True)
        rb = store.layout.num_bytes(Precision.INT8)
        assert resp.fd_attached and resp.record_bytes == rb
        assert resp.file_bytes == store.manifest.records_file_bytes == os.fstat(fd).st_size
        assert np.array_equal(np.frombuffer(resp.crc32c, "<u4"), store.crc_table(1, Precision.INT8))
        for nid in (0, 7, store.manifest.d_ffn - 1):
            got = os.pread(fd, rb, resp.segment_offset + nid * rb)
            assert got == store.get_neurons(1, [nid], Precision.INT8)
        assert not os.get_inheritable(fd)
        with pytest.raises(OSError) as err:  # read-only: the caller cannot change the store's records
            os.write(fd, b"x")
        assert err.value.errno == errno.EBADF
        again, no_fd = reader.record_file(MODEL, 0, int(Precision.FULL), want_fd=False)
        assert no_fd is None and not again.fd_attached and again.segment_offset != resp.segment_offset
        with pytest.raises(errors.InvalidArgument, match="layer 9 out of range"):
            reader.record_file(MODEL, 9, int(Precision.FULL), want_fd=False)
    finally:
        if fd is not None:
            os.close(fd)
        reader.close()
        handle.stop()


def test_record_files_are_refused_where_they_cannot_be_shared(store_root, redis_proc, tmp_path):
    from checkpoints import make_tiny_checkpoint
    from m2cache.convert.prune import PruneSpec
    from m2cache.convert.writer import convert

    root = tmp_path / "root"
    shutil.copytree(store_root / MODEL, root / MODEL)
    convert(make_tiny_checkpoint("opt", tmp_path / "hf"), root / "opt-p40", progress=False, prune=PruneSpec(0.4))
    handle = StoreHandle(root)
    reader = _reader(handle)
    stranger = SharedRegion(4096)  # made, never registered with the store
    client = SocketClient(str(reader.socket.path), 10.0)
    try:
        with pytest.raises(errors.FailedPrecondition, match="not registered"):
            client.request(store_pb2.SocketRequest(record_file=store_pb2.RecordFileRequest(
                model=MODEL, layer=0, precision=0, want_fd=True,
                region=store_pb2.SharedRegion(name=stranger.name, tag=stranger.tag))), max_fds=1)
        with pytest.raises(errors.FailedPrecondition, match="bitmap-coded"):
            reader.record_file("opt-p40", 0, 0, want_fd=True)
        with pytest.raises(errors.NotFound):
            reader.record_file("no-such-model", 0, 0, want_fd=True)
    finally:
        client.close()
        stranger.close()
        reader.close()
        handle.stop()
    handle = StoreHandle(root, share_record_files=False)  # off: the store reads each batch into the region
    dram = DramHandle(handle.target, redis_proc.url, budget_bytes=0, num_pinned_layers=0, preload="used")
    fetcher = _fetcher(dram)
    try:
        manifest, _ = fetcher.manifest()
        ids = torch.arange(0, manifest.d_ffn, 2)
        want = handle.catalog.get(MODEL).get_neurons(0, ids.numpy(), Precision.FULL)
        assert fetcher.neurons(0, Precision.FULL, ids, 0).numpy().tobytes() == want
        assert fetcher._shared.local is None and fetcher.stats.local_records == 0 and fetcher.stats.shared_reads > 0
    finally:
        fetcher.close()
        dram.stop()
        handle.stop()


def test_the_fetcher_reads_cold_records_itself_and_names_a_corrupt_one(store_root, redis_proc, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(store_root / MODEL, root / MODEL)
    handle = StoreHandle(root)
    dram = DramHandle(handle.target, redis_proc.url, budget_bytes=0, num_pinned_layers=0, preload="used")
    fetcher = _fetcher(dram)
    try:
        manifest, _ = fetcher.manifest()
        store = handle.catalog.get(MODEL)
        ids = torch.arange(1, manifest.d_ffn, 3)
        want = {p: store.get_neurons(1, ids.numpy(), p) for p in Precision}
        cold = drop_page_cache(root / MODEL / RECORDS_FILE)
        for prec in Precision:
            assert fetcher.neurons(1, prec, ids, 1).numpy().tobytes() == want[prec]
        s, n = fetcher.stats, len(Precision) * ids.numel()
        assert s.local_records == n and s.shared_reads == 0 and s.redis_records == 0
        if cold:  # the page cache was dropped: records came from the device, read here (under the full
            #       suite's load a precision's pages were once back in the cache before its fetch: counted so)
            assert s.store_records > 0 and s.page_cache_records + s.store_records == n
        bad = int(ids[4])
        flip_record_byte(root / MODEL, 1, Precision.INT4, bad)
        for _ in range(2):  # the page cache's copy (just written) and, dropped, the device's
            with pytest.raises(errors.ChecksumError, match=f"layer 1 neuron {bad} INT4 fails its checksum") as err:
                fetcher.neurons(1, Precision.INT4, ids, 1)
            assert err.value.code == "DATA_LOSS"
            drop_page_cache(root / MODEL / RECORDS_FILE)
        assert s.retries == 0
    finally:
        fetcher.close()
        dram.stop()
        handle.stop()


def test_with_the_store_stopped_the_page_cache_is_still_read(store_root, redis_proc):
    handle = StoreHandle(store_root)
    dram = DramHandle(handle.target, redis_proc.url, budget_bytes=0, num_pinned_layers=0, preload="used")
    fetcher = _fetcher(dram)
    running = True
    try:
        manifest, _ = fetcher.manifest()
        ids = torch.arange(0, manifest.d_ffn, 5)
        want = fetcher.neurons(0, Precision.INT8, ids, 0).numpy().copy()  # now in the page cache
        handle.stop()
        running = False
        before = fetcher.stats.page_cache_records
        assert np.array_equal(fetcher.neurons(0, Precision.INT8, ids, 0).numpy(), want)
        assert fetcher.stats.page_cache_records == before + ids.numel()
        with pytest.raises(errors.Unavailable):  # a layer not asked before needs the store's table
            fetcher.neurons(1, Precision.INT8, ids, 1)
    finally:
        fetcher.close()
        dram.stop()
        if running:
            handle.stop()
