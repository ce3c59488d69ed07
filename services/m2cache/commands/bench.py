"""``m2cache bench``: this system against the peers a user would pick instead
(dense, transformers, Accelerate offload, naive layer streaming, llama.cpp on
GGUF models), m2cache in-process and through the full service stack, on one
model and one prompt, with honest tiers. The model is the synthetic wide one
by default, or any checkpoint (``--model DIR_OR_GGUF``: adds held-out
perplexity per policy and the oracle policy); ``--trace-from`` replays a real
model's neuron choices on the synthetic one ("trace-driven"). The harness lives
in the checkout's ``bench/harness`` (imported lazily: matplotlib, accelerate,
llama-cpp-python and the benchmark code load only for this command)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from m2cache.errors import FailedPrecondition

SYSTEMS = ("dense-reference", "transformers-dense", "accelerate-offload", "naive-streaming",
           "m2cache-inprocess", "m2cache-stack", "llama.cpp")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``bench`` subcommand."""
    p = subparsers.add_parser("bench", help="benchmark m2cache against dense, Accelerate offload and layer streaming",
                              description=__doc__)
    p.add_argument("--out-dir", type=Path, default=None, help="results, models and plots (default bench/out)")
    p.add_argument("--tokens", type=int, default=4, help="measured decode tokens per configuration (default 4)")
    p.add_argument("--warmup", type=int, default=1, help="decode tokens before measuring (default 1)")
    p.add_argument("--prompt-len", type=int, default=8, help="prompt tokens (default 8)")
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1],
                   help="fast-memory budgets as fractions of FFN bytes (default 1 0.5 0.25 0.1)")
    p.add_argument("--accelerate-fractions", type=float, nargs="+", default=[0.25],
                   help="budgets at which Accelerate offload runs (default 0.25)")
    p.add_argument("--ratios", type=float, nargs=3, default=[0.2, 0.25, 0.25], metavar=("FULL", "INT8", "INT4"),
                   help="mixed-precision band ratios when the store has no policy (default 0.2 0.25 0.25)")
    p.add_argument("--window", type=int, default=4, help="HBM cache window in tokens (default 4)")
    p.add_argument("--headroom-mb", type=int, default=512,
                   help="memory above a process's anonymous memory under the cgroup limit (default 512)")
    p.add_argument("--dram-fraction", type=float, default=0.5,
                   help="DramTier budget as a fraction of the preloaded precisions' FFN bytes (default 0.5)")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS),
                   help="systems to run (default all; llama.cpp runs on GGUF models only)")
    p.add_argument("--model", type=Path, default=None, metavar="DIR_OR_GGUF",
                   help="benchmark this checkpoint (HF directory or .gguf) instead of the synthetic model")
    p.add_argument("--text", type=Path, default=None,
                   help="held-out text for perplexity and traces (default ../shared/corpora/wikitext2/wiki.test.raw)")
    p.add_argument("--ppl-tokens", type=int, default=256, help="tokens scored per policy (default 256)")
    p.add_argument("--ppl-context", type=int, default=128, help="perplexity context length (default 128)")
    p.add_argument("--trace-from", type=Path, default=None, metavar="DIR_OR_GGUF",
                   help="record this real model's neuron choices on --text and replay them on the synthetic model "
                        "(policy 'trace-driven')")
    p.add_argument("--trace-chooser", choices=("oracle", "predictor"), default="oracle",
                   help="whose choices the trace records (default oracle; predictor needs one trained in its store)")
    p.add_argument("--trace-tokens", type=int, default=256, help="tokens recorded (default 256)")
    p.add_argument("--policies", nargs="+", choices=("full", "mixed", "int4", "oracle", "trace-driven"),
                   default=["full", "mixed", "int4", "oracle", "trace-driven"],
                   help="m2cache policies, each where it applies (int4: every neuron INT4, in-process; oracle: "
                        "real models; trace-driven: with --trace-from) (default all)")
    p.add_argument("--llamacpp-threads", type=int, default=2, help="llama.cpp threads (default 2)")
    p.add_argument("--layers", type=int, default=16, help="synthetic model layers (default 16)")
    p.add_argument("--hidden", type=int, default=2048, help="synthetic model hidden size (default 2048)")
    p.add_argument("--ffn", type=int, default=5632, help="synthetic model FFN width (default 5632)")
    p.add_argument("--heads", type=int, default=32, help="attention heads (default 32)")
    p.add_argument("--kv-heads", type=int, default=4, help="KV heads (default 4)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary (default 32000)")
    p.add_argument("--fidelity-models", nargs="*", default=["tinystories-656k", "stories260k"],
                   help="real tiny models (under ../shared/models) checked token for token at 100%% FULL")
    p.add_argument("--docs", action="store_true", help="also copy the two plots to docs/img/")
    return p


def _import_harness():
    """bench/ is not an installed package: put the checkout root on sys.path."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "bench" / "harness" / "run.py").is_file():
        raise FailedPrecondition(f"m2cache bench needs a source checkout (no bench/harness under {root})")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from bench.harness import run, synth

    return run, synth


def build_config(args: argparse.Namespace):
    run, synth = _import_harness()
    shape = synth.SynthShape(num_layers=args.layers, hidden=args.hidden, ffn=args.ffn, heads=args.heads,
                             kv_heads=args.kv_heads, vocab=args.vocab)
    kwargs = dict(shape=shape, tokens=args.tokens, warmup=args.warmup, prompt_len=args.prompt_len,
                  fractions=tuple(args.fractions), accelerate_fractions=tuple(args.accelerate_fractions),
                  ratios=tuple(args.ratios), window=args.window, headroom_mb=args.headroom_mb,
                  dram_fraction=args.dram_fraction, systems=tuple(args.systems),
                  fidelity_models=tuple(args.fidelity_models), ppl_tokens=args.ppl_tokens,
                  ppl_context=args.ppl_context, trace_chooser=args.trace_chooser, trace_tokens=args.trace_tokens,
                  llamacpp_threads=args.llamacpp_threads, policies=tuple(args.policies))
    for name in ("out_dir", "model", "text", "trace_from"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name).resolve()
    return run, run.BenchConfig(**kwargs)


def main(args: argparse.Namespace) -> int:
    """Run every system, write results.json / results.md / plots under --out-dir."""
    if args.tokens < 1 or args.warmup < 0 or args.prompt_len < 1:
        raise FailedPrecondition("--tokens and --prompt-len must be >= 1, --warmup >= 0")
    for name in ("model", "trace_from", "text"):
        path = getattr(args, name)
        if path is not None and not path.exists():
            raise FailedPrecondition(f"--{name.replace('_', '-')} {path}: no such file or directory")
    run, config = build_config(args)
    doc = run.run(config)
    if args.docs:
        import shutil

        img = Path(__file__).resolve().parents[3] / "docs" / "img"
        img.mkdir(parents=True, exist_ok=True)
        for plot in doc["plots"]:
            shutil.copy(plot, img / Path(plot).name)
    print(f"results: {config.out_dir / 'results.json'}")
    return 0
