"""The OpenAI-compatible gateway, driven by the official openai client, over
real workers and tiers."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from m2cache.gateway import server as gateway_server
from m2cache.gateway.config import GatewayConfig
from worker_stack import WorkerHandle, reference_tokens

MODEL = "tinystories-656k"


@pytest.fixture(scope="module")
def stack(store_service):
    from tiers import DramHandle, start_redis

    redis = start_redis()
    dram = DramHandle(store_service.target, redis.url, budget_bytes=1 << 20)
    worker = WorkerHandle(dram.target, MODEL)
    server = gateway_server.create_server(GatewayConfig(workers=worker.target, model=MODEL,
                                                        address="127.0.0.1:0", timeout_s=60)).start()
    yield f"http://127.0.0.1:{server.port}", worker
    server.stop()
    worker.stop()
    dram.stop()
    redis.stop()


@pytest.fixture(scope="module")
def oai(stack):
    return openai.OpenAI(base_url=stack[0] + "/v1", api_key="unused", timeout=60, max_retries=0)


def test_models_health_metrics(stack, oai):
    assert [m.id for m in oai.models.list().data] == [MODEL]
    with urllib.request.urlopen(stack[0] + "/health", timeout=5) as r:
        assert r.status == 200 and json.load(r)["status"] == "ok"
    with urllib.request.urlopen(stack[0] + "/metrics", timeout=5) as r:
        assert b"m2cache_gateway_requests" in r.read()


def test_completion_equals_worker_greedy(stack, oai, store_service):
    worker = stack[1]
    ids = worker.runtime.encode("Once upon a time")
    want = reference_tokens(store_service.catalog.get(MODEL), ids, 20)
    resp = oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=0)
    assert resp.choices[0].text == worker.runtime.tokenizer.decode(want, skip_special_tokens=True)
    assert resp.usage.completion_tokens == 20 and resp.choices[0].finish_reason == "length"


def test_streaming_completion_and_chat(stack, oai):
    whole = oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=0)
    chunks = list(oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=0,
                                         stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    chat = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}],
                                       max_tokens=16, temperature=0)
    stream = list(oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}],
                                              max_tokens=16, temperature=0, stream=True))
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content


def test_errors_map_to_http_codes(stack, oai):
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="other-model", prompt="hi", max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=MODEL, prompt="hi", max_tokens=4, temperature=-1)
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=MODEL, prompt="", max_tokens=4)
    req = urllib.request.Request(stack[0] + "/v1/completions", data=b"not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == 400


def test_help_states_the_default_temperature():
    from m2cache.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices["serve"]
    gateway = next(a for a in sub._subparsers._group_actions if a.dest == "service").choices["gateway"]
    text = " ".join(gateway.format_help().split())
    assert 'samples at 1.0' in text and "greedy (temperature 0)" in text
