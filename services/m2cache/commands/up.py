"""``m2cache up``: the whole stack as local processes on loopback (Redis,
store, DRAM tier, ranker, workers, HTTP gateway), started in order with health
waits; Ctrl-C or SIGTERM stops every process it started."""
from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from m2cache.stack import Stack, StackConfig


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("up", help="run the whole stack locally", description=__doc__)
    p.add_argument("--store-root", required=True, type=Path, help="directory of converted stores")
    p.add_argument("--model", required=True, help="store (subdirectory) to serve")
    p.add_argument("--workers", type=int, default=1, help="decode workers (default 1)")
    p.add_argument("--base-port", type=int, default=50060, help="ports: store +1, dram +2, ranker +3, "
                   "redis +9, workers +10.., gateway +80 (default 50060)")
    p.add_argument("--no-gateway", action="store_true", help="do not start the OpenAI-compatible gateway")
    p.add_argument("--dram-budget-bytes", type=int, default=1 << 30)
    p.add_argument("--numa-node", type=int, default=-1,
                   help="bind the DRAM tier's Redis to this NUMA node, e.g. a CXL expander (default -1: off)")
    p.add_argument("--cache-fraction", type=float, default=0.25, help="HBM cache budget, fraction of FFN bytes")
    p.add_argument("--window", type=int, default=4, help="tokens a used neuron stays in the HBM cache")
    p.add_argument("--device", default="cpu", help="worker device: cpu or cuda")
    p.add_argument("--state-file", type=Path, default=Path("runs/stack.json"))
    p.add_argument("--log-dir", type=Path, default=Path("runs/logs"))
    p.add_argument("--demo-prompt", default="", help="after start-up, generate from this prompt and print it")
    p.add_argument("--demo-tokens", type=int, default=64)
    p.add_argument("--exit-after-demo", action="store_true", help="stop the stack after the demo generation")
    return p


def main(args: argparse.Namespace) -> int:
    config = StackConfig(
        store_root=args.store_root, model=args.model, num_workers=args.workers, base_port=args.base_port,
        gateway=not args.no_gateway, dram_budget_bytes=args.dram_budget_bytes, numa_node=args.numa_node,
        cache_fraction=args.cache_fraction,
        window=args.window, device=args.device, log_dir=args.log_dir, state_file=args.state_file,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stack = Stack(config)
    try:
        print(f"starting m2cache stack for {config.model} (logs in {config.log_dir}) ...", flush=True)
        stack.start()
        print(f"up: workers {', '.join(config.addr(10 + i) for i in range(config.num_workers))}"
              + (f", OpenAI-compatible gateway http://{config.addr(80)}/v1" if config.gateway else ""), flush=True)
        if args.demo_prompt:
            demo(config, args.demo_prompt, args.demo_tokens)
        if not args.exit_after_demo:
            print("serving; Ctrl-C stops every process", flush=True)
            stop.wait()
    finally:
        stack.stop()
        print("stopped", flush=True)
    return 0


def demo(config: StackConfig, prompt: str, max_new_tokens: int) -> None:
    from m2cache_client import Client
    from m2cache_client.client import Progress

    with Client([config.addr(10 + i) for i in range(config.num_workers)], model=config.model) as client:
        print(prompt, end="", flush=True)
        progress = Progress()
        for token in client.stream(prompt, max_new_tokens=max_new_tokens, progress_out=progress):
            print(token.text, end="", flush=True)
        s = progress.stats
        print(f"\n[{s.generated_tokens} tokens, {s.tokens_per_s:.1f} tok/s, TTFT {s.ttft_s * 1000:.0f} ms, "
              f"HBM hit rate {s.hbm_hit_rate:.0%}]", flush=True)
