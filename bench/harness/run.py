"""Orchestration of ``m2cache bench``: models, tier bandwidths, one child
process per system (``bench.harness.child``), physical limits, fidelity,
results.json, the markdown table and the plots."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.harness import bandwidth, limits, report
from bench.harness.honest import MemoryLimit
from bench.harness.synth import SynthShape, build_checkpoint, build_store

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
SYSTEMS = ("dense-reference", "transformers-dense", "accelerate-offload", "naive-streaming",
           "m2cache-inprocess", "m2cache-stack")


@dataclass(frozen=True)
class BenchConfig:
    """Everything ``m2cache bench`` takes from its flags."""

    out_dir: Path = REPO / "bench" / "out"
    shape: SynthShape = SynthShape()
    tokens: int = 4
    warmup: int = 1
    prompt_len: int = 8
    fractions: tuple[float, ...] = (1.0, 0.5, 0.25, 0.1)
    accelerate_fractions: tuple[float, ...] = (0.25,)
    ratios: tuple[float, float, float] = (0.2, 0.25, 0.25)
    window: int = 4
    headroom_mb: int = 512
    dram_fraction: float = 0.5
    systems: tuple[str, ...] = SYSTEMS
    fidelity_models: tuple[str, ...] = ("tinystories-656k", "stories260k")
    shared_models: Path = REPO.parent / "shared" / "models"
    child_timeout_s: float = 1800.0
    extra: dict = field(default_factory=dict)


def prompt_ids(store_path: Path, length: int, vocab: int) -> list[int]:
    """A fixed prompt: tokenised story text when the store has a tokenizer, else fixed ids."""
    from m2cache.store.reader import NeuronStore
    from m2cache.local.loader import load_tokenizer

    store = NeuronStore(store_path)
    try:
        tok = load_tokenizer(store)
    finally:
        store.close()
    if tok is not None:
        text = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
        return list(tok(text).input_ids)[:length]
    return [1] + [(7919 * i + 13) % (vocab - 3) + 3 for i in range(1, length)]


def run_child(spec: dict, work: Path, timeout_s: float) -> list[dict]:
    """One system in its own process; a crash or timeout becomes an error result."""
    tag = f"{spec['model']}-{spec['kind']}-{spec.get('policy', 'full')}"
    spec_path, out_path = work / f"{tag}.spec.json", work / f"{tag}.result.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    t0 = time.monotonic()
    with open(work / f"{tag}.log", "w") as logf:
        try:
            proc = subprocess.run([sys.executable, "-m", "bench.harness.child", str(spec_path), str(out_path)],
                                  cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT, timeout=timeout_s)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    if code != 0 or not out_path.is_file():
        return [{"system": spec["kind"], "model": spec["model"], "policy": spec.get("policy", "full"),
                 "error": f"child exited {code} (log {work / (tag + '.log')})"}]
    results = json.loads(out_path.read_text())
    print(f"  {tag}: {len(results)} config(s) in {time.monotonic() - t0:.0f} s", flush=True)
    return results


def specs_for(cfg: BenchConfig, model: str, hf_dir: Path, prompt: list[int], fidelity: bool) -> list[dict]:
    """The children to run for one model (fidelity models: 100% FULL only)."""
    base = {"model": model, "store_root": str(cfg.out_dir / "stores"), "hf_dir": str(hf_dir), "prompt_ids": prompt,
            "warmup": cfg.warmup, "tokens": cfg.tokens, "window": cfg.window, "headroom_bytes": cfg.headroom_mb << 20,
            "cgroup": MemoryLimit.available(), "ratios": list(cfg.ratios), "dram_fraction": cfg.dram_fraction,
            "log_dir": str(cfg.out_dir / "logs"), "offload_dir": str(cfg.out_dir / "offload"), "policy": "full"}
    fractions = [1.0] if fidelity else list(cfg.fractions)
    out = []
    for kind in cfg.systems:
        if fidelity and kind in ("accelerate-offload", "naive-streaming"):
            continue
        ssd = kind not in ("dense-reference", "transformers-dense")
        spec = {**base, "kind": kind, "ssd": ssd, "fractions": fractions}
        if kind == "accelerate-offload":
            spec["fractions"] = list(cfg.accelerate_fractions)
        out.append(spec)
        if kind in ("m2cache-inprocess", "m2cache-stack") and not fidelity:
            out.append({**spec, "policy": "mixed"})
    return out


def prepare_models(cfg: BenchConfig) -> list[tuple[str, Path, bool]]:
    """(store name, HF dir, fidelity-only) for the synthetic model and the real tiny ones."""
    stores = cfg.out_dir / "stores"
    hf = build_checkpoint(cfg.shape, cfg.out_dir / "models" / cfg.shape.name)
    build_store(hf, stores / cfg.shape.name)
    models = [(cfg.shape.name, hf, False)]
    for name in cfg.fidelity_models:
        src = cfg.shared_models / name
        if (src / "config.json").is_file():
            build_store(src, stores / name)
            models.append((name, src, True))
        else:
            log.warning("fidelity model %s not found under %s", name, cfg.shared_models)
    return models


def run(cfg: BenchConfig) -> dict:
    """The whole benchmark; returns (and writes) the results document."""
    t_start = time.monotonic()
    work = cfg.out_dir / "runs"
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    print(f"m2cache bench: load average {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}", flush=True)
    models = prepare_models(cfg)
    main_store = cfg.out_dir / "stores" / cfg.shape.name
    print("  measuring tier bandwidths", flush=True)
    bw = bandwidth.measure_all(main_store)
    results = []
    for name, hf_dir, fidelity in models:
        prompt = prompt_ids(cfg.out_dir / "stores" / name, cfg.prompt_len, cfg.shape.vocab)
        for spec in specs_for(cfg, name, hf_dir, prompt, fidelity):
            results.extend(run_child(spec, work, cfg.child_timeout_s))
    doc = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "config": _jsonable(asdict(cfg)),
        "load_avg": {"start": load_start, "end": os.getloadavg()}, "bandwidth": bw,
        "ffn_bytes": limits.ffn_bytes(main_store), "results": results,
        "wall_s": time.monotonic() - t_start,
    }
    limits.annotate(doc)
    report.write_all(doc, cfg.out_dir)
    (cfg.out_dir / "results.json").write_text(json.dumps(doc, indent=1))
    return doc


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return str(obj) if isinstance(obj, Path) else obj
