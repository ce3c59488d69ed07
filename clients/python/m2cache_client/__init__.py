"""m2cache client library: talks to m2cache workers over gRPC (grpcio + protobuf only).

    from m2cache_client import Client
    with Client(["127.0.0.1:50070", "127.0.0.1:50071"], timeout_s=60) as c:
        print(c.generate("Once upon a time", max_new_tokens=32).text)
        for token in c.stream("Once upon a time", max_new_tokens=32):
            print(token.text, end="", flush=True)
"""
from m2cache_client.aio import AsyncClient
from m2cache_client.client import Client, Completion, Token
from m2cache_client.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidRequest,
    M2CacheClientError,
    ModelNotFound,
    Overloaded,
    Unauthenticated,
    Unavailable,
)

__all__ = ["Client", "AsyncClient", "Completion", "Token", "M2CacheClientError", "InvalidRequest", "ModelNotFound",
           "Overloaded", "Unavailable", "DeadlineExceeded", "Cancelled", "Unauthenticated"]
