"""Each tier's bandwidth, measured in the same run as the systems:

- ``ssd_records``: the store's own read path (NeuronStore.read_into a
  preallocated buffer, sorted random 25% of a layer's FULL records), page cache
  dropped first;
- ``ssd_sequential``: the block device read sequentially in 1 MiB reads
  (kernel readahead on), page cache dropped first: what the disk can give;
- ``dram``: Redis MGET of FULL-size records, 64 per call, over loopback;
- ``hbm``: summing a 256 MiB float32 tensor (fast memory on this CPU box).
All in bytes per second of payload.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from m2cache.codec.format import Precision
from m2cache.store.reader import NeuronStore

from bench.harness.honest import device_read_bytes, drop_caches


def ssd_records(store_path: Path, layers=(1, 2), fraction: float = 0.25, seed: int = 0, warm: bool = False,
                draws: int = 3) -> dict:
    """The store's read path on sorted random ``fraction`` of each layer's FULL records, cold
    (page cache dropped first), or ``warm``: the same reads timed again from the page cache.
    The median of ``draws`` draws (other records each): one draw of a shared virtual disk
    moved by 25% between runs."""
    runs = sorted((_ssd_records_once(store_path, layers, fraction, seed + i, warm) for i in range(draws)),
                  key=lambda r: r["bytes_per_s"])
    return {**runs[len(runs) // 2], "draws_bytes_per_s": [r["bytes_per_s"] for r in runs]}


def _ssd_records_once(store_path: Path, layers, fraction: float, seed: int, warm: bool) -> dict:
    store = NeuronStore(store_path)
    try:
        how = drop_caches([store_path / "data.mdb", *store_path.glob("*.bin")])
        m = store.manifest
        rb = store.layout.num_bytes(Precision.FULL)
        rng = np.random.default_rng(seed)
        batches = [(layer % m.num_layers, np.sort(rng.choice(m.d_ffn, max(1, int(fraction * m.d_ffn)), replace=False)))
                   for layer in layers]
        outs = [np.empty((ids.size, rb), dtype=np.uint8) for _, ids in batches]
        if warm:
            how = "warm (read once before)"
            for (layer, ids), out in zip(batches, outs):
                store.read_into(layer, Precision.FULL, ids, out)
        nbytes, io0, t0 = 0, device_read_bytes(), time.perf_counter()
        for (layer, ids), out in zip(batches, outs):
            nbytes += store.read_into(layer, Precision.FULL, ids, out).nbytes
        dt = time.perf_counter() - t0
        return {"bytes_per_s": nbytes / dt, "bytes": nbytes, "records": int(sum(ids.size for _, ids in batches)),
                "seconds": dt, "device_bytes": device_read_bytes() - io0, "how": how}
    finally:
        store.close()


def ssd_sequential(path: Path, nbytes: int = 256 << 20, chunk: int = 1 << 20) -> dict:
    how = drop_caches([path])
    io0, t0, done = device_read_bytes(), time.perf_counter(), 0
    with open(path, "rb", buffering=0) as f:
        while done < nbytes:
            block = f.read(chunk)
            if not block:
                break
            done += len(block)
    dt = time.perf_counter() - t0
    return {"bytes_per_s": done / dt, "bytes": done, "device_bytes": device_read_bytes() - io0, "how": how}


def dram(record_bytes: int, num_records: int = 512, batch: int = 64, reps: int = 24) -> dict:
    import redis

    from m2cache.dram.redis_proc import RedisProcess, find_redis_server
    from bench.harness.systems_stack import free_port

    proc = RedisProcess(find_redis_server(), free_port()).start()
    try:
        client = redis.Redis.from_url(proc.url)
        value = os.urandom(record_bytes)
        client.mset({f"bw:{i}": value for i in range(num_records)})
        keys = [f"bw:{i}" for i in range(num_records)]
        client.mget(keys[:batch])  # connection warm
        t0, got = time.perf_counter(), 0
        for r in range(reps):
            lo = (r * batch) % (num_records - batch)
            got += sum(len(v) for v in client.mget(keys[lo : lo + batch]))
        return {"bytes_per_s": got / (time.perf_counter() - t0), "bytes": got, "record_bytes": record_bytes}
    finally:
        proc.stop()


def hbm(nbytes: int = 256 << 20, reps: int = 5) -> dict:
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return {"bytes_per_s": nbytes / best, "bytes": nbytes}


def measure_all(store_path: Path) -> dict:
    record = NeuronStore(store_path)
    rb = record.layout.num_bytes(Precision.FULL)
    record.close()
    return {"ssd_records": ssd_records(store_path), "ssd_sequential": ssd_sequential(store_path / "data.mdb"),
            "dram": dram(rb), "hbm": hbm()}
