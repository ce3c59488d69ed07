"""m2cache results -> OpenAI wire format: pure translation, no I/O."""
from __future__ import annotations

import time
import uuid

FINISH = {"length": "length", "eos": "stop", "stop": "stop", "cancelled": "stop"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, stats=None) -> dict:
    """OpenAI's usage object; with the request's GenerationStats, also its energy,
    CO2 and cost when the worker measured or modelled them (an extension: clients
    that do not know the fields ignore them)."""
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if stats is not None and stats.energy_source:
        out.update(energy_j=stats.energy_j, energy_source=stats.energy_source, gco2=stats.gco2,
                   cost_usd=stats.cost_usd)
    return out


def _finish(reason: str | None) -> str | None:
    return FINISH.get(reason, "stop") if reason else None


def completion_body(rid: str, model: str, text: str, finish: str, use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": _finish(finish) or "stop"}],
            "usage": use}


def completion_chunk(rid: str, model: str, text: str | None, finish: str | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": _finish(finish)}]}


def chat_body(rid: str, model: str, text: str, finish: str, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": _finish(finish) or "stop"}],
            "usage": use}


def chat_chunk(rid: str, model: str, text: str | None, finish: str | None, first: bool = False) -> dict:
    delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": _finish(finish)}]}


def usage_chunk(rid: str, model: str, chat: bool, use: dict) -> dict:
    """The extra last chunk of a stream with ``stream_options.include_usage``."""
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [], "usage": use}


def models_body(model: str) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "m2cache"}]}


def error_body(message: str, kind: str, code: int | str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
