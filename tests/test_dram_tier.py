"""DramTier service over real Redis and a real NeuronStore: bytes identical to
the store's under any mix of hits, misses, evictions and preloads; the
layer-aware policy observed from outside (Redis contents, stats)."""
from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from m2cache.codec.format import Precision
from m2cache.dram.dataplane import HEADER_BYTES
from m2cache_client.pb import common_pb2
from tiers import DEADLINE_S, health, status_of

MODEL = "stories260k"            # real model: 5 layers, 172 neurons
LAYER_BYTES = 172 * (768 + 198 + 108)  # one layer at FULL + INT8 + INT4


def expect(store_service, model, layer, ids, prec):
    store = store_service.catalog.get(model)
    return store.get_neurons(layer, ids, prec), store.crc_table(layer, prec)[ids].tolist()


def check(dram, store_service, model, layer, ids, prec, current_layer=None, caller_id="w0"):
    batch = dram.fetch(model, layer, ids, int(prec), current_layer, caller_id)
    payload, crcs = expect(store_service, model, layer, ids, prec)
    assert batch.payload == payload, (model, layer, prec)
    assert list(batch.crc32c) == crcs and list(batch.neuron_ids) == list(ids)


def redis_bytes(dram) -> int:
    return dram.tier.cache.stored_bytes()


def test_bytes_match_the_store_under_hits_misses_evictions_and_preloads(make_dram, store_service):
    dram = make_dram(budget_bytes=int(2.5 * LAYER_BYTES), num_pinned_layers=1, preload_ahead=2)
    rng = np.random.default_rng(7)
    for step in range(60):
        model = MODEL if step % 4 else "tinystories-656k"   # two models share the tier
        manifest = store_service.catalog.get(model).manifest
        layer = int(rng.integers(manifest.num_layers))
        ids = rng.choice(manifest.d_ffn, size=int(rng.integers(1, 60)), replace=False).tolist()
        prec = Precision(int(rng.integers(1, 4)))
        check(dram, store_service, model, layer, ids, prec, current_layer=layer)
        if step % 5 == 0:
            assert redis_bytes(dram) <= dram.config.budget_bytes
    dram.wait_idle()
    stats = dram.stats()
    assert redis_bytes(dram) == stats.bytes_resident <= stats.budget_bytes
    assert stats.bytes_from_redis > 0 and stats.bytes_from_store > 0
    assert stats.evictions > 0 and stats.preloads > 0 and stats.redis_up
    assert sum(s.hits for s in stats.layers) * 1 > 0 and {s.model for s in stats.layers} == {MODEL, "tinystories-656k"}


def test_pinned_layers_stay_resident(make_dram, store_service):
    dram = make_dram(budget_bytes=3 * LAYER_BYTES, num_pinned_layers=1, preload_ahead=2)
    dram.wait_idle()
    for step in range(25):
        layer = step % 5
        check(dram, store_service, MODEL, layer, list(range(0, 172, 3)), Precision(1 + step % 3))
    dram.wait_idle()
    assert dram.stats().evictions > 0
    for prec in Precision:   # every record of layer 0, straight from Redis, equals the store's
        keys = dram.tier.cache.keys(MODEL, 0, int(prec), range(172))
        values = dram.tier.cache.mget(keys)  # sealed: tag | crc32c | record
        assert b"".join(v[HEADER_BYTES:] for v in values) == store_service.catalog.get(MODEL).get_layer(0, prec)
    assert redis_bytes(dram) <= dram.config.budget_bytes


def test_preloads_arrive_ahead_of_the_caller(make_dram, store_service):
    dram = make_dram(budget_bytes=5 * LAYER_BYTES, num_pinned_layers=0, preload_ahead=2,
                     preload_precisions="full")
    ids = list(range(0, 172, 2))
    for layer in range(5):
        check(dram, store_service, MODEL, layer, ids, Precision.FULL)
        dram.wait_idle()   # the caller computes; preloads land meanwhile
        resident = {k.layer for k, (n, _) in dram.tier.policy.units().items() if n == 172}
        assert {(layer + 1) % 5, (layer + 2) % 5} <= resident
    per_layer = {s.layer: s for s in dram.stats().layers}
    assert per_layer[0].misses == len(ids)                      # nothing ahead of the first step
    assert all(per_layer[layer].misses == 0 and per_layer[layer].hits == len(ids) for layer in range(1, 5))
    stats = dram.stats()
    assert stats.mean_preload_lead >= 1 and stats.preload_misses == 0


def test_corrupt_redis_record_is_refetched(make_dram, store_service):
    dram = make_dram(budget_bytes=5 * LAYER_BYTES, num_pinned_layers=2, preload_precisions="int8")
    dram.wait_idle()
    key = dram.tier.cache.keys(MODEL, 1, int(Precision.INT8), [9])[0]
    good = dram.tier.cache.client.get(key)
    dram.tier.cache.client.set(key, bytes(b ^ 0xFF for b in good))
    check(dram, store_service, MODEL, 1, [8, 9, 10], Precision.INT8)
    stats = dram.stats()
    assert stats.checksum_refetches == 1
    assert {s.layer: (s.hits, s.misses) for s in stats.layers}[1] == (2, 1)
    assert dram.tier.cache.client.get(key) == good               # written back


def test_workers_at_different_layers_share_one_tier(make_dram, store_service):
    dram = make_dram(budget_bytes=2 * LAYER_BYTES, num_pinned_layers=1, preload_ahead=1)
    errors = []

    def worker(wid: int) -> None:
        rng = np.random.default_rng(wid)
        try:
            for step in range(20):
                layer = (wid * 2 + step) % 5
                ids = rng.choice(172, size=40, replace=False).tolist()
                check(dram, store_service, MODEL, layer, ids, Precision(1 + (step + wid) % 3),
                      caller_id=f"w{wid}")
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    dram.wait_idle()
    assert redis_bytes(dram) == dram.tier.policy.bytes_resident <= dram.config.budget_bytes


BAD = {
    "unknown model": (dict(model="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
    "layer": (dict(layer=5), grpc.StatusCode.INVALID_ARGUMENT, "layer 5"),
    "current layer": (dict(current_layer=9), grpc.StatusCode.INVALID_ARGUMENT, "current_layer 9"),
    "neuron": (dict(ids=[172]), grpc.StatusCode.INVALID_ARGUMENT, "neuron id 172"),
    "precision": (dict(prec=0), grpc.StatusCode.INVALID_ARGUMENT, "precision"),
    "oversized": (dict(ids=[0] * 101), grpc.StatusCode.RESOURCE_EXHAUSTED, "101"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(make_dram, store_service, case):
    dram = make_dram(max_batch_ids=100, preload_precisions="int4")
    args = dict(model=MODEL, layer=0, ids=[1], prec=1, current_layer=0)
    fields, code, needle = BAD[case]
    args.update(fields)
    got, details = status_of(lambda: dram.fetch(args["model"], args["layer"], args["ids"], args["prec"],
                                                args["current_layer"]))
    assert got == code and needle in details, details
    check(dram, store_service, MODEL, 0, [1], Precision.FULL)   # still serving


def test_passthrough_rpcs_and_health(make_dram, store_service):
    dram = make_dram(preload_precisions="int4")
    manifest = dram.stub.GetManifest(common_pb2.ManifestRequest(model=MODEL), timeout=DEADLINE_S)
    assert '"num_layers": 5' in manifest.manifest_json
    dense = dram.stub.FetchDense(common_pb2.DenseRequest(model=MODEL), timeout=DEADLINE_S)
    store = store_service.catalog.get(MODEL)
    assert {t.name: t.data for t in dense.tensors} == {n: store.get_dense_bytes(n) for n in store.dense_names()}
    assert health(dram.target, "m2cache.v1.DramTier") == "SERVING"
