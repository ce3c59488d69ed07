"""``m2cache plan --validate``: the planner's predictions against ``m2cache bench``'s
measurements on this machine, side by side.

For every configuration the benchmark runs on a store (the dense reference, naive
layer streaming, m2cache in-process and through the full service stack, each
policy and fast-memory budget), in its own child process exactly as ``m2cache
bench`` runs it (bench/harness/run.py ``run_child``, configs.py, child.py):

1. just before the child, measure this machine: the engine probes the
   configuration needs (planner/probes.py) and the benchmark's tier bandwidths;
   the machine is shared, so a fixed reference workload is timed at a low duty
   cycle while the probes run and while the configuration runs
   (measure.Speedometer), and the prediction is scaled by the ratio of the
   medians (``drift``: the machine's speed, never the run's own time);
2. run the configuration;
3. predict its decode tok/s from the profile just measured and the bytes per
   token per tier the benchmark counted (planner/roofline.py).

Needs a source checkout (bench/harness).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from m2cache.errors import InvalidArgument
from m2cache.planner import measure, probes, profiles, roofline, shapes, traffic as tr

log = logging.getLogger(__name__)
STORE_SYSTEMS = ("dense-reference", "naive-streaming", "m2cache-inprocess", "m2cache-stack")
PAGE_ROUNDING = 4 / 3  # a 12,288-byte FULL record (d 2048, fp16) takes four 4 KiB pages


@dataclass(frozen=True, slots=True)
class ValidateConfig:
    store: Path
    out_dir: Path
    systems: tuple[str, ...] = STORE_SYSTEMS
    policies: tuple[str, ...] = ("full", "mixed")
    fractions: tuple[float, ...] = (1.0, 0.5, 0.25, 0.1)
    ratios: tuple[float, float, float] = (0.2, 0.25, 0.25)
    tokens: int = 16  # a 4-token window moved the same 100% row by 1.7x between runs on this 2-core VM
    resident_tokens: int = 64  # configurations with nothing to fetch decode at 10-20 tok/s: a window of
    #                            seconds, as the others get, not one (16 tokens of one read 8.9-22 tok/s)
    warmup: int = 2
    prompt_len: int = 8
    window: int = 4
    headroom_mb: int = 512
    dram_fraction: float = 0.5
    probe_layers: int = 8  # the mixed step is 5-10 ms over 4 layers against a 16-20 ms empty step: too near the noise
    probe_tokens: int = 5
    tolerance: float = 0.25
    child_timeout_s: float = 1800.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (Path(self.store) / "data.mdb").is_file():
            raise InvalidArgument(f"--validate needs a converted store (no data.mdb in {self.store})")
        bad = [s for s in self.systems if s not in STORE_SYSTEMS]
        if bad:
            raise InvalidArgument(f"cannot validate {bad}: the planner predicts {', '.join(STORE_SYSTEMS)}")


def specs(cfg: ValidateConfig, prompt: list[int]) -> list[dict]:
    """One child spec per configuration, as ``m2cache bench`` builds them (bench/harness/run.py)."""
    from bench.harness import run as hrun
    from bench.harness.models import BenchModel

    store = Path(cfg.store).resolve()
    bcfg = hrun.BenchConfig(out_dir=Path(cfg.out_dir), tokens=cfg.tokens, warmup=cfg.warmup,
                            prompt_len=cfg.prompt_len, fractions=tuple(cfg.fractions), ratios=tuple(cfg.ratios),
                            window=cfg.window, headroom_mb=cfg.headroom_mb, dram_fraction=cfg.dram_fraction,
                            systems=tuple(cfg.systems), fidelity_models=())
    out = []
    for spec in hrun.specs_for(bcfg, BenchModel(name=store.name, hf_dir=None), prompt):
        spec["store_root"] = str(store.parent)
        if spec.get("policy", "full") not in cfg.policies:
            continue
        if spec["kind"] == "dense-reference":
            out.append({**spec, "tokens": cfg.resident_tokens})
        elif spec["kind"] == "naive-streaming":  # one configuration each
            out.append(spec)
        else:  # specs_for gives each budget a child of its own: measured right after its own probes
            (f,) = spec["fractions"]
            out.append({**spec, "tokens": cfg.resident_tokens if f >= 1 else cfg.tokens})
    return out


def _variants(spec: dict) -> tuple[str, ...]:
    """The engine probes a configuration's prediction uses (each a few decode steps)."""
    if spec["kind"] == "dense-reference":  # the dense path: the memory probe's bandwidth and the empty step
        return ()
    if spec["kind"] == "naive-streaming":
        return ("stream",)
    if spec.get("policy") == "mixed":
        return ("mixed",)
    return ("full", "miss")


def page_cached_fraction(result: dict, traffic: tr.Traffic, headroom: int) -> float:
    """Share of the SSD tier's reads the page cache serves in a configuration. The benchmark
    caps the page cache of the processes reading the store (cgroup: anonymous memory +
    headroom); records re-read every token stay cached when they fit in the headroom (LMDB
    keeps a record in whole 4 KiB pages), and an LRU cycled by a larger set keeps nothing."""
    limit = result.get("cgroup_limit_bytes")
    if not limit or traffic.ssd <= 0:
        return 0.0 if limit else 1.0  # no cap: the store stays in the (ample) page cache after the first token
    return 1.0 if traffic.ssd * PAGE_ROUNDING <= headroom else 0.0


def predict_result(result: dict, shape: shapes.ModelShape, profile: profiles.HardwareProfile,
                   prompt_len: int, headroom: int = 512 << 20, drift: float = 1.0) -> dict:
    """The planner's figures for one benchmark result, from its counted bytes per token;
    ``drift``: how much slower the machine ran during the result than during the probes."""
    traffic = tr.from_bench(shape, result)
    device = result.get("device_read_bytes_per_token")
    if result.get("cgroup_limit_bytes") and device is not None and traffic.ssd > 0:
        # what reached the device, counted in the run: a ranked policy's misses rotate
        # through every precision's records, so their share in the page cache is not a
        # question of one token's bytes against the headroom (page_cached_fraction)
        traffic = dataclasses.replace(traffic, device_bytes=float(device))
    else:
        cached = page_cached_fraction(result, traffic, headroom)
        if cached:
            traffic = dataclasses.replace(traffic, page_cached=cached)
    pred = roofline.predict(profile, shape, traffic, prompt_len, cold_start=True)
    measured = result["decode_tok_s"]
    tok_s = pred.tok_s / drift
    return {"predicted_tok_s": tok_s, "measured_tok_s": measured, "error": tok_s / measured - 1.0,
            "predicted_at_probe_tok_s": pred.tok_s, "predicted_ttft_s": pred.ttft_s * drift, "measured_ttft_s": result["ttft_s"], "bound": pred.bound,
            "terms_s": pred.terms, "bytes_per_token": result["bytes_per_token"],
            "page_cached": max(0.0, 1.0 - traffic.cold_share), "device_bytes_per_token": traffic.device_bytes}


def _label(r: dict) -> dict:
    return {k: r.get(k) for k in ("system", "policy", "fraction")}


def run(cfg: ValidateConfig) -> dict:
    """Measure, run and compare every configuration; writes ``out_dir/validate.json``."""
    measure.harness()
    from bench.harness import run as hrun

    t_start = time.monotonic()
    store = Path(cfg.store).resolve()
    shape = shapes.from_store(store)
    work = Path(cfg.out_dir) / "runs"
    work.mkdir(parents=True, exist_ok=True)
    prompt = hrun.prompt_ids(store, cfg.prompt_len, shape.vocab)
    load_start = os.getloadavg()
    print(f"m2cache plan --validate: {store.name}, load average {load_start[0]:.2f} {load_start[1]:.2f} "
          f"{load_start[2]:.2f}", flush=True)
    rows, probe_log = [], []
    todo = specs(cfg, prompt)
    for i, spec in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {spec['kind']} {spec.get('policy')} {spec['fractions'][0]:g}: measuring the machine",
              flush=True)
        with measure.Speedometer() as during_probe:  # the tiers too: this VM's memory bandwidth swings by 1.6x
            tiers = measure.probe_tiers(store)          # from one second to the next, so the drift must cover it
            engine_probe = probes.probe_in_child(
                store, _variants(spec), work / "probe", spec["headroom_bytes"] if spec.get("ssd") else None,
                cfg.probe_layers, cfg.probe_tokens, prompt, list(cfg.ratios) if spec.get("policy") == "mixed" else None)
        coeffs = probes.engine_coefficients(engine_probe, shape, tiers["hbm"]["bytes_per_s"])
        profile = measure.local_profile(coeffs, tiers, when=time.strftime("%Y-%m-%d %H:%M"))
        probe_log.append({"engine": engine_probe, "coefficients": coeffs, "tiers": _bw(tiers)})
        with measure.Speedometer() as during_run:
            results = hrun.run_child(spec, work, cfg.child_timeout_s)
        # the machine's speed during the run relative to during the probe (shared CPUs)
        drift = during_run.seconds / during_probe.seconds
        for r in results:
            row = {**_label(r), "load_avg_probe": engine_probe["load_avg_start"], "load_avg_run": r.get("load_avg_start"),
                   "calibration_s": {"probe": during_probe.samples, "run": during_run.samples}, "drift": drift}
            if "error" in r:
                row["failed"] = r["error"]
            else:
                row.update(predict_result(r, shape, profile, cfg.prompt_len, spec["headroom_bytes"], drift))
                row["within_tolerance"] = abs(row["error"]) <= cfg.tolerance
                row["profile"] = profiles.to_dict(profile)
            rows.append(row)
            print("   " + line(row), flush=True)
        doc = _document(cfg, store, shape, rows, probe_log, load_start, t_start)
        (Path(cfg.out_dir) / "validate.json").write_text(json.dumps(doc, indent=1))  # after every configuration
    return doc


def _document(cfg: ValidateConfig, store: Path, shape, rows: list, probe_log: list, load_start, t_start) -> dict:
    ok = [r for r in rows if "failed" not in r]
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "store": str(store), "shape": asdict(shape),
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
            "tolerance": cfg.tolerance, "configurations": rows, "probes": probe_log,
            "all_within_tolerance": bool(ok) and len(ok) == len(rows) and all(r["within_tolerance"] for r in ok),
            "load_avg": {"start": load_start, "end": os.getloadavg()}, "wall_s": time.monotonic() - t_start}


def _bw(tiers: dict) -> dict:
    return {k: v["bytes_per_s"] for k, v in tiers.items()}


def line(row: dict) -> str:
    label = f"{row['system']:<18} {row.get('policy') or '':<5} {100 * (row.get('fraction') or 0):>4.0f}%"
    if "failed" in row:
        return f"{label}  failed: {row['failed'][:100]}"
    mark = "ok" if row["within_tolerance"] else "OFF"
    return (f"{label}  predicted {row['predicted_tok_s']:7.3f}  measured {row['measured_tok_s']:7.3f} tok/s  "
            f"({100 * row['error']:+5.0f}%, {mark}; bound {row['bound']})")


def table(doc: dict) -> str:
    """Markdown: predicted vs measured per configuration."""
    head = ("| system | policy | budget | predicted tok/s | measured tok/s | error | bound | predicted TTFT s "
            "| measured TTFT s | load (probe / run) |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in doc["configurations"]:
        budget = f"{100 * (r.get('fraction') or 0):.0f}%"
        if "failed" in r:
            out.append(f"| {r['system']} | {r.get('policy')} | {budget} | failed: {r['failed'][:60]} | | | | | | |")
            continue
        out.append(f"| {r['system']} | {r['policy']} | {budget} | {r['predicted_tok_s']:.3f} | {r['measured_tok_s']:.3f} "
                   f"| {100 * r['error']:+.0f}% | {r['bound']} | {r['predicted_ttft_s']:.1f} | {r['measured_ttft_s']:.1f} "
                   f"| {r['load_avg_probe'][0]:.1f} / {r['load_avg_run'][0]:.1f} |")
    return "\n".join(out)
