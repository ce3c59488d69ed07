"""Helpers for the storage-tier tests: real NeuronStore / DramTier servers on
loopback port 0, real redis-server processes (stopped by PID), deadlines on
every client call."""
from __future__ import annotations

import dataclasses
import os
import socket
import time
from pathlib import Path
from typing import Callable

import grpc
from prometheus_client import CollectorRegistry

from m2cache import grpc_util
from m2cache.dram import server as dram_server
from m2cache.dram.config import DramConfig
from m2cache.dram.redis_proc import RedisProcess, find_redis_server
from m2cache.store import server as store_server
from m2cache.store.config import StoreConfig
from m2cache_client.pb import common_pb2, dram_pb2, dram_pb2_grpc, store_pb2_grpc

DEADLINE_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(port: int | None = None) -> RedisProcess:
    return RedisProcess(find_redis_server(), port or free_port()).start()


class StoreHandle:
    """A running NeuronStore server and a stub to it; ``registry``: its metrics."""

    def __init__(self, root: Path, port: int = 0, **overrides):
        self.config = StoreConfig(root=root, address=f"127.0.0.1:{port}", **overrides)
        self.registry = CollectorRegistry()
        self.server, self.port, self.catalog = store_server.create_server(self.config, self.registry)
        self.server.start()
        self.target = f"127.0.0.1:{self.port}"
        self.channel = grpc_util.channel(self.target)
        self.stub = store_pb2_grpc.NeuronStoreStub(self.channel)

    def regions_mapped(self) -> int:
        """The shared-memory regions the store maps now (its m2cache_store_shared_regions gauge)."""
        return int(self.registry.get_sample_value("m2cache_store_shared_regions"))

    def stop(self) -> None:
        self.channel.close()
        self.server.stop(0).wait()
        self.catalog.close()


class DramHandle:
    """A running DramTier server over ``store_target`` and ``redis_url``."""

    def __init__(self, store_target: str, redis_url: str, **overrides):
        # every precision preloaded unless a test asks for "auto" (policy-driven) explicitly; whole
        # layers (M2Cache's policy) unless a test asks for preload="used"
        base = DramConfig(store_target=store_target, address="127.0.0.1:0", redis_probe_interval_s=0.1,
                          key_prefix=f"m2c-test-{free_port()}:", preload_precisions="full,int8,int4",
                          preload="layer")
        self.config = dataclasses.replace(base, **overrides)
        self.server, self.port, self.tier = dram_server.create_server(self.config, redis_url)
        self.server.start()
        self.target = f"127.0.0.1:{self.port}"
        self.channel = grpc_util.channel(self.target)
        self.stub = dram_pb2_grpc.DramTierStub(self.channel)

    def fetch(self, model: str, layer: int, ids, prec: int, current_layer: int | None = None,
              caller_id: str = "w0", timeout: float = DEADLINE_S, all_neurons: bool = False):
        batch = common_pb2.NeuronBatchRequest(model=model, layer=layer, neuron_ids=list(ids), precision=prec,
                                              all_neurons=all_neurons)
        req = dram_pb2.DramFetchRequest(batch=batch, current_layer=layer if current_layer is None else current_layer,
                                        caller_id=caller_id)
        return self.stub.FetchNeurons(req, timeout=timeout)

    def tier_plane(self) -> dram_pb2.DataPlaneInfo:
        return self.stub.DataPlane(dram_pb2.DataPlaneRequest(model=""), timeout=DEADLINE_S)

    def stats(self) -> dram_pb2.DramStats:
        return self.stub.GetStats(common_pb2.StatsRequest(), timeout=DEADLINE_S)

    def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Until no preload is in flight."""
        wait_for(lambda: not self.tier._inflight, timeout_s, "preloads to finish")

    def stop(self) -> None:
        self.channel.close()
        self.server.stop(0).wait()
        self.tier.stop()
        self.tier.store.close()
        self.tier.cache.close()


def wait_for(cond: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.02) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def health(target: str, service: str) -> str:
    return grpc_util.check_health(target, service, timeout_s=2.0)


def status_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """Status code and details of a call expected to fail."""
    try:
        call()
    except grpc.RpcError as err:
        return err.code(), err.details()
    raise AssertionError("call succeeded; expected an error status")


def flip_record_byte(store_dir: Path, layer: int, prec, neuron: int, offset: int = 5) -> None:
    """Corrupt one byte of a stored record in ``neurons.bin`` (its CRC no longer matches)."""
    import numpy as np

    from m2cache.codec.format import RECORDS_FILE
    from m2cache.store.reader import NeuronStore

    reader = NeuronStore(store_dir)
    try:
        (at,), _ = reader.record_spans(layer, prec, np.asarray([neuron]))
    finally:
        reader.close()
    with open(store_dir / RECORDS_FILE, "r+b") as f:
        f.seek(int(at) + offset)
        byte = f.read(1)[0]
        f.seek(int(at) + offset)
        f.write(bytes([byte ^ 0x40]))


def drop_page_cache(path) -> bool:
    """Ask the kernel to drop ``path``'s pages (written back first); True when it did (a read of its
    first page must then wait on the device), False where the file lives in memory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages (a store just written) are not dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        try:
            os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT)
            return False
        except BlockingIOError:
            return True
    finally:
        os.close(fd)
