#!/usr/bin/env python3
"""Bitmap sparse format (Endor) on an offload-bound synthetic model: record
bytes, decode cost against the transfer time it saves, and end-to-end tokens/s
of a worker over the real DramTier + NeuronStore, unpruned vs 50%-pruned. Not a test.

A random fp16 Llama (default d_model 512, d_ffn 1376, 4 layers) is converted
twice: unpruned (codec dense) and magnitude-pruned 50% (codec bitmap). The
NeuronStore and DramTier run as subprocesses (``m2cache serve``) over one Redis;
the worker runs in this process with a small HBM cache and every neuron at FULL
precision (``full_precision``), so each token moves most of the FFN weights.

    python bench/bench_bitmap.py [--tokens 24] [--rounds 3] [--cache-fraction 0.1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tiers import free_port, serve, stop  # noqa: E402  (subprocess helpers)

from m2cache import grpc_util  # noqa: E402
from m2cache.codec import bitmap  # noqa: E402
from m2cache.convert.writer import convert  # noqa: E402
from m2cache.codec.format import Precision  # noqa: E402
from m2cache.store.reader import NeuronStore  # noqa: E402
from m2cache.convert.prune import PruneSpec  # noqa: E402
from m2cache.dram.redis_proc import RedisProcess, find_redis_server  # noqa: E402
from m2cache.worker import server as worker_server  # noqa: E402
from m2cache.worker.config import WorkerConfig  # noqa: E402
from m2cache.worker.runtime import WorkerRuntime  # noqa: E402
from m2cache_client.pb import common_pb2, dram_pb2, dram_pb2_grpc, worker_pb2, worker_pb2_grpc  # noqa: E402

MODELS = ("dense", "bitmap")
PROMPT = [1, 365, 118, 263, 431]


def make_checkpoint(out: Path, d_model: int, d_ffn: int, layers: int) -> Path:
    """A random-init fp16 Llama checkpoint (safetensors + config.json)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=d_model, intermediate_size=d_ffn,
                                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                                      max_position_embeddings=512, tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float16)
    model.save_pretrained(out, safe_serialization=True)
    return out


def record_sizes(root: Path) -> list[str]:
    """Markdown rows: stored bytes of every record per precision, bitmap / dense."""
    rows = []
    dense, sparse = NeuronStore(root / "dense"), NeuronStore(root / "bitmap")
    for prec in Precision:
        d_bytes = s_bytes = 0
        for layer in range(dense.manifest.num_layers):
            ids = range(dense.manifest.d_ffn)
            d_bytes += len(dense.get_records(layer, ids, prec)[0])
            s_bytes += len(sparse.get_records(layer, ids, prec)[0])
        rows.append(f"| {prec.name} | {dense.layout.num_bytes(prec):,} | "
                    f"{sparse.manifest.max_record_bytes[prec.name.lower()]:,} | {s_bytes / d_bytes:.4f} |")
    dense.close()
    sparse.close()
    return rows


def decode_cost(root: Path, reps: int = 7) -> tuple[float, int, int]:
    """(median s to decode one layer's FULL records, stored bytes, dense bytes) on this CPU."""
    store = NeuronStore(root / "bitmap")
    ids = range(store.manifest.d_ffn)
    payload, lengths = store.get_records(0, ids, Precision.FULL)
    spec = bitmap.element_spec(store.layout, Precision.FULL)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        bitmap.decode_bytes(payload, lengths, spec)
        times.append(time.perf_counter() - t)
    dense_bytes = store.manifest.d_ffn * store.layout.num_bytes(Precision.FULL)
    store.close()
    return statistics.median(times), len(payload), dense_bytes


def layer_fetch_s(dram_target: str, model: str, d_ffn: int, reps: int = 7) -> float:
    """Median seconds of one DramTier FetchNeurons of a whole layer at FULL (from Redis once warm)."""
    stub = dram_pb2_grpc.DramTierStub(grpc_util.channel(dram_target))
    batch = common_pb2.NeuronBatchRequest(model=model, layer=0, neuron_ids=list(range(d_ffn)), precision=1)
    req = dram_pb2.DramFetchRequest(batch=batch, current_layer=0, caller_id=f"probe-{model}")
    stub.FetchNeurons(req, timeout=60)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        stub.FetchNeurons(req, timeout=60)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def generate_round(dram_target: str, model: str, args) -> dict:
    """One fresh worker (cold HBM cache), one request: tokens/s and per-token fetch figures."""
    config = WorkerConfig(model=model, dram_target=dram_target, address="127.0.0.1:0",
                          cache_fraction=args.cache_fraction, window=1, worker_id=f"bench-{model}")
    runtime = WorkerRuntime.connect(config)
    server, port, runtime = worker_server.create_server(config, runtime)
    server.start()
    try:
        stub = worker_pb2_grpc.WorkerStub(grpc_util.channel(f"127.0.0.1:{port}"))
        req = worker_pb2.GenerateRequest(model=model, prompt_token_ids=PROMPT, max_new_tokens=args.tokens,
                                         full_precision=True)
        before = (runtime.fetcher.stats.bytes, runtime.fetcher.stats.decode_seconds, runtime.fetcher.stats.seconds)
        msgs = list(stub.Generate(req, timeout=600))
        stats = msgs[-1].stats
        s = runtime.fetcher.stats
        return {"tok_s": stats.tokens_per_s, "tokens": stats.generated_tokens,
                "mb_per_tok": (s.bytes - before[0]) / stats.generated_tokens / 1e6,
                "decode_ms_per_tok": 1e3 * (s.decode_seconds - before[1]) / stats.generated_tokens,
                "fetch_ms_per_tok": 1e3 * (s.seconds - before[2]) / stats.generated_tokens, "hit_rate": stats.hbm_hit_rate}
    finally:
        server.stop(0).wait()
        runtime.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ffn", type=int, default=1376)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=24, help="new tokens per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds per store, alternating stores")
    p.add_argument("--cache-fraction", type=float, default=0.1, help="worker HBM cache / FULL FFN bytes")
    p.add_argument("--budget-mb", type=float, default=8.0, help="DRAM tier (Redis) budget")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-bitmap-") as tmp:
        tmp = Path(tmp)
        hf = make_checkpoint(tmp / "hf", args.d_model, args.d_ffn, args.layers)
        convert(hf, tmp / "root" / "dense", progress=False)
        convert(hf, tmp / "root" / "bitmap", progress=False, prune=PruneSpec(0.5))
        print("| precision | dense record B | largest bitmap record B | stored bytes bitmap / dense |")
        print("|---|---|---|---|")
        print("\n".join(record_sizes(tmp / "root")))
        run_stack(tmp / "root", args)


def run_stack(root: Path, args) -> None:
    """Start Redis, the store and one DramTier; measure transfer vs decode, then tokens/s."""
    redis = RedisProcess(find_redis_server(), free_port()).start()
    store_t, dram_t = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    procs = []
    try:
        procs.append(serve(["store", "--root", str(root), "--address", store_t], store_t, "m2cache.v1.NeuronStore"))
        procs.append(serve(["dram", "--address", dram_t, "--store-target", store_t, "--redis-url", redis.url,
                            "--budget-bytes", str(int(args.budget_mb * 2**20)), "--num-pinned-layers", "1",
                            "--preload-ahead", "1"], dram_t, "m2cache.v1.DramTier"))
        decode_s, stored, dense_bytes = decode_cost(root)
        fetch = {m: layer_fetch_s(dram_t, m, args.d_ffn) for m in MODELS}
        print(f"\none layer, every neuron FULL: dense {dense_bytes / 1e6:.2f} MB fetched in {1e3 * fetch['dense']:.1f} ms; "
              f"bitmap {stored / 1e6:.2f} MB fetched in {1e3 * fetch['bitmap']:.1f} ms "
              f"(saves {1e3 * (fetch['dense'] - fetch['bitmap']):.1f} ms); decode {1e3 * decode_s:.1f} ms")
        results = {m: [] for m in MODELS}
        for _ in range(args.rounds):
            for m in MODELS:
                results[m].append(generate_round(dram_t, m, args))
        print("\n| store | tokens/s (median of rounds) | MB fetched / token | fetch ms / token | "
              "decode ms / token | HBM hit rate |")
        print("|---|---|---|---|---|---|")
        for m in MODELS:
            rs = results[m]
            med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            each = ", ".join(f"{r['tok_s']:.2f}" for r in rs)
            print(f"| {m} | {med['tok_s']:.2f} ({each}) | "
                  f"{med['mb_per_tok']:.2f} | {med['fetch_ms_per_tok']:.1f} | {med['decode_ms_per_tok']:.1f} | "
                  f"{med['hit_rate']:.2f} |")
        ratio = statistics.median(r["tok_s"] for r in results["bitmap"]) / statistics.median(
            r["tok_s"] for r in results["dense"])
        print(f"\nbitmap / dense tokens/s: {ratio:.2f}x")
    finally:
        for proc in reversed(procs):
            stop(proc)
        redis.stop()


if __name__ == "__main__":
    main()
