"""Blocking client: ``generate`` and ``stream`` against one or more workers.

- Every call has a deadline (``timeout_s``).
- Targets: a list of ``host:port`` used round-robin, or one ``dns:///name:port``
  whose addresses gRPC balances itself (``round_robin`` policy).
- UNAVAILABLE is retried on the next target. A stream that breaks after some
  tokens resumes on the next worker from the prompt plus the tokens received
  (exact for greedy decoding; a seeded sampler restarts its random stream).
- Errors are raised as the typed exceptions in ``m2cache_client.errors``.
"""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import grpc

from m2cache_client.errors import M2CacheClientError, Unavailable, from_rpc_error
from m2cache_client.pb import common_pb2, worker_pb2, worker_pb2_grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Token:
    id: int
    text: str


@dataclass(slots=True)
class Completion:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str = ""
    stats: worker_pb2.GenerationStats | None = None


@dataclass(slots=True)
class Progress:
    """What one logical stream has received so far (for resuming elsewhere)."""

    prompt_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    stats: worker_pb2.GenerationStats | None = None

    @property
    def done(self) -> bool:
        return self.stats is not None

    def absorb(self, msg: worker_pb2.GenerateResponse) -> Token | None:
        """Record one streamed message; the token to hand the caller (the final
        message carries stats and at most some held-back text, id -1)."""
        if msg.prompt_token_ids and not self.prompt_ids:
            self.prompt_ids = list(msg.prompt_token_ids)
        if msg.HasField("stats"):
            self.stats = msg.stats
            return Token(-1, msg.text) if msg.text else None
        self.token_ids.append(msg.token_id)
        return Token(msg.token_id, msg.text)


def give_up(err: grpc.RpcError, attempt: int, retries: int, end: float) -> M2CacheClientError | None:
    """The typed error to raise, or None when the call should be retried elsewhere."""
    typed = from_rpc_error(err)
    if not isinstance(typed, Unavailable) or attempt == retries or time.monotonic() >= end:
        return typed
    return None


def backoff_s(base: float, attempt: int, end: float) -> float:
    return min(base * 2**attempt, max(end - time.monotonic(), 0))


def channel_options(targets: Sequence[str]) -> list[tuple[str, object]]:
    opts: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
    if len(targets) == 1 and targets[0].startswith("dns:"):
        opts.append(("grpc.lb_policy_name", "round_robin"))
    return opts


def build_request(prompt: str | None, prompt_token_ids: Sequence[int] | None, messages: Sequence[dict] | None,
                  max_new_tokens: int, model: str, temperature: float, top_p: float, top_k: int, seed: int | None,
                  stop: Sequence[str], full_precision: bool) -> worker_pb2.GenerateRequest:
    if sum(x is not None for x in (prompt, prompt_token_ids, messages)) != 1:
        raise ValueError("give exactly one of prompt, prompt_token_ids or messages")
    sampling = worker_pb2.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k,
                                         seed=seed or 0, has_seed=seed is not None)
    chat = [worker_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages or ()]
    return worker_pb2.GenerateRequest(model=model, prompt=prompt or "", prompt_token_ids=list(prompt_token_ids or []),
                                      max_new_tokens=max_new_tokens, sampling=sampling, stop=list(stop),
                                      full_precision=full_precision, messages=chat)


def resumed(request: worker_pb2.GenerateRequest, progress: Progress) -> worker_pb2.GenerateRequest:
    """The request that continues ``progress`` on another worker."""
    if not progress.prompt_ids:
        return request
    again = worker_pb2.GenerateRequest()
    again.CopyFrom(request)
    again.prompt = ""
    again.ClearField("messages")
    again.ClearField("prompt_token_ids")
    again.prompt_token_ids.extend(progress.prompt_ids + progress.token_ids)
    again.max_new_tokens = request.max_new_tokens - len(progress.token_ids)
    return again


class ClientBase:
    """Settings and channels shared by ``Client`` and ``AsyncClient``; ``channels``
    is ``grpc`` or ``grpc.aio`` (both offer secure_channel / insecure_channel)."""

    def __init__(self, targets: str | Sequence[str], *, model: str = "", timeout_s: float = 120.0,
                 retries: int = 3, backoff_s: float = 0.2, tls: bool = False,
                 root_certificates: bytes | None = None, certificate_chain: bytes | None = None,
                 private_key: bytes | None = None, token: str = "", server_name: str = "", channels=grpc):
        """``tls``: TLS channels verified against ``root_certificates`` (PEM; None = the
        system's roots); ``certificate_chain`` + ``private_key`` (PEM) present a client
        certificate (mTLS); ``token`` is sent as ``authorization: Bearer <token>`` on
        every call; ``server_name`` overrides the name checked in the server's certificate."""
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        if not self.targets:
            raise ValueError("at least one worker target is needed")
        if bool(certificate_chain) != bool(private_key):
            raise ValueError("certificate_chain and private_key go together")
        self.model, self.timeout_s, self.retries, self.backoff_s = model, timeout_s, retries, backoff_s
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        creds = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain) if tls else None
        opts = channel_options(self.targets)
        if server_name:
            opts.append(("grpc.ssl_target_name_override", server_name))
        self._channels = [channels.secure_channel(t, creds, opts) if creds else channels.insecure_channel(t, opts)
                          for t in self.targets]
        self._stubs = [worker_pb2_grpc.WorkerStub(c) for c in self._channels]
        self._next = itertools.count()

    def _begin(self, prompt, prompt_token_ids, messages, max_new_tokens, temperature, top_p, top_k, seed, stop,
               full_precision, timeout_s, progress_out) -> tuple[worker_pb2.GenerateRequest, Progress, float]:
        """(request, progress record, monotonic deadline) of one logical stream."""
        request = build_request(prompt, prompt_token_ids, messages, max_new_tokens, self.model, temperature, top_p,
                                top_k, seed, stop, full_precision)
        progress = progress_out if progress_out is not None else Progress()
        return request, progress, time.monotonic() + (timeout_s or self.timeout_s)


class Client(ClientBase):
    """A client of m2cache workers. Thread-safe; close() or use as a context manager."""

    def __init__(self, targets: str | Sequence[str], **kwargs):
        super().__init__(targets, **kwargs)
        self._lock = threading.Lock()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for ch in self._channels:
            ch.close()

    def _stub(self) -> worker_pb2_grpc.WorkerStub:
        with self._lock:
            return self._stubs[next(self._next) % len(self._stubs)]

    def stream(self, prompt: str | None = None, *, prompt_token_ids: Sequence[int] | None = None,
               messages: Sequence[dict] | None = None,
               max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 0.0, top_k: int = 0,
               seed: int | None = None, stop: Sequence[str] = (), full_precision: bool = False,
               timeout_s: float | None = None, progress_out: Progress | None = None) -> Iterator[Token]:
        """Yield tokens as the worker samples them."""
        request, progress, end = self._begin(prompt, prompt_token_ids, messages, max_new_tokens, temperature, top_p,
                                             top_k, seed, stop, full_precision, timeout_s, progress_out)
        for attempt in range(self.retries + 1):
            try:
                call = self._stub().Generate(resumed(request, progress), timeout=max(end - time.monotonic(), 0.001),
                                             metadata=self.metadata)
                try:
                    for msg in call:
                        token = progress.absorb(msg)
                        if token is not None:
                            yield token
                finally:
                    call.cancel()  # a caller that stops iterating (or is closed) ends the RPC now
                return
            except grpc.RpcError as err:
                typed = give_up(err, attempt, self.retries, end)
                if typed is not None:
                    raise typed from None
                time.sleep(backoff_s(self.backoff_s, attempt, end))
        raise Unavailable(grpc.StatusCode.UNAVAILABLE, "no worker answered")

    def generate(self, prompt: str | None = None, **kwargs) -> Completion:
        """The whole completion at once (same arguments as ``stream``)."""
        progress = Progress()
        text = "".join(t.text for t in self.stream(prompt, progress_out=progress, **kwargs))
        stats = progress.stats
        return Completion(text, progress.token_ids, progress.prompt_ids,
                          stats.finish_reason if stats else "", stats)

    def stats(self, timeout_s: float = 10.0) -> list[worker_pb2.WorkerStats]:
        """GetStats of every target."""
        try:
            return [s.GetStats(common_pb2.StatsRequest(), timeout=timeout_s, metadata=self.metadata)
                    for s in self._stubs]
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None


__all__ = ["Client", "Completion", "Token", "M2CacheClientError"]
