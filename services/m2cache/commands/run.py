"""``m2cache run STORE --prompt TEXT``: generate in process, straight from a
converted store (no services). By default every neuron is resident; with
``--budget F`` the worker's own HBM neuron cache holds F of the FFN bytes and
misses are read from the store, so the cache can be tried without the stack."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import torch

from m2cache.codec.format import Precision
from m2cache.errors import FailedPrecondition, InvalidArgument
from m2cache.local.loader import load_model, store_fetch
from m2cache.model.generate import Sampling, generate
from m2cache.model.providers import Choose, ChoiceProvider, FullProvider, WeightBank, uniform_choose
from m2cache.store.reader import NeuronStore

log = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``run`` subcommand."""
    p = subparsers.add_parser("run", help="generate text from a store, in process",
                              description="Generate a continuation of --prompt in process, from a converted store.")
    p.add_argument("store", metavar="STORE", help="store directory (from m2cache convert)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--token-ids", action="store_true", help="print prompt + generated token ids as one JSON list")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="every neuron at full precision (ignore the policy)")
    mode.add_argument("--precision", choices=[p.name.lower() for p in Precision],
                      help="every neuron at this precision (ignore the policy)")
    p.add_argument("--budget", type=float, default=None,
                   help="HBM neuron-cache budget as a fraction of the FFN's full-precision bytes (e.g. 0.25); "
                        "misses are read from the store. Default: every neuron resident")
    p.add_argument("--window", type=int, default=4, help="with --budget: tokens a used neuron stays cached (default 4)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="compute device (default cpu)")
    p.add_argument("--quiet", action="store_true", help="do not print the speed and cache line to stderr")
    return p


def policy_choose(store: NeuronStore, bank: WeightBank):
    """(choose, ratios) of the store's policy (band ratios from ``m2cache search-policy``)
    ranked by its newest predictor, or (None, None) when the store has no policy."""
    from m2cache.predictors.ranking import Ranker
    from m2cache.predictors.storage import load_policy

    if load_policy(store) is None:
        return None, None
    ranker = Ranker.from_store(store, require_policy=True)
    ranker.predictor = ranker.predictor.to(bank.device)
    log.info("policy %s with predictor v%d", ranker.ratios, ranker.predictor.version)
    return ranker.choose(), ranker.ratios.to_dict()


def default_choose(store: NeuronStore, bank: WeightBank) -> Choose:
    """What ``run`` computes with when neither --full nor --precision is given, as a
    choose function: the store's policy, or every neuron at full precision."""
    choose, _ratios = policy_choose(store, bank)
    return choose or uniform_choose(bank, Precision.FULL)


def choose_for(args: argparse.Namespace, store: NeuronStore, bank: WeightBank) -> tuple[Choose | None, dict | None]:
    """What the run computes: (None, None) = every neuron at full precision (the dense path)."""
    if args.full:
        return None, None
    if args.precision:
        prec = Precision.parse(args.precision)
        return uniform_choose(bank, prec), {p.name.lower(): float(p == prec) for p in Precision}
    return policy_choose(store, bank)


class Run:
    """The FFN provider a run uses, its per-step hook and its cache counters."""

    def __init__(self, args: argparse.Namespace, store: NeuronStore, bank: WeightBank):
        choose, ratios = choose_for(args, store, bank)
        self.cache = None
        if args.budget is None or (args.budget >= 1 and choose is None):
            self.ffn = FullProvider(bank) if choose is None else ChoiceProvider(bank, choose)
            self.before_step = None
            return
        from m2cache.worker.choosers import full_choose
        from m2cache.worker.provider import CachedProvider
        from m2cache.worker.runtime import build_cache

        choose = choose or full_choose(bank.num_neurons)
        m = store.manifest
        self.cache = build_cache(m, args.budget, ratios, args.window, args.device)
        self.ffn = CachedProvider(self.cache, store.layout, store_fetch(store), m.num_layers)
        self.before_step = lambda: self.ffn.begin_step([choose])

    def close(self) -> None:
        if self.cache is not None:
            self.ffn.close()

    def summary(self, n_tokens: int, t_start: float, times: list[float]) -> str:
        ttft = times[0] - t_start if times else 0.0
        rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
        line = f"[{n_tokens} tokens, {rate:.1f} tok/s, TTFT {1000 * ttft:.0f} ms"
        if self.cache is None:
            return line + ", every neuron resident]"
        s = self.cache.stats
        hit = s.hits / (s.hits + s.misses) if s.hits + s.misses else 0.0
        fetched = self.ffn.stats.bytes_fetched
        return line + (f", HBM hit rate {100 * hit:.0f}%, {fetched / max(n_tokens, 1) / 2**20:.2f} MiB/token "
                       f"from the store, cache {self.cache.budget_bytes >> 20} MiB]")


def main(args: argparse.Namespace) -> int:
    """Generate and print the continuation (or the token ids); speed and cache on stderr."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise FailedPrecondition("--device cuda: CUDA is not available on this machine")
    if args.budget is not None and not args.budget > 0:
        raise InvalidArgument(f"--budget must be > 0, got {args.budget}")
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    store = NeuronStore(args.store)
    try:
        model, tokenizer, bank = load_model(store, args.device, drop_pages=True)
        if tokenizer is None:
            raise FailedPrecondition(f"{args.store} holds no tokenizer files; cannot encode --prompt")
        prompt_ids = tokenizer(args.prompt).input_ids
        run = Run(args, store, bank)
        times: list[float] = []
        try:
            t_start = time.perf_counter()
            new_ids = generate(model, prompt_ids, args.max_new_tokens, run.ffn, sampling,
                               before_step=run.before_step, on_token=lambda _t: times.append(time.perf_counter()))
        finally:
            run.close()
    finally:
        store.close()
    if args.token_ids:
        print(json.dumps(prompt_ids + new_ids))
    else:
        print(tokenizer.decode(new_ids, skip_special_tokens=True))
    if not args.quiet:
        print(run.summary(len(new_ids), t_start, times), file=sys.stderr)
    return 0
