"""Sustained load against a local stack: N concurrent clients for M minutes.

Starts the whole stack on loopback (``m2cache.stack.Stack``: Redis, store, DRAM
tier, ranker, workers, gateway), runs ``--clients`` threads that each stream
completions back to back through the OpenAI gateway (``--via gateway``, SSE) or
the gRPC client library (``--via grpc``) until ``--minutes`` have passed, samples
the RSS of every stack process every ``--sample-s`` seconds, then stops every
process it started. Bounded: it stops by itself, and Ctrl-C stops it early.

Reports (JSON, ``--out``): requests, errors (by kind), tokens and tokens/s,
p50/p99 time to first token and inter-token latency, each process's RSS at the
start, at ``--rss-from-minute`` (default 2) and at the end with the growth
between the last two, and the load average beside them.

    python bench/load.py --store-root runs/stores --model tinystories-656k --clients 8 --minutes 10 \\
        --workers 2 --out bench/out/load.json
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "services"), str(REPO / "clients" / "python")]

import httpx  # noqa: E402

from m2cache.stack import Stack, StackConfig, client_kwargs  # noqa: E402
from m2cache.stack.config import free_base_port  # noqa: E402

PROMPTS = ["Once upon a time", "The little dog", "One day, a girl named Lily", "Tom and Sam went to the park",
           "There was a big red ball", "The sun was shining and"]


@dataclass
class Tally:
    """What the client threads record (under ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)

    def done(self, ttft: float | None, gaps: list[float], tokens: int) -> None:
        with self.lock:
            self.requests += 1
            self.tokens += tokens
            if ttft is not None:
                self.ttft.append(ttft)
            self.itl.extend(gaps)

    def error(self, kind: str) -> None:
        with self.lock:
            self.requests += 1
            self.errors[kind] = self.errors.get(kind, 0) + 1


def via_gateway(state: dict, prompt: str, max_tokens: int, timeout_s: float, http: httpx.Client):
    """(ttft, inter-token gaps, tokens) of one streamed completion through the gateway."""
    body = {"model": state["model"], "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    arrivals, tokens = [], 0
    with http.stream("POST", f"{state['gateway']}/v1/completions", json=body, timeout=timeout_s) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}")
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"].get("type", "error"))
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif event["choices"] and event["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
    if not arrivals:
        raise RuntimeError("no tokens")
    return arrivals[0] - start, [b - a for a, b in zip(arrivals, arrivals[1:])], tokens


def via_grpc(state: dict, prompt: str, max_tokens: int, timeout_s: float, client):
    start = time.perf_counter()
    arrivals = [time.perf_counter() for t in client.stream(prompt, max_new_tokens=max_tokens, timeout_s=timeout_s)
                if t.id >= 0]
    if not arrivals:
        raise RuntimeError("no tokens")
    return arrivals[0] - start, [b - a for a, b in zip(arrivals, arrivals[1:])], len(arrivals)


def client_loop(index: int, state: dict, args, until: float, stop: threading.Event, tally: Tally) -> None:
    if args.via == "gateway":
        verify = ssl.create_default_context(cafile=state["tls"]["ca"]) if state.get("tls") else True
        headers = {}
        if state.get("api_key_file"):
            headers["authorization"] = "Bearer " + Path(state["api_key_file"]).read_text().split()[0]
        conn = httpx.Client(verify=verify, headers=headers)
        call = via_gateway
    else:
        from m2cache_client import Client

        conn = Client(state["workers"], model=state["model"], timeout_s=args.request_timeout_s, **client_kwargs(state))
        call = via_grpc
    n = index
    try:
        while time.monotonic() < until and not stop.is_set():
            prompt = PROMPTS[n % len(PROMPTS)]
            n += args.clients
            try:
                ttft, gaps, tokens = call(state, prompt, args.max_tokens, args.request_timeout_s, conn)
            except Exception as err:  # noqa: BLE001 (every failure is counted, by kind)
                tally.error(f"{type(err).__name__}: {err}"[:120])
                continue
            tally.done(ttft, gaps, tokens)
    finally:
        conn.close()


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def redis_memory(state: dict) -> dict | None:
    """Redis' own view (INFO memory): what of its RSS is data, allocator, buffers."""
    import redis

    host, port = state["redis"].rsplit(":", 1)
    try:
        info = redis.Redis(host=host, port=int(port), socket_timeout=2).info("memory")
    except redis.exceptions.RedisError:
        return None
    keys = ("used_memory", "used_memory_dataset", "used_memory_rss", "mem_fragmentation_ratio",
            "mem_clients_normal", "allocator_allocated", "allocator_resident")
    return {k: info.get(k) for k in keys}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarize(args, tally: Tally, samples: list[dict], elapsed: float, load: dict) -> dict:
    from_s = args.rss_from_minute * 60
    rss = {}
    for name in samples[0]["rss"] if samples else []:
        series = [(s["t"], s["rss"].get(name)) for s in samples if s["rss"].get(name)]
        mid = min(series, key=lambda p: abs(p[0] - from_s))[1] if series else None
        start, end = (series[0][1], series[-1][1]) if series else (None, None)
        rss[name] = {"start": start, f"minute_{args.rss_from_minute:g}": mid, "end": end,
                     "growth_from_minute": (end - mid) / mid if mid and end else None}
    growth = [v["growth_from_minute"] for v in rss.values() if v["growth_from_minute"] is not None]
    return {
        "config": {"clients": args.clients, "minutes": args.minutes, "workers": args.workers, "via": args.via,
                   "max_tokens": args.max_tokens, "model": args.model, "secure": args.secure},
        "elapsed_s": elapsed, "requests": tally.requests, "errors": sum(tally.errors.values()),
        "error_kinds": tally.errors, "tokens": tally.tokens, "tokens_per_s": tally.tokens / elapsed if elapsed else 0,
        "ttft_s": {"p50": pct(tally.ttft, 0.5), "p99": pct(tally.ttft, 0.99),
                   "mean": statistics.fmean(tally.ttft) if tally.ttft else None},
        "itl_s": {"p50": pct(tally.itl, 0.5), "p99": pct(tally.itl, 0.99),
                  "mean": statistics.fmean(tally.itl) if tally.itl else None},
        "rss_bytes": rss, "max_rss_growth_from_minute": max(growth) if growth else None,
        "load_average": load, "rss_samples": samples,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store-root", type=Path, required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--via", choices=("gateway", "grpc"), default="gateway")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--request-timeout-s", type=float, default=120.0)
    ap.add_argument("--sample-s", type=float, default=10.0, help="RSS sampling period")
    ap.add_argument("--rss-from-minute", type=float, default=2.0, help="RSS growth is measured from here to the end")
    ap.add_argument("--secure", action="store_true", help="the stack with mTLS and API keys")
    ap.add_argument("--base-port", type=int, default=0, help="default: a free block")
    ap.add_argument("--run-dir", type=Path, default=REPO / "bench" / "out" / "load-run")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "load.json")
    args = ap.parse_args(argv)
    config = StackConfig(store_root=args.store_root, model=args.model, num_workers=args.workers,
                         base_port=args.base_port or free_base_port(args.workers), secure=args.secure,
                         run_dir=args.run_dir, log_dir=args.run_dir / "logs", state_file=args.run_dir / "stack.json",
                         log_level="WARNING", restart=False)  # a death is an error here, not something to hide
    stack = Stack(config, progress=lambda line: print(line, file=sys.stderr, flush=True))
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    tally, samples = Tally(), []
    load = {"start": os.getloadavg()}
    try:
        stack.start()
        state = stack.state()
        pids = stack.pids()
        begin = time.monotonic()
        until = begin + args.minutes * 60
        threads = [threading.Thread(target=client_loop, args=(i, state, args, until, stop, tally), daemon=True)
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        next_sample = begin
        while time.monotonic() < until and not stop.is_set():
            if time.monotonic() >= next_sample:
                samples.append({"t": round(time.monotonic() - begin, 1), "rss": {n: rss_bytes(p) for n, p in pids.items()},
                                "requests": tally.requests, "errors": sum(tally.errors.values()),
                                "redis_memory": redis_memory(state)})
                next_sample += args.sample_s
            stop.wait(min(1.0, max(next_sample - time.monotonic(), 0.05)))
        for t in threads:  # each finishes its request in flight (bounded by the request timeout)
            t.join(timeout=args.request_timeout_s + 10)
        elapsed = time.monotonic() - begin
        samples.append({"t": round(elapsed, 1), "rss": {n: rss_bytes(p) for n, p in pids.items()},
                        "requests": tally.requests, "errors": sum(tally.errors.values()),
                        "redis_memory": redis_memory(state)})
        dead = [n for n, p in pids.items() if rss_bytes(p) is None]
        if dead:
            tally.errors["process died: " + ",".join(dead)] = len(dead)
    finally:
        stack.stop()
    load["end"] = os.getloadavg()
    report = summarize(args, tally, samples, elapsed, load)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    brief = {k: report[k] for k in ("requests", "errors", "tokens_per_s", "ttft_s", "itl_s",
                                    "max_rss_growth_from_minute", "load_average")}
    print(json.dumps(brief, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
