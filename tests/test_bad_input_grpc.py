"""Bad input on the gRPC APIs of a real worker (over a real DramTier, Redis and
store) and of the DramTier: each gets a precise status (INVALID_ARGUMENT, not
UNKNOWN or INTERNAL; RESOURCE_EXHAUSTED for oversized batches), and the worker
keeps serving correct tokens afterwards."""
from __future__ import annotations

import grpc
import pytest

from tiers import DramHandle, start_redis
from worker_stack import WorkerHandle, reference_tokens, status_of
from m2cache_client.pb import common_pb2, dram_pb2, worker_pb2

MODEL = "tinystories-656k"


@pytest.fixture(scope="module")
def worker(store_service):
    redis = start_redis()
    dram = DramHandle(store_service.target, redis.url, budget_bytes=1 << 20, max_batch_ids=1000)
    handle = WorkerHandle(dram.target, MODEL)
    handle.dram = dram
    yield handle
    handle.stop()
    dram.stop()
    redis.stop()


def generate(worker, **fields):
    fields.setdefault("model", MODEL)
    fields.setdefault("max_new_tokens", 4)
    return lambda: list(worker.stub.Generate(worker_pb2.GenerateRequest(**fields), timeout=30))


def code_and_details(call) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as err:
        return err.code(), err.details()
    raise AssertionError("call succeeded; expected an error status")


@pytest.mark.parametrize("fields, words", [
    ({"prompt": "hi", "sampling": worker_pb2.SamplingParams(temperature=float("nan"))}, "temperature"),
    ({"prompt": "hi", "sampling": worker_pb2.SamplingParams(temperature=float("inf"))}, "temperature"),
    ({"prompt": "hi", "sampling": worker_pb2.SamplingParams(temperature=-0.5)}, "temperature"),
    ({"prompt": "hi", "sampling": worker_pb2.SamplingParams(temperature=1, top_p=float("nan"))}, "top_p"),
    ({"prompt": "hi", "sampling": worker_pb2.SamplingParams(temperature=1, top_p=7)}, "top_p"),
    ({"prompt": ""}, "empty prompt"),
    ({}, "empty prompt"),
    ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt_token_ids": [1, 10**9]}, "token ids"),
    ({"prompt_token_ids": [1] * 100_000}, "context length"),
    ({"prompt": "x" * (2 << 20)}, "character limit"),
    ({"prompt": "hi", "max_new_tokens": 1 << 31}, "context length"),
    ({"prompt": "hi", "prompt_token_ids": [1, 2]}, "only one"),
    ({"messages": [worker_pb2.ChatMessage(role="wizard", content="hi")]}, "roles"),
    ({"prompt": "hi", "stop": ["x"] * 17}, "stop"),
    ({"prompt": "hi", "stop": [""]}, "stop"),
], ids=["nan-temperature", "inf-temperature", "negative-temperature", "nan-top-p", "top-p-7", "empty-prompt",
        "no-prompt", "zero-tokens", "token-id-out-of-range", "prompt-over-context", "huge-prompt-text",
        "max-tokens-over-context", "two-prompts", "bad-role", "too-many-stops", "empty-stop"])
def test_bad_requests_are_invalid_argument(worker, fields, words):
    code, details = code_and_details(generate(worker, **fields))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert words in details, details


def test_malformed_protobuf_is_invalid_argument(worker):
    raw = worker.channel.unary_stream("/m2cache.v1.Worker/Generate", request_serializer=None,
                                      response_deserializer=None)
    for junk in (b"\xff\xff\xff\xff", b"\x0a\xff\x01abc", b"\x12\x05hi"):
        code, details = code_and_details(lambda: list(raw(junk, timeout=10)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in details, (junk, code, details)
    stats = worker.channel.unary_unary("/m2cache.v1.Worker/GetStats", request_serializer=None,
                                       response_deserializer=None)
    assert status_of(lambda: stats(b"\x08\x80", timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT


def test_wrong_model_is_not_found(worker):
    assert status_of(generate(worker, model="other", prompt="hi")) == grpc.StatusCode.NOT_FOUND


def test_oversized_batches_on_the_dram_tier(worker):
    batch = common_pb2.NeuronBatchRequest(model=MODEL, layer=0, neuron_ids=list(range(1001)), precision=1)
    req = dram_pb2.DramFetchRequest(batch=batch, current_layer=0, caller_id="t")
    code, details = code_and_details(lambda: worker.dram.stub.FetchNeurons(req, timeout=10))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    bad_layer = dram_pb2.DramFetchRequest(batch=common_pb2.NeuronBatchRequest(model=MODEL, layer=999,
                                                                              neuron_ids=[0], precision=1))
    assert status_of(lambda: worker.dram.stub.FetchNeurons(bad_layer, timeout=10)) in (
        grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE)


def test_still_serving_correct_tokens(worker, store_service):
    ids = worker.runtime.encode("Once upon a time")
    got, stats = worker.generate(ids, 8)
    assert got == reference_tokens(store_service.catalog.get(MODEL), ids, 8)
    assert stats.generated_tokens == 8
