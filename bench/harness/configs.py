"""What each child runs: ``run_spec(spec, group)`` builds every configuration
of one system kind (budgets x policy) and measures each with child.run_config;
two kinds are not systems but measurements in their own process: "perplexity"
(bench/harness/quality.py) and "record-trace" (bench/harness/trace.py)."""
from __future__ import annotations

import os

from pathlib import Path

from m2cache.codec.format import Precision
from m2cache.predictors.bands import BandRatios

from bench.harness.child import run_config
from bench.harness.policy import load_policy


# the module each system kind's code lives in: imported before the child measures its
# runtime (the interpreter, torch and the system's code, before any weight is loaded)
SYSTEM_MODULES = {"dense-reference": "bench.harness.systems_local", "naive-streaming": "bench.harness.systems_local",
                  "m2cache-inprocess": "bench.harness.systems_local", "m2cache-stack": "bench.harness.systems_stack",
                  "transformers-dense": "bench.harness.systems_hf", "accelerate-offload": "bench.harness.systems_hf",
                  "llama.cpp": "bench.harness.systems_llamacpp"}


def import_code(kind: str) -> None:
    """Import system ``kind``'s code (nothing for the measurement kinds; an optional peer
    that is not installed is reported by its own row)."""
    import importlib

    name = SYSTEM_MODULES.get(kind)
    if name is not None:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def _paths(spec: dict) -> tuple[Path, Path]:
    return Path(spec["store_root"]) / spec["model"], Path(spec["hf_dir"])


def _manifest(store_path: Path):
    from m2cache.store.reader import NeuronStore

    store = NeuronStore(store_path)
    try:
        return store.manifest
    finally:
        store.close()


def _mixed(spec: dict, store_path: Path):
    """The policy object of spec["policy"] (None for "full"): mixed, oracle or trace-driven."""
    return load_policy(spec["policy"], store_path, _manifest(store_path), BandRatios(*spec["ratios"]),
                       spec.get("trace"))


def _label(spec: dict, system: str, fraction, mixed) -> dict:
    return {"system": system, "model": spec["model"], "fraction": fraction, "policy": spec.get("policy", "full"),
            "predictor": None if mixed is None else mixed.source}


def run_spec(spec: dict, group) -> list[dict]:
    store_path, hf_dir = _paths(spec)
    kind = spec["kind"]
    if kind == "dense-reference":
        from bench.harness.systems_local import DenseReference
        return [run_config(spec, _label(spec, kind, 1.0, None), lambda: DenseReference(store_path), group)]
    if kind == "transformers-dense":
        from bench.harness.systems_hf import TransformersDense
        return [run_config(spec, _label(spec, kind, 1.0, None), lambda: TransformersDense(hf_dir), group)]
    if kind == "naive-streaming":
        from bench.harness.systems_local import NaiveStreaming
        return [run_config(spec, _label(spec, kind, 0.0, None), lambda: NaiveStreaming(store_path), group)]
    if kind == "accelerate-offload":
        return _accelerate(spec, hf_dir, store_path, group)
    if kind == "m2cache-inprocess":
        return _inprocess(spec, store_path, group)
    if kind == "m2cache-stack":
        return _stack(spec, store_path, group)
    if kind == "llama.cpp":
        return _llamacpp(spec, group)
    if kind == "perplexity":
        from bench.harness.quality import perplexities
        return perplexities(store_path, Path(spec["text"]), spec["num_tokens"], spec["context"],
                            BandRatios(*spec["ratios"]), tuple(spec["policies"]))
    if kind == "record-trace":
        return [_record_trace(spec, store_path)]
    raise ValueError(f"unknown system kind {kind!r}")


def _llamacpp(spec, group) -> list[dict]:
    """Each GGUF of the model (F16, the shipped quantisation) in turn, same prompt and limit."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:  # an optional peer: say so in its row
        return [{**_label(spec, "llama.cpp", 1.0, None), "policy": f"gguf-{label.lower()}",
                 "error": "llama-cpp-python is not installed (optional peer; docs/BENCHMARKS.md says how to build it)"}
                for label in spec["ggufs"]]
    from bench.harness.systems_llamacpp import LlamaCpp

    out = []
    n_ctx = len(spec["prompt_ids"]) + 1 + spec["warmup"] + spec["tokens"] + 8
    for label, path in spec["ggufs"].items():
        build = lambda path=path: LlamaCpp(Path(path), spec["threads"], n_ctx, spec.get("stop_at_eos", True))
        label_ = {**_label(spec, "llama.cpp", 1.0, None), "policy": f"gguf-{label.lower()}"}
        out.append(run_config({**spec, "cache_files": [path]}, label_, build, group))
    return out


def _record_trace(spec, store_path) -> dict:
    from m2cache.local.loader import load_tokenizer
    from m2cache.store.reader import NeuronStore

    from bench.harness.quality import text_ids
    from bench.harness.trace import overlap_stats, record

    store = NeuronStore(store_path)
    try:
        ids = text_ids(load_tokenizer(store), Path(spec["text"]), spec["num_tokens"])
    finally:
        store.close()
    trace = record(store_path, ids, spec["chooser"], BandRatios(*spec["ratios"]), Path(spec["text"]).name)
    trace.save(Path(spec["trace_out"]))
    return {**trace.meta(), "path": spec["trace_out"], "locality": overlap_stats(trace, spec["window"])}


def _accelerate(spec, hf_dir, store_path, group) -> list[dict]:
    """max_memory = the dense (non-FFN) bytes + fraction of the FFN bytes: the same fast memory m2cache gets."""
    from bench.harness.systems_hf import AccelerateOffload

    m = _manifest(store_path)
    ffn = m.num_layers * m.d_ffn * m.layout.num_bytes(Precision.FULL)
    dense = sum(p.stat().st_size for p in hf_dir.glob("*.safetensors")) - ffn
    out = []
    for f in spec["fractions"]:
        offload = Path(spec["offload_dir"]) / f"{spec['model']}-{f}"
        build = lambda f=f, offload=offload: AccelerateOffload(hf_dir, dense + int(f * ffn), offload)
        out.append(run_config(spec, _label(spec, "accelerate-offload", f, None), build, group))
    return out


def _inprocess(spec, store_path, group) -> list[dict]:
    from bench.harness.systems_local import M2CacheLocal

    mixed = _mixed(spec, store_path)
    return [run_config(spec, _label(spec, "m2cache-inprocess", f, mixed),
                       lambda f=f: M2CacheLocal(store_path, f, mixed, spec["window"]), group)
            for f in spec["fractions"]]


def _stack(spec, store_path, group) -> list[dict]:
    """Dense model loaded once (locally, before any timing); fresh services and worker per budget."""
    from m2cache.store.reader import NeuronStore
    from m2cache.local.loader import load_model
    from bench.harness.systems_stack import ServiceStack, StackWorker
    from m2cache.worker.compute import ComputeThread

    compute = ComputeThread()  # as a served worker: loaded where it decodes (worker/compute.py)
    mixed = compute.call(_mixed, spec, store_path)
    store = NeuronStore(store_path)
    model, _tok, _bank = compute.call(lambda: load_model(store, drop_pages=True, tokenizer=False))
    manifest = store.manifest
    store.close()
    precisions = "full,int8,int4" if mixed else "full"
    per_prec = sum(manifest.layout.num_bytes(Precision.parse(p)) for p in precisions.split(","))
    dram_budget = int(spec["dram_fraction"] * manifest.num_layers * manifest.d_ffn * per_prec)
    out = []
    for f in spec["fractions"]:
        holder = {}

        def build(f=f):
            holder["stack"] = ServiceStack(Path(spec["store_root"]), dram_budget, precisions,
                                           Path(spec["log_dir"]) / f"stack-{spec['model']}-{spec['policy']}-{f}", group)
            return StackWorker(holder["stack"], spec["model"], manifest, model, f, mixed, spec["window"], compute)

        label = {**_label(spec, "m2cache-stack", f, mixed), "dram_budget_bytes": dram_budget}
        try:
            # the store's reads and the worker's own (it reads the store's records file: short-circuit)
            out.append(run_config(spec, label, build, group,
                                  io_pids=lambda system: [system.stack.store.pid, os.getpid()]))
        finally:
            if "stack" in holder:
                holder["stack"].close()
    compute.close()
    return out
