"""Typed client exceptions, one per gRPC status code a caller can act on."""
from __future__ import annotations

import grpc


class M2CacheClientError(Exception):
    """Base class; ``code`` is the grpc.StatusCode, ``details`` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidRequest(M2CacheClientError):
    """INVALID_ARGUMENT: bad prompt, sampling parameters or lengths."""


class ModelNotFound(M2CacheClientError):
    """NOT_FOUND: the worker does not serve that model."""


class Overloaded(M2CacheClientError):
    """RESOURCE_EXHAUSTED: every decode slot and queue place is taken."""


class Unavailable(M2CacheClientError):
    """UNAVAILABLE: no worker (or tier below it) answered within the retries."""


class DeadlineExceeded(M2CacheClientError):
    """DEADLINE_EXCEEDED: the call's deadline passed."""


class Cancelled(M2CacheClientError):
    """CANCELLED."""


class Unauthenticated(M2CacheClientError):
    """UNAUTHENTICATED: no or a wrong bearer token (``token=``); a missing client
    certificate fails the TLS handshake instead, as UNAVAILABLE."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: ModelNotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def from_rpc_error(err: grpc.RpcError) -> M2CacheClientError:
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    return _BY_CODE.get(code, M2CacheClientError)(code, details or "")
