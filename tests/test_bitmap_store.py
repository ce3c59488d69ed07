"""Pruned stores in the bitmap codec through every path: the store (in process
and gRPC), the DramTier with Redis (hits, preloads, checksums), the worker
(tokens equal the in-process reference on the same store) and ``m2cache run``."""
from __future__ import annotations

import json
import shutil

import grpc
import numpy as np
import pytest
import torch

from checkpoints import corpus, make_tiny_checkpoint, real_model_dir
from m2cache import cli
from m2cache.codec import bitmap
from m2cache.convert.writer import convert
from m2cache.codec.format import RECORDS_FILE, Precision
from m2cache.store.reader import NeuronStore
from m2cache.convert.prune import PruneSpec
from m2cache.errors import ChecksumError
from m2cache.local.loader import load_tokenizer
from m2cache.predictors.ranking import Ranker
from tiers import DramHandle, StoreHandle, start_redis, status_of, wait_for
from worker_stack import RATIOS, WorkerHandle, mixed_choosers, random_predictor, reference_tokens

PROMPT = [1, 365, 118, 263, 431]
HALF = PruneSpec(0.5)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Stores: fp16 llama pruned 50% as bitmap and (reference) as dense, OPT 30%,
    and the real stories260k pruned 50% by Wanda on a little calibration text."""
    tmp = tmp_path_factory.mktemp("pruned")
    llama = make_tiny_checkpoint("llama", tmp / "hf-llama", dtype=torch.float16)
    root = tmp / "root"
    convert(llama, root / "llama-p50", progress=False, prune=HALF)
    convert(llama, root / "llama-p50-dense", progress=False, prune=HALF, codec="dense")
    convert(make_tiny_checkpoint("opt", tmp / "hf-opt"), root / "opt-p30", progress=False, prune=PruneSpec(0.3))
    wanda = PruneSpec(0.5, "wanda", str(corpus("tinystories/valid_000-499_calib.txt")), max_tokens=2048)
    convert(real_model_dir("stories260k"), root / "stories-w50", progress=False, prune=wanda)
    return root


@pytest.fixture(scope="module")
def stack(root):
    """NeuronStore + Redis + DramTier over ``root``."""
    store = StoreHandle(root, max_batch_ids=1000)
    redis = start_redis()
    dram = DramHandle(store.target, redis.url, budget_bytes=1 << 20, num_pinned_layers=1, preload_ahead=1)
    yield store, dram
    dram.stop()
    redis.stop()
    store.stop()


def test_manifest_records_codec_and_pruning(stack):
    store, _ = stack
    m = store.catalog.get("llama-p50").manifest
    assert (m.codec, m.prune) == ("bitmap", {"method": "magnitude", "sparsity": 0.5})
    assert store.catalog.get("llama-p50-dense").manifest.codec == "dense"
    w = store.catalog.get("stories-w50").manifest.prune
    assert w["method"] == "wanda" and w["calibration"]["max_tokens"] == 2048
    # FULL fp16 at 50%: 9 bits per weight, every record
    assert m.max_record_bytes["full"] / m.layout.num_bytes(Precision.FULL) <= 0.57


def test_bitmap_store_reads_back_the_pruned_dense_records(stack):
    store, _ = stack
    sparse, dense = store.catalog.get("llama-p50"), store.catalog.get("llama-p50-dense")
    for layer in range(sparse.manifest.num_layers):
        for prec in Precision:
            assert sparse.get_layer(layer, prec) == dense.get_layer(layer, prec)
            payload, lengths = sparse.get_records(layer, range(sparse.manifest.d_ffn), prec)
            assert len(payload) == lengths.sum() < len(dense.get_layer(layer, prec))
    for name in sparse.dense_names():  # attention and the rest stay unpruned and dense
        assert sparse.get_dense_bytes(name) == dense.get_dense_bytes(name)


def _fetch(stub, model, layer, ids, prec):
    from m2cache_client.pb import common_pb2

    req = common_pb2.NeuronBatchRequest(model=model, layer=layer, neuron_ids=ids, precision=int(prec))
    return stub.FetchNeurons(req, timeout=10)


def test_store_service_and_dram_tier_move_compressed_records(stack):
    store, dram = stack
    local = store.catalog.get("opt-p30")
    ids = [5, 0, 77, 5, 127]
    for prec in Precision:
        a = _fetch(store.stub, "opt-p30", 2, ids, prec)
        b = dram.fetch("opt-p30", 2, ids, int(prec))
        c = dram.fetch("opt-p30", 2, ids, int(prec))  # Redis now holds them
        want = local.get_records(2, ids, prec)
        for batch in (a, b, c):
            assert (batch.codec, batch.payload, list(batch.record_lengths)) == ("bitmap", want[0], want[1].tolist())
            assert batch.record_bytes == local.layout.num_bytes(prec)
        spec = bitmap.element_spec(local.layout, prec)
        decoded = bitmap.decode_bytes(a.payload, a.record_lengths, spec).numpy().tobytes()
        assert decoded == local.get_neurons(2, ids, prec)
    assert dram.stats().bytes_from_redis > 0


def test_preloaded_layers_serve_from_redis(stack):
    _store, dram = stack
    dram.fetch("llama-p50", 0, [1], int(Precision.FULL), current_layer=0, caller_id="pre")
    dram.wait_idle()
    before = dram.stats().bytes_from_redis
    got = dram.fetch("llama-p50", 1, list(range(20)), int(Precision.INT4), current_layer=1, caller_id="pre")
    assert dram.stats().bytes_from_redis - before == len(got.payload) > 0


def test_corrupt_bitmap_record_in_redis_is_refetched(stack):
    store, dram = stack
    ids = list(range(8))
    want = _fetch(store.stub, "llama-p50", 2, ids, Precision.INT8)
    dram.fetch("llama-p50", 2, ids, int(Precision.INT8))
    key = dram.tier.cache.keys("llama-p50", 2, int(Precision.INT8), [3])[0]
    wait_for(lambda: dram.tier.cache.client.exists(key), 5, "the record to reach Redis")
    dram.tier.cache.client.set(key, b"\x00" * 10)
    before = dram.stats().checksum_refetches
    got = dram.fetch("llama-p50", 2, ids, int(Precision.INT8))
    assert got.payload == want.payload and dram.stats().checksum_refetches == before + 1


def test_corrupt_bitmap_record_on_disk_is_data_loss(root, tmp_path):
    bad_root = tmp_path / "bad"
    shutil.copytree(root / "llama-p50", bad_root / "llama-p50")
    store_dir = bad_root / "llama-p50"
    reader = NeuronStore(store_dir)
    try:
        offsets, lengths = reader.record_spans(1, Precision.FULL, np.asarray([9, 10]))
        prefix = bitmap.element_spec(reader.layout, Precision.FULL).prefix_bytes
    finally:
        reader.close()
    with open(store_dir / RECORDS_FILE, "r+b") as f:
        for pos, mask in ((int(offsets[0] + lengths[0]) - 1, 0xFF),  # a packed value of neuron 9
                          (int(offsets[1]) + prefix, 0x01)):  # a bitmap bit of 10: popcount != length
            f.seek(pos)
            byte = f.read(1)[0]
            f.seek(pos)
            f.write(bytes([byte ^ mask]))
    handle = StoreHandle(bad_root)
    try:
        code, details = status_of(lambda: _fetch(handle.stub, "llama-p50", 1, [9], Precision.FULL))
        assert code == grpc.StatusCode.DATA_LOSS and "checksum" in details
        assert _fetch(handle.stub, "llama-p50", 1, [8], Precision.FULL).payload  # others still served
    finally:
        handle.stop()
    unverified = NeuronStore(bad_root / "llama-p50", verify=False)
    try:
        with pytest.raises(ChecksumError, match="corrupt record"):
            unverified.get_neurons(1, [10], Precision.FULL)
    finally:
        unverified.close()


def test_worker_tokens_equal_the_reference_on_a_pruned_store(stack):
    store, dram = stack
    local = store.catalog.get("stories-w50")
    want_mixed = reference_tokens(local, PROMPT, 20, Ranker(random_predictor(local), RATIOS).choose())
    want_full = reference_tokens(local, PROMPT, 20)
    worker = WorkerHandle(dram.target, "stories-w50", mixed_choosers(local), cache_fraction=0.1, window=1)
    try:
        got_mixed, _ = worker.generate(PROMPT, 20)
        got_full, _ = worker.generate(PROMPT, 20, full_precision=True)
        fetched = worker.runtime.fetcher.stats
    finally:
        worker.stop()
    assert got_mixed == want_mixed and got_full == want_full
    assert fetched.bytes > 0 and fetched.decode_seconds > 0


def test_run_cli_on_a_pruned_store(root, stack, tmp_path, capsys):
    copy = shutil.copytree(root / "stories-w50", tmp_path / "stories-w50")  # LMDB opens a path once per process
    rc = cli.main(["run", str(copy), "--prompt", "Once upon a time", "--max-new-tokens", "12", "--token-ids", "--full"])
    ids = json.loads(capsys.readouterr().out)
    store = stack[0].catalog.get("stories-w50")
    prompt = load_tokenizer(store)("Once upon a time").input_ids
    assert rc == 0 and ids == prompt + reference_tokens(store, prompt, 12)


def test_pruning_changes_the_neurons(stack):
    """Guard against a no-op: the Wanda-pruned store really is half zeros in every vector."""
    store = stack[0].catalog.get("stories-w50")
    vectors, _ = store.neuron_weights(0, range(store.manifest.d_ffn), Precision.FULL)
    zeros = (vectors == 0).float().mean(dim=-1)  # [F, nvec]
    d = store.manifest.d_model
    assert torch.allclose(zeros, torch.full_like(zeros, (d // 2) / d))
