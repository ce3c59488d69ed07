#!/usr/bin/env python3
"""Pooled workers sharing one store and one DRAM tier (issue 16). Not a test.

One NeuronStore and one DramTier (its own password-protected Redis) as
processes; for N = 1, 2, 4: N worker processes (``m2cache serve worker``, one
torch thread each: OMP_NUM_THREADS=1), each decoding one greedy request
concurrently. Reported: aggregate decode tokens/s, and the DRAM tier's bytes/s
(what Redis sent to the workers, from its INFO counters, over the same window)
beside what the workers fetched below their HBM caches (their GetStats). Two read
paths (``--paths``): "page-cache", the default on the store's host (each worker reads
the store's records file itself, its page cache first: Redis holds nothing for
them), and "redis" (``--page-cache-first false``: the workers read Redis, as workers
on other hosts do). Workers warm up first (one request each), so Redis or the page
cache holds what they use.

    python bench/bench_pool.py --json bench/out/pool.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.harness.synth import SynthShape, build_checkpoint, build_store  # noqa: E402
from bench.harness.systems_stack import stop_child as stop  # noqa: E402
from m2cache import grpc_util  # noqa: E402
from m2cache_client.pb import common_pb2, worker_pb2, worker_pb2_grpc  # noqa: E402


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(args: list[str], target: str, service: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "m2cache.cli", "serve", *args], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env)
    deadline = time.monotonic() + 300
    while grpc_util.check_health(target, service, 1.0) != "SERVING":
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            sys.exit(f"{service} did not come up (log {log})")
        time.sleep(0.2)
    return proc


def generate(target: str, model: str, prompt: list[int], n: int) -> int:
    with grpc_util.channel(target) as ch:
        stub = worker_pb2_grpc.WorkerStub(ch)
        req = worker_pb2.GenerateRequest(prompt_token_ids=prompt, max_new_tokens=n, model=model)
        return sum(1 for m in stub.Generate(req, timeout=1800) if not m.HasField("stats"))


def fetched(targets: list[str]) -> int:
    """Bytes the workers fetched below their HBM caches so far (Redis, page cache or store)."""
    total = 0
    for target in targets:
        with grpc_util.channel(target) as ch:
            total += worker_pb2_grpc.WorkerStub(ch).GetStats(common_pb2.StatsRequest(), timeout=30).bytes.dram
    return total


def redis_sent(client: redis.Redis) -> int:
    return int(client.info("stats")["total_net_output_bytes"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--tokens", type=int, default=8, help="decode tokens per worker per measured request")
    ap.add_argument("--cache-fraction", type=float, default=0.25)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "pool")
    ap.add_argument("--paths", nargs="+", choices=("page-cache", "redis"), default=["page-cache", "redis"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    shape = SynthShape(num_layers=args.layers, hidden=args.hidden, ffn=args.ffn, heads=16, kv_heads=4, vocab=8000)
    hf = build_checkpoint(shape, args.out / "models" / shape.name)
    build_store(hf, args.out / "stores" / shape.name)
    logs = Path(tempfile.mkdtemp(prefix="bench-pool-"))
    secret = logs / "redis.pass"
    secret.write_text(os.urandom(16).hex())
    secret.chmod(0o600)
    ffn_bytes = args.layers * args.ffn * 3 * args.hidden * 2
    store_t, dram_t, redis_port = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", free_port()
    procs = [serve(["store", "--root", str(args.out / "stores"), "--address", store_t], store_t,
                   "m2cache.v1.NeuronStore", logs / "store.log")]
    prompt = [1] + [(7919 * i + 13) % 7997 + 3 for i in range(1, 8)]
    rows = []
    try:
        procs.append(serve(["dram", "--store-target", store_t, "--address", dram_t, "--redis-port", str(redis_port),
                            "--budget-bytes", str(2 * ffn_bytes), "--redis-password-file", str(secret),
                            "--preload-precisions", "full"], dram_t, "m2cache.v1.DramTier", logs / "dram.log"))
        rclient = redis.Redis(port=redis_port, password=secret.read_text())
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        for path, n in [(path, n) for path in args.paths for n in args.workers]:
            targets = [f"127.0.0.1:{free_port()}" for _ in range(n)]
            workers = [serve(["worker", "--model", shape.name, "--dram-target", dram_t, "--address", t,
                              "--worker-id", f"pool-{path}-{n}-{i}", "--cache-fraction", str(args.cache_fraction),
                              "--redis-password-file", str(secret),
                              "--page-cache-first", "true" if path == "page-cache" else "false"], t,
                             "m2cache.v1.Worker", logs / f"worker-{path}-{n}-{i}.log", env)
                       for i, t in enumerate(targets)]
            try:
                for t in targets:  # warm-up: Redis gets what the workers use
                    generate(t, shape.name, prompt, 3)
                time.sleep(2)
                counts = [0] * n
                sent0, fetched0, t0 = redis_sent(rclient), fetched(targets), time.perf_counter()
                threads = [threading.Thread(target=lambda i=i: counts.__setitem__(
                    i, generate(targets[i], shape.name, prompt, args.tokens))) for i in range(n)]
                for th in threads:
                    th.start()
                for th in threads:
                    th.join()
                wall, sent = time.perf_counter() - t0, redis_sent(rclient) - sent0
                got = fetched(targets) - fetched0
                rows.append({"path": path, "workers": n, "tokens": sum(counts), "wall_s": wall,
                             "tok_per_s": sum(counts) / wall, "tier_bytes_per_s": sent / wall,
                             "fetched_bytes_per_s": got / wall, "load_avg": os.getloadavg()})
                print(f"{path}, workers {n}: {sum(counts)} tokens in {wall:.1f} s = {sum(counts) / wall:.3f} tok/s, "
                      f"Redis sent {sent / wall / 1e6:.0f} MB/s, workers fetched {got / wall / 1e6:.0f} MB/s; "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
            finally:
                for w in workers:
                    stop(w)
    finally:
        for p in reversed(procs):
            stop(p)
    for r in rows:
        base = next(b["tok_per_s"] for b in rows if b["path"] == r["path"])  # that path's fewest workers
        r["speedup_vs_1"] = r["tok_per_s"] / base
    doc = {"shape": shape.name, "ffn_bytes": ffn_bytes, "cache_fraction": args.cache_fraction,
           "cores": os.cpu_count(), "rows": rows}
    print(json.dumps(doc, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
