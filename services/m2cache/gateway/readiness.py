"""The gateway's readiness: ready while at least one worker and every configured
tier (``--tiers dram=host:port,...``) answer SERVING to grpc.health.v1, probed
over long-lived channels (TLS as the process's security setting says) at most
once per ``health_cache_s``."""
from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from m2cache import security as sec
from m2cache.gateway.config import GatewayConfig

WORKER_SERVICE = "m2cache.v1.Worker"
TIER_SERVICES = {"dram": "m2cache.v1.DramTier", "store": "m2cache.v1.NeuronStore", "ranker": "m2cache.v1.Ranker"}
PROBE_TIMEOUT_S = 1.0


def aio_channel(target: str, security: sec.SecurityConfig) -> grpc.aio.Channel:
    creds = security.channel_credentials()
    opts = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000),
            *security.channel_options()]
    return grpc.aio.secure_channel(target, creds, opts) if creds else grpc.aio.insecure_channel(target, opts)


class Readiness:
    def __init__(self, config: GatewayConfig, security: sec.SecurityConfig):
        self.config = config
        self.probes = [("workers", t, WORKER_SERVICE) for t in config.worker_targets()]
        self.probes += [("tiers", name, TIER_SERVICES.get(name, "")) for name in config.tier_targets()]
        targets = {**{t: t for t in config.worker_targets()}, **config.tier_targets()}
        self.channels = {key: aio_channel(target, security) for key, target in targets.items()}
        self._cached: tuple[float, tuple[bool, dict]] | None = None
        self._lock = asyncio.Lock()

    async def _probe(self, key: str, service: str) -> str:
        stub = health_pb2_grpc.HealthStub(self.channels[key])
        try:
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=PROBE_TIMEOUT_S)
        except grpc.RpcError:
            return "UNREACHABLE"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    async def check(self) -> tuple[bool, dict]:
        """(ready, {"workers": {target: status}, "tiers": {name: status}})."""
        async with self._lock:  # a burst of probes shares one round of checks
            now = time.monotonic()
            if self._cached and now - self._cached[0] < self.config.health_cache_s:
                return self._cached[1]
            statuses = await asyncio.gather(*(self._probe(key, service) for _, key, service in self.probes))
            detail: dict[str, dict[str, str]] = {"workers": {}, "tiers": {}}
            for (group, key, _), status in zip(self.probes, statuses):
                detail[group][key] = status
            ready = (any(s == "SERVING" for s in detail["workers"].values())
                     and all(s == "SERVING" for s in detail["tiers"].values()))
            self._cached = (time.monotonic(), (ready, detail))
            return ready, detail

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels.values()))
