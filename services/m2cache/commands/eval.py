"""``m2cache eval STORE --text FILE [--budget B] [--json PATH]``: perplexity of
the dense model, of the oracle's choice and of the predictor's choice at the
store's policy for that budget, and the predictor's top-25% recall, on any text.

JSON keys: ppl_dense, ppl_oracle, ppl_predictor, ppl_predictor_vs_oracle
(relative), recall_top10 / recall_top25 / recall_top50 (mean over layers),
recall_top25_per_layer, ahead_recall_top25 (layer l+1 from layer l's input),
ratios, budget, byte_fraction, predictor_version / _kind / _ranks / _cost
(bytes and FLOPs per token, and as fractions of a layer's FFN), ppl_tokens,
recall_tokens, text."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from m2cache.predictors.scorecard import DEFAULT_EVAL_TOKENS, DEFAULT_RECALL_TOKENS, EvalJob, run_eval


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``eval`` subcommand."""
    p = subparsers.add_parser("eval", help="perplexity and recall of a store's predictor and policy on a text",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store", metavar="STORE", help="store directory with a trained predictor and a policy")
    p.add_argument("--text", required=True, help="text file (UTF-8) to evaluate on (held out from training)")
    p.add_argument("--budget", type=float, default=None,
                   help="use the policy searched for this budget (default: the store's default policy)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_EVAL_TOKENS,
                   help=f"tokens decoded one by one for each perplexity (default {DEFAULT_EVAL_TOKENS})")
    p.add_argument("--recall-tokens", type=int, default=DEFAULT_RECALL_TOKENS,
                   help=f"tokens for the recall figures (default {DEFAULT_RECALL_TOKENS})")
    p.add_argument("--json", default=None, help="also write the figures as JSON to this path")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    return p


def main(args: argparse.Namespace) -> int:
    text = Path(args.text).read_text(encoding="utf-8")
    report = run_eval(args.store, EvalJob(text, args.budget, args.max_tokens, args.recall_tokens, args.device,
                                          str(args.text)))
    print(f"perplexity: dense {report['ppl_dense']:.3f}, oracle {report['ppl_oracle']:.3f}, "
          f"predictor {report['ppl_predictor']:.3f} ({100 * report['ppl_predictor_vs_oracle']:+.2f}% vs oracle) "
          f"at FULL/INT8/INT4 = {report['ratios']['full']:.3f}/{report['ratios']['int8']:.3f}/"
          f"{report['ratios']['int4']:.3f} ({report['byte_fraction']:.3f} of FULL bytes)")
    ahead = report["ahead_recall_top25"]
    print(f"recall: top-10% {report['recall_top10']:.3f}, top-25% {report['recall_top25']:.3f}, "
          f"top-50% {report['recall_top50']:.3f}" + (f"; look-ahead top-25% {ahead:.3f}" if ahead is not None else ""))
    cost = report["predictor_cost"]
    print(f"predictor v{report['predictor_version']} ({report['predictor_kind']}): "
          f"{100 * cost['bytes_frac']:.2f}% of a layer's FFN bytes, {100 * cost['flops_frac']:.2f}% of its FLOPs per token")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return 0
