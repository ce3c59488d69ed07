"""Redis access for the DRAM tier: batched reads (one MGET), batched writes
(one pipeline that first unlinks the evicted records), liveness probes.
Connection failures surface as :class:`CacheUnavailable`; nothing here retries."""
from __future__ import annotations

import logging
from typing import Sequence

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from m2cache.dram.dataplane import redis_keys

log = logging.getLogger(__name__)

# AuthenticationError is a ConnectionError: a wrong password reads as Redis being away.
_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.AuthenticationError,
         redis.exceptions.ResponseError, OSError)
DELETE_CHUNK = 4096  # keys per UNLINK command


class CacheUnavailable(Exception):
    """Redis cannot be reached (down, restarting, timed out)."""


class RedisCache:
    """Neuron records in Redis under ``prefix + model + ":" + neuron_key``."""

    def __init__(self, url: str, prefix: str, timeout_s: float, password: bytes | None = None):
        self.prefix = prefix.encode()
        # No client-side retries: the caller decides (serve from the store, probe in the background).
        kwargs = {"password": password.decode()} if password else {}
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                           retry=Retry(NoBackoff(), 0), **kwargs)

    def keys(self, model: str, layer: int, prec: int, neuron_ids: Sequence[int]) -> list[bytes]:
        return redis_keys(self.prefix, model, layer, prec, neuron_ids)

    def mget(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Values of ``keys`` in one round trip (None where absent)."""
        if not keys:
            return []
        try:
            return self.client.mget(keys)
        except _DOWN as err:
            raise CacheUnavailable(str(err)) from err

    def write(self, items: Sequence[tuple[bytes, bytes | memoryview]], deletes: Sequence[bytes] = ()) -> None:
        """Unlink ``deletes`` then set ``items``, in one pipelined round trip."""
        if not items and not deletes:
            return
        pipe = self.client.pipeline(transaction=False)
        for i in range(0, len(deletes), DELETE_CHUNK):
            pipe.unlink(*deletes[i : i + DELETE_CHUNK])
        if items:
            pipe.mset(dict(items))
        try:
            pipe.execute()
        except _DOWN as err:
            raise CacheUnavailable(str(err)) from err

    def run_id(self) -> str:
        """The server's run_id: it changes when Redis restarts (and loses our data)."""
        try:
            return self.client.info("server")["run_id"]
        except _DOWN as err:
            raise CacheUnavailable(str(err)) from err

    def delete_all(self) -> int:
        """Remove every key under our prefix (stale data from an earlier tier)."""
        count = 0
        try:
            batch = []
            for key in self.client.scan_iter(match=self.prefix + b"*", count=1000):
                batch.append(key)
                if len(batch) >= DELETE_CHUNK:
                    count += self.client.unlink(*batch)
                    batch = []
            if batch:
                count += self.client.unlink(*batch)
        except _DOWN as err:
            raise CacheUnavailable(str(err)) from err
        return count

    def stored_bytes(self) -> int:
        """Sum of value sizes under our prefix (what the budget governs)."""
        try:
            keys = list(self.client.scan_iter(match=self.prefix + b"*", count=1000))
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.strlen(key)
            return sum(pipe.execute()) if keys else 0
        except _DOWN as err:
            raise CacheUnavailable(str(err)) from err

    def close(self) -> None:
        self.client.close()
