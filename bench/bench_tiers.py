#!/usr/bin/env python3
"""Storage-tier throughput: batched fetches of realistic neuron records through
the NeuronStore and DramTier services versus raw LMDB reads and raw Redis MGET,
measured in the same run. Not a test.

Synthetic store written with the store format (RecordLayout + keys):
SwiGLU, d_model 4096, fp16 -> FULL records of 3 x 4096 x 2 B = 24 KiB.
Both services run as real subprocesses (``m2cache serve store|dram``) on
loopback, so client and servers do not share a GIL.

    python bench/bench_tiers.py --neurons 2048 --batches 16 64 256 --reps 30
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import lmdb
import numpy as np
import torch

from m2cache import grpc_util
from m2cache.codec.format import MANIFEST_KEY, Manifest, Precision, crc_key, neuron_key
from m2cache.dram.redis_proc import RedisProcess, find_redis_server
from m2cache_client.pb import common_pb2, dram_pb2, dram_pb2_grpc, store_pb2_grpc

D_MODEL, NVEC, LAYERS = 4096, 3, 2
FULL = int(Precision.FULL)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_store(path: Path, num_neurons: int) -> Manifest:
    """FULL records of random fp16 weights, crc tables, manifest last."""
    manifest = Manifest(family="llama", hf_config={}, dtype="float16", num_layers=LAYERS, d_model=D_MODEL,
                        d_ffn=num_neurons, ffn_kind="swiglu", int4_group=32, source="synthetic")
    layout = manifest.layout
    path.mkdir(parents=True)
    size = layout.num_bytes(Precision.FULL)
    env = lmdb.open(str(path), map_size=int(LAYERS * num_neurons * (size + 4096) * 1.2) + (64 << 20))
    for layer in range(LAYERS):
        crcs = []
        for lo in range(0, num_neurons, 256):
            n = min(256, num_neurons - lo)
            recs = layout.encode(torch.randn(n, NVEC, D_MODEL), None, Precision.FULL).numpy()
            with env.begin(write=True) as txn:
                for i in range(n):
                    txn.put(neuron_key(layer, Precision.FULL, lo + i), recs[i].tobytes())
                    crcs.append(zlib.crc32(recs[i].tobytes()))
        with env.begin(write=True) as txn:
            txn.put(crc_key(layer, Precision.FULL), np.asarray(crcs, dtype="<u4").tobytes())
    with env.begin(write=True) as txn:
        txn.put(MANIFEST_KEY, manifest.to_json())
    env.close()
    return manifest


def serve(args: list[str], target: str, service: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "m2cache.cli", "serve", *args], start_new_session=True)
    deadline = time.monotonic() + 60
    while grpc_util.check_health(target, service, 1.0) != "SERVING":
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            sys.exit(f"{service} did not come up")
        time.sleep(0.1)
    return proc


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM by PID (graceful), SIGKILL if it lingers."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def timed(fn, batches: list[list[int]], reps: int) -> list[float]:
    out = []
    for r in range(reps):
        ids = batches[r % len(batches)]
        t = time.perf_counter()
        fn(ids)
        out.append(time.perf_counter() - t)
    return out


def id_batches(rng, num_neurons: int, batch: int, count: int = 8) -> list[list[int]]:
    return [sorted(rng.choice(num_neurons, size=batch, replace=False).tolist()) for _ in range(count)]


def handler_totals(port: int, service: str) -> tuple[float, float]:
    """(sum seconds, count) of FetchNeurons handler time from a service's /metrics."""
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    vals = {}
    for line in text.splitlines():
        for kind in ("sum", "count"):
            if line.startswith(f'm2cache_{service}_rpc_seconds_{kind}{{rpc="FetchNeurons"}}'):
                vals[kind] = float(line.split()[-1])
    return vals.get("sum", 0.0), vals.get("count", 0.0)


class Bench:
    """The four paths over one store and one Redis, plus the DramTier miss path."""

    def __init__(self, root: Path, model: str, redis_url: str, store_target: str, dram_targets: dict[str, str],
                 prefix: str):
        from m2cache.dram.cache import RedisCache

        self.env = lmdb.open(str(root / model), readonly=True, lock=False, readahead=False)
        self.model = model
        self.cache = RedisCache(redis_url, prefix, 5.0)
        self.store = store_pb2_grpc.NeuronStoreStub(grpc_util.channel(store_target))
        self.dram = {name: dram_pb2_grpc.DramTierStub(grpc_util.channel(t)) for name, t in dram_targets.items()}

    def raw_lmdb(self, ids):
        with self.env.begin(buffers=True) as txn:
            return b"".join([txn.get(neuron_key(0, Precision.FULL, n)) for n in ids])

    def raw_mget(self, ids):
        return b"".join(self.cache.client.mget(self.cache.keys(self.model, 0, FULL, ids)))

    def store_rpc(self, ids):
        req = common_pb2.NeuronBatchRequest(model=self.model, layer=0, neuron_ids=ids, precision=FULL)
        return self.store.FetchNeurons(req, timeout=30).payload

    def dram_rpc(self, name):
        def call(ids):
            batch = common_pb2.NeuronBatchRequest(model=self.model, layer=0, neuron_ids=ids, precision=FULL)
            req = dram_pb2.DramFetchRequest(batch=batch, current_layer=0, caller_id="bench")
            return self.dram[name].FetchNeurons(req, timeout=30).payload
        return call


def row(name: str, batch: int, times: list[float], record_bytes: int, raw_p50: float | None) -> str:
    p50 = statistics.median(times)
    over = f"{(p50 / raw_p50 - 1) * 100:+.0f}%" if raw_p50 else "-"
    return (f"| {name} | {batch} | {p50 * 1e3:.2f} | {batch / p50:,.0f} | "
            f"{batch * record_bytes / p50 / 1e6:,.0f} | {over} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--neurons", type=int, default=2048, help="neurons per layer (2 layers)")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-tiers-"))
    model = "synthetic"
    manifest = write_store(tmp / "root" / model, args.neurons)
    size = manifest.layout.num_bytes(Precision.FULL)
    redis_proc = RedisProcess(find_redis_server(), free_port()).start()
    procs = []
    try:
        store_t = f"127.0.0.1:{free_port()}"
        metrics = {"store": free_port(), "dram": free_port()}
        procs.append(serve(["store", "--root", str(tmp / "root"), "--address", store_t,
                            "--metrics-port", str(metrics["store"])], store_t,
                           "m2cache.v1.NeuronStore"))
        common = ["--store-target", store_t, "--redis-url", redis_proc.url, "--preload-precisions", "full"]
        dram_t = {name: f"127.0.0.1:{free_port()}" for name in ("hit", "hit-noverify", "miss")}
        flags = {"hit": ["--key-prefix", "b:", "--budget-bytes", str(4 << 30), "--num-pinned-layers", "2",
                         "--metrics-port", str(metrics["dram"])],
                 "hit-noverify": ["--key-prefix", "nv:", "--budget-bytes", str(4 << 30), "--num-pinned-layers", "2",
                                  "--verify-redis", "false"],
                 "miss": ["--key-prefix", "m:", "--budget-bytes", "0", "--num-pinned-layers", "0"]}
        # Each tier owns its key prefix (it deletes every key under it at start).
        for name in ("hit", "miss", "hit-noverify"):
            procs.append(serve(["dram", "--address", dram_t[name], *common, *flags[name]], dram_t[name],
                               "m2cache.v1.DramTier"))
        bench = Bench(tmp / "root", model, redis_proc.url, store_t, dram_t, "b:")
        wait_pinned(bench, args.neurons, size)
        bench.metrics = metrics
        run_table(bench, args, size)
    finally:
        for proc in procs:
            stop(proc)
        redis_proc.stop()


def wait_pinned(bench: Bench, num_neurons: int, size: int) -> None:
    deadline = time.monotonic() + 300
    want = LAYERS * num_neurons * size
    while bench.cache.stored_bytes() < want:
        if time.monotonic() > deadline:
            sys.exit("pinning did not finish")
        time.sleep(0.5)


def run_table(bench: Bench, args, size: int) -> None:
    """Paths are timed round-robin (one call each per round) so that load from
    other processes on this shared 2-core box hits every path alike."""
    rng = np.random.default_rng(0)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"records: {size} B (FULL, d_model {D_MODEL}, fp16, SwiGLU); p50 of {args.reps} rounds; "
          f"{os.cpu_count()} cores, load average {load}")
    print("| path | batch | p50 ms | records/s | MB/s | overhead vs raw |")
    print("|---|---|---|---|---|---|")
    paths = [("raw LMDB get+join", bench.raw_lmdb, None), ("NeuronStore gRPC", bench.store_rpc, "lmdb"),
             ("raw Redis MGET", bench.raw_mget, None), ("DramTier gRPC, hits", bench.dram_rpc("hit"), "mget"),
             ("DramTier gRPC, hits, no crc check", bench.dram_rpc("hit-noverify"), "mget"),
             ("DramTier gRPC, misses (store path)", bench.dram_rpc("miss"), "lmdb")]
    handler = {}
    for batch in args.batches:
        ids = id_batches(rng, args.neurons, batch)
        expect = [bench.raw_lmdb(i) for i in ids]
        for _, fn, _ in paths:
            assert [fn(i) for i in ids] == expect, fn  # every path serves the store's bytes (also warms up)
        times = {name: [] for name, _, _ in paths}
        before = {svc: handler_totals(port, svc) for svc, port in bench.metrics.items()}
        for r in range(args.reps):
            for name, fn, _ in paths:
                t = time.perf_counter()
                fn(ids[r % len(ids)])
                times[name].append(time.perf_counter() - t)
        after = {svc: handler_totals(port, svc) for svc, port in bench.metrics.items()}
        handler[batch] = {svc: (after[svc][0] - before[svc][0]) / max(1.0, after[svc][1] - before[svc][1])
                          for svc in after}
        raw = {"lmdb": statistics.median(times[paths[0][0]]), "mget": statistics.median(times[paths[2][0]])}
        for name, _, base in paths:
            print(row(name, batch, times[name], size, raw.get(base)))
    print("\nmean server-side FetchNeurons handler time (ms; the rest of p50 is gRPC transport + protobuf):")
    for batch, per in handler.items():
        print(f"  batch {batch}: NeuronStore {per['store'] * 1e3:.2f}, DramTier (hits) {per['dram'] * 1e3:.2f}"
              " (the store figure also counts the DramTier miss path's calls)")
    ids = id_batches(rng, args.neurons, max(args.batches), 1)[0]
    payload = bench.raw_lmdb(ids)
    recs = [payload[i * size : (i + 1) * size] for i in range(len(ids))]
    t_crc = statistics.median(timed(lambda _: [zlib.crc32(r) for r in recs], [ids], args.reps))
    t_join = statistics.median(timed(lambda _: b"".join(recs), [ids], args.reps))
    print(f"\nbatch {len(ids)} components: crc32 of all records {t_crc * 1e3:.2f} ms, "
          f"join {t_join * 1e3:.2f} ms, payload {len(payload) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
