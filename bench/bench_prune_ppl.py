#!/usr/bin/env python3
"""Perplexity cost of pruning (a benchmark, not a test): the real tiny models
converted unpruned and pruned at each sparsity by magnitude and by Wanda
(calibrated on the TinyStories calibration split), scored on the held-out eval
split with every neuron at FULL precision. Prints a markdown table.

    python bench/bench_prune_ppl.py [--sparsity 0.3 0.5] [--tokens N] [--calib-tokens 65536]
"""
from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

from m2cache.convert.writer import convert
from m2cache.store.reader import NeuronStore
from m2cache.convert.prune import PruneSpec
from m2cache.model.eval import negative_log_likelihood
from m2cache.local.loader import load_model
from m2cache.model.providers import FullProvider

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODELS = ("tinystories-656k", "stories260k")
CALIB_TEXT = SHARED / "corpora" / "tinystories" / "valid_000-499_calib.txt"
EVAL_TEXT = SHARED / "corpora" / "tinystories" / "valid_500-999_eval.txt"


def store_perplexity(hf_dir: Path, store_dir: Path, prune: PruneSpec | None, tokens: int | None,
                     context: int) -> tuple[float, float]:
    """(perplexity on the eval text, stored FULL bytes / dense FULL bytes) of one conversion."""
    manifest = convert(hf_dir, store_dir, progress=False, prune=prune)
    store = NeuronStore(store_dir)
    try:
        model, tokenizer, bank = load_model(store)
        ids = tokenizer(EVAL_TEXT.read_text()).input_ids[:tokens]
        nll, count = negative_log_likelihood(model, ids, FullProvider(bank), context)
        stored = sum(len(store.get_records(layer, range(manifest.d_ffn), 1)[0]) for layer in range(manifest.num_layers))
        dense = manifest.num_layers * manifest.d_ffn * manifest.layout.num_bytes(1)
    finally:
        store.close()
    return math.exp(nll / count), stored / dense


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--tokens", type=int, default=None, help="first N eval tokens (default all)")
    parser.add_argument("--calib-tokens", type=int, default=65536, help="Wanda calibration tokens")
    parser.add_argument("--context", type=int, default=256)
    args = parser.parse_args()
    print("| model | sparsity | method | eval ppl | change vs unpruned | FULL bytes stored / dense |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench-prune-") as tmp:
        for name in MODELS:
            hf = SHARED / "models" / name
            base, _ = store_perplexity(hf, Path(tmp) / f"{name}-base", None, args.tokens, args.context)
            print(f"| {name} | 0 | - | {base:.4f} | - | 1.0000 |")
            for sparsity in args.sparsity:
                for method in ("magnitude", "wanda"):
                    spec = PruneSpec(sparsity, method, str(CALIB_TEXT) if method == "wanda" else None,
                                     args.calib_tokens)
                    ppl, ratio = store_perplexity(hf, Path(tmp) / f"{name}-{method}-{sparsity}", spec, args.tokens,
                                                  args.context)
                    print(f"| {name} | {sparsity:g} | {method} | {ppl:.4f} | {100 * (ppl / base - 1):+.2f} % | "
                          f"{ratio:.4f} |", flush=True)


if __name__ == "__main__":
    main()
