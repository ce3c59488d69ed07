"""Faults: Redis SIGKILLed mid-run and restarted on the same port; the
NeuronStore restarted under a DramTier. Every fetch must still return the
store's bytes; every process is stopped by PID; each test is time-bounded."""
from __future__ import annotations

import shutil
import threading
import time

import grpc
import pytest

from m2cache.codec.format import Precision
from tiers import DramHandle, StoreHandle, health, status_of, wait_for

MODEL = "stories260k"
IDS = list(range(0, 172, 4))
DRAM = "m2cache.v1.DramTier"


def fetch_ok(dram, catalog, layer, prec=Precision.FULL, timeout=10.0):
    batch = dram.fetch(MODEL, layer, IDS, int(prec), timeout=timeout)
    assert batch.payload == catalog.get(MODEL).get_neurons(layer, IDS, prec)
    return batch


def test_redis_killed_then_restarted(make_dram, store_service, redis_proc):
    dram = make_dram(budget_bytes=1 << 20, num_pinned_layers=1, preload_ahead=2, preload_precisions="full")
    for layer in list(range(5)) * 2:
        fetch_ok(dram, store_service.catalog, layer)
    dram.wait_idle()
    before = dram.stats()
    assert before.redis_up and before.bytes_from_redis > 0

    redis_proc.kill()                                    # SIGKILL by PID, mid-run
    for layer in list(range(5)) * 2:                     # served from the store meanwhile
        fetch_ok(dram, store_service.catalog, layer)
    wait_for(lambda: health(dram.target, DRAM) == "NOT_SERVING", 5, "DramTier NOT_SERVING")
    assert health(dram.target, "") == "SERVING"          # the server itself stays up
    down = dram.stats()
    assert not down.redis_up and down.bytes_from_store > before.bytes_from_store

    redis_proc.start()                                   # same port, empty
    wait_for(lambda: health(dram.target, DRAM) == "SERVING", 5, "DramTier SERVING again")
    dram.wait_idle()                                     # layer 0 pinned again
    assert dram.tier.cache.stored_bytes() > 0
    fetch_ok(dram, store_service.catalog, 0)
    after = dram.stats()
    assert after.redis_up and after.bytes_from_redis > down.bytes_from_redis


@pytest.fixture
def own_store(store_root, tmp_path):
    """A NeuronStore over a private copy of one store (LMDB opens a path once per process)."""
    shutil.copytree(store_root / MODEL, tmp_path / "root" / MODEL)
    handles = [StoreHandle(tmp_path / "root")]
    yield tmp_path / "root", handles
    for handle in handles:
        handle.stop()


def test_store_restart_is_retried_within_the_deadline(own_store, redis_proc):
    root, handles = own_store
    port = handles[0].port
    dram = DramHandle(handles[0].target, redis_proc.url, num_pinned_layers=0, preload_ahead=0,
                      preload_precisions="full", retry_initial_backoff_s=0.05, retry_max_backoff_s=0.2)
    try:
        fetch_ok(dram, handles[0].catalog, 0)            # a miss, written back to Redis
        layer0 = handles[0].catalog.get(MODEL).get_neurons(0, IDS, Precision.FULL)
        handles.pop().stop()
        restarted = threading.Timer(0.6, lambda: handles.append(StoreHandle(root, port=port)))
        restarted.start()
        start = time.monotonic()
        batch = dram.fetch(MODEL, 3, IDS, int(Precision.INT8), timeout=10.0)   # a miss: needs the store
        elapsed = time.monotonic() - start
        restarted.join()
        assert batch.payload == handles[0].catalog.get(MODEL).get_neurons(3, IDS, Precision.INT8)
        assert 0.5 < elapsed < 5.0

        handles.pop().stop()                              # store gone for good: the caller's deadline rules
        start = time.monotonic()
        code, details = status_of(lambda: dram.fetch(MODEL, 4, IDS, int(Precision.INT4), timeout=0.5))
        assert code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE), details
        assert time.monotonic() - start < 1.5
        assert dram.fetch(MODEL, 0, IDS, int(Precision.FULL), timeout=2.0).payload == layer0  # Redis needs no store
    finally:
        dram.stop()
