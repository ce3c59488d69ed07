#!/usr/bin/env python3
"""Decode worker: ranking in-process (predictor pulled once from the Ranker)
versus a Rank RPC per layer and step, same store, same tiers, same run. Not a test.

The store is a copy of a real tiny model with a fixed random predictor and a
policy written into it (a trained one ranks the same way, at the same cost).
Every service runs in this process on loopback (store, DramTier + a private
redis-server, Ranker, workers).

    python bench/bench_rank_modes.py --model stories260k --tokens 64 --reps 3
"""
from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch

from m2cache.convert.writer import convert
from m2cache.store.reader import NeuronStore
from m2cache.dram import server as dram_server
from m2cache.dram.config import DramConfig
from m2cache.dram.redis_proc import RedisProcess, find_redis_server
from m2cache.ranker import server as ranker_server
from m2cache.predictors.bands import BandRatios
from m2cache.ranker.config import RankerConfig
from m2cache.predictors.kinds import LowRankPredictor
from m2cache.predictors.predictor import Predictor
from m2cache.predictors.storage import save_policy, save_predictor
from m2cache.store import server as store_server
from m2cache.store.config import StoreConfig
from m2cache.worker.config import WorkerConfig
from m2cache.worker.engine import Request
from m2cache.worker.runtime import WorkerRuntime

SHARED = Path(__file__).resolve().parents[2] / "shared"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_store(root: Path, model: str, ratios: BandRatios) -> None:
    convert(SHARED / "models" / model, root / model, progress=False)
    store = NeuronStore(root / model)
    g, m = torch.Generator().manual_seed(0), store.manifest
    layers = [LowRankPredictor(torch.randn(m.d_model, 16, generator=g), torch.randn(16, m.d_ffn, generator=g),
                             torch.zeros(m.d_ffn)) for _ in range(m.num_layers)]
    version = save_predictor(store, Predictor(layers))
    save_policy(store, {"ratios": ratios.to_dict(), "predictor_version": version})
    store.close()


def tokens_per_s(runtime: WorkerRuntime, prompt: list[int], tokens: int) -> float:
    seq = runtime.submit(Request(tuple(prompt), tokens))
    start = None
    while True:
        event = seq.events.get(timeout=300)
        if event.kind == "error":
            raise event.error
        if event.kind == "token" and start is None:
            start = time.perf_counter()  # after prefill: decode speed
        if event.kind == "done":
            return (len(seq.generated) - 1) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="stories260k")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cache-fraction", type=float, default=0.25)
    args = ap.parse_args()
    ratios = BandRatios(0.2, 0.25, 0.25)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare_store(root, args.model, ratios)
        store, store_port, catalog = store_server.create_server(StoreConfig(root=root, address="127.0.0.1:0"))
        store.start()
        redis = RedisProcess(find_redis_server(), free_port()).start()
        dram, dram_port, tier = dram_server.create_server(
            DramConfig(store_target=f"127.0.0.1:{store_port}", address="127.0.0.1:0"), redis.url)
        dram.start()
        ranker, ranker_port, _ = ranker_server.create_server(RankerConfig(root=root, address="127.0.0.1:0"))
        ranker.start()
        try:
            results = {}
            for mode in ("local", "remote"):
                cfg = WorkerConfig(model=args.model, dram_target=f"127.0.0.1:{dram_port}", address="127.0.0.1:0",
                                   ranker_target=f"127.0.0.1:{ranker_port}", rank_mode=mode,
                                   cache_fraction=args.cache_fraction)
                runtime = WorkerRuntime.connect(cfg)
                prompt = runtime.encode("Once upon a time")
                tokens_per_s(runtime, prompt, 4)  # warm-up
                results[mode] = [tokens_per_s(runtime, prompt, args.tokens) for _ in range(args.reps)]
                runtime.close()
        finally:
            ranker.stop(0).wait()
            dram.stop(0).wait()
            tier.stop()
            store.stop(0).wait()
            catalog.close()
            redis.stop()
    local, remote = statistics.median(results["local"]), statistics.median(results["remote"])
    print(f"model {args.model}, {args.tokens} tokens x {args.reps}, HBM cache {args.cache_fraction:.0%}, "
          f"bands {ratios.to_dict()}")
    print("| ranking | decode tok/s (median) | runs |\n|---|---|---|")
    print(f"| in-process (predictor pulled once) | {local:.1f} | {', '.join(f'{x:.1f}' for x in results['local'])} |")
    print(f"| Rank RPC per layer and step | {remote:.1f} | {', '.join(f'{x:.1f}' for x in results['remote'])} |")
    print(f"ratio remote / in-process: {remote / local:.2f}")


if __name__ == "__main__":
    main()
