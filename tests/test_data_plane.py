"""The DRAM tier's data plane (issue 16) and its integrity (issue 18): workers
read Redis directly (sealed values, one MGET per layer and precision) and
stream misses from the store; a record edited in Redis with its CRC fixed up is
refused as DATA_LOSS at the client, with no retries; an unknown model is
NOT_FOUND at the client; with the DRAM tier gone workers read through to the
store, and with the store gone too they fail with a typed UNAVAILABLE within a
bounded time; Redis requires its password; a 7B-shape layer arrives cold."""
from __future__ import annotations

import struct
import time

import grpc
import numpy as np
import pytest
import redis
import torch

from m2cache import errors
from m2cache.codec.checksum import crc32c
from m2cache.codec.format import RECORDS_FILE, Manifest, Precision
from m2cache.convert.store_writer import StoreWriter
from m2cache.dram.dataplane import HEADER_BYTES, TAG_BYTES
from m2cache.dram.redis_proc import RedisProcess, find_redis_server
from m2cache.worker.fetcher import TierFetcher
from m2cache_client import Client, ModelNotFound
from m2cache_client.errors import M2CacheClientError
from tiers import DramHandle, StoreHandle, drop_page_cache, free_port, start_redis, wait_for
from worker_stack import WorkerHandle, reference_tokens

MODEL = "tinystories-656k"
PROMPT = [1, 365, 118, 263, 431]
FULL = Precision.FULL
# These tests are about the Redis path: the store here is on the same host, and its page
# cache (read first by default, test_store_shared.py) would serve every miss before Redis.
REDIS_PATH = {"page_cache_first": False}


@pytest.fixture
def tier(store_service, redis_proc):
    """A DramTier with whole layers pinned (every record of this 2-layer model in Redis)."""
    dram = DramHandle(store_service.target, redis_proc.url, budget_bytes=64 << 20, num_pinned_layers=2,
                      preload_precisions="full")
    yield dram
    dram.stop()


def test_workers_read_redis_directly_and_report_their_use(store_service, redis_proc):
    dram = DramHandle(store_service.target, redis_proc.url, budget_bytes=64 << 20, num_pinned_layers=1,
                      preload="used", preload_precisions="full")
    worker = WorkerHandle(dram.target, MODEL, cache_fraction=0.1, window=1, **REDIS_PATH)
    try:
        want = reference_tokens(store_service.catalog.get(MODEL), PROMPT, 12)
        assert worker.generate(PROMPT, 12)[0] == want
        stats = worker.runtime.fetcher.stats
        assert stats.store_records > 0  # cold: the misses streamed from the store
        wait_for(lambda: dram.stats().reports > 0 and not dram.tier._inflight, 10, "the tier to admit the misses")
        before = stats.redis_records
        assert worker.generate(PROMPT, 12)[0] == want
        assert stats.redis_records > before  # the admitted records now come from Redis, straight
        assert dram.stats().bytes_from_redis == 0  # ... not through the tier's FetchNeurons
    finally:
        worker.stop()
        dram.stop()


def test_hits_split_over_several_mgets_land_in_their_rows(tier, store_service, monkeypatch):
    """A layer's Redis hits are read in bounded round trips (fetcher.MGET_BYTES); with
    three records per MGET every batch takes many, and the tokens are still the reference's."""
    from m2cache.worker import fetcher as fetcher_mod

    tier.wait_idle()
    worker = WorkerHandle(tier.target, MODEL, cache_fraction=0.1, window=1, **REDIS_PATH)
    try:
        record = worker.runtime.fetcher.layout.num_bytes(FULL)
        monkeypatch.setattr(fetcher_mod, "MGET_BYTES", 3 * record)
        calls = []
        mget = worker.runtime.fetcher.redis.mget
        monkeypatch.setattr(worker.runtime.fetcher.redis, "mget", lambda keys: calls.append(len(keys)) or mget(keys))
        want = reference_tokens(store_service.catalog.get(MODEL), PROMPT, 8)
        assert worker.generate(PROMPT, 8)[0] == want
        stats = worker.runtime.fetcher.stats
        assert stats.redis_records > 0 and stats.store_records == 0  # every miss a Redis hit
        assert calls and max(calls) == 3 and len(calls) > stats.calls  # batches took several round trips
    finally:
        worker.stop()


def test_the_page_cache_comes_before_redis_and_redis_before_the_device(tier, store_service):
    """Same host, page cache first: with the layer's pages cached every record comes from
    the store's page cache; with them dropped, from Redis (every record pinned there; a
    few pages may come back meanwhile), none from the device. Rows some nearer tier already filled stay as they are."""
    tier.wait_idle()
    store = store_service.catalog.get(MODEL)
    fetcher = TierFetcher(tier.channel, MODEL, "w-nearest")
    try:
        manifest, _ = fetcher.manifest()
        rb, ids = manifest.layout.num_bytes(FULL), torch.arange(0, manifest.d_ffn, 2)
        want = np.empty((ids.numel(), rb), np.uint8)
        store.read_into(0, FULL, ids.numpy(), want)  # the layer's pages are cached now
        s, n = fetcher.stats, ids.numel()
        assert np.array_equal(fetcher.neurons(0, FULL, ids, 0).numpy(), want)
        assert s.page_cache_records == n and s.redis_records == 0 and s.store_records == 0
        if drop_page_cache(store.path / RECORDS_FILE):  # (a file system in memory keeps them)
            assert np.array_equal(fetcher.neurons(0, FULL, ids, 0).numpy(), want)
            assert s.redis_records > n // 2 and s.page_cache_records + s.redis_records == 2 * n
            assert s.store_records == 0
        out = np.zeros((n, rb), np.uint8)
        missing = np.arange(n) % 3 == 0  # the other rows: read from a nearer tier already
        fetcher._from_redis(fetcher.redis, 0, FULL, ids.numpy(), out, missing)
        assert not missing.any() and np.array_equal(out[::3], want[::3]) and not out[1::3].any()
    finally:
        fetcher.close()


@pytest.mark.parametrize("short_circuit", [True, False])
def test_with_the_store_gone_redis_still_serves_what_the_page_cache_did(store_root, redis_proc, short_circuit):
    """The page cache comes first only while it can be read: with the store gone, a
    worker reading the store's file itself (short-circuit) still reads the layers whose
    place in it it knows, and a fetch of anything else Redis holds still succeeds (the
    page-cache reads pause); through the store, Redis serves it all."""
    store = StoreHandle(store_root)
    dram = DramHandle(store.target, redis_proc.url, budget_bytes=64 << 20, num_pinned_layers=2,
                      preload_precisions="full")
    fetcher = TierFetcher(dram.channel, MODEL, "w-store-gone", unavailable_s=0.5, short_circuit=short_circuit)
    try:
        dram.wait_idle()
        manifest, _ = fetcher.manifest()
        ids = torch.arange(0, manifest.d_ffn, 2)
        want = {}
        for layer in (0, 1):
            want[layer] = np.empty((ids.numel(), manifest.layout.num_bytes(FULL)), np.uint8)
            store.catalog.get(MODEL).read_into(layer, FULL, ids.numpy(), want[layer])
        s, n = fetcher.stats, ids.numel()
        assert np.array_equal(fetcher.neurons(0, FULL, ids, 0).numpy(), want[0])
        assert s.page_cache_records == n
        store.stop()
        store = None
        assert np.array_equal(fetcher.neurons(0, FULL, ids, 0).numpy(), want[0])
        assert (s.page_cache_records, s.redis_records) == ((2 * n, 0) if short_circuit else (n, n))
        assert np.array_equal(fetcher.neurons(1, FULL, ids, 1).numpy(), want[1])  # layer 1: never asked
        assert s.redis_records == (n if short_circuit else 2 * n)
    finally:
        fetcher.close()
        dram.stop()
        if store is not None:
            store.stop()


def test_a_record_forged_in_redis_is_data_loss_at_the_client_without_retries(tier, store_service):
    tier.wait_idle()
    key = tier.tier.cache.keys(MODEL, 1, int(FULL), [5])[0]
    value = bytearray(tier.tier.cache.client.get(key))
    record = bytearray(value[HEADER_BYTES:])
    record[7] ^= 0x55  # an edit ...
    value[TAG_BYTES:HEADER_BYTES] = struct.pack("<I", crc32c(bytes(record)))  # ... with its CRC made to match
    value[HEADER_BYTES:] = record
    tier.tier.cache.client.set(key, bytes(value))
    worker = WorkerHandle(tier.target, MODEL, **REDIS_PATH)
    try:
        with Client([worker.target], model=MODEL, timeout_s=30) as client:
            with pytest.raises(M2CacheClientError) as info:
                client.generate(prompt_token_ids=PROMPT, max_new_tokens=4)
        assert info.value.code == grpc.StatusCode.DATA_LOSS
        assert "fails its MAC" in info.value.details and "layer 1" in info.value.details
        assert worker.runtime.fetcher.stats.retries == 0
    finally:
        worker.stop()


def test_an_unknown_model_is_not_found_at_the_client(tier, store_service):
    worker = WorkerHandle(tier.target, MODEL)
    try:
        with Client([worker.target], model="no-such-model", timeout_s=30) as client:
            with pytest.raises(ModelNotFound):
                client.generate(prompt_token_ids=PROMPT, max_new_tokens=4)
    finally:
        worker.stop()
    fetcher = TierFetcher(tier.channel, "no-such-model", "w")
    with pytest.raises(errors.NotFound, match="no-such-model"):
        fetcher.manifest()


@pytest.mark.parametrize("short_circuit", [False, True])
def test_tier_gone_reads_through_and_store_gone_fails_fast(store_root, redis_proc, short_circuit):
    """Each tier lost in turn. With the store gone too, a worker that reads the store's
    records file itself (short-circuit, same host) decodes on from it; one that asks
    the store per read gets a typed UNAVAILABLE within unavailable_s."""
    store = StoreHandle(store_root)
    dram = DramHandle(store.target, redis_proc.url, budget_bytes=64 << 20, num_pinned_layers=2,
                      preload_precisions="full")
    worker = WorkerHandle(dram.target, MODEL, cache_fraction=0.1, window=1, fetch_deadline_s=30.0,
                          unavailable_s=1.0, short_circuit=short_circuit)
    try:
        want = reference_tokens(store.catalog.get(MODEL), PROMPT, 10)
        assert worker.generate(PROMPT, 10)[0] == want
        dram.stop()  # the DRAM tier is gone (its Redis stays): cache loss is survivable
        assert worker.generate(PROMPT, 10)[0] == want
        redis_proc.kill()  # Redis gone too: everything from the store
        assert worker.generate(PROMPT, 10)[0] == want
        store.stop()  # and the store: a typed error within unavailable_s, never the 30 s deadline
        if short_circuit:  # every layer's place in the file is known: the file is all it needs
            assert worker.generate(PROMPT, 10)[0] == want
            assert worker.runtime.fetcher.stats.local_records > 0
            return
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            worker.generate(PROMPT, 10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - start < 10
    finally:
        worker.stop()


def test_redis_requires_its_password_and_the_stack_uses_it(store_service, tmp_path):
    secret = tmp_path / "redis.pass"
    secret.write_text("correct horse battery staple\n")
    secret.chmod(0o600)
    key_file = tmp_path / "mac.key"
    key_file.write_text("0123456789abcdef0123456789abcdef\n")
    key_file.chmod(0o600)
    proc = RedisProcess(find_redis_server(), free_port(), password=b"correct horse battery staple").start()
    try:
        with pytest.raises((redis.exceptions.AuthenticationError, redis.exceptions.ResponseError)):
            redis.Redis.from_url(proc.url, socket_timeout=2).set("x", b"1")
        dram = DramHandle(store_service.target, proc.url, budget_bytes=64 << 20, num_pinned_layers=2,
                          preload_precisions="full", redis_password_file=str(secret), mac_key_file=str(key_file))
        try:
            info = dram.tier_plane()
            assert info.redis_password == b"" and info.mac_key == b""  # shared by file, never sent
            assert "horse" not in info.redis_url
            worker = WorkerHandle(dram.target, MODEL, redis_password_file=str(secret), mac_key_file=str(key_file),
                                  **REDIS_PATH)
            try:
                dram.wait_idle()
                assert worker.generate(PROMPT, 6)[0] == reference_tokens(store_service.catalog.get(MODEL), PROMPT, 6)
                assert worker.runtime.fetcher.stats.redis_records > 0
            finally:
                worker.stop()
        finally:
            dram.stop()
    finally:
        proc.stop()


def test_pooled_workers_share_one_tier(tier, store_service):
    import threading

    tier.wait_idle()
    want = reference_tokens(store_service.catalog.get(MODEL), PROMPT, 16)
    workers = [WorkerHandle(tier.target, MODEL, worker_id=f"pool-{i}", cache_fraction=0.1, **REDIS_PATH)
               for i in range(3)]
    got, errs = {}, []

    def run(i):
        try:
            got[i] = workers[i].generate(PROMPT, 16)[0]
        except Exception as err:  # noqa: BLE001 - reported below
            errs.append(err)

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errs and all(got[i] == want for i in range(3))
        assert all(w.runtime.fetcher.stats.redis_records > 0 for w in workers)
    finally:
        for w in workers:
            w.stop()


def _seven_b_store(path) -> int:
    """One layer of Llama-2-7B's FFN shape: 11008 neurons x (3 x 4096) fp16 = 270 MB at FULL."""
    manifest = Manifest(family="llama", hf_config={}, dtype="float16", num_layers=1, d_model=4096, d_ffn=11008,
                        ffn_kind="swiglu", int4_group=32, source="synthetic")
    rb = manifest.layout.num_bytes(FULL)
    writer = StoreWriter(path, 64 << 20)
    try:
        seg = writer.begin_segment(0, FULL)
        rng = np.random.default_rng(0)
        block = rng.integers(0, 256, size=(512, rb), dtype=np.uint8)
        for lo in range(0, 11008, 512):
            rows = block[: min(512, 11008 - lo)].copy()
            rows[:, :8] = np.arange(lo, lo + rows.shape[0], dtype=np.int64).reshape(-1, 1).view(np.uint8)
            writer.add_rows(seg, rows)
        writer.end_segment(seg)
        writer.finish(manifest)
    finally:
        writer.close()
    return rb


def test_a_7b_shape_layer_arrives_cold_through_the_stack(tmp_path, redis_proc):
    rb = _seven_b_store(tmp_path / "root" / "seven-b")
    store = StoreHandle(tmp_path / "root")
    dram = DramHandle(store.target, redis_proc.url, budget_bytes=0, num_pinned_layers=0, preload="used")
    fetcher = TierFetcher(dram.channel, "seven-b", "w-7b", deadline_s=120)
    try:
        manifest, _ = fetcher.manifest()
        assert manifest.d_ffn * rb == 11008 * 24576 > 256 << 20  # over the old unary payload limit
        cold = drop_page_cache(tmp_path / "root" / "seven-b" / RECORDS_FILE)
        out = torch.empty((11008, rb), dtype=torch.uint8)
        got = fetcher.neurons(0, FULL, torch.arange(11008), 0, out=out)
        s = fetcher.stats
        assert got is out and s.store_records + s.page_cache_records == 11008 and s.retries == 0
        # a cold page is never waited for, so the device serves some (what the kernel's readahead
        # brought in meanwhile, the page cache serves); a file system in memory is never cold
        assert s.store_records > 0 or not cold
        stamps = out[:, :8].contiguous().view(torch.int64).reshape(-1)
        assert torch.equal(stamps, torch.arange(11008))
        want = np.empty((64, rb), np.uint8)
        store.catalog.get("seven-b").read_into(0, FULL, np.arange(5000, 5064), want)
        assert np.array_equal(out[5000:5064].numpy(), want)
        # through the tier's unary FetchNeurons the layer is over the payload limit: a
        # deterministic refusal, raised at once as its typed error and never retried
        proxy = TierFetcher(dram.channel, "seven-b", "w-proxy", deadline_s=60, data_plane=False)
        proxy.manifest()
        start = time.monotonic()
        with pytest.raises(errors.ResourceExhausted, match="payload limit"):
            proxy.neurons(0, FULL, torch.arange(11008), 0)
        assert proxy.stats.retries == 0 and time.monotonic() - start < 10
    finally:
        fetcher.close()
        dram.stop()
        store.stop()



@pytest.mark.parametrize("impl", ["c", "python"])
def test_a_reply_opened_at_once_equals_the_values_opened_one_by_one(monkeypatch, impl):
    """dataplane.open_joined (seal.c, or its Python loop): records into their rows or back
    to back, CRCs out, misses skipped; the first forged value is named, a short one refused,
    and (seal.c) a record sealed with a CRC it does not have is refused when asked."""
    from m2cache.dram import dataplane

    if impl == "python":
        monkeypatch.setattr(dataplane, "_seal_library", lambda: None)
    else:
        assert dataplane._seal_library() is not None, "seal.c did not build here"
    rng = np.random.default_rng(0)
    seal = dataplane.RecordSeal(rng.bytes(32))
    keys = dataplane.redis_keys(b"t:", "m", 3, 1, range(300))
    records = [rng.bytes(96) for _ in keys]
    values = [seal.seal(k, r, crc32c(r)) for k, r in zip(keys, records)]
    values[7] = values[250] = None  # misses
    want = [i for i in range(300) if i not in (7, 250)]
    rows = np.ones((300, 96), np.uint8)
    pos, joined, lengths, crcs, checked = dataplane.open_joined(seal, keys, values, rows, check_crc=True)
    assert pos.tolist() == want and joined is None and lengths.tolist() == [96] * len(want)
    assert crcs.tolist() == [crc32c(records[i]) for i in want] and all(rows[i].tobytes() == records[i] for i in want)
    assert (rows[7] == 1).all() and (rows[250] == 1).all() and checked == (impl == "c")
    pos, joined, lengths, crcs, _ = dataplane.open_joined(seal, keys, values)
    assert joined.tobytes() == b"".join(records[i] for i in want) and pos.tolist() == want
    forged = list(values)
    for i in (120, 200):  # the first forged one is named
        edited = bytearray(forged[i])
        edited[-1] ^= 1
        forged[i] = bytes(edited)
    with pytest.raises(dataplane.BadSeal, match=repr(keys[120]).replace("\\", "\\\\")):
        dataplane.open_joined(seal, keys, forged, rows)
    forged = list(values)
    forged[3] = seal.seal(keys[3], records[3][:50], 3)  # sealed, but not a record of this size
    with pytest.raises(errors.ChecksumError, match="not a sealed record of 96 bytes"):
        dataplane.open_joined(seal, keys, forged, rows)
    with pytest.raises(dataplane.BadSeal):  # a value sealed under another key is refused
        dataplane.open_joined(seal, keys[1:2], [values[0]], rows[:1])
    wrong = list(values)
    wrong[40] = seal.seal(keys[40], records[40], crc32c(records[40]) ^ 1)  # a tier that sealed bad bytes
    if impl == "c":
        with pytest.raises(errors.ChecksumError, match="layer 3 neuron 40 FULL in Redis differs from its CRC-32C"):
            dataplane.open_joined(seal, keys, wrong, rows, check_crc=True)
    assert dataplane.open_joined(seal, keys, wrong, rows)[4] is False  # not asked: the caller checks
