"""Where the stack worker's decode step goes: one worker over a NeuronStore and a
DramTier (their own processes, as in ``m2cache bench``'s m2cache-stack system), one
greedy request measured, then optionally sampled by py-spy.

    python bench/profile_stack.py STORES_ROOT MODEL [--fraction 0.25] [--policy mixed|full]
        [--tokens 32] [--spy OUT.txt] [--json OUT.json]

STORES_ROOT is a directory of stores (``m2cache bench``'s ``OUT/stores``), MODEL one of
them. Prints decode tok/s and the fetcher's counters (calls, records, Redis and store
bytes, shared-region reads) over the measured request, and the CPU milliseconds per token
of the worker and of each service process. With ``--spy`` it then decodes
for 8 s more under ``py-spy record -f raw`` of this process (``--threads``): the
decode thread is ``decode-loop``. Not a test; figures compare only within a run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPT = [1, 422, 1117, 314, 260, 1345, 282, 3000]


def main() -> None:
    from bench.harness.policy import load_policy
    from bench.harness.systems_stack import ServiceStack, StackWorker
    from m2cache.codec.format import Precision
    from m2cache.local.loader import load_model
    from m2cache.predictors.bands import BandRatios
    from m2cache.store.reader import NeuronStore
    from m2cache.worker.compute import ComputeThread

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("model")
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--policy", choices=("mixed", "full"), default="mixed")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--dram-fraction", type=float, default=0.5, help="as m2cache bench's --dram-fraction")
    ap.add_argument("--spy", type=Path, help="py-spy raw output for 8 s of further decoding")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    path = args.root / args.model
    compute = ComputeThread()  # loaded where it decodes, as a served worker (worker/compute.py)
    store = NeuronStore(path)
    manifest = store.manifest
    model, _tok, _bank = compute.call(lambda: load_model(store, drop_pages=True, tokenizer=False))
    store.close()
    mixed = None
    if args.policy == "mixed":
        mixed = compute.call(load_policy, "mixed", path, manifest, BandRatios(0.2, 0.25, 0.25), None)
    precisions = list(Precision) if mixed else [Precision.FULL]
    dram_budget = int(args.dram_fraction * manifest.num_layers * manifest.d_ffn
                      * sum(manifest.layout.num_bytes(p) for p in precisions))
    logs = Path(tempfile.mkdtemp(prefix="profile-stack-"))
    stack = ServiceStack(args.root, dram_budget, ",".join(p.name.lower() for p in precisions), logs, None)
    try:
        worker = StackWorker(stack, args.model, manifest, model, args.fraction, mixed, 4, compute)
        worker.generate(PROMPT, 8, lambda i, t: None)  # warm: cache, Redis, kernels
        before, cpu0 = dataclasses.asdict(worker.runtime.fetcher.stats), cpu_seconds(stack)
        times: list[float] = []
        worker.generate(PROMPT, args.tokens + 1, lambda i, t: times.append(time.perf_counter()))
        after, cpu1 = dataclasses.asdict(worker.runtime.fetcher.stats), cpu_seconds(stack)
        steps = len(times) - 2
        out = {"model": args.model, "policy": args.policy, "fraction": args.fraction,
               "decode_tok_s": steps / (times[-1] - times[1]),
               "fetch_per_token": {k: (after[k] - before[k]) / (steps + 1) for k in after},
               "cpu_ms_per_token": {k: 1e3 * (cpu1[k] - cpu0.get(k, 0.0)) / (steps + 1) for k in cpu1}}
        print(f"{args.policy} at {args.fraction:.0%} through the stack: {out['decode_tok_s']:.2f} tok/s")
        for key, value in out["fetch_per_token"].items():
            print(f"  fetch {key:16s} {value:14,.3f} per token")
        for key, value in out["cpu_ms_per_token"].items():
            if value >= 0.05:
                print(f"  cpu   {key:16s} {value:14,.3f} ms per token")
        if args.spy:
            exe = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
            if exe is None:
                sys.exit("py-spy is not installed (it is in requirements.txt)")
            spy = subprocess.Popen([exe, "record", "-p", str(os.getpid()), "-d", "8",
                                    "-r", "200", "-f", "raw", "-o", str(args.spy), "--threads"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            end = time.perf_counter() + 8.5
            while time.perf_counter() < end:
                worker.generate(PROMPT, args.tokens, lambda i, t: None)
            spy.wait(60)
            print(f"py-spy samples in {args.spy}")
        worker.close()
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=1))
    finally:
        stack.close()
        compute.close()


def cpu_seconds(stack) -> dict[str, float]:
    """User + system CPU seconds so far of this process (the worker) and of each service
    process (store, DRAM tier, its Redis): on a 2-core machine their work is the decode's loss."""
    import psutil

    def used(proc) -> float:
        t = proc.cpu_times()
        return t.user + t.system

    dram = psutil.Process(stack.dram.pid)
    out = {"worker": used(psutil.Process()), **worker_threads(),
           "store": used(psutil.Process(stack.store.pid)), "dram": used(dram)}
    out.update({child.name(): used(child) for child in dram.children(recursive=True)})
    return out


def worker_threads() -> dict[str, float]:
    """This process's CPU seconds by thread ("worker/<comm>/<tid>": torch's and Python's
    threads are all "python")."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:  # the thread ended
            continue
        name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat.rsplit(")", 1)[1].split()
        out[f"worker/{name}/{tid}"] = (int(fields[11]) + int(fields[12])) / tick
    return out


if __name__ == "__main__":
    main()
