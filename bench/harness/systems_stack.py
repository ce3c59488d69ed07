"""m2cache through the full service stack: a NeuronStore process (SSD, under a
cgroup memory limit with this process, whose worker reads the store's records file
itself on this host), a DramTier process with its own redis-server (DRAM), and
a Worker gRPC server driven over loopback by a streaming Generate call.

The Worker runs in this (child) process so one model load serves every cache
budget: ``StackWorker`` builds a fresh WorkerRuntime (empty HBM cache) per
budget around the shared dense model. Store and DramTier are fresh per budget
(``ServiceStack``), so DRAM starts empty each time.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from m2cache import grpc_util
from m2cache.codec.format import Manifest
from m2cache.worker import server as worker_server
from m2cache.worker.choosers import Choosers, full_choose
from m2cache.worker.compute import ComputeThread
from m2cache.worker.config import WorkerConfig
from m2cache.worker.fetcher import TierFetcher
from m2cache.worker.runtime import WorkerRuntime
from m2cache_client.pb import common_pb2, dram_pb2_grpc, worker_pb2, worker_pb2_grpc

from bench.harness.honest import MemoryLimit, anon_bytes, device_read_bytes, peak_rss_bytes
from bench.harness.systems_local import all_resident_fraction, touch_cache

DEADLINE_S = 600.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(args: list[str], target: str, service: str, log_path: Path) -> subprocess.Popen:
    """``m2cache serve ...`` as a child process, waited on until healthy."""
    with open(log_path, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "m2cache.cli", "serve", *args], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while grpc_util.check_health(target, service, 1.0) != "SERVING":
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_child(proc)
            raise RuntimeError(f"{service} did not come up (log {log_path})")
        time.sleep(0.2)
    return proc


def stop_child(proc: subprocess.Popen) -> None:
    """SIGTERM by PID, SIGKILL if it lingers."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def _transport(config: WorkerConfig) -> str:
    """The data plane a worker on the store's host uses (worker/fetcher.py)."""
    if config.shared_memory_bytes <= 0:
        return "data plane: Redis MGET + StreamNeurons from the store"
    reads = ("the worker reads the store's records file itself (short-circuit)" if config.short_circuit
             else "the store reads into a shared-memory region")
    first = ", page cache before Redis" if config.page_cache_first else ", Redis before the page cache"
    return f"same host: {reads}{first}"


class ServiceStack:
    """NeuronStore + DramTier (+ its redis-server) for one measured configuration."""

    def __init__(self, store_root: Path, dram_budget: int, precisions: str, log_dir: Path, group: MemoryLimit | None):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.store_target = f"127.0.0.1:{free_port()}"
        self.dram_target = f"127.0.0.1:{free_port()}"
        self.store = _serve(["store", "--root", str(store_root), "--address", self.store_target],
                            self.store_target, "m2cache.v1.NeuronStore", log_dir / "store.log")
        self.group = group
        if group is not None:
            group.add(self.store.pid)
        self.dram = _serve(["dram", "--store-target", self.store_target, "--address", self.dram_target,
                            "--redis-port", str(free_port()), "--budget-bytes", str(dram_budget),
                            "--preload-precisions", precisions, "--key-prefix", f"m2c-bench-{os.getpid()}:"],
                           self.dram_target, "m2cache.v1.DramTier", log_dir / "dram.log")
        self.dram_stub = dram_pb2_grpc.DramTierStub(grpc_util.channel(self.dram_target))

    def dram_stats(self):
        return self.dram_stub.GetStats(common_pb2.StatsRequest(), timeout=30)

    def store_anon_bytes(self) -> int:
        return anon_bytes(self.store.pid)

    def store_device_reads(self) -> int:
        return device_read_bytes(self.store.pid)

    def close(self) -> None:
        stop_child(self.dram)
        stop_child(self.store)


class StackWorker:
    """One budget's Worker gRPC server over ``stack`` and the client that drives it."""

    name = "m2cache-stack"

    def __init__(self, stack: ServiceStack, model_name: str, manifest: Manifest, model, fraction: float,
                 mixed=None, window: int = 4, compute: ComputeThread | None = None):
        """``compute``: the thread ``model`` (and ``mixed``) were loaded on, where the worker
        decodes (worker/compute.py: a second OpenMP thread team halves the decode speed)."""
        self.stack = stack
        if fraction >= 1 and mixed is not None:  # as in-process: "100%" of a mixed policy holds every precision it uses
            fraction = all_resident_fraction(manifest, mixed.ratios.to_dict())
        self.config = WorkerConfig(model=model_name, dram_target=stack.dram_target, address="127.0.0.1:0",
                                   cache_fraction=fraction, window=window, fetch_deadline_s=DEADLINE_S, max_batch=1)
        fetcher = TierFetcher.from_config(self.config)
        fetcher.manifest()  # sets up the data plane: Redis read directly, misses streamed from the store
        full = full_choose(manifest.d_ffn)
        choosers = (Choosers(full, full, None) if mixed is None else
                    Choosers(full, mixed.choose(), mixed.ratios.to_dict()))
        self.runtime = WorkerRuntime(self.config, fetcher, manifest, model, None, choosers, compute=compute)
        self.runtime.compute.call(touch_cache, self.runtime.cache)
        self.server, port, _ = worker_server.create_server(self.config, self.runtime)
        self.server.start()
        self.channel = grpc_util.channel(f"127.0.0.1:{port}")
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)
        self.info = {"cache_budget_bytes": self.runtime.cache.budget_bytes, "window": window,
                     "ratios": choosers.ratios,
                     "transport": _transport(self.config)}

    def generate(self, prompt_ids, n_new, on_token):
        """Stream one request; tokens are clocked where the worker emits them (the
        engine's ``_emit``, wrapped here only for the benchmark), so the measured
        window is the worker's decode, not the client's read of a buffered stream."""
        engine = self.runtime.engine
        emit = engine._emit

        def clocked(seq, token):
            emit(seq, token)
            on_token(len(seq.generated) - 1, token)

        engine._emit = clocked
        req = worker_pb2.GenerateRequest(prompt_token_ids=prompt_ids, max_new_tokens=n_new, model=self.config.model)
        try:
            return [m.token_id for m in self.stub.Generate(req, timeout=DEADLINE_S) if not m.HasField("stats")]
        finally:
            del engine._emit  # the class's method again (assigning the bound one back would be a
            #                   cycle keeping the engine, its KV and its cache, alive after close)

    def counters(self) -> dict:
        """DRAM bytes: what the worker read from Redis itself (plus any through the tier);
        SSD bytes: the worker's misses read from the store's records file (by the store, or
        by the worker itself: short-circuit), as in-process counts them whether the page
        cache held them or not, plus what the tier read from the store into Redis. Of the
        worker's, ``page_cache_bytes`` were in the store's page cache (same host,
        worker/same_host.py): the block device's counters say what the rest cost."""
        hits, misses, b_hbm, b_fetched = self.runtime.snapshot()
        f = self.runtime.fetcher.stats
        d = self.stack.dram_stats()
        store = f.store_bytes + f.page_cache_bytes
        return {"hbm_bytes": b_hbm, "hbm_hits": hits, "hbm_misses": misses,
                "fetched_bytes": b_fetched, "dram_bytes": f.redis_bytes + d.bytes_from_redis,
                "ssd_bytes": store + d.bytes_from_store + d.bytes_preloaded,
                "ssd_read_through_bytes": store + d.bytes_from_store,
                "page_cache_bytes": f.page_cache_bytes, "short_circuit_records": f.local_records}

    def service_peak_rss(self) -> dict[str, int]:
        """Peak resident memory of the service processes (store, dram, redis-server)."""
        import psutil

        dram = psutil.Process(self.stack.dram.pid)
        out = {"store": peak_rss_bytes(self.stack.store.pid), "dram": peak_rss_bytes(dram.pid)}
        out.update({f"{c.name()}": peak_rss_bytes(c.pid) for c in dram.children(recursive=True)})
        return out

    def close(self) -> None:
        self.channel.close()
        self.server.stop(0).wait()
        self.runtime.close()
