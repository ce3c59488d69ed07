"""Shared gRPC plumbing: the one place typed errors become status codes (and
status codes typed errors again, in :class:`Rpc`), server creation (health +
reflection), graceful shutdown, client channels, and the RPC helper every
service-to-service client uses (deadlines, retries of retryable codes only).
Servers and channels are TLS/mTLS (and servers token-guarded) as
``m2cache.security`` says: the process-wide setting, or an explicit ``security=``."""
from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from m2cache import security as sec
from m2cache.errors import InvalidArgument, M2CacheError

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 512 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Reconnect quickly after a peer restarts: callers retry within their own
    # deadlines, and gRPC's default backoff (1 s growing to 120 s) would make a
    # restarted service look down long after it is back.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def status_code(err: M2CacheError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, err.code, grpc.StatusCode.INTERNAL)


def _parse(deserializer: Callable | None, raw: bytes):
    """Deserialize inside the handler, so a malformed message is INVALID_ARGUMENT
    (gRPC's own deserialization failure is INTERNAL)."""
    if deserializer is None:
        return raw
    try:
        return deserializer(raw)
    except Exception:  # DecodeError and friends: the bytes are not this message
        raise InvalidArgument("malformed request message") from None


def _internal(err: Exception, context) -> None:
    """An unexpected exception: logged here with its traceback, INTERNAL to the caller,
    whose message never shows server paths or internals."""
    log.exception("unhandled error in %s", type(err).__name__)
    context.abort(grpc.StatusCode.INTERNAL, "internal error (see the server's log)")


def _wrap_unary(fn: Callable, deserializer: Callable | None) -> Callable:
    def handler(raw, context):
        try:
            return fn(_parse(deserializer, raw), context)
        except M2CacheError as err:
            context.abort(status_code(err), str(err))
        except Exception as err:
            if context.code() is not None:  # context.abort() raised: the status is set
                raise
            _internal(err, context)

    return handler


def _wrap_stream(fn: Callable, deserializer: Callable | None) -> Callable:
    def handler(raw, context):
        try:
            yield from fn(_parse(deserializer, raw), context)
        except M2CacheError as err:
            context.abort(status_code(err), str(err))
        except Exception as err:
            if context.code() is not None:
                raise
            _internal(err, context)

    return handler


class ErrorInterceptor(grpc.ServerInterceptor):
    """Translates :class:`M2CacheError` subclasses into their status codes."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, handler.request_deserializer), None, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, handler.request_deserializer), None, handler.response_serializer
            )
        return handler


def create_server(
    address: str,
    register: Iterable[tuple[Callable, object]],
    service_names: Iterable[str],
    max_workers: int = 16,
    security: sec.SecurityConfig | None = None,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Build a server with health + reflection. ``register`` holds
    (add_XServicer_to_server, servicer) pairs. Returns (server, bound port, health)."""
    security = security or sec.installed()
    auth = security.auth_interceptor()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=([auth] if auth else []) + [ErrorInterceptor()],
        options=CHANNEL_OPTIONS,
    )
    for add, servicer in register:
        add(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    for name in names + [""]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(names + [health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    creds = security.server_credentials()
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    return server, port, health_servicer


def serve_until_signal(server: grpc.Server, grace_s: float, on_stop: Callable[[], None] | None = None) -> None:
    """Start ``server`` and block until SIGTERM/SIGINT, then stop gracefully."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    stop.wait()
    log.info("shutting down (grace %.1fs)", grace_s)
    server.stop(grace_s).wait()
    if on_stop:
        on_stop()


def channel(target: str, options: list | None = None, security: sec.SecurityConfig | None = None) -> grpc.Channel:
    """A channel to ``target``: TLS (with this process's client certificate) when
    the security setting has a CA, else plaintext."""
    security = security or sec.installed()
    opts = (options or CHANNEL_OPTIONS) + security.channel_options()
    creds = security.channel_credentials()
    return grpc.secure_channel(target, creds, options=opts) if creds else grpc.insecure_channel(target, options=opts)


def check_health(target: str, service: str = "", timeout_s: float = 2.0,
                 security: sec.SecurityConfig | None = None) -> str:
    """Health status name of ``service`` at ``target`` ("SERVING", "NOT_SERVING", ...),
    or "UNREACHABLE"."""
    with channel(target, security=security) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return "UNREACHABLE"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


# ---- the client side: one RPC helper for every service-to-service call ---------------
# Only UNAVAILABLE (a peer restarting, a connection not yet up) is worth retrying:
# every other status is deterministic for the same request (bad input, unknown
# model, corrupt data, a size limit) or final (our deadline passed), and is
# raised at once as the typed error of m2cache.errors.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})


def _typed_classes() -> dict:
    from m2cache import errors

    return {
        grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
        grpc.StatusCode.OUT_OF_RANGE: errors.InvalidArgument,
        grpc.StatusCode.NOT_FOUND: errors.NotFound,
        grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
        grpc.StatusCode.DATA_LOSS: errors.ChecksumError,
        grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
        grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
        grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    }


def typed_error(err: grpc.RpcError, where: str) -> M2CacheError:
    """The :mod:`m2cache.errors` exception for a failed call (its status code kept,
    so a server passing it on answers with the same code)."""
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    return error_for_code(code.name, where, details)


def error_for_code(code_name: str, where: str, details: str) -> M2CacheError:
    """The typed error for a status code's name (also what a non-gRPC transport carries)."""
    code = getattr(grpc.StatusCode, code_name, grpc.StatusCode.UNKNOWN)
    cls = _typed_classes().get(code)
    if cls is not None:
        return cls(f"{where}: {details}")
    out = M2CacheError(f"{where}: {code.name}: {details}")
    out.code = code.name  # e.g. UNAUTHENTICATED, PERMISSION_DENIED, CANCELLED, INTERNAL
    return out


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How one logical call is bounded: ``deadline_s`` for the whole call (retries
    included) when the caller gives no deadline; UNAVAILABLE is retried with
    doubling backoff for at most ``unavailable_s`` (fail fast when a peer is gone)."""

    deadline_s: float = 30.0
    unavailable_s: float = 5.0
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0


class Rpc:
    """Calls to one service over ``channel``: every call has a deadline, only
    retryable codes are retried, every failure is a typed error."""

    def __init__(self, channel: grpc.Channel, stub_class, service: str, policy: RetryPolicy = RetryPolicy(),
                 on_retry: Callable[[str, grpc.RpcError], None] | None = None):
        self.channel = channel
        self.stub = stub_class(channel)
        self.service = service
        self.policy = policy
        self.on_retry = on_retry

    def unary(self, method: str, request, deadline: float | None = None):
        """One unary call; ``deadline`` is absolute (time.monotonic()), default now + policy.deadline_s."""
        return self._attempts(method, lambda timeout: getattr(self.stub, method)(request, timeout=timeout),
                              deadline)

    def stream(self, method: str, request, deadline: float | None = None) -> Iterator:
        """A server-streaming call's messages. Retried (from scratch) only until its
        first message arrives; a stream cut later raises the typed error."""
        call = self._attempts(method, lambda timeout: _first_and_rest(getattr(self.stub, method)(request,
                                                                                                timeout=timeout)),
                              deadline)
        first, rest = call
        if first is None:
            return
        yield first
        try:
            yield from rest
        except grpc.RpcError as err:
            raise typed_error(err, f"{self.service} {method}") from None

    def _attempts(self, method: str, attempt: Callable[[float], object], deadline: float | None):
        end = deadline if deadline is not None else time.monotonic() + self.policy.deadline_s
        backoff, give_up_at = self.policy.initial_backoff_s, None
        while True:
            left = end - time.monotonic()
            if left <= 0:
                from m2cache.errors import DeadlineExceeded

                raise DeadlineExceeded(f"{self.service} {method}: deadline passed")
            try:
                return attempt(left)
            except grpc.RpcError as err:
                now = time.monotonic()
                give_up_at = give_up_at or min(end, now + self.policy.unavailable_s)
                if err.code() not in RETRYABLE or now + backoff >= give_up_at:
                    raise typed_error(err, f"{self.service} {method}") from None
                if self.on_retry is not None:
                    self.on_retry(method, err)
                log.info("%s %s %s (%s); retrying in %.2fs", self.service, method, err.code().name,
                         err.details(), backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, self.policy.max_backoff_s)

    def close(self) -> None:
        self.channel.close()


def _first_and_rest(responses) -> tuple[object | None, Iterator]:
    """Wait for a stream's first message (so errors before it can be retried)."""
    for first in responses:
        return first, responses
    return None, iter(())


def chunked(items, size: int) -> Iterator:
    """Consecutive slices of at most ``size`` items (large requests split into bounded calls)."""
    for lo in range(0, len(items), max(1, size)):
        yield items[lo : lo + size]
