"""The client library against real workers over the real tiers."""
from __future__ import annotations

import asyncio

import pytest

from m2cache_client import AsyncClient, Client, DeadlineExceeded, InvalidRequest, ModelNotFound, Unavailable
from worker_stack import WorkerHandle, reference_tokens

PROMPT = [1, 365, 118, 263, 431]


@pytest.fixture(scope="module")
def dram(store_service):
    from tiers import DramHandle, start_redis

    redis = start_redis()
    handle = DramHandle(store_service.target, redis.url, budget_bytes=1 << 20)
    yield handle
    handle.stop()
    redis.stop()


@pytest.fixture(scope="module")
def workers(dram):
    handles = [WorkerHandle(dram.target, "stories260k") for _ in range(2)]
    yield handles
    for h in handles:
        h.stop()


@pytest.fixture(scope="module")
def want(store_service):
    return reference_tokens(store_service.catalog.get("stories260k"), PROMPT, 40)


def test_generate_and_stream_in_order(workers, want):
    with Client([w.target for w in workers], model="stories260k", timeout_s=30) as c:
        done = c.generate(prompt_token_ids=PROMPT, max_new_tokens=40)
        streamed = [t.id for t in c.stream(prompt_token_ids=PROMPT, max_new_tokens=40) if t.id >= 0]
        text = c.generate("Once upon a time", max_new_tokens=12)
    assert done.token_ids == want and streamed == want
    assert done.prompt_token_ids == PROMPT and done.finish_reason in ("length", "eos")
    assert done.stats.generated_tokens == 40
    assert isinstance(text.text, str) and len(text.token_ids) == 12 and text.text.strip()


def test_round_robin_spreads_requests(workers):
    before = [w.runtime.engine.requests for w in workers]
    with Client([w.target for w in workers], model="stories260k") as c:
        for _ in range(4):
            c.generate(prompt_token_ids=PROMPT, max_new_tokens=2)
    assert [w.runtime.engine.requests - b for w, b in zip(workers, before)] == [2, 2]


def test_typed_errors_and_deadlines(workers):
    with Client(workers[0].target, model="stories260k") as c:
        with pytest.raises(InvalidRequest):
            c.generate(prompt_token_ids=PROMPT, max_new_tokens=0)
        with pytest.raises(InvalidRequest):
            c.generate(prompt_token_ids=PROMPT, max_new_tokens=4, temperature=-2)
        with pytest.raises(DeadlineExceeded):
            c.generate(prompt_token_ids=PROMPT, max_new_tokens=400, timeout_s=0.05)
    with Client(workers[0].target, model="no-such-model") as c:
        with pytest.raises(ModelNotFound):
            c.generate(prompt_token_ids=PROMPT, max_new_tokens=4)
    with Client("127.0.0.1:1", retries=1, backoff_s=0.01, timeout_s=2) as c:
        with pytest.raises(Unavailable):
            c.generate(prompt_token_ids=PROMPT, max_new_tokens=4)


def test_async_client(workers, want):
    async def run():
        async with AsyncClient([w.target for w in workers], model="stories260k") as c:
            done = await c.generate(prompt_token_ids=PROMPT, max_new_tokens=40)
            streamed = [t.id async for t in c.stream(prompt_token_ids=PROMPT, max_new_tokens=40) if t.id >= 0]
            return done, streamed

    done, streamed = asyncio.run(run())
    assert done.token_ids == want and streamed == want


def test_retry_onto_second_worker_when_first_stops_mid_run(dram, want):
    first, second = WorkerHandle(dram.target, "stories260k"), WorkerHandle(dram.target, "stories260k")
    try:
        with Client([first.target, second.target], model="stories260k", backoff_s=0.05) as c:
            got = []
            for i, token in enumerate(c.stream(prompt_token_ids=PROMPT, max_new_tokens=40)):
                if token.id >= 0:
                    got.append(token.id)
                if i == 5:
                    first.server.stop(0)  # the worker streaming to us goes away mid-run
        assert got == want  # resumed on the second worker from prompt + tokens so far
        assert second.runtime.engine.requests == 1
    finally:
        first.stop()
        second.stop()
