"""Shared gRPC plumbing: the one place typed errors become status codes, server
creation (health + reflection), graceful shutdown, and client channels."""
from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from typing import Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from m2cache.errors import M2CacheError

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


def _wrap_unary(fn: Callable) -> Callable:
    def handler(request, context):
        try:
            return fn(request, context)
        except M2CacheError as err:
            context.abort(status_code(err), str(err))

    return handler


def _wrap_stream(fn: Callable) -> Callable:
    def handler(request, context):
        try:
            yield from fn(request, context)
        except M2CacheError as err:
            context.abort(status_code(err), str(err))

    return handler


class ErrorInterceptor(grpc.ServerInterceptor):
    """Translates :class:`M2CacheError` subclasses into their status codes."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer
            )
        return handler


def create_server(
    address: str,
    register: Iterable[tuple[Callable, object]],
    service_names: Iterable[str],
    max_workers: int = 16,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Build a server with health + reflection. ``register`` holds
    (add_XServicer_to_server, servicer) pairs. Returns (server, bound port, health)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=[ErrorInterceptor()],
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
    port = server.add_insecure_port(address)
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


def channel(target: str) -> grpc.Channel:
    return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)


def check_health(target: str, service: str = "", timeout_s: float = 2.0) -> str:
    """Health status name of ``service`` at ``target`` ("SERVING", "NOT_SERVING", ...),
    or "UNREACHABLE"."""
    with channel(target) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return "UNREACHABLE"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
