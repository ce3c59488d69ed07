"""Decode worker over the real tiers: caching never changes results, batching
never changes results, bad input gets clear codes, faults leave it healthy."""
from __future__ import annotations

import threading
import time

import grpc
import pytest
import transformers
from prometheus_client import generate_latest
import torch

from checkpoints import real_model_dir
from m2cache.predictors.ranking import Ranker
from m2cache.worker.metrics import worker_registry
from worker_stack import RATIOS, WorkerHandle, mixed_choosers, random_predictor, reference_tokens, status_of

PROMPT = [1, 365, 118, 263, 431]  # ids valid for every test model (vocab >= 512)


@pytest.fixture(scope="module")
def dram(store_service, tmp_path_factory):
    from tiers import DramHandle, start_redis

    redis = start_redis()
    handle = DramHandle(store_service.target, redis.url, budget_bytes=1 << 20, num_pinned_layers=1, preload_ahead=1)
    yield handle
    handle.stop()
    redis.stop()


@pytest.fixture(scope="module")
def stories(store_service):
    """The stories260k store as the store server opened it (LMDB opens an env once per process)."""
    return store_service.catalog.get("stories260k")


def test_full_precision_matches_transformers(dram):
    worker = WorkerHandle(dram.target, "tinystories-656k", cache_fraction=1.0)
    try:
        ids, stats = worker.generate(PROMPT, 32, full_precision=True)
    finally:
        worker.stop()
    hf = transformers.AutoModelForCausalLM.from_pretrained(real_model_dir("tinystories-656k"))
    want = hf.generate(torch.tensor([PROMPT]), max_new_tokens=32, do_sample=False)[0, len(PROMPT):].tolist()
    assert ids == want[: len(ids)] and (len(ids) == 32 or ids[-1] in (2,))
    assert stats.generated_tokens == len(ids) and stats.finish_reason in ("length", "eos")


@pytest.mark.parametrize("fraction,window,prefetch", [(1.0, 4, "auto"), (0.5, 2, "off"), (0.25, 4, "on"),
                                                     (0.25, 4, "off"), (0.1, 1, "on")])
def test_caching_never_changes_mixed_precision_tokens(dram, stories, fraction, window, prefetch):
    """Every budget and window, with the side-thread prefetch (a CUDA worker's default) and without
    (a CPU worker's): the same tokens as the in-process reference."""
    store = stories
    want = reference_tokens(store, PROMPT, 24, Ranker(random_predictor(store), RATIOS).choose())
    worker = WorkerHandle(dram.target, "stories260k", mixed_choosers(store), cache_fraction=fraction, window=window,
                          prefetch=prefetch)
    try:
        got, stats = worker.generate(PROMPT, 24)
        cache = worker.runtime.cache
        assert cache.num_bytes <= cache.budget_bytes <= fraction * cache_ffn_bytes(store) + 1
        used = worker.runtime.provider.stats.prefetched_used
    finally:
        worker.stop()
    assert got == want
    assert (used > 0) == (prefetch == "on"), used  # the prefetch ran (and was used) exactly when asked
    assert 0.0 <= stats.hbm_hit_rate <= 1.0
    if fraction == 1.0:
        assert stats.hbm_hit_rate > 0.3  # most chosen neurons repeat between tokens


def cache_ffn_bytes(store) -> int:
    from m2cache.codec.format import Precision

    m = store.manifest
    return m.num_layers * m.d_ffn * m.layout.num_bytes(Precision.FULL)


def test_eight_concurrent_streams_match_alone(dram, stories):
    store = stories
    worker = WorkerHandle(dram.target, "stories260k", mixed_choosers(store), cache_fraction=0.25, max_batch=8)
    prompts = [PROMPT[: 2 + i % 4] + [300 + i] for i in range(8)]
    lengths = [4 + 2 * i for i in range(8)]  # unequal: rows join and leave the batch at different steps
    try:
        alone = [worker.generate(p, n)[0] for p, n in zip(prompts, lengths)]
        together: list = [None] * 8
        barrier = threading.Barrier(8)

        def run(i):
            barrier.wait()
            together[i] = worker.generate(prompts[i], lengths[i])[0]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        worker.stop()
    assert together == alone
    assert [len(t) for t in together] == lengths


def test_bad_input_gets_clear_codes_and_worker_survives(dram):
    worker = WorkerHandle(dram.target, "stories260k", max_batch=1, max_queue=0, queue_timeout_s=1.0)
    try:
        ctx = worker.runtime.engine.max_context
        assert status_of(lambda: worker.generate([1] * ctx, 8)) == grpc.StatusCode.INVALID_ARGUMENT
        assert status_of(lambda: worker.generate(PROMPT, 0)) == grpc.StatusCode.INVALID_ARGUMENT
        assert status_of(lambda: worker.generate(PROMPT, 4, model="nope")) == grpc.StatusCode.NOT_FOUND
        bad_sampling = {"sampling": {"temperature": -1.0}}
        assert status_of(lambda: worker.generate(PROMPT, 4, **bad_sampling)) == grpc.StatusCode.INVALID_ARGUMENT
        assert status_of(lambda: worker.generate(PROMPT, 4, sampling={"top_p": 1.5})) == grpc.StatusCode.INVALID_ARGUMENT
        assert status_of(lambda: worker.generate([99999], 4)) == grpc.StatusCode.INVALID_ARGUMENT
        # one slot, no queue: a second concurrent request is refused, the first completes
        first = worker.stub.Generate(_req(worker, 40), timeout=60)
        next(first)  # the first holds the only slot now
        assert status_of(lambda: worker.generate(PROMPT, 4)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len([m for m in first if not m.HasField("stats")]) == 39
        ids, _ = worker.generate(PROMPT, 4)  # unharmed
        assert len(ids) == 4
    finally:
        worker.stop()


def _req(worker, n):
    from m2cache_client.pb import worker_pb2

    return worker_pb2.GenerateRequest(model=worker.config.model, prompt_token_ids=PROMPT, max_new_tokens=n)


def test_sampling_with_seed_is_reproducible(dram):
    worker = WorkerHandle(dram.target, "stories260k")
    try:
        s = {"temperature": 0.9, "top_k": 40, "top_p": 0.95, "seed": 7, "has_seed": True}
        a, _ = worker.generate(PROMPT, 16, sampling=s)
        b, _ = worker.generate(PROMPT, 16, sampling=s)
        metrics = generate_latest(worker_registry(worker.runtime)).decode()
    finally:
        worker.stop()
    assert a == b and len(a) == 16
    assert "m2cache_worker_tokens_total 32.0" in metrics
    assert 'm2cache_worker_hbm_lookups_total{result="hit"}' in metrics


def test_over_budget_dense_layers_stream_and_match(dram, stories):
    """Resident parts over the device budget: later layers' attention streams per step."""
    m = stories.manifest
    non_attention = sum(torch.Size(v["shape"]).numel() * 4 for n, v in m.dense.items() if "self_attn." not in n)
    layer0 = sum(torch.Size(v["shape"]).numel() * 4 for n, v in m.dense.items() if n.startswith("model.layers.0.self_attn."))
    want = reference_tokens(stories, PROMPT, 20, Ranker(random_predictor(stories), RATIOS).choose())
    worker = WorkerHandle(dram.target, "stories260k", mixed_choosers(stories), dense_budget_bytes=non_attention + layer0)
    try:
        got, _ = worker.generate(PROMPT, 20)
        streamer = worker.runtime.streamer
        assert sorted(streamer.streamed) == list(range(1, m.num_layers))
        assert streamer.bytes >= 20 * (m.num_layers - 1) * layer0  # every step fetched them again
    finally:
        worker.stop()
    assert got == want
    with pytest.raises(Exception, match="dense budget"):
        WorkerHandle(dram.target, "stories260k", dense_budget_bytes=1000)


def test_client_going_away_cancels_its_sequence(dram):
    worker = WorkerHandle(dram.target, "stories260k", max_batch=1)
    try:
        stream = worker.stub.Generate(_req(worker, 400), timeout=60)
        next(stream)
        stream.cancel()  # the client goes away mid-generation
        engine = worker.runtime.engine
        deadline = time.monotonic() + 10
        while engine.num_active and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.num_active == 0 and engine.kv.num_free == 1  # slot back, decoding stopped
        assert engine.tokens < 400
        ids, _ = worker.generate(PROMPT, 4)  # the freed slot serves the next request
        assert len(ids) == 4
    finally:
        worker.stop()


def test_stop_strings_end_the_stream_before_them(dram):
    from m2cache_client.pb import worker_pb2

    worker = WorkerHandle(dram.target, "tinystories-656k")

    def run(stop):
        req = worker_pb2.GenerateRequest(model="tinystories-656k", prompt="Once upon a time", max_new_tokens=40,
                                         stop=stop)
        msgs = list(worker.stub.Generate(req, timeout=60))
        return "".join(m.text for m in msgs), msgs[-1].stats

    try:
        full, stats = run([])
        cut, stopped = run(["Lily"])
    finally:
        worker.stop()
    assert "Lily" in full and stats.finish_reason == "length"
    assert cut == full[: full.index("Lily")] and stopped.finish_reason == "stop"
    assert stopped.generated_tokens < stats.generated_tokens
