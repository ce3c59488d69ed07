"""Mixed-precision fidelity (a benchmark, not a test): perplexity of the real
tiny models on the held-out TinyStories eval text with every FFN neuron at
FULL, INT8 and INT4, through a converted store. Prints a markdown table.

    python bench/bench_fidelity.py [--tokens N] [--context 256]
"""
from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

from m2cache.convert.writer import convert
from m2cache.codec.format import Precision
from m2cache.store.reader import NeuronStore
from m2cache.model.eval import negative_log_likelihood
from m2cache.local.loader import load_model
from m2cache.model.providers import ChoiceProvider, FullProvider, uniform_choose

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODELS = ("tinystories-656k", "stories260k")
EVAL_TEXT = SHARED / "corpora" / "tinystories" / "valid_500-999_eval.txt"


def measure(name: str, tokens: int | None, context: int) -> dict:
    """Perplexity at each uniform precision for one model; returns a table row."""
    with tempfile.TemporaryDirectory() as tmp:
        convert(SHARED / "models" / name, Path(tmp) / "store", progress=False)
        store = NeuronStore(Path(tmp) / "store")
        model, tokenizer, bank = load_model(store)
        ids = tokenizer(EVAL_TEXT.read_text()).input_ids[:tokens]
        row = {"model": name, "tokens": len(ids)}
        for prec in Precision:
            provider = FullProvider(bank) if prec == Precision.FULL else ChoiceProvider(bank, uniform_choose(bank, prec))
            nll, count = negative_log_likelihood(model, ids, provider, context)
            row[prec.name.lower()] = math.exp(nll / count)
            row["predicted"] = count
        store.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=None, help="first N tokens of the eval text (default all)")
    parser.add_argument("--context", type=int, default=256, help="tokens per independently scored chunk")
    args = parser.parse_args()
    print("| model | eval tokens (predicted) | FULL ppl | INT8 ppl | INT8 change | INT4 ppl | INT4 change |")
    print("|---|---|---|---|---|---|---|")
    for name in MODELS:
        r = measure(name, args.tokens, args.context)
        print(f"| {r['model']} | {r['tokens']:,} ({r['predicted']:,}) | {r['full']:.4f} | {r['int8']:.4f} | "
              f"{100 * (r['int8'] / r['full'] - 1):+.3f} % | {r['int4']:.4f} | {100 * (r['int4'] / r['full'] - 1):+.2f} % |")


if __name__ == "__main__":
    main()
