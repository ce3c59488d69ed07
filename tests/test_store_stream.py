"""Store format 2's read path: ``read_into`` (sorted fast path straight into the
caller's buffer, unsorted and duplicate ids, torch buffers), streamed
``StreamNeurons`` responses in chunks (dense and bitmap stores) equal to the
unary ones, a synthetic layer larger than 512 MiB through the real gRPC service,
and corrupt / truncated records named over the wire."""
from __future__ import annotations

import os
import shutil

import grpc
import numpy as np
import pytest
import torch

from m2cache.codec.checksum import crc32c
from m2cache.codec.format import RECORDS_FILE, Manifest, Precision
from m2cache.convert.store_writer import StoreWriter
from m2cache.store.reader import NeuronStore
from m2cache_client.pb import common_pb2
from tiers import StoreHandle, flip_record_byte, status_of

FULL = Precision.FULL


def _request(model, layer, ids=(), prec=FULL, all_neurons=False):
    return common_pb2.NeuronBatchRequest(model=model, layer=layer, neuron_ids=list(ids), precision=int(prec),
                                         all_neurons=all_neurons)


def _assemble(stream) -> tuple[bytes, list[int], list[int], list[int]]:
    payload, crcs, lengths, firsts = bytearray(), [], [], []
    for msg in stream:
        firsts.append(msg.first)
        payload += msg.payload
        crcs += list(msg.crc32c)
        lengths += list(msg.record_lengths)
    return bytes(payload), crcs, lengths, firsts


def test_read_into_fills_the_callers_buffer(store_service):
    store = store_service.catalog.get("tinystories-656k")
    rb = store.layout.num_bytes(Precision.INT8)
    layer = store.get_layer(1, Precision.INT8)
    want = lambda ids: b"".join(layer[i * rb : (i + 1) * rb] for i in ids)  # noqa: E731
    ids = np.sort(np.random.default_rng(0).choice(store.manifest.d_ffn, 50, replace=False))
    out = np.full((ids.size, rb), 7, dtype=np.uint8)
    assert store.read_into(1, Precision.INT8, ids, out) is out and out.tobytes() == want(ids)
    messy = [9, 3, 3, 200, 0, 9]
    pinned_like = torch.empty((len(messy), rb), dtype=torch.uint8)
    assert store.read_into(1, Precision.INT8, messy, pinned_like) is pinned_like
    assert pinned_like.numpy().tobytes() == want(messy)
    with pytest.raises(Exception, match="contiguous uint8"):
        store.read_into(1, Precision.INT8, ids, np.empty((ids.size, rb + 1), np.uint8))


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-opt", "stories260k"])
def test_streamed_records_equal_the_unary_ones_in_small_chunks(store_root, model):
    handle = StoreHandle(store_root, stream_chunk_bytes=3000)  # a few records per message
    try:
        store = handle.catalog.get(model)
        for prec in Precision:
            ids = [int(i) for i in np.random.default_rng(int(prec)).choice(store.manifest.d_ffn, 40)]
            unary = handle.stub.FetchNeurons(_request(model, 1, ids, prec), timeout=30)
            payload, crcs, _, firsts = _assemble(handle.stub.StreamNeurons(_request(model, 1, ids, prec), timeout=30))
            assert len(firsts) > 1 and firsts == sorted(firsts) and firsts[0] == 0
            assert (payload, crcs) == (unary.payload, list(unary.crc32c))
            assert payload == store.get_neurons(1, ids, prec)
    finally:
        handle.stop()


def test_streamed_bitmap_records_keep_their_lengths(tmp_path, store_root):
    from checkpoints import make_tiny_checkpoint
    from m2cache.convert.prune import PruneSpec
    from m2cache.convert.writer import convert

    root = tmp_path / "root"
    convert(make_tiny_checkpoint("opt", tmp_path / "hf"), root / "opt-p40", progress=False, prune=PruneSpec(0.4))
    handle = StoreHandle(root, stream_chunk_bytes=2000)
    try:
        store = handle.catalog.get("opt-p40")
        got = _assemble(handle.stub.StreamNeurons(_request("opt-p40", 2, all_neurons=True, prec=Precision.INT4),
                                                  timeout=30))
        want_payload, want_lengths = store.get_records(2, range(store.manifest.d_ffn), Precision.INT4)
        assert len(got[3]) > 1 and got[0] == want_payload and got[2] == want_lengths.tolist()
        assert got[1] == store.crc_table(2, Precision.INT4).tolist()
    finally:
        handle.stop()


def _big_store(path, num_neurons: int, d_model: int) -> int:
    """One layer of distinct FULL fp16 SwiGLU records (row i starts with i as int64); returns record bytes."""
    manifest = Manifest(family="llama", hf_config={}, dtype="float16", num_layers=1, d_model=d_model,
                        d_ffn=num_neurons, ffn_kind="swiglu", int4_group=32, source="synthetic")
    rb = manifest.layout.num_bytes(FULL)
    writer = StoreWriter(path, 64 << 20)
    try:
        seg = writer.begin_segment(0, FULL)
        base = np.random.default_rng(0).integers(0, 256, size=rb, dtype=np.uint8)
        for lo in range(0, num_neurons, 256):
            ids = np.arange(lo, min(lo + 256, num_neurons), dtype=np.int64)
            rows = np.tile(base, (ids.size, 1))
            rows[:, :8] = ids.reshape(-1, 1).view(np.uint8)
            writer.add_rows(seg, rows)
        writer.end_segment(seg)
        writer.finish(manifest)
    finally:
        writer.close()
    return rb


def test_a_layer_over_512_mib_streams_through_the_service(tmp_path):
    num, d_model = 2800, 32768  # 2800 x 192 KiB = 550 MB > 512 MiB, in one layer at one precision
    rb = _big_store(tmp_path / "root" / "big", num, d_model)
    assert num * rb > 512 << 20
    handle = StoreHandle(tmp_path / "root")
    try:
        code, details = status_of(lambda: handle.stub.FetchNeurons(_request("big", 0, all_neurons=True), timeout=60))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "payload limit" in details
        total, count, ok = 0, 0, True
        for msg in handle.stub.StreamNeurons(_request("big", 0, all_neurons=True), timeout=120):
            assert len(msg.payload) <= handle.config.stream_chunk_bytes + rb
            rows = np.frombuffer(msg.payload, dtype=np.uint8).reshape(-1, rb)
            ok &= bool(np.array_equal(rows[:, :8].copy().view(np.int64).ravel(),
                                      np.arange(msg.first, msg.first + rows.shape[0])))
            ok &= [crc32c(r) for r in rows[:: max(1, rows.shape[0] - 1)]] == list(msg.crc32c)[:: max(1, rows.shape[0] - 1)]
            total += len(msg.payload)
            count += 1
        assert ok and total == num * rb and count > 100
    finally:
        handle.stop()


def test_corrupt_and_truncated_records_are_named_over_the_wire(store_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(store_root / "tiny-llama", root / "tiny-llama")
    reader = NeuronStore(root / "tiny-llama")
    try:
        (cut_at,), _ = reader.record_spans(2, Precision.INT4, np.asarray([50]))
    finally:
        reader.close()
    flip_record_byte(root / "tiny-llama", 0, Precision.INT8, 17)
    os.truncate(root / "tiny-llama" / RECORDS_FILE, int(cut_at) + 1)
    handle = StoreHandle(root)
    try:
        for call in (handle.stub.FetchNeurons, lambda r, timeout: list(handle.stub.StreamNeurons(r, timeout=timeout))):
            code, details = status_of(lambda: call(_request("tiny-llama", 0, range(10, 30), Precision.INT8),
                                                   timeout=30))
            assert code == grpc.StatusCode.DATA_LOSS and "layer 0 neuron 17 INT8 fails its checksum" in details
            # scattered ids: read as one covering span, each record's CRC checked (store/reader.py)
            code, details = status_of(lambda: call(_request("tiny-llama", 0, [5, 17, 40], Precision.INT8),
                                                   timeout=30))
            assert code == grpc.StatusCode.DATA_LOSS and "layer 0 neuron 17 INT8 fails its checksum" in details
            code, details = status_of(lambda: call(_request("tiny-llama", 2, [3, 50], Precision.INT4), timeout=30))
            assert code == grpc.StatusCode.DATA_LOSS and "layer 2 neuron 50 INT4 is missing or truncated" in details
        assert handle.stub.FetchNeurons(_request("tiny-llama", 0, [16, 18], Precision.INT8), timeout=30).payload
    finally:
        handle.stop()


@pytest.mark.parametrize("impl", ["c", "python"])
def test_scattered_reads_equal_one_record_at_a_time(store_root, monkeypatch, impl):
    """A cache's misses (sorted, scattered ids) take the record-by-record path
    (RecordFile.read_records: gather.c, or its Python loop) and read what the
    record-at-a-time path reads; a file that ends inside a record is named."""
    from m2cache.store import segments
    if impl == "python":
        monkeypatch.setattr(segments, "_gather_library", lambda: None)
    else:
        assert segments._gather_library() is not None, "gather.c did not build here"
    reader = NeuronStore(store_root / "tiny-llama")
    try:
        for prec in Precision:
            ids = np.asarray([2, 9, 10, 33, 60, 61, 95])
            got = reader.read_into(1, prec, ids, np.empty((ids.size, reader.layout.num_bytes(prec)), np.uint8))
            want = np.stack([np.frombuffer(reader.get_neurons(1, [i], prec), np.uint8) for i in ids.tolist()])
            assert np.array_equal(got, want)
        starts, _ = reader.record_spans(1, FULL, np.asarray([60]))
        size = reader.layout.num_bytes(FULL)
        with pytest.raises(segments.ShortRead):
            reader.records.read_records(np.asarray([int(starts[0]), reader.records.size - size // 2]), size,
                                        np.empty((2, size), np.uint8))
    finally:
        reader.close()


def test_records_off_the_device_are_read_several_at_a_time_and_checked(tmp_path):
    """After a batch that waited on the device, RecordReads.read_ids reads what the page
    cache holds in one call and the rest on the pool's threads (read_checked_parallel),
    each record still checked and a bad one named; a batch the page cache held whole
    counts the streak down."""
    from m2cache.codec import checksum
    from m2cache.errors import ChecksumError
    from m2cache.store import record_reads, segments
    assert segments._gather_library() is not None, "gather.c did not build here"
    size, n, base = 4096, 2000, 4096  # a record a page: evicted pages are whole records
    data = np.random.default_rng(0).integers(0, 256, size=base + n * size, dtype=np.uint8)
    path = tmp_path / "records.bin"
    with open(path, "wb") as f:
        f.write(data.tobytes())
        f.flush()
        os.fsync(f.fileno())  # clean pages: fadvise can drop them
    rows = data[base:].reshape(n, size)
    crcs = checksum.crc32c_rows(rows).astype(np.uint32)
    rf = segments.RecordFile(path, io_threads=4)
    reads = record_reads.RecordReads(rf, verify=True, expected_bytes=base + n * size)
    seg = record_reads.FixedSegment.of(base, size, crcs)
    parts = []
    real = rf.read_checked_parallel
    rf.read_checked_parallel = lambda *a: parts.append(a[1].copy()) or real(*a)
    try:
        ids = np.sort(np.random.default_rng(1).choice(n, 300, replace=False)).astype(np.int64)
        if rf.resident_checked(base, ids, n, size, 0, np.empty((ids.size, size), np.uint8)) is None:
            pytest.skip("no RWF_NOWAIT on this kernel or file system: nothing can be read page-cache-first")
        os.posix_fadvise(rf.fd, 0, 0, os.POSIX_FADV_DONTNEED)  # nothing resident...
        warm = ids[::3].copy()
        reads.read_ids(0, Precision.FULL, warm, seg, np.empty((warm.size, size), np.uint8))  # ...but these
        reads.cold_streak = record_reads.COLD_STREAK
        dest = torch.zeros((ids.size, size), dtype=torch.uint8)
        assert reads.read_ids(0, Precision.FULL, torch.from_numpy(ids), seg, dest)
        assert np.array_equal(dest.numpy(), rows[ids])
        assert parts, "no record was read off the device"
        cold = np.concatenate(parts)
        assert np.isin(cold, ids).all() and not np.isin(cold, warm).all()
        assert reads.cold_streak == record_reads.COLD_STREAK
        assert reads.read_ids(0, Precision.FULL, ids, seg, np.empty((ids.size, size), np.uint8))  # all resident now
        assert reads.cold_streak == record_reads.COLD_STREAK - 1
        os.posix_fadvise(rf.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        bad = crcs.copy()
        bad[ids[200]] ^= 1  # as if record ids[200] had changed on disk
        with pytest.raises(ChecksumError, match=f"neuron {ids[200]} FULL"):
            reads.read_ids(3, Precision.FULL, ids, record_reads.FixedSegment.of(base, size, bad),
                           np.empty((ids.size, size), np.uint8))
    finally:
        rf.close()


def test_a_cache_miss_batch_is_read_and_checked_in_one_c_call(tmp_path):
    """RecordFile.read_checked (gather.c): ascending ids of one segment read into their
    rows, each checked against the segment's CRC table (the first bad row returned);
    batches it does not take (descending or out-of-range ids, mostly contiguous runs)
    read nothing; a record past the end of the file is ShortRead."""
    from m2cache.codec import checksum
    from m2cache.store import segments
    assert segments._gather_library() is not None, "gather.c did not build here"
    size, n, base = 300, 1000, 4096
    data = np.random.default_rng(0).integers(0, 256, size=base + n * size, dtype=np.uint8)
    path = tmp_path / "records.bin"
    data.tofile(path)
    rows = data[base:].reshape(n, size)
    crcs = checksum.crc32c_rows(rows).astype(np.uint32)
    rf = segments.RecordFile(path)
    try:
        ids = np.sort(np.random.default_rng(1).choice(n, 161, replace=False)).astype(np.int64)
        dest = np.zeros((ids.size, size), np.uint8)
        assert rf.read_checked(base, ids, n, size, crcs.ctypes.data, dest, 8) == -1
        assert np.array_equal(dest, rows[ids])
        bad = crcs.copy()
        bad[ids[100]] ^= 1  # as if record ids[100] had changed on disk
        assert rf.read_checked(base, torch.from_numpy(ids), n, size, bad.ctypes.data, torch.from_numpy(dest), 8) == 100
        assert rf.read_checked(base, ids, n, size, 0, dest, 8) == -1  # unchecked
        for no in (ids[::-1].copy(), np.append(ids, n), np.arange(64, dtype=np.int64),  # not taken
                   ids.astype(np.int32), ids[::2]):  # (wrong dtype; not contiguous)
            assert rf.read_checked(base, no, n, size, crcs.ctypes.data, np.zeros((no.size, size), np.uint8), 8) is None
        with pytest.raises(segments.ShortRead):
            rf.read_checked(base, np.asarray([5, n + 3], np.int64), n + 10, size, 0, np.zeros((2, size), np.uint8), 8)
        # the page-cache-only twin (the file was just written: every page is resident)
        got = rf.resident_checked(base, ids, n, size, crcs.ctypes.data, dest)
        if got is not None:  # None: this kernel or file system has no RWF_NOWAIT
            dest[:] = 0
            present, bad_row = rf.resident_checked(base, ids, n, size, crcs.ctypes.data, dest)
            assert bad_row == -1 and present.all() and np.array_equal(dest, rows[ids])
            assert rf.resident_checked(base, ids, n, size, bad.ctypes.data, dest)[1] == 100
            assert rf.resident_checked(base, ids[::-1].copy(), n, size, 0, dest) is None
    finally:
        rf.close()


def test_large_scattered_batches_split_across_the_pool(tmp_path):
    """RecordFile.read_records on a batch big enough to split across the I/O threads:
    every record lands in its row; a batch reaching past the end names ShortRead."""
    from m2cache.store import segments
    size, n = 200, 6000
    data = np.random.default_rng(0).integers(0, 256, size=n * size, dtype=np.uint8)
    path = tmp_path / "records.bin"
    data.tofile(path)
    rf = segments.RecordFile(path, io_threads=4)
    try:
        ids = np.sort(np.random.default_rng(1).choice(n, 3000, replace=False))
        assert min(rf.io_threads, ids.size // segments.RECORDS_PER_THREAD) >= 2  # the split path
        dest = np.empty((ids.size, size), np.uint8)
        rf.read_records(ids * size, size, dest)
        assert np.array_equal(dest, data.reshape(n, size)[ids])
        with pytest.raises(segments.ShortRead):
            rf.read_records(np.append(ids * size, n * size - size // 2), size, np.empty((ids.size + 1, size), np.uint8))
    finally:
        rf.close()
