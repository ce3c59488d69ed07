"""The gateway's HTTP server: uvicorn (h11, asyncio) serving the Starlette app of
:mod:`m2cache.gateway.app`, with limits a public endpoint needs:

- a deadline on each request's headers (slowloris, idle half-requests: 408 and
  the connection closed) and on its body (in the app), keep-alive idle timeout;
- at most ``max_connections`` connections (503 beyond) and ``max_concurrent``
  generations (429 beyond), a deep listen backlog so bursts queue instead of
  being reset; one event loop thread, so held connections pin no threads;
- HTTPS when the security setting has a certificate (``--tls-cert``/``--tls-key``).
"""
from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from m2cache import security as sec
from m2cache.gateway.app import Gateway, build_app
from m2cache.gateway.config import GatewayConfig

log = logging.getLogger(__name__)

_TIMEOUT_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"content-length: 28\r\nconnection: close\r\n\r\nrequest headers took too long")


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline from a connection's start (or its
    last response) to a complete request head. uvicorn's keep-alive timer alone is
    cancelled by any byte received, so a client trickling header bytes would hold
    its connection forever."""

    header_timeout_s = 10.0
    _header_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:  # a request head arrived
            self._disarm()

    def on_response_complete(self) -> None:
        self._arm()  # before super(): it may start a pipelined request, which disarms
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expired(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.write(_TIMEOUT_408)
            self.transport.close()


def _socket(address: str, backlog: int) -> socket.socket:
    host, port = address.rsplit(":", 1)
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


class GatewayServer:
    """A bound (not yet serving) gateway. ``serve()`` blocks (SIGTERM/SIGINT stop it
    gracefully when called on the main thread); ``start()``/``stop()`` run it on a
    background thread (tests)."""

    def __init__(self, config: GatewayConfig, security: sec.SecurityConfig | None = None):
        self.config = config
        self.security = security or sec.installed()
        self.gateway = Gateway(config, self.security)
        self.sock = _socket(config.address, config.backlog)
        self.port = self.sock.getsockname()[1]
        protocol = type("GatewayProtocol", (HeaderDeadlineProtocol,), {"header_timeout_s": config.header_timeout_s})
        s = self.security
        self.uvicorn = uvicorn.Server(uvicorn.Config(
            build_app(self.gateway), loop="asyncio", http=protocol, lifespan="on", log_config=None,
            access_log=False, server_header=False, backlog=config.backlog, limit_concurrency=config.max_connections,
            timeout_keep_alive=config.keep_alive_s, timeout_graceful_shutdown=config.grace_s,
            ssl_certfile=s.tls_cert or None, ssl_keyfile=s.tls_key or None))
        self._thread: threading.Thread | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.security.tls else "http"

    def serve(self) -> None:
        self.uvicorn.run(sockets=[self.sock])

    def start(self, timeout_s: float = 30.0) -> "GatewayServer":
        self._thread = threading.Thread(target=self.serve, name="gateway", daemon=True)
        self._thread.start()
        end = time.monotonic() + timeout_s
        while not self.uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("gateway did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=self.config.grace_s + 5)
        self.sock.close()


def create_server(config: GatewayConfig, security: sec.SecurityConfig | None = None) -> GatewayServer:
    return GatewayServer(config, security)


def serve(config: GatewayConfig) -> None:
    server = create_server(config)
    log.info("gateway on %s://%s:%d for model %s, workers %s, tiers %s (%s; default temperature %g, "
             "max %d generations in flight, body cap %d B)", server.scheme, config.address.rsplit(":", 1)[0],
             server.port, config.model, config.worker_targets(), config.tier_targets() or "none",
             server.security.describe(),
             config.default_temperature, config.max_concurrent, config.max_body_bytes)
    server.serve()
