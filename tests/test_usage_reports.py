"""The worker's usage reports to the DRAM tier (worker/records.Reporter): uses queued
within one interval leave in one report, in order, none lost; a tier that is away
costs dropped reports, not a stalled or failing worker; close sends what is queued.
Neuron sets travel as bitmaps (dram/id_sets.py): they round-trip, a real tier admits
the misses a bitmap names (and only those), and one naming neurons the layer does
not have is INVALID_ARGUMENT."""
from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from m2cache import errors
from m2cache.codec.format import Precision
from m2cache.dram import id_sets
from m2cache.worker.records import Reporter
from m2cache_client.pb import dram_pb2
from tiers import DramHandle, wait_for

MODEL = "tinystories-656k"


def _recorder():
    sent, lock = [], threading.Lock()

    def send(current_layer, uses):
        with lock:
            sent.append((current_layer, list(uses)))
    return sent, send


def test_uses_queued_within_an_interval_leave_in_one_report():
    sent, send = _recorder()
    reporter = Reporter(send, interval_s=0.2)
    try:
        for layer in range(30):  # one token's layer fetches, far quicker than the interval
            reporter.add(layer, f"use-{layer}")
        deadline = time.monotonic() + 5
        while reporter.sent < 30 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        reporter.close()
    assert reporter.sent == 30 and reporter.dropped == 0
    assert len(sent) <= 2  # not one RPC per layer
    assert [u for _, batch in sent for u in batch] == [f"use-{i}" for i in range(30)]
    assert sent[-1][0] == 29  # the latest layer says where the worker is


def test_a_tier_that_is_away_drops_reports_and_close_sends_what_is_queued():
    calls = []

    def failing(current_layer, uses):
        calls.append(len(uses))
        raise ConnectionError("tier away")
    reporter = Reporter(failing, interval_s=0.01, backoff_s=0.05)
    for layer in range(5):
        reporter.add(layer, layer)
    deadline = time.monotonic() + 5
    while reporter.dropped < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    reporter.close()
    assert reporter.dropped == 5 and reporter.sent == 0 and sum(calls) == 5

    sent, send = _recorder()
    reporter = Reporter(send, interval_s=10.0)  # nothing would leave for 10 s ...
    reporter.add(3, "last")
    start = time.monotonic()
    reporter.close()  # ... but close does not wait the interval out, and sends it
    assert time.monotonic() - start < 5 and sent == [(3, ["last"])]


def test_neuron_sets_round_trip_as_bitmaps_and_bad_ones_are_refused():
    rng = np.random.default_rng(1)
    for d_ffn in (1, 8, 13, 1536):
        ids = rng.integers(0, d_ffn, size=3 * d_ffn)  # unsorted, with duplicates
        bits = id_sets.pack(ids, d_ffn)
        assert len(bits) == -(-d_ffn // 8)
        assert np.array_equal(id_sets.unpack(bits, [], d_ffn, "a test"), np.unique(ids))
    assert id_sets.unpack(b"", [4, 1], 13, "a test").tolist() == [4, 1]  # the listed form still reads
    with pytest.raises(errors.InvalidArgument, match="neuron id 13 out of range in a test"):
        id_sets.unpack(bytes([0, 0x20]), [], 13, "a test")  # bit 13 of a 13-neuron layer
    with pytest.raises(errors.InvalidArgument, match="a bitmap of 3 bytes"):
        id_sets.unpack(bytes(3), [], 13, "a test")
    with pytest.raises(errors.InvalidArgument, match="out of range"):
        id_sets.unpack(b"", [13], 13, "a test")


def test_a_tier_admits_the_misses_a_bitmap_names_and_refuses_a_bad_one(store_service, redis_proc):
    """A worker that reads the store's page cache first (same host) needs nothing of
    Redis: its misses are not admitted. Another worker's are, exactly those."""
    dram = DramHandle(store_service.target, redis_proc.url, budget_bytes=64 << 20, num_pinned_layers=0,
                      preload="used", preload_ahead=0)
    try:
        d_ffn = store_service.catalog.get(MODEL).manifest.d_ffn
        missed = np.array([2, 7, d_ffn - 1])
        use = dram_pb2.LayerUse(layer=1, precision=int(Precision.INT8), used_bits=id_sets.pack(np.arange(20), d_ffn),
                                missed_bits=id_sets.pack(missed, d_ffn))
        cache = dram.tier.cache
        keys = cache.keys(MODEL, 1, int(Precision.INT8), list(range(d_ffn)))
        here = dram_pb2.UsageReport(model=MODEL, caller_id="w-here", current_layer=1, uses=[use], page_cache_first=True)
        dram.stub.Report(here, timeout=10)
        assert dram.stats().reports >= 1
        dram.wait_idle()
        assert all(v is None for v in cache.mget(keys))
        dram.stub.Report(dram_pb2.UsageReport(model=MODEL, caller_id="w", current_layer=1, uses=[use]), timeout=10)
        wait_for(lambda: sum(v is not None for v in cache.mget(keys)) >= missed.size, 10, "the misses admitted")
        dram.wait_idle()
        held = [i for i, v in enumerate(cache.mget(keys)) if v is not None]
        assert held == missed.tolist()
        bad = dram_pb2.LayerUse(layer=1, precision=0, used_bits=bytes(-(-d_ffn // 8) + 1))
        with pytest.raises(grpc.RpcError) as err:
            dram.stub.Report(dram_pb2.UsageReport(model=MODEL, caller_id="w", current_layer=1, uses=[bad]), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bitmap" in err.value.details()
    finally:
        dram.stop()
