"""``m2cache train-predictor STORE --text FILE``: train the per-layer neuron
predictors on calibration text and save them into the store (a new version).
Resumable: every finished layer is checkpointed beside the store, and running
the same command again continues where it stopped."""
from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from m2cache.predictors.budget import DEFAULT_COST
from m2cache.predictors.kinds import KINDS
from m2cache.predictors.pipeline import DEFAULT_EPOCHS, DEFAULT_TRAIN_TOKENS, TrainJob, run_training
from m2cache.predictors.storage import load_predictor


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``train-predictor`` subcommand."""
    p = subparsers.add_parser("train-predictor", help="train activation predictors into a store",
                              description="Run the full-precision model over calibration text and train one "
                                          "neuron-importance predictor per layer (saved in the store). Resumable: "
                                          "re-running the same command continues an interrupted run.")
    p.add_argument("store", metavar="STORE", help="store directory (from m2cache convert)")
    p.add_argument("--text", required=True, help="calibration text file (UTF-8)")
    p.add_argument("--kind", default="auto", choices=["auto", *KINDS],
                   help="predictor kind (default auto: the kind measured best at the --cost budget)")
    p.add_argument("--cost", type=float, default=DEFAULT_COST,
                   help=f"predictor bytes per token as a fraction of the layer's FFN bytes (default {DEFAULT_COST}); "
                        "sets the rank unless --rank is given")
    p.add_argument("--rank", default=None, help="rank (hidden width) instead of --cost: R for every layer or "
                                                "R0,R1,... per layer")
    p.add_argument("--ahead-cost", type=float, default=0.0,
                   help="also train look-ahead scorers (layer l+1's neurons from layer l's input, for prefetch) "
                        "of this cost fraction (default 0: none; prefetch then uses layer l+1's own scorer)")
    p.add_argument("--restart", action="store_true", help="ignore a checkpoint of an interrupted run")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_TRAIN_TOKENS,
                   help=f"calibration tokens to use (default {DEFAULT_TRAIN_TOKENS})")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"epochs (default {DEFAULT_EPOCHS})")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


class _Bars:
    """One tqdm bar per stage."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar, self.stage = None, None

    def __call__(self, stage: str, step: int, total: int, loss: float) -> None:
        if stage != self.stage:
            self.close()
            self.stage, self.bar = stage, tqdm(total=total, desc=stage, disable=not self.enabled)
        self.bar.n = step
        if stage == "train":
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(args: argparse.Namespace) -> int:
    text = Path(args.text).read_text(encoding="utf-8")
    job = TrainJob(text, args.rank, args.max_tokens, args.epochs, args.device, source=str(args.text), kind=args.kind,
                   cost=args.cost, ahead_cost=args.ahead_cost, resume=not args.restart)
    bars = _Bars(args.progress)
    try:
        version = run_training(args.store, job, bars)
    finally:
        bars.close()
    p = load_predictor(args.store, version)
    print(f"predictor v{version}: {p.num_layers} layers, kind {p.meta.get('kind')}, ranks {p.ranks()}, "
          f"{p.num_bytes(False) / p.num_layers / 1024:.1f} KiB per layer ({100 * p.meta.get('cost', {}).get('bytes_frac', 0):.2f}% "
          f"of the layer's FFN bytes), {p.meta.get('tokens')} tokens, "
          f"final loss {[round(x, 4) for x in p.meta.get('final_loss', [])]}"
          + (f", look-ahead {p.meta.get('ahead_kind')}" if p.ahead else ""))
    return 0
