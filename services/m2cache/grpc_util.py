"""Shared gRPC plumbing: the one place typed errors become status codes, server
creation (health + reflection), graceful shutdown, and client channels. Servers
and channels are TLS/mTLS (and servers token-guarded) as ``m2cache.security``
says: the process-wide setting, or an explicit ``security=``."""
from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from typing import Callable, Iterable

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
