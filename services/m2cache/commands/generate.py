"""``m2cache generate``: stream a completion from the running stack (addresses,
and for a ``--secure`` stack the client certificate and API key, from its state
file). Greedy by default (temperature 0), unlike the OpenAI gateway's 1.0."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from m2cache.stack import client_kwargs, read_state


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="generate from the running stack", description=__doc__)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--token-ids", action="store_true", help="print prompt+generated token ids as one JSON list")
    p.add_argument("--workers", default="", help="comma-separated worker targets (default: from --state-file)")
    p.add_argument("--model", default="", help="model name (default: from --state-file)")
    p.add_argument("--state-file", type=Path, default=Path("runs/stack.json"))
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--full", action="store_true", help="every neuron at full precision")
    p.add_argument("--timeout-s", type=float, default=300.0)
    return p


def main(args: argparse.Namespace) -> int:
    from m2cache_client import Client, M2CacheClientError
    from m2cache_client.client import Progress

    if args.workers:
        targets, model, security = args.workers.split(","), args.model, {}
    else:
        state = read_state(args.state_file)
        targets, model, security = state["workers"], args.model or state["model"], client_kwargs(state)
    progress = Progress()
    with Client(targets, model=model, timeout_s=args.timeout_s, **security) as client:
        try:
            for token in client.stream(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                       top_k=args.top_k, top_p=args.top_p, seed=args.seed, full_precision=args.full,
                                       progress_out=progress):
                if not args.token_ids:
                    print(token.text, end="", flush=True)
        except M2CacheClientError as err:
            print(f"m2cache generate: {err}", file=sys.stderr)
            return 2
    if args.token_ids:
        print(json.dumps(progress.prompt_ids + progress.token_ids))
    else:
        print()
    return 0
