"""DramTier gRPC service: thin proto <-> domain layer over :class:`DramTier`.

Health: the overall server ("") is SERVING while the process runs. The
``m2cache.v1.DramTier`` service reports NOT_SERVING while Redis is away:
*degraded* — every RPC still answers correctly, from the NeuronStore at SSD
speed — and SERVING again once Redis is back in use.
"""
from __future__ import annotations

import logging
import time

import grpc
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry

from m2cache import grpc_util
from m2cache.dram import dataplane, id_sets
from m2cache.dram.cache import RedisCache
from m2cache.dram.config import DramConfig
from m2cache.dram.redis_proc import RedisProcess, find_redis_server
from m2cache.dram.requests import FetchRequest, LayerUse
from m2cache.dram.stats import TierStats
from m2cache.dram.store_client import StoreClient
from m2cache.dram.tier import DramTier
from m2cache.metrics import start_metrics_server
from m2cache_client.pb import common_pb2, dram_pb2, dram_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = dram_pb2.DESCRIPTOR.services_by_name["DramTier"].full_name


class DramTierServicer(dram_pb2_grpc.DramTierServicer):
    def __init__(self, config: DramConfig, tier: DramTier, plane: dram_pb2.DataPlaneInfo):
        self.config = config
        self.tier = tier
        self.plane = plane  # redis_url, key_prefix, store_target and the secrets not shared by file

    def DataPlane(self, request, context):
        """Where the worker reads records itself: Redis (sealed values) and the store."""
        with self.tier.stats.rpc.observe("DataPlane"):
            info = dram_pb2.DataPlaneInfo()
            info.CopyFrom(self.plane)
            if not self.tier.redis_up:
                info.redis_url = ""
            info.redis_run_id = self.tier.run_id
            return info

    def Report(self, request, context):
        """A worker's usage (what it used, what it read from the store); steers what Redis keeps."""
        with self.tier.stats.rpc.observe("Report"):
            d_ffn = self.tier.manifest(request.model, self._deadline(context)).d_ffn
            uses = [LayerUse(u.layer, u.precision,
                             id_sets.unpack(u.used_bits, u.used_ids, d_ffn, f"layer {u.layer}'s used neurons"),
                             id_sets.unpack(u.missed_bits, u.missed_ids, d_ffn, f"layer {u.layer}'s missed neurons"))
                    for u in request.uses]
            self.tier.report(request.model, request.caller_id or context.peer(), request.current_layer, uses,
                             request.page_cache_first)
            return dram_pb2.ReportAck()

    def _deadline(self, context) -> float:
        """The caller's deadline (monotonic), or the configured store timeout when it set none."""
        remaining = context.time_remaining()
        return time.monotonic() + (remaining if remaining is not None else self.config.store_timeout_s)

    def FetchNeurons(self, request, context):
        """Records of many neurons of one layer at one precision, as one payload
        with per-record CRC-32C; ``current_layer`` steers preloading."""
        with self.tier.stats.rpc.observe("FetchNeurons"):
            b = request.batch
            req = FetchRequest(b.model, b.layer, b.precision, b.neuron_ids, b.all_neurons, request.current_layer,
                               request.caller_id or context.peer())
            batch = self.tier.fetch(req, self._deadline(context))
            return common_pb2.NeuronBatch(model=b.model, layer=b.layer, precision=b.precision,
                                          neuron_ids=batch.neuron_ids, record_bytes=batch.record_bytes,
                                          payload=batch.payload, crc32c=batch.crc32, codec=batch.codec,
                                          record_lengths=batch.record_lengths)

    def GetManifest(self, request, context):
        with self.tier.stats.rpc.observe("GetManifest"):
            return self.tier.store.manifest(request.model, self._deadline(context))

    def FetchDense(self, request, context):
        """Passed through to the NeuronStore (dense weights are loaded once, not cached)."""
        with self.tier.stats.rpc.observe("FetchDense"):
            return self.tier.store.dense(request, self._deadline(context))

    def StreamDense(self, request, context):
        """Passed through from the NeuronStore chunk by chunk (any tensor size)."""
        with self.tier.stats.rpc.observe("StreamDense"):
            yield from self.tier.store.stream_dense(request, self._deadline(context))

    def FetchFile(self, request, context):
        with self.tier.stats.rpc.observe("FetchFile"):
            return self.tier.store.file(request, self._deadline(context))

    def GetStats(self, request, context):
        with self.tier.stats.rpc.observe("GetStats"):
            return stats_proto(self.tier)


def stats_proto(tier: DramTier) -> dram_pb2.DramStats:
    s = tier.stats
    layers = [dram_pb2.LayerStats(model=m, layer=layer, hits=h, misses=mi) for m, layer, h, mi in s.layer_counts()]
    return dram_pb2.DramStats(
        layers=layers, bytes_from_redis=s.bytes_from_redis, bytes_from_store=s.bytes_from_store,
        bytes_resident=tier.policy.bytes_resident, budget_bytes=tier.policy.budget_bytes, preloads=s.preloads,
        preload_misses=s.preload_misses, mean_preload_lead=s.mean_preload_lead, redis_up=tier.redis_up,
        evictions=tier.policy.num_evictions, bytes_preloaded=s.bytes_preloaded, preloads_skipped=s.preloads_skipped,
        checksum_refetches=s.checksum_refetches, reports=s.reports)


def create_server(config: DramConfig, redis_url: str, registry: CollectorRegistry | None = None,
                  redis_password: bytes | None = None) -> tuple[grpc.Server, int, DramTier]:
    """A DramTier server (not started) over the Redis at ``redis_url`` (``redis_password``,
    else the config's password file, else none); the tier is started (models learnt,
    layers pinning in the background)."""
    registry = registry or CollectorRegistry()
    store = StoreClient(config.store_target, config.retry_initial_backoff_s, config.retry_max_backoff_s,
                        config.store_timeout_s)
    file_password = dataplane.env_or_file(config.redis_password_file, "Redis password")
    password = redis_password or file_password
    file_key = dataplane.env_or_file(config.mac_key_file, "MAC key")
    mac_key = file_key or dataplane.new_secret()
    cache = RedisCache(redis_url, config.key_prefix, config.redis_timeout_s, password)
    plane = dram_pb2.DataPlaneInfo(redis_url=_without_credentials(redis_url), key_prefix=config.key_prefix,
                                   store_target=config.store_target,
                                   redis_password=b"" if file_password or not password else password,
                                   mac_key=b"" if file_key else mac_key)
    holder = {}

    def on_redis_state(up: bool) -> None:
        if "health" in holder:
            status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
            holder["health"].set(SERVICE_NAME, status)

    tier = DramTier(config, store, cache, TierStats(registry), dataplane.RecordSeal(mac_key), on_redis_state)
    server, port, health = grpc_util.create_server(
        config.address, [(dram_pb2_grpc.add_DramTierServicer_to_server, DramTierServicer(config, tier, plane))],
        [SERVICE_NAME], max_workers=config.max_workers)
    holder["health"] = health
    tier.start()
    on_redis_state(tier.redis_up)
    log.info("DramTier on port %d (store %s, redis %s, budget %d B)", port, config.store_target, redis_url,
             config.budget_bytes)
    return server, port, tier


def serve(config: DramConfig) -> None:
    """Start our own redis-server unless a URL is configured, serve until
    SIGTERM/SIGINT, then drain, stop preloading and stop Redis (by PID)."""
    redis_proc, password = None, None
    if not config.redis_url:  # our own Redis always requires a password: the file's, else a random one
        password = dataplane.env_or_file(config.redis_password_file, "Redis password") or dataplane.new_secret()
        redis_proc = RedisProcess(find_redis_server(config.redis_server), config.redis_port,
                                  password=password, numa_node=config.numa_node).start()
    registry = CollectorRegistry()
    try:
        server, port, tier = create_server(config, config.redis_url or redis_proc.url, registry, password)
        start_metrics_server(config.metrics_port, registry)

        def on_stop() -> None:
            tier.stop()
            tier.store.close()
            tier.cache.close()

        grpc_util.serve_until_signal(server, config.grace_s, on_stop=on_stop)
    finally:
        if redis_proc is not None:
            redis_proc.stop()


def _without_credentials(url: str) -> str:
    """redis://[user:pass@]host:port/db -> redis://host:port/db (secrets travel separately)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
