"""Transport security and client authentication, shared by every service.

- **mTLS**: a service with ``tls_cert``/``tls_key`` serves TLS; with ``tls_ca`` it
  also demands a client certificate signed by that CA, and its own outgoing
  channels verify servers against the CA and present its certificate.
- **Bearer tokens**: a service with ``api_keys_file`` refuses calls to its API
  methods (gRPC health and reflection stay open for probes) that do not carry
  ``authorization: Bearer <key>`` metadata with one of the keys, with
  UNAUTHENTICATED, counted in ``m2cache_auth_refused``.

The service configs stay security-free: ``m2cache serve`` adds these flags to every
service (env ``M2CACHE_<SERVICE>_TLS_CERT`` ...), and installs the result once per
process with :func:`install`, as logging is configured once in the entry point;
``grpc_util`` reads it when a server or channel is built without an explicit one.
"""
from __future__ import annotations

import argparse
import hmac
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry, Counter

from m2cache import envflags
from m2cache.errors import InvalidArgument

log = logging.getLogger(__name__)

# Methods a token never guards: probes (kubelet, compose healthchecks) must reach them.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")
AUTH_HEADER = "authorization"

# Process-wide, like prometheus' default registry: every AuthInterceptor in the
# process counts here, and metrics.start_metrics_server serves it beside the service's own.
AUTH_REGISTRY = CollectorRegistry()
AUTH_REFUSED = Counter("m2cache_auth_refused", "calls refused for a missing or wrong bearer token",
                       ["reason"], registry=AUTH_REGISTRY)


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    """One process's TLS files and tokens; empty strings mean off (plaintext, no auth)."""

    tls_cert: str = ""        # PEM certificate of this service (served, and shown to the services it calls)
    tls_key: str = ""         # its PEM private key
    tls_ca: str = ""          # CA bundle: peers' certificates must chain to it (servers then require client certs)
    api_keys_file: str = ""   # bearer tokens this service accepts, one per line ('#' comments); empty = none needed
    token_file: str = ""      # bearer token this process sends to the services it calls (its first line)
    tls_server_name: str = "" # name expected in servers' certificates when targets are aliases not in them

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InvalidArgument("--tls-cert and --tls-key go together")
        for name in ("tls_cert", "tls_key", "tls_ca", "api_keys_file", "token_file"):
            path = getattr(self, name)
            if path and not os.access(path, os.R_OK):
                raise InvalidArgument(f"--{name.replace('_', '-')}: cannot read {path}")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def mutual(self) -> bool:
        return bool(self.tls_cert and self.tls_ca)

    def describe(self) -> str:
        """One line for the start-up log."""
        if not self.tls_cert and not self.tls_ca:
            transport = "plaintext (no TLS)"
        else:
            transport = "mTLS" if self.mutual else ("TLS" if self.tls else "TLS client only")
        auth = "bearer tokens required" if self.api_keys_file else "no token required"
        return f"{transport}, {auth}"

    # ---- credentials --------------------------------------------------------------
    def server_credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_server_credentials([(_read(self.tls_key), _read(self.tls_cert))],
                                           root_certificates=_read(self.tls_ca) if self.tls_ca else None,
                                           require_client_auth=bool(self.tls_ca))

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """Credentials of the channels this process opens (None: plaintext)."""
        if not self.tls_ca:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca),
            private_key=_read(self.tls_key) if self.tls else None,
            certificate_chain=_read(self.tls_cert) if self.tls else None)

    def channel_options(self) -> list[tuple[str, object]]:
        return [("grpc.ssl_target_name_override", self.tls_server_name)] if self.tls_server_name else []

    @property
    def api_keys(self) -> tuple[str, ...]:
        """The accepted keys, read from the file now (keys rotate with a restart)."""
        return read_keys(self.api_keys_file) if self.api_keys_file else ()

    @property
    def token(self) -> str:
        return read_keys(self.token_file)[0] if self.token_file else ""

    def auth_interceptor(self) -> "AuthInterceptor | None":
        return AuthInterceptor(self.api_keys) if self.api_keys_file else None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "SecurityConfig":
        return envflags.config_from_args(cls, args)


def add_arguments(parser: argparse.ArgumentParser, prefix: str) -> None:
    """``--tls-cert`` ... on a service's parser, defaults from ``M2CACHE_<PREFIX>_TLS_CERT`` ..."""
    envflags.add_config_arguments(parser, SecurityConfig, prefix)


def read_keys(path: str | Path) -> tuple[str, ...]:
    """Non-empty, non-comment lines of a key file."""
    lines = Path(path).read_text().splitlines()
    keys = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not keys:
        raise InvalidArgument(f"{path} holds no key")
    return keys


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """gRPC call metadata carrying ``token`` (empty: none)."""
    return ((AUTH_HEADER, f"Bearer {token}"),) if token else ()


def token_ok(header: str | None, keys: tuple[str, ...]) -> bool:
    """Whether an ``Authorization`` value carries one of ``keys`` (constant-time compare)."""
    if not header or not header.startswith("Bearer "):
        return False
    given = header[len("Bearer "):].strip().encode()
    return any(hmac.compare_digest(given, k.encode()) for k in keys)


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses API calls without a valid bearer token with UNAUTHENTICATED."""

    def __init__(self, keys: tuple[str, ...]):
        self.keys = keys

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        header = dict(handler_call_details.invocation_metadata or ()).get(AUTH_HEADER)
        if token_ok(header, self.keys):
            return handler
        reason = "missing" if not header else "invalid"
        AUTH_REFUSED.labels(reason).inc()
        log.warning("refused %s: %s bearer token", method, reason)
        return _refusal(handler, f"{reason} bearer token (send 'authorization: Bearer <api key>' metadata)")


def _refusal(handler: grpc.RpcMethodHandler, details: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that aborts with UNAUTHENTICATED."""

    def abort(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, details)

    def abort_stream(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, details)
        yield  # pragma: no cover (abort raises)

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(abort, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    return grpc.stream_stream_rpc_method_handler(abort_stream, **kw)


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


# ---- the process-wide setting --------------------------------------------------------
_installed = SecurityConfig()


def install(config: SecurityConfig) -> None:
    """Make ``config`` the default of every server and channel this process builds
    (called once by the entry point, before any server starts)."""
    global _installed
    _installed = config
    log.info("transport security: %s", config.describe())


def installed() -> SecurityConfig:
    return _installed
