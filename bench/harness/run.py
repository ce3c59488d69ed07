"""Orchestration of ``m2cache bench``: models, tier bandwidths, one child
process per system and budget (``bench.harness.child``), physical limits, fidelity,
perplexity per policy (real models), the trace-driven policy, results.json,
the markdown tables and the plots."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.harness import bandwidth, limits, models, report
from bench.harness.honest import MemoryLimit
from bench.harness.models import BenchModel
from bench.harness.synth import SynthShape

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
SYSTEMS = ("dense-reference", "transformers-dense", "accelerate-offload", "naive-streaming",
           "m2cache-inprocess", "m2cache-stack", "llama.cpp")
POLICIES = ("full", "mixed", "int4", "oracle", "trace-driven")
PER_BUDGET = ("accelerate-offload", "m2cache-inprocess", "m2cache-stack")  # one child per budget
WIKITEXT = REPO.parent / "shared" / "corpora" / "wikitext2" / "wiki.test.raw"


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
    model: Path | None = None  # --model DIR_OR_GGUF: this checkpoint instead of the synthetic one
    text: Path = WIKITEXT  # held-out text: perplexity and the recorded trace
    ppl_tokens: int = 256
    ppl_context: int = 128
    trace_from: Path | None = None  # --trace-from DIR_OR_GGUF: record its choices, replay them ("trace-driven")
    trace_chooser: str = "oracle"  # or "predictor" (the store's trained one)
    trace_tokens: int = 256
    llamacpp_threads: int = 2
    policies: tuple[str, ...] = POLICIES  # m2cache policies run where they apply (see policies_for)
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
    if spec["kind"] in PER_BUDGET and len(spec["fractions"]) == 1:
        tag += f"-{spec['fractions'][0]:g}"
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


def _base_spec(cfg: BenchConfig, model: str, hf_dir: Path | None, prompt: list[int]) -> dict:
    return {"model": model, "store_root": str(cfg.out_dir / "stores"), "hf_dir": str(hf_dir), "prompt_ids": prompt,
            "warmup": cfg.warmup, "tokens": cfg.tokens, "window": cfg.window, "headroom_bytes": cfg.headroom_mb << 20,
            "cgroup": MemoryLimit.available(), "ratios": list(cfg.ratios), "dram_fraction": cfg.dram_fraction,
            "log_dir": str(cfg.out_dir / "logs"), "offload_dir": str(cfg.out_dir / "offload"), "policy": "full"}


def policies_for(cfg: BenchConfig, kind: str, model: BenchModel, trace: Path | None) -> list[str]:
    """m2cache's policies (of cfg.policies) that apply: full and mixed always; uniform INT4
    in-process; the oracle on real models (in-process); the trace-driven replay on the
    synthetic model when a trace was recorded."""
    out = ["full", "mixed"]
    if kind == "m2cache-inprocess":
        out.append("int4")
    if model.real and kind == "m2cache-inprocess":
        out.append("oracle")
    if trace is not None and not model.real:
        out.append("trace-driven")
    return [p for p in out if p in cfg.policies]


def specs_for(cfg: BenchConfig, model: BenchModel, prompt: list[int], trace: Path | None = None) -> list[dict]:
    """The children to run for one model (fidelity models: 100% FULL only)."""
    base = _base_spec(cfg, model.name, model.hf_dir, prompt)
    fidelity = model.fidelity_only
    fractions = [1.0] if fidelity else list(cfg.fractions)
    out = []
    for kind in cfg.systems:
        if fidelity and kind in ("accelerate-offload", "naive-streaming"):
            continue
        if kind in ("transformers-dense", "accelerate-offload") and model.hf_dir is None:
            continue
        if kind == "llama.cpp":
            # GGUF models and the synthetic one (exported); without llama-cpp-python the
            # synthetic model has no GGUF copies and its rows say the peer is not installed
            ggufs = {k: str(v) for k, v in model.ggufs.items()} or ({} if model.real else {"F16": "", "Q4_1": ""})
            if ggufs and not fidelity:
                out.append({**base, "kind": kind, "ssd": True, "ggufs": ggufs, "threads": cfg.llamacpp_threads,
                            "stop_at_eos": model.real})  # a random model's EOS means nothing
            continue
        ssd = kind not in ("dense-reference", "transformers-dense")
        spec = {**base, "kind": kind, "ssd": ssd, "fractions": fractions}
        if kind == "accelerate-offload":
            spec["fractions"] = list(cfg.accelerate_fractions)
        if kind not in ("m2cache-inprocess", "m2cache-stack"):
            out += per_budget(spec) if kind in PER_BUDGET else [spec]
        elif fidelity:
            out.append(spec)  # 100% FULL only
        else:
            out += [s for p in policies_for(cfg, kind, model, trace)
                    for s in per_budget({**spec, "policy": p, "trace": str(trace) if trace else None})]
    return out


def per_budget(spec: dict) -> list[dict]:
    """One child per budget: a configuration's peak memory is its own, not what an earlier
    budget's larger cache left in the heap (6.5 MiB at 25% after 100% on SmolLM2)."""
    return [{**spec, "fractions": [f]} for f in spec["fractions"]]


def prepare_models(cfg: BenchConfig) -> list[BenchModel]:
    """The main model first (the synthetic one, or --model), then the real tiny ones (fidelity only)."""
    main = models.checkpoint(cfg.model, cfg.out_dir) if cfg.model else \
        models.synthetic(cfg.shape, cfg.out_dir, llamacpp="llama.cpp" in cfg.systems)
    extra = [models.fidelity(name, cfg.shared_models, cfg.out_dir) for name in cfg.fidelity_models]
    return [main] + [m for m in extra if m is not None]


def perplexity(cfg: BenchConfig, model: BenchModel, work: Path) -> list[dict]:
    """Held-out perplexity per policy (real models only), in its own child process."""
    spec = {**_base_spec(cfg, model.name, model.hf_dir, []), "kind": "perplexity", "cgroup": False,
            "text": str(cfg.text), "num_tokens": cfg.ppl_tokens, "context": cfg.ppl_context,
            "policies": ["full", "int8", "int4"] + [p for p in ("mixed", "oracle") if p in cfg.policies]}
    return run_child(spec, work, cfg.child_timeout_s)


def record_trace(cfg: BenchConfig, work: Path) -> tuple[Path | None, dict]:
    """Convert --trace-from and record its choices on the held-out text (once per source and settings)."""
    source = models.checkpoint(cfg.trace_from, cfg.out_dir, peers=False)
    out = cfg.out_dir / "traces" / f"{source.name}-{cfg.trace_chooser}-{cfg.trace_tokens}-" \
        f"{'-'.join(f'{r:g}' for r in cfg.ratios)}.pt"
    spec = {**_base_spec(cfg, source.name, source.hf_dir, []), "kind": "record-trace", "cgroup": False,
            "text": str(cfg.text), "num_tokens": cfg.trace_tokens, "chooser": cfg.trace_chooser,
            "trace_out": str(out)}
    meta = run_child(spec, work, cfg.child_timeout_s)[0]
    return (out if "error" not in meta else None), meta


def run(cfg: BenchConfig) -> dict:
    """The whole benchmark; returns (and writes) the results document."""
    t_start = time.monotonic()
    work = cfg.out_dir / "runs"
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    print(f"m2cache bench: load average {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}", flush=True)
    bench_models = prepare_models(cfg)
    main = bench_models[0]
    main_store = cfg.out_dir / "stores" / main.name
    trace, trace_meta = record_trace(cfg, work) if cfg.trace_from else (None, None)
    print("  measuring tier bandwidths", flush=True)
    bw = bandwidth.measure_all(main_store)
    results = []
    for model in bench_models:
        prompt = prompt_ids(cfg.out_dir / "stores" / model.name, cfg.prompt_len, cfg.shape.vocab)
        for spec in specs_for(cfg, model, prompt, trace):
            results.extend(run_child(spec, work, cfg.child_timeout_s))
    doc = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "config": _jsonable(asdict(cfg)), "main_model": main.name,
        "main_model_real": main.real,
        "main_model_weights": main.source_weights, "load_avg": {"start": load_start, "end": None}, "bandwidth": bw,
        "ffn_bytes": limits.ffn_bytes(main_store), "results": results,
        "perplexity": perplexity(cfg, main, work) if main.real else [], "trace": trace_meta,
    }
    doc["load_avg"]["end"] = os.getloadavg()
    doc["wall_s"] = time.monotonic() - t_start
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
