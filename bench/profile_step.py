"""Where a decode step's time goes: m2cache in-process on one store, per component.

    python bench/profile_step.py STORE [--fraction 1] [--policy mixed|full|int4] [--tokens 32] [--json OUT]

Runs greedy decode with the bench's in-process system (bench/harness/systems_local.py:
the worker's provider, cache and kernels, misses from the local store) and times,
per decode token (the prefill excluded), the step's parts by wrapping them: the
attention block (with the FFN's input norm), choose (predictor + bands), the cache
call (lookup, misses fetched and admitted), the fetch alone, the FFN, the head;
"other" is the rest (embedding, residual adds, the loop). The wrappers cost a few
microseconds per call, so the step is timed once bare (tok/s) and once wrapped (the split). For a
sampled profile of the same run: ``py-spy record -f raw -o out.txt -- python
bench/profile_step.py ...``. Figures on a shared machine compare only within a run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPT = [1, 422, 1117, 314, 260, 1345, 282, 3000]


def _timed(acc: dict, key: str, fn):
    def wrapped(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[key] = acc.get(key, 0.0) + time.perf_counter() - t0
    return wrapped


def main() -> None:
    from bench.harness.policy import UniformPolicy, load_mixed_policy
    from bench.harness.systems_local import M2CacheLocal, greedy_loop
    from m2cache.predictors.bands import BandRatios
    from m2cache.store.reader import NeuronStore
    import m2cache.worker.provider as provider_mod

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", type=Path)
    ap.add_argument("--fraction", type=float, default=1.0, help="fast-memory budget (fraction of FFN bytes)")
    ap.add_argument("--policy", choices=("mixed", "full", "int4"), default="mixed",
                    help="mixed: the store's predictor and policy (else a random one at 0.2/0.25/0.25); "
                         "int4: every neuron INT4, no ranking")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    mixed = None
    if args.policy == "int4":
        store = NeuronStore(args.store)
        mixed = UniformPolicy(store.manifest.d_ffn)
        store.close()
    if args.policy == "mixed":
        store = NeuronStore(args.store)
        manifest = store.manifest
        store.close()
        mixed = load_mixed_policy(args.store, manifest, BandRatios(0.2, 0.25, 0.25))
    system = M2CacheLocal(args.store, args.fraction, mixed)

    def decode(n: int) -> float:
        times = []
        greedy_loop(system.model, PROMPT, n, system.provider, lambda i, t: times.append(time.perf_counter()),
                    before_step=lambda: system.provider.begin_step([system.choose]))
        return (times[-1] - times[1]) / (len(times) - 2)  # from the first decode token on

    decode(4)  # warm: kernels built, caches filled
    bare = decode(args.tokens)
    acc: dict[str, float] = {}
    net = system.model.net
    net.block_input = _timed(acc, "attention block (+ FFN input norm)", net.block_input)
    if system.path == "cached":
        for key in ("choose", "cache (lookup, misses fetched and admitted)", "  of which fetch", "ffn kernel"):
            acc[key] = 0.0
        p = system.provider
        system.choose = _timed(acc, "choose", system.choose)
        system.cache.bands = _timed(acc, "cache (lookup, misses fetched and admitted)", system.cache.bands)
        p._fetch = _timed(acc, "  of which fetch", p._fetch)
        provider_mod.sparse_ffn = _timed(acc, "ffn kernel", provider_mod.sparse_ffn)
    else:
        system.provider.layers = [_timed(acc, "ffn (dense matrices)", f) for f in system.provider.layers]
    net.head = _timed(acc, "head (final norm, vocabulary projection)", net.head)
    marks = []

    calls = {"fetch": 0}
    if system.path == "cached":
        timed_fetch = p._fetch

        def counted_fetch(*args, **kwargs):
            calls["fetch"] += 1
            return timed_fetch(*args, **kwargs)
        p._fetch = counted_fetch
    seen = {}

    def on_token(i: int, _token: int) -> None:
        if i == 0:  # the prefill is done: time the decode steps only
            for key in acc:
                acc[key] = 0.0
            calls["fetch"] = 0
            if system.path == "cached":
                seen["hits"], seen["misses"] = system.cache.stats.hits, system.cache.stats.misses
        marks.append(time.perf_counter())

    greedy_loop(system.model, PROMPT, args.tokens + 1, system.provider, on_token,
                before_step=lambda: system.provider.begin_step([system.choose]))
    steps = len(marks) - 1
    wrapped = (marks[-1] - marks[0]) / steps
    split = {k: v / steps for k, v in acc.items()}
    split["other (embedding, residual adds, the loop)"] = wrapped - sum(
        v for k, v in split.items() if not k.startswith(" "))
    system.close()
    out = {"store": str(args.store), "policy": args.policy if mixed is None else mixed.source,
           "fraction": args.fraction, "path": system.path, "tokens": args.tokens,
           "decode_tok_s": 1 / bare, "ms_per_token": 1e3 * bare, "wrapped_ms_per_token": 1e3 * wrapped,
           "split_ms_per_token": {k: 1e3 * v for k, v in split.items()}}
    if system.path == "cached":
        misses = system.cache.stats.misses - seen["misses"]
        out |= {"misses_per_token": misses / steps, "hits_per_token": (system.cache.stats.hits - seen["hits"]) / steps,
                "fetch_calls_per_token": calls["fetch"] / steps,
                "us_per_fetch_call": 1e6 * acc["  of which fetch"] / max(calls["fetch"], 1)}
    print(f"{out['policy']} at {args.fraction:.0%} ({system.path} path): {out['decode_tok_s']:.2f} tok/s, "
          f"{out['ms_per_token']:.1f} ms/token; wrapped {out['wrapped_ms_per_token']:.1f} ms/token:")
    for k, v in out["split_ms_per_token"].items():
        print(f"  {k:46s} {v:7.2f} ms/token")
    if "misses_per_token" in out:
        print(f"  misses {out['misses_per_token']:.0f} / hits {out['hits_per_token']:.0f} per token; "
              f"{out['fetch_calls_per_token']:.1f} fetches per token, {out['us_per_fetch_call']:.0f} us each")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
