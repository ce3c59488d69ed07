"""One system per child process: ``python -m bench.harness.child SPEC.json OUT.json``.

Per configuration: build the system (loads run before the clock), reset the
peak-RSS counter, empty the page cache and, for systems with an SSD tier, cap
the page cache with a cgroup memory limit; then prefill (time to first token),
``warmup`` decode tokens, and ``tokens`` measured decode tokens. Counters
(bytes per tier, hits) and the block device's read bytes are differenced over
the measured tokens only.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from bench.harness import honest

log = logging.getLogger(__name__)


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so each config's peak is its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5\n")
    except OSError:
        pass


def measure(system, prompt_ids: list[int], warmup: int, tokens: int, io_pids: list[int]) -> dict:
    """Time one greedy generation of 1 + warmup + tokens new tokens."""
    times: list[float] = []
    mark: dict = {}

    def io() -> int:
        return sum(honest.device_read_bytes(p) for p in io_pids)

    def on_token(i: int, _tok: int) -> None:
        times.append(time.perf_counter())
        if i == warmup:  # the last warm-up token: the measured window starts here
            mark.update(c=system.counters(), io=io(), t=time.perf_counter())

    start = time.perf_counter()
    out = system.generate(prompt_ids, 1 + warmup + tokens, on_token)
    end_counters, end_io = system.counters(), io()
    tokens = len(times) - 1 - warmup  # fewer than asked when a system stopped at EOS
    if tokens < 1:
        raise RuntimeError(f"generation stopped after {len(times)} tokens, before the measured window")
    delta = {k: v - mark["c"].get(k, 0) for k, v in end_counters.items()}
    hits, misses = delta.get("hbm_hits", 0), delta.get("hbm_misses", 0)
    dram, through = delta.get("dram_bytes", 0), delta.get("ssd_read_through_bytes", 0)
    return {
        "generated_ids": out, "tokens": tokens, "ttft_s": times[0] - start,
        "decode_tok_s": tokens / max(times[-1] - mark["t"], 1e-9),
        "bytes_per_token": {tier: delta.get(f"{tier}_bytes", 0) / tokens for tier in ("hbm", "dram", "ssd")},
        "device_read_bytes_per_token": (end_io - mark["io"]) / tokens,
        **({"page_cache_bytes_per_token": delta["page_cache_bytes"] / tokens} if "page_cache_bytes" in delta else {}),
        "hbm_hit_rate": hits / (hits + misses) if hits + misses else None,
        "dram_hit_rate": dram / (dram + through) if dram + through else None,
    }


def run_config(spec: dict, label: dict, build, group: honest.MemoryLimit | None, io_pids=None) -> dict:
    """Build, isolate, measure and close one configuration; failures become a result with ``error``.

    ``io_pids(system)``: the processes whose reads are the SSD tier's (default: this one);
    the cgroup limit is their anonymous memory plus the headroom."""
    result = {**label, "load_avg_start": os.getloadavg()}
    system = None
    try:
        system = build()
        pids = io_pids(system) if io_pids else [os.getpid()]
        reset_peak_rss()
        files = [Path(spec["store_root"]) / spec["model"] / "data.mdb", *map(Path, spec.get("cache_files", []))]
        result["page_cache"] = honest.drop_caches(files)
        if group is not None and spec.get("ssd"):
            result["cgroup_limit_bytes"] = honest.cap_page_cache(group, pids, spec["headroom_bytes"])
            result["page_cache"] += f" + cgroup limit (anon + {spec['headroom_bytes'] >> 20} MiB)"
        result.update(measure(system, spec["prompt_ids"], spec["warmup"], spec["tokens"], pids))
        result["info"] = system.info
        if hasattr(system, "service_peak_rss"):
            result["peak_rss_services_bytes"] = system.service_peak_rss()
    except Exception as err:  # one system failing must not lose the others' results
        log.exception("%s failed", label)
        result["error"] = f"{type(err).__name__}: {err}"
    finally:
        if group is not None:
            group.set_limit(-1)
        result["peak_rss_bytes"] = honest.peak_rss_bytes()
        result["code_rss_bytes"] = honest.code_rss_bytes()
        result["load_avg_end"] = os.getloadavg()
        if system is not None:
            system.close()
    return result


def main(spec_path: str, out_path: str) -> None:
    from bench.harness.configs import import_code, run_spec

    import psutil
    import torch  # noqa: F401  (with the harness: the interpreter every system pays before any weight)
    spec = json.loads(Path(spec_path).read_text())
    import_code(spec["kind"])  # and the system's own code: the runtime is everything but its data
    runtime_rss, runtime_code = psutil.Process().memory_info().rss, honest.code_rss_bytes()
    group = None
    if spec.get("cgroup") and honest.MemoryLimit.available():
        group = honest.MemoryLimit(f"m2c-bench-{os.getpid()}")
        group.add(os.getpid())  # the stack's too: its worker reads the store's records file itself
    try:
        results = run_spec(spec, group)
    finally:
        if group is not None:
            group.close()
    for r in results:
        r["runtime_rss_bytes"] = runtime_rss
        r["runtime_code_rss_bytes"] = runtime_code
    Path(out_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("M2CACHE_BENCH_LOG", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(sys.argv[1], sys.argv[2])
