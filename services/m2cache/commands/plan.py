"""``m2cache plan``: what a token costs on given hardware (tok/s, TTFT, tok/J,
gCO2/token, tok/$), with the tier placement and the flags that realise it, from
shipped hardware profiles and a roofline model (docs/PLANNING.md).

  m2cache plan --model llama-2-70b --hardware rtx3090 --hardware h100-80gb
  m2cache plan --model STORE --hardware all --bench bench/out/results.json --json plan.json
  m2cache plan --model STORE --measure-profile this-machine.yaml
  m2cache plan --model STORE --validate --json validate.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from m2cache.errors import InvalidArgument

POLICIES = ("full", "mixed")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``plan`` subcommand."""
    p = subparsers.add_parser("plan", help="predict tok/s, tok/J, gCO2/token and tok/$ on hardware profiles",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[],
                   help="store, checkpoint directory or shape name (llama-2-7b, llama-2-13b, llama-2-70b); repeatable")
    p.add_argument("--hardware", action="append", default=[],
                   help="shipped profile name, a profile YAML, or 'all'; repeatable (default all)")
    p.add_argument("--list-profiles", action="store_true", help="list the shipped hardware profiles and exit")
    p.add_argument("--policy", choices=(*POLICIES, "both"), default="both", help="precision policy (default both)")
    p.add_argument("--ratios", type=float, nargs=3, default=None, metavar=("FULL", "INT8", "INT4"),
                   help="mixed band ratios (default: the store's policy, else 0.2 0.25 0.25)")
    p.add_argument("--bench", type=Path, default=None,
                   help="m2cache bench results.json: bytes per token per tier from its m2cache configurations")
    p.add_argument("--reuse", type=float, default=None,
                   help="fraction of a token's neurons a recent token used (cache model; default 0.8, M2Cache)")
    p.add_argument("--window", type=int, default=4, help="HBM cache window in tokens (default 4)")
    p.add_argument("--context", type=int, default=2048, help="KV cache tokens reserved in device memory (default 2048)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens for the TTFT (default 128)")
    p.add_argument("--grid-gco2-per-kwh", type=float, default=820.0, help="grid carbon intensity (default 820, M2Cache)")
    p.add_argument("--usd-per-kwh", type=float, default=0.15,
                   help="energy price for profiles whose price excludes energy (default 0.15)")
    p.add_argument("--json", type=Path, default=None, help="write the plans (or the validation) as JSON")
    p.add_argument("--markdown", type=Path, default=None, help="write the table as markdown")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG plot")
    p.add_argument("--measure-profile", type=Path, default=None, metavar="YAML",
                   help="measure this machine on --model STORE and write its profile")
    p.add_argument("--validate", action="store_true",
                   help="on --model STORE: run the benchmark's configurations and compare with the predictions")
    p.add_argument("--out-dir", type=Path, default=Path("bench/out/validate"), help="validation work directory")
    p.add_argument("--systems", nargs="+", default=None, help="validation: systems to run (default all on a store)")
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1],
                   help="validation: fast-memory budgets (default 1 0.5 0.25 0.1)")
    p.add_argument("--tokens", type=int, default=None,
                   help="validation: measured decode tokens per configuration (default: planner/validate.py's "
                        "ValidateConfig, 16 after 2 warm-up)")
    p.add_argument("--tolerance", type=float, default=0.25, help="validation: allowed relative error (default 0.25)")
    return p


def main(args: argparse.Namespace) -> int:
    from m2cache.planner import profiles

    if args.list_profiles:
        for name in profiles.shipped_names():
            print(f"{name:16s} {profiles.load(name).description}")
        return 0
    if not args.model:
        raise InvalidArgument("give --model (a store, a checkpoint or a shape name)")
    if args.validate:
        return _validate(args)
    if args.measure_profile:
        return _measure(args)
    return _plan(args)


def _options(args, shape):
    from m2cache.planner import placement, power

    ratios = args.ratios and dict(zip(("full", "int8", "int4"), args.ratios))
    mixed = ratios or shape.policy or dict(placement.DEFAULT_MIXED)
    return placement.Options(context=args.context, prompt_len=args.prompt_len, window=args.window, reuse=args.reuse,
                             mixed=mixed, tariff=power.Tariff(args.grid_gco2_per_kwh, args.usd_per_kwh))


def _hardware(args) -> list:
    from m2cache.planner import profiles

    names = args.hardware or ["all"]
    if "all" in names:
        names = [n for n in names if n != "all"] + profiles.shipped_names()
    return [profiles.load(n) for n in dict.fromkeys(names)]


def _plan(args) -> int:
    from m2cache.planner import bench_traffic, placement, report, shapes

    rows = []
    policies = POLICIES if args.policy == "both" else (args.policy,)
    for model in args.model:
        shape = shapes.resolve(model)
        opts = _options(args, shape)
        bench = bench_traffic.load(args.bench, shape) if args.bench else None
        for profile in _hardware(args):
            if bench:
                for label, traffic in bench:
                    plan = placement.plan(profile, shape, traffic.extra["policy"], opts, traffic,
                                          cache_fraction=traffic.extra["fraction"])
                    rows.append({**plan.row(), "bench_config": label})
                continue
            for policy in policies:
                rows.append(placement.plan(profile, shape, policy, opts).row())
    table = report.plan_table(rows)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.plot:
        print(f"plot: {report.plot(rows, args.plot)}")
    if args.json:
        best = max(rows, key=lambda r: r["tok_s"])
        doc = {**{k: best[k] for k in ("tok_s", "tok_per_joule", "gco2_per_token", "tok_per_dollar", "ttft_s")},
               "best": best, "plans": rows, "grid_gco2_per_kwh": args.grid_gco2_per_kwh}
        args.json.write_text(json.dumps(doc, indent=1))
        print(f"json: {args.json}")
    return 0


def _store(args) -> Path:
    path = Path(args.model[0])
    if len(args.model) != 1 or not (path / "data.mdb").is_file():
        raise InvalidArgument("--validate and --measure-profile take one --model: a converted store")
    return path


def _measure(args) -> int:
    import time

    import yaml

    from m2cache.planner import measure, probes, profiles, shapes

    store = _store(args)
    shape = shapes.from_store(store)
    print(f"measuring this machine on {store} ...", flush=True)
    probe = probes.probe_in_child(store, ("full", "int8", "int4", "miss", "stream"),
                                  args.out_dir.resolve() / "probe", probe_layers=2, tokens=3)
    tiers = measure.probe_tiers(store)
    coeffs = probes.engine_coefficients(probe, shape, tiers["hbm"]["bytes_per_s"])
    profile = measure.local_profile(coeffs, tiers, when=time.strftime("%Y-%m-%d %H:%M"))
    args.measure_profile.write_text(yaml.safe_dump(profiles.to_dict(profile), sort_keys=False))
    print(f"profile: {args.measure_profile} (load average {probe['load_avg_start'][0]:.2f})")
    return 0


def _validate(args) -> int:
    from m2cache.planner import report, validate

    kwargs = dict(store=_store(args), out_dir=args.out_dir.resolve(), fractions=tuple(args.fractions),
                  tolerance=args.tolerance)
    if args.tokens:
        kwargs["tokens"] = args.tokens
    if args.ratios:
        kwargs["ratios"] = tuple(args.ratios)
    if args.systems:
        kwargs["systems"] = tuple(args.systems)
    if args.policy != "both":
        kwargs["policies"] = (args.policy,)
    doc = validate.run(validate.ValidateConfig(**kwargs))
    print(validate.table(doc))
    plot = report.validation_plot(doc, args.plot or args.out_dir / "validate.png")
    print(f"plot: {plot}")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))
        print(f"json: {args.json}")
    within = sum(1 for r in doc["configurations"] if r.get("within_tolerance"))
    print(f"{within}/{len(doc['configurations'])} configurations within {args.tolerance:.0%}", file=sys.stderr)
    return 0
