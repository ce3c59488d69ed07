"""``m2cache search-policy STORE --text FILE --budget F``: M2Cache Algorithm 1,
the band ratios (FULL / INT8 / INT4) that minimise perplexity (or predictive
entropy) under a byte budget, among those whose choices a worker's cache of that
budget serves with misses of at most ``--max-miss`` of the FFN bytes per token;
saved as the store's policy (workers' default)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from m2cache.predictors.pipeline import DEFAULT_SEARCH_TOKENS, SearchJob, run_search
from m2cache.predictors.search import DEFAULT_MAX_MISS, OBJECTIVES


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``search-policy`` subcommand."""
    p = subparsers.add_parser("search-policy", help="search FULL/INT8/INT4 band ratios under a byte budget",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store", metavar="STORE", help="store directory with a trained predictor")
    p.add_argument("--text", required=True, help="calibration text file (UTF-8)")
    p.add_argument("--budget", type=float, required=True,
                   help="bytes per layer as a fraction of the layer's FULL bytes, in (0, 1]")
    p.add_argument("--step", type=float, default=0.1, help="grid step of the FULL and INT8 fractions (default 0.1)")
    p.add_argument("--objective", choices=OBJECTIVES, default="ppl", help="what to minimise (default ppl)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_SEARCH_TOKENS,
                   help=f"calibration tokens per candidate (default {DEFAULT_SEARCH_TOKENS})")
    p.add_argument("--max-miss", type=float, default=DEFAULT_MAX_MISS,
                   help="pass over candidates whose cache misses fetch more than this fraction of the FFN "
                        f"bytes per token, counted with the worker's cache at this budget (default "
                        f"{DEFAULT_MAX_MISS}; 0 keeps only miss-free ones, a negative value no cap)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(args: argparse.Namespace) -> int:
    text = Path(args.text).read_text(encoding="utf-8")
    job = SearchJob(text, args.budget, args.step, args.objective, args.max_tokens, args.device, str(args.text),
                    None if args.max_miss < 0 else args.max_miss)
    with tqdm(desc="search", unit="cand", disable=not args.progress) as bar:
        def progress(i: int, n: int, score: float) -> None:
            bar.total, bar.n = n, i
            bar.set_postfix(score=f"{score:.4f}", refresh=False)
            bar.refresh()

        policy = run_search(args.store, job, progress)
    print(json.dumps(policy, indent=2, sort_keys=True))
    return 0
