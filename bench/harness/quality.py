"""Held-out perplexity of the benchmarked model under each precision policy,
on a bounded number of tokens of real text (WikiText-2 test by default).

Uniform policies (every neuron FULL, INT8 or INT4) give every token the same
neurons, so whole chunks are scored in one forward (model.eval.perplexity);
per-token policies (mixed, oracle) are scored one token per forward
(predictors.evaluate.stepwise_score), as the worker decodes. Both run the same
float32 reference model on the store's records, and the caches never change
results, so these figures hold for every fast-memory budget."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from m2cache.codec.format import Precision
from m2cache.predictors.bands import BandRatios


def text_ids(tokenizer, text_path: Path, num_tokens: int) -> list[int]:
    """The first ``num_tokens`` token ids of the text (read only as far as needed)."""
    text = Path(text_path).read_text(encoding="utf-8")[: num_tokens * 12]
    return list(tokenizer(text).input_ids)[:num_tokens]


def perplexities(store_path: Path, text_path: Path, num_tokens: int, context: int, ratios: BandRatios,
                 policies: tuple[str, ...]) -> list[dict]:
    """One row per policy: perplexity, tokens scored, who chose the neurons, seconds."""
    from m2cache.model.eval import perplexity
    from m2cache.local.loader import load_model
    from m2cache.model.providers import ChoiceProvider, FullProvider, uniform_choose
    from m2cache.predictors.evaluate import stepwise_score
    from m2cache.store.reader import NeuronStore

    from bench.harness.policy import load_policy

    store = NeuronStore(store_path)
    try:
        model, tok, bank = load_model(store)
        if tok is None:
            raise RuntimeError(f"{store_path} has no tokenizer: perplexity needs one")
        ids = text_ids(tok, text_path, num_tokens)
        seqs = [torch.tensor(c) for c in (ids[i : i + context] for i in range(0, len(ids), context)) if len(c) >= 2]
        rows = []
        uniform = {"full": FullProvider(bank), "int8": ChoiceProvider(bank, uniform_choose(bank, Precision.INT8)),
                   "int4": ChoiceProvider(bank, uniform_choose(bank, Precision.INT4))}
        for name in policies:
            t0 = time.perf_counter()
            if name in uniform:
                ppl, source = perplexity(model, ids, uniform[name], context=context), f"every neuron {name.upper()}"
                kept = 1.0
            else:
                policy = load_policy(name, store_path, store.manifest, ratios)
                ppl, source = stepwise_score(model, seqs, ChoiceProvider(bank, policy.choose())).perplexity, policy.source
                kept = policy.ratios.kept
            rows.append({"policy": name, "perplexity": ppl, "tokens": len(ids), "context": context, "chooser": source,
                         "kept_fraction": kept, "seconds": time.perf_counter() - t0})
        return rows
    finally:
        store.close()
