"""OpenAI request bodies -> validated m2cache calls: pure functions, no I/O.

Every refusal is a :class:`BadRequest` naming the offending parameter, which the
gateway returns as HTTP 400 in OpenAI's error shape. Unknown parameters are
ignored (as most OpenAI-compatible servers do); known ones m2cache cannot honour
(``n > 1``, ``logprobs``, penalties, tools...) are refused rather than dropped.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from m2cache.errors import InvalidArgument

MAX_JSON_DEPTH = 32
MAX_STOP = 4          # OpenAI's limit
MAX_STOP_CHARS = 256
MAX_TOKENS = 1 << 20  # far above any context; the worker checks the model's own limit
ROLES = ("system", "developer", "user", "assistant", "tool")


class BadRequest(InvalidArgument):
    """A request the gateway refuses with 400; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class Parsed:
    """One validated request: keyword arguments of ``AsyncClient.stream``, and how to answer."""

    kwargs: dict = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object: strict UTF-8, no NaN/Infinity, bounded nesting."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadRequest(f"request body is not valid UTF-8 (byte {err.start})") from None
    try:
        body = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise BadRequest(f"request JSON is nested too deeply (limit {MAX_JSON_DEPTH})") from None
    except json.JSONDecodeError as err:
        raise BadRequest(f"request body is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    _check_depth(body)
    return body


def completion(body: dict, default_max_tokens: int, default_temperature: float, max_chars: int) -> Parsed:
    """/v1/completions."""
    _refuse_unsupported(body, chat=False)
    source = _prompt(body.get("prompt"), max_chars)
    return _parsed(body, source, body.get("max_tokens"), "max_tokens", default_max_tokens, default_temperature)


def chat(body: dict, default_max_tokens: int, default_temperature: float, max_chars: int) -> Parsed:
    """/v1/chat/completions (``max_completion_tokens`` wins over the deprecated ``max_tokens``)."""
    _refuse_unsupported(body, chat=True)
    source = {"messages": _messages(body.get("messages"), max_chars)}
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return _parsed(body, source, body.get(name), name, default_max_tokens, default_temperature)


def _parsed(body: dict, source: dict, max_tokens, max_name: str, default_max_tokens: int,
            default_temperature: float) -> Parsed:
    kwargs = {
        **source,
        "max_new_tokens": default_max_tokens if max_tokens is None else _int(max_tokens, max_name, 1, MAX_TOKENS),
        "temperature": _number(body.get("temperature"), "temperature", 0.0, 2.0, default_temperature),
        "top_p": _number(body.get("top_p"), "top_p", 0.0, 1.0, 1.0),
        "top_k": _int(body.get("top_k", 0) if body.get("top_k") is not None else 0, "top_k", 0, 1 << 20),
        "stop": _stop(body.get("stop")),
    }
    if body.get("seed") is not None:
        kwargs["seed"] = _int(body["seed"], "seed", -(1 << 63), (1 << 64) - 1) & ((1 << 64) - 1)
    stream = _bool(body.get("stream"), "stream", False)
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise BadRequest("stream_options must be an object, and only with stream: true", "stream_options")
    include_usage = _bool((options or {}).get("include_usage"), "stream_options.include_usage", False)
    return Parsed(kwargs, stream, include_usage)


def _refuse_unsupported(body: dict, chat: bool) -> None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("model must be a string", "model")
    if body.get("n") not in (None, 1) or isinstance(body.get("n"), bool):
        raise BadRequest("only n=1 is supported", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0) or isinstance(body.get(name), bool):
            raise BadRequest(f"{name} is not supported (only 0)", name)
    unsupported = {"logprobs": (None, False), "echo": (None, False), "best_of": (None, 1), "suffix": (None, ""),
                   "logit_bias": (None,), "tools": (None,), "functions": (None,), "top_logprobs": (None, 0)}
    for name, allowed in unsupported.items():
        value = body.get(name)
        if value in ({}, []) and None in allowed:
            continue
        if not any(value is a or (value == a and type(value) is type(a)) for a in allowed):
            raise BadRequest(f"{name} is not supported", name)
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise BadRequest("only response_format {'type': 'text'} is supported", "response_format")


def _prompt(prompt, max_chars: int) -> dict:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise BadRequest("prompt must not be empty", "prompt")
        if len(prompt) > max_chars:
            raise BadRequest(f"prompt of {len(prompt)} characters is over the {max_chars}-character limit", "prompt")
        return {"prompt": prompt}
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if len(prompt) > max_chars:
            raise BadRequest(f"prompt of {len(prompt)} tokens is over the limit", "prompt")
        if min(prompt) < 0 or max(prompt) >= 1 << 32:
            raise BadRequest("prompt token ids must be non-negative 32-bit integers", "prompt")
        return {"prompt_token_ids": prompt}
    if isinstance(prompt, list) and len(prompt) > 1:
        raise BadRequest("only one prompt per request is supported", "prompt")
    raise BadRequest("prompt must be a non-empty string or a list of token ids", "prompt")


def _messages(messages, max_chars: int) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    out, total = [], 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f"{where} must be an object", where)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise BadRequest(f"{where}.role must be one of {', '.join(ROLES)}", f"{where}.role")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise BadRequest(f"{where}.content parts must be {{'type': 'text', 'text': str}}", f"{where}.content")
            content = "".join(p["text"] for p in content)
        elif content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise BadRequest(f"{where}.content must be a string or a list of text parts", f"{where}.content")
        total += len(content)
        out.append({"role": role, "content": content})
    if total > max_chars:
        raise BadRequest(f"messages of {total} characters are over the {max_chars}-character limit", "messages")
    return out


def _stop(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise BadRequest("stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise BadRequest(f"stop: at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters", "stop")
    return [s for s in stops if s]


def _int(v, name: str, low: int, high: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"{name} must be an integer, got {_kind(v)}", name)
    if not low <= v <= high:
        raise BadRequest(f"{name} must be in [{low}, {high}], got {v}", name)
    return v


def _number(v, name: str, low: float, high: float, default: float) -> float:
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadRequest(f"{name} must be a number, got {_kind(v)}", name)
    if not math.isfinite(v) or not low <= v <= high:
        raise BadRequest(f"{name} must be in [{low:g}, {high:g}], got {v}", name)
    return float(v)


def _bool(v, name: str, default: bool) -> bool:
    if v is None:
        return default
    if not isinstance(v, bool):
        raise BadRequest(f"{name} must be true or false, got {_kind(v)}", name)
    return v


def _kind(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), type(v).__name__)


def _no_constant(name: str):
    raise BadRequest(f"{name} is not a JSON number")


def _check_depth(body) -> None:
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise BadRequest(f"request JSON is nested too deeply (limit {MAX_JSON_DEPTH})")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
