"""OpenAI wire format <-> m2cache client calls: pure translation, no I/O."""
from __future__ import annotations

import time
import uuid

from m2cache.errors import InvalidArgument

FINISH = {"length": "length", "eos": "stop", "stop": "stop", "cancelled": "stop"}


def sampling_kwargs(body: dict, default_max_tokens: int) -> dict:
    """Validated keyword arguments for Client.stream from a request body."""
    if body.get("n", 1) != 1:
        raise InvalidArgument("only n=1 is supported")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or default_max_tokens
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else list(stop)
    kwargs = {
        "max_new_tokens": _int(max_tokens, "max_tokens"),
        "temperature": _float(body.get("temperature", 1.0), "temperature"),
        "top_p": _float(body.get("top_p", 1.0), "top_p"),
        "stop": stop,
    }
    if body.get("seed") is not None:
        kwargs["seed"] = _int(body["seed"], "seed")
    return kwargs


def completion_prompt(body: dict) -> dict:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return {"prompt_token_ids": prompt}
    if not isinstance(prompt, str) or not prompt:
        raise InvalidArgument("prompt must be a non-empty string (or one list of token ids)")
    return {"prompt": prompt}


def chat_messages(body: dict) -> dict:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument("messages must be a non-empty list")
    out = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str) or not isinstance(m.get("role"), str):
            raise InvalidArgument("each message needs a string role and content")
        out.append({"role": m["role"], "content": content})
    return {"messages": out}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, text: str, finish: str, prompt_tokens: int, n_tokens: int) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": FINISH.get(finish, "stop")}],
            "usage": usage(prompt_tokens, n_tokens)}


def completion_chunk(rid: str, model: str, text: str, finish: str | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None,
                         "finish_reason": FINISH.get(finish, "stop") if finish else None}]}


def chat_body(rid: str, model: str, text: str, finish: str, prompt_tokens: int, n_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": FINISH.get(finish, "stop")}],
            "usage": usage(prompt_tokens, n_tokens)}


def chat_chunk(rid: str, model: str, text: str | None, finish: str | None, first: bool = False) -> dict:
    delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": FINISH.get(finish, "stop") if finish else None}]}


def models_body(model: str) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "m2cache"}]}


def error_body(message: str, kind: str, code: int) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidArgument(f"{name} must be an integer")
    return v


def _float(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InvalidArgument(f"{name} must be a number")
    return float(v)
