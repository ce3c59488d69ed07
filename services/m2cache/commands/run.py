"""``m2cache run STORE --prompt TEXT``: generate with the reference model,
in process, straight from a converted store (no services)."""
from __future__ import annotations

import argparse
import json
import logging

import torch

from m2cache.codec.format import Precision
from m2cache.store.reader import NeuronStore
from m2cache.errors import FailedPrecondition
from m2cache.model.ffn import FFNProvider
from m2cache.model.generate import Sampling, generate
from m2cache.model.loader import load_model
from m2cache.model.providers import Choose, ChoiceProvider, FullProvider, WeightBank, uniform_choose

log = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``run`` subcommand."""
    p = subparsers.add_parser("run", help="generate text from a store with the reference model",
                              description="Generate a continuation of --prompt with the in-process reference model.")
    p.add_argument("store", metavar="STORE", help="store directory (from m2cache convert)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--token-ids", action="store_true", help="print prompt + generated token ids as one JSON list")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="every neuron at full precision (ignore the policy)")
    mode.add_argument("--precision", choices=[p.name.lower() for p in Precision],
                      help="every neuron at this precision (ignore the policy)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="compute device (default cpu)")
    return p


def default_choose(store: NeuronStore, bank: WeightBank) -> Choose:
    """What ``run`` computes with when neither --full nor --precision is given:
    the store's policy (band ratios from ``m2cache search-policy``) ranked by its
    newest predictor; every neuron at full precision when the store has no policy."""
    from m2cache.predictors.ranking import Ranker
    from m2cache.predictors.storage import load_policy

    if load_policy(store) is None:
        return uniform_choose(bank, Precision.FULL)
    ranker = Ranker.from_store(store, require_policy=True)
    ranker.predictor = ranker.predictor.to(bank.device)
    log.info("policy %s with predictor v%d", ranker.ratios, ranker.predictor.version)
    return ranker.choose()


def build_provider(args: argparse.Namespace, store: NeuronStore, bank: WeightBank) -> FFNProvider:
    if args.full:
        return FullProvider(bank)
    if args.precision:
        return ChoiceProvider(bank, uniform_choose(bank, args.precision))
    return ChoiceProvider(bank, default_choose(store, bank))


def main(args: argparse.Namespace) -> int:
    """Generate and print the continuation (or the token ids)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise FailedPrecondition("--device cuda: CUDA is not available on this machine")
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    store = NeuronStore(args.store)
    try:
        model, tokenizer, bank = load_model(store, args.device)
        if tokenizer is None:
            raise FailedPrecondition(f"{args.store} holds no tokenizer files; cannot encode --prompt")
        prompt_ids = tokenizer(args.prompt).input_ids
        new_ids = generate(model, prompt_ids, args.max_new_tokens, build_provider(args, store, bank), sampling)
    finally:
        store.close()
    if args.token_ids:
        print(json.dumps(prompt_ids + new_ids))
    else:
        print(tokenizer.decode(new_ids, skip_special_tokens=True))
    return 0
