"""Property-based tests (hypothesis) of the request parsers: whatever JSON or
bytes arrive, the gateway's parser returns a request within every documented
bound or refuses it with BadRequest naming a parameter, and never raises anything
else (which would be a 500); the worker's validation likewise refuses with
InvalidArgument only."""
from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m2cache.errors import InvalidArgument
from m2cache.gateway import validate
from m2cache.model.generate import Sampling
from m2cache.worker.server import validate_request
from m2cache_client.pb import worker_pb2

json_scalars = st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=6)
FIELDS = ["prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "stop",
          "stream", "stream_options", "seed", "n", "logprobs", "echo", "best_of", "suffix", "logit_bias",
          "presence_penalty", "frequency_penalty", "response_format", "model", "user", "tools"]
# Bodies mostly made of the fields the parser reads, with arbitrary values, plus good values to mix in.
good = {"prompt": st.sampled_from(["hi", "Once upon a time"]), "max_tokens": st.integers(1, 64),
        "temperature": st.floats(0, 2), "top_p": st.floats(0, 1), "stream": st.booleans(),
        "messages": st.just([{"role": "user", "content": "hi"}]), "stop": st.lists(st.text(max_size=5), max_size=4)}
values = {f: (good[f] | json_values) if f in good else json_values for f in FIELDS}
bodies = st.fixed_dictionaries({}, optional=values)


def check_parsed(p: validate.Parsed) -> None:
    k = p.kwargs
    assert 1 <= k["max_new_tokens"] <= validate.MAX_TOKENS
    assert math.isfinite(k["temperature"]) and 0 <= k["temperature"] <= 2
    assert 0 <= k["top_p"] <= 1 and k["top_k"] >= 0
    assert isinstance(k["stop"], list) and len(k["stop"]) <= validate.MAX_STOP
    assert all(isinstance(s, str) and s for s in k["stop"])
    assert sum(key in k for key in ("prompt", "prompt_token_ids", "messages")) == 1
    if "prompt" in k:
        assert isinstance(k["prompt"], str) and k["prompt"]
    if "prompt_token_ids" in k:
        assert all(isinstance(t, int) and 0 <= t < 1 << 32 for t in k["prompt_token_ids"])
    if "messages" in k:
        assert all(m["role"] in validate.ROLES and isinstance(m["content"], str) for m in k["messages"])
    if "seed" in k:
        assert 0 <= k["seed"] < 1 << 64
    assert isinstance(p.stream, bool) and isinstance(p.include_usage, bool)
    assert not p.include_usage or p.stream


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies, st.booleans())
def test_gateway_parser_accepts_only_valid_requests(body, chat):
    parse = validate.chat if chat else validate.completion
    try:
        parsed = parse(body, 16, 1.0, 1 << 20)
    except validate.BadRequest as err:
        assert str(err)
        return
    check_parsed(parsed)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=100).map(str.encode))
def test_json_parser_refuses_with_bad_request_only(raw):
    try:
        body = validate.parse_json(raw)
    except validate.BadRequest:
        return
    assert isinstance(body, dict)


@settings(max_examples=100, deadline=None)
@given(json_values)
def test_json_round_trip_of_any_object(value):
    import json

    raw = json.dumps({"v": value}, allow_nan=False).encode() if _finite(value) else b"{}"
    assert "v" in validate.parse_json(raw) or raw == b"{}"


def _finite(v) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, list):
        return all(map(_finite, v))
    if isinstance(v, dict):
        return all(map(_finite, v.values()))
    return True


requests = st.builds(
    worker_pb2.GenerateRequest,
    prompt=st.text(max_size=30), prompt_token_ids=st.lists(st.integers(0, (1 << 32) - 1), max_size=5),
    max_new_tokens=st.integers(0, (1 << 32) - 1),
    sampling=st.builds(worker_pb2.SamplingParams, temperature=st.floats(), top_p=st.floats(),
                       top_k=st.integers(0, (1 << 32) - 1)),
    stop=st.lists(st.text(max_size=300), max_size=20),
    messages=st.lists(st.builds(worker_pb2.ChatMessage, role=st.sampled_from(["user", "assistant", "x", ""]),
                                content=st.text(max_size=10)), max_size=3))


@settings(max_examples=200, deadline=None)
@given(requests)
def test_worker_validation_refuses_with_invalid_argument_only(req):
    try:
        validate_request(req)
        s = req.sampling
        Sampling(temperature=s.temperature, top_k=s.top_k or None,
                 top_p=None if s.top_p in (0.0, 1.0) else s.top_p)
    except InvalidArgument:
        return
    assert req.max_new_tokens >= 1
    assert sum(map(bool, (req.prompt, req.prompt_token_ids, req.messages))) == 1
    assert math.isfinite(req.sampling.temperature) and req.sampling.temperature >= 0
    assert len(req.stop) <= 16 and all(0 < len(s) <= 256 for s in req.stop)
