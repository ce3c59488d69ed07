"""Ranker benchmark: top-k recall of trained predictors vs oracle vs random, and
held-out perplexity of dense vs oracle-sparse vs predictor-sparse decoding,
FULL-only and mixed precision at the same byte budget.

Train text: train_2316.txt; ratio search: valid_000-499_calib.txt; every number
reported is on valid_500-999_eval.txt (never tuned on). Prints markdown tables.

    python bench/bench_ranker.py [--models tinystories-656k stories260k] [--threads 1]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from m2cache.convert.writer import convert
from m2cache.codec.format import Precision
from m2cache.store.reader import NeuronStore
from m2cache.model.loader import load_model
from m2cache.model.providers import ChoiceProvider, FullProvider, uniform_choose
from m2cache.predictors import storage
from m2cache.predictors.bands import BandRatios, full_only
from m2cache.predictors.collect import collect_ffn_inputs, full_weights, tokenize
from m2cache.predictors.evaluate import stepwise_score
from m2cache.predictors.pipeline import SearchJob, TrainJob, run_search, run_training
from m2cache.predictors.quality import layer_recalls, standard_rankers
from m2cache.predictors.ranking import Ranker, oracle_choose

SHARED = Path(__file__).resolve().parents[2] / "shared"
CORPUS = SHARED / "corpora" / "tinystories"
FRACS = (0.1, 0.25, 0.5)
KEEPS = (0.25, 0.5, 0.75)


def prepare(model_name: str, workdir: Path, args) -> tuple[Path, float, dict]:
    """Convert, train a predictor, search a policy per budget. Returns (store, train s, {keep: ratios})."""
    store_dir = workdir / model_name
    convert(SHARED / "models" / model_name, store_dir, progress=False)
    t = time.perf_counter()
    run_training(store_dir, TrainJob((CORPUS / "train_2316.txt").read_text(), args.rank, args.train_tokens,
                                     args.epochs, args.device, "train_2316.txt"))
    train_s = time.perf_counter() - t
    calib = (CORPUS / "valid_000-499_calib.txt").read_text()
    mixed = {}
    for keep in KEEPS:
        policy = run_search(store_dir, SearchJob(calib, keep, args.step, "ppl", args.search_tokens, args.device))
        mixed[keep] = BandRatios.from_dict(policy["ratios"])
    return store_dir, train_s, mixed


def recall_table(model_name: str, store: NeuronStore, model, tok, bank, predictor, args) -> list[str]:
    eval_text = (CORPUS / "valid_500-999_eval.txt").read_text()
    seqs = tokenize(tok, eval_text, 256, args.recall_tokens, model.config.bos_token_id)
    inputs = collect_ffn_inputs(model, FullProvider(bank), seqs)
    rec = layer_recalls(inputs, lambda l: full_weights(bank, l), store.manifest.ffn_kind, standard_rankers(predictor),
                        FRACS)
    rows = []
    for layer in range(len(inputs)):
        cells = [" / ".join(f"{rec[name][layer][i]:.3f}" for name in ("predictor", "oracle", "random"))
                 for i in range(len(FRACS))]
        rows.append(f"| {model_name} | {layer} | {predictor.ranks()[layer]} | " + " | ".join(cells) + " |")
    return rows


def ppl_table(model_name: str, store: NeuronStore, model, tok, bank, predictor, mixed: dict, args) -> list[str]:
    eval_text = (CORPUS / "valid_500-999_eval.txt").read_text()
    seqs = tokenize(tok, eval_text, 128, args.ppl_tokens, model.config.bos_token_id)
    layout, kind = store.layout, store.manifest.ffn_kind
    ranker = Ranker(predictor)

    def ppl(choose) -> float:
        return stepwise_score(model, seqs, ChoiceProvider(bank, choose)).perplexity

    dense = stepwise_score(model, seqs, FullProvider(bank)).perplexity
    rows = [f"| {model_name} | dense FULL | 100% | 1.000 | {dense:.3f} | {dense:.3f} |",
            f"| {model_name} | dense INT8 | 100% int8 | {BandRatios(0, 1, 0).byte_fraction(layout):.3f} | "
            f"{ppl(uniform_choose(bank, Precision.INT8)):.3f} | - |",
            f"| {model_name} | dense INT4 | 100% int4 | {BandRatios(0, 0, 1).byte_fraction(layout):.3f} | "
            f"{ppl(uniform_choose(bank, Precision.INT4)):.3f} | - |"]
    for keep in KEEPS:
        for label, ratios in ((f"{keep:.0%} FULL only", full_only(keep)), (f"{keep:.0%} budget, mixed", mixed[keep])):
            split = f"{ratios.full:.2f}/{ratios.int8:.2f}/{ratios.int4:.2f}"
            oracle = ppl(oracle_choose(bank, kind, ratios))
            pred = ppl(ranker.choose(ratios))
            rows.append(f"| {model_name} | {label} | {split} | {ratios.byte_fraction(layout):.3f} | "
                        f"{oracle:.3f} | {pred:.3f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tinystories-656k", "stories260k"])
    ap.add_argument("--rank", default=None, help="predictor rank (default d_model/4)")
    ap.add_argument("--train-tokens", type=int, default=16384)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--search-tokens", type=int, default=512)
    ap.add_argument("--step", type=float, default=0.125)
    ap.add_argument("--recall-tokens", type=int, default=8192)
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recall_rows, ppl_rows, notes = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-ranker-") as tmp:
        for name in args.models:
            store_dir, train_s, mixed = prepare(name, Path(tmp), args)
            store = NeuronStore(store_dir)
            model, tok, bank = load_model(store, args.device)
            predictor = storage.load_predictor(store).to(args.device)
            notes.append(f"{name}: trained in {train_s:.1f} s on {args.train_tokens} tokens, {args.epochs} epochs")
            recall_rows += recall_table(name, store, model, tok, bank, predictor, args)
            ppl_rows += ppl_table(name, store, model, tok, bank, predictor, mixed, args)
            store.close()
    print("Top-k recall on held-out text (predictor / oracle / random):\n")
    print("| model | layer | rank | k=10% | k=25% | k=50% |\n|---|---|---|---|---|---|")
    print("\n".join(recall_rows))
    print("\nPerplexity on held-out text, decoded token by token (split = FULL/INT8/INT4 fractions):\n")
    print("| model | setting | split | bytes vs FULL | oracle ppl | predictor ppl |\n|---|---|---|---|---|---|")
    print("\n".join(ppl_rows))
    print("\n" + "\n".join(f"- {n}" for n in notes))


if __name__ == "__main__":
    main()
