"""One error hierarchy for the whole server side. Each class carries the gRPC
status code it maps to; ``m2cache.grpc_util`` translates them in one place.
This module imports no grpc so domain code stays free of it."""
from __future__ import annotations


class M2CacheError(Exception):
    """Base class. ``code`` is a grpc.StatusCode name."""

    code = "INTERNAL"


class InvalidArgument(M2CacheError):
    code = "INVALID_ARGUMENT"


class NotFound(M2CacheError):
    code = "NOT_FOUND"


class UnsupportedArchitecture(InvalidArgument):
    pass


class CheckpointError(InvalidArgument):
    """Missing, unreadable or inconsistent checkpoint files."""


class FormatVersionError(M2CacheError):
    code = "FAILED_PRECONDITION"


class ChecksumError(M2CacheError):
    """A record's bytes do not match the checksum recorded at conversion."""

    code = "DATA_LOSS"


class StoreNotFound(NotFound):
    pass


class FailedPrecondition(M2CacheError):
    code = "FAILED_PRECONDITION"


class Unavailable(M2CacheError):
    code = "UNAVAILABLE"


class ResourceExhausted(M2CacheError):
    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(M2CacheError):
    code = "DEADLINE_EXCEEDED"
