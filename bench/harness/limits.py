"""Physical limits, fidelity and the targets, computed from one run's figures.

Physical limit of a configuration: each tier's bytes per token over that
tier's measured bandwidth; tiers can overlap at best, so the slowest tier
bounds the token time. Two SSD bandwidths are used: the device's sequential
bandwidth (``limit_tok_s``: what the disk allows) and the store's record read
path (``limit_store_path_tok_s``: what LMDB reads of records give).
"""
from __future__ import annotations

from pathlib import Path

from m2cache.codec.format import DTYPES, Precision

TARGET_FRACTION = 0.25


def ffn_bytes(store_path: Path) -> int:
    """The model's FFN bytes at FULL precision (record bytes, the checkpoint dtype)."""
    return model_bytes(store_path, 0)["ffn"]


def model_bytes(store_path: Path, max_len: int) -> dict[str, int]:
    """FFN bytes at FULL, non-FFN (dense) weight bytes and one sequence's KV cache of
    ``max_len`` positions, all in the checkpoint dtype (the worker's compute dtype)."""
    from m2cache.store.reader import NeuronStore

    store = NeuronStore(store_path)
    try:
        m, hf = store.manifest, store.manifest.hf_config
        heads = hf.get("num_attention_heads", 1)
        head_dim = hf.get("head_dim") or m.d_model // heads
        item = DTYPES[m.dtype].itemsize
        return {"ffn": m.num_layers * m.d_ffn * m.layout.num_bytes(Precision.FULL),
                "dense": sum(store.dense_nbytes(n) for n in store.dense_names()),
                "kv": 2 * m.num_layers * hf.get("num_key_value_heads", heads) * head_dim * max_len * item}
    finally:
        store.close()


def _limit(bpt: dict, bw: dict, ssd_bw: float) -> tuple[float | None, str | None]:
    times = {"hbm": bpt.get("hbm", 0) / bw["hbm"]["bytes_per_s"], "dram": bpt.get("dram", 0) / bw["dram"]["bytes_per_s"],
             "ssd": bpt.get("ssd", 0) / ssd_bw}
    tier = max(times, key=times.get)
    return (1.0 / times[tier], tier) if times[tier] > 0 else (None, None)


def annotate_result(r: dict, bw: dict, ffn: int) -> None:
    """Adds limits, ratios and SSD bytes as % of FFN to one result (in place)."""
    if "error" in r:
        return
    bpt = r["bytes_per_token"]
    device_bw = bw["ssd_sequential"]["bytes_per_s"]
    store_bw = device_bw if r["system"] == "accelerate-offload" else bw["ssd_records"]["bytes_per_s"]
    r["limit_tok_s"], r["bound_by"] = _limit(bpt, bw, device_bw)
    r["limit_store_path_tok_s"], _ = _limit(bpt, bw, store_bw)
    for key in ("limit_tok_s", "limit_store_path_tok_s"):
        r[key.replace("limit", "ratio_to_limit")] = r["decode_tok_s"] / r[key] if r[key] else None
    r["ssd_pct_of_ffn"] = 100.0 * bpt.get("ssd", 0) / ffn
    r["device_pct_of_ffn"] = 100.0 * r["device_read_bytes_per_token"] / ffn


def fidelity(results: list[dict]) -> list[dict]:
    """Tokens of every 100% FULL configuration (and llama.cpp on the F16 GGUF) against the dense reference."""
    refs = {r["model"]: r["generated_ids"] for r in results if r["system"] == "dense-reference" and "error" not in r}
    out = []
    for r in results:
        if "error" in r or r["system"] == "dense-reference" or r.get("policy") not in ("full", "gguf-f16") \
                or r.get("fraction") != 1.0:
            continue
        if r["model"] in refs:
            ref = refs[r["model"]]
            out.append({"model": r["model"], "system": r["system"], "policy": r["policy"],
                        "identical": r["generated_ids"] == ref, "tokens": len(ref),
                        "first_mismatch": next((i for i, (a, b) in enumerate(zip(ref, r["generated_ids"]))
                                                if a != b), None)})
    return out


def _find(results, model, system, fraction=None, policy=None):
    for r in results:
        if (r["model"], r["system"]) == (model, system) and "error" not in r and \
                (fraction is None or r.get("fraction") == fraction) and (policy is None or r.get("policy") == policy):
            return r
    return None


POLICIES = ("full", "mixed", "int4", "oracle", "trace-driven")


def _target(policy, name, value, goal, at_least=True, fraction=TARGET_FRACTION) -> dict:
    return {"policy": policy, "target": name, "value": value, "goal": goal, "at_least": at_least,
            "met": value >= goal if at_least else value <= goal, "fraction": fraction}


def targets(results: list[dict], model: str) -> list[dict]:
    """The issues' targets at the 25% budget for each m2cache policy (issue 14: HBM hit rate >= 80%
    at window 4, <= 10% of the FFN from SSD per token; issue 12: speed against the peers)."""
    f = TARGET_FRACTION
    acc = _find(results, model, "accelerate-offload", f)
    dense = _find(results, model, "dense-reference")
    hf = _find(results, model, "transformers-dense")
    out = []
    for policy in POLICIES:
        local = _find(results, model, "m2cache-inprocess", f, policy)
        stack = _find(results, model, "m2cache-stack", f, policy)
        pairs = [("m2cache in-process / Accelerate offload", local, acc, 10.0),
                 ("m2cache in-process / dense reference", local, dense, 0.5),
                 ("m2cache in-process / transformers dense", local, hf, 1.0),
                 ("full stack / m2cache in-process", stack, local, 0.8)]
        for name, a, b, goal in pairs:
            if a and b:
                out.append(_target(policy, name, a["decode_tok_s"] / b["decode_tok_s"], goal))
        for name, r in (("m2cache in-process / physical limit", local), ("full stack / physical limit", stack)):
            if r and r.get("ratio_to_limit_tok_s") is not None:
                out.append(_target(policy, name, r["ratio_to_limit_tok_s"], 0.5))
        for where, r in (("in-process", local), ("full stack", stack)):
            if r and r.get("hbm_hit_rate") is not None:
                out.append(_target(policy, f"{where} HBM hit rate (window {r['info'].get('window')})",
                                   r["hbm_hit_rate"], 0.8))
            if r:
                out.append(_target(policy, f"{where} SSD bytes per token, % of FFN", r["ssd_pct_of_ffn"], 10.0, False))
    for policy, goal in (("full", 0.9), ("mixed", 1.2)):  # issue 12: everything cached, no I/O
        local = _find(results, model, "m2cache-inprocess", 1.0, policy)
        if local and hf:
            out.append(_target(policy, "m2cache in-process / transformers dense",
                               local["decode_tok_s"] / hf["decode_tok_s"], goal, fraction=1.0))
    llama = _find(results, model, "llama.cpp", policy="gguf-q4_1")
    best = max((r for r in results if r["model"] == model and r["system"] == "m2cache-inprocess"
                and r.get("fraction") == 1.0 and "error" not in r), key=lambda r: r["decode_tok_s"], default=None)
    if llama and best:
        out.append(_target(best["policy"], "m2cache in-process (best policy) / llama.cpp Q4_1",
                           best["decode_tok_s"] / llama["decode_tok_s"], 0.5, fraction=1.0))
    return out


def annotate(doc: dict) -> None:
    """Limits on every result; fidelity and targets on the document."""
    stores = Path(doc["config"]["out_dir"]) / "stores"
    ffn = {}
    for r in doc["results"]:
        if r["model"] not in ffn:
            ffn[r["model"]] = ffn_bytes(stores / r["model"])
        annotate_result(r, doc["bandwidth"], ffn[r["model"]])
    doc["fidelity"] = fidelity(doc["results"])
    doc["targets"] = targets(doc["results"], doc["main_model"])
    doc["targets"] += memory_targets(doc, stores)


def memory_targets(doc: dict, stores: Path) -> list[dict]:
    """Issue 12: the worker's peak memory at 25% <= (non-FFN weights + 25% of the FFN +
    KV cache) x 1.1, in-process and the stack's worker process; peak RSS counted above
    the interpreter's own (Python + torch + the harness imported, measured in the child
    before anything is built) and above the library code pages that first ran after
    that (``code_rss_bytes``: libtorch's kernels as they are first called), which no
    weight budget can include."""
    cfg, model = doc["config"], doc["main_model"]
    sizes = model_bytes(stores / model, cfg.get("prompt_len", 8) + cfg.get("warmup", 1) + cfg.get("tokens", 4) + 1)
    bound = 1.1 * (sizes["dense"] + TARGET_FRACTION * sizes["ffn"] + sizes["kv"])
    doc["memory_bound"] = {**sizes, "fraction": TARGET_FRACTION, "bound_bytes": int(bound)}
    out = []
    for system in ("m2cache-inprocess", "m2cache-stack"):
        for policy in POLICIES:
            r = _find(doc["results"], model, system, TARGET_FRACTION, policy)
            if r and r.get("peak_rss_bytes"):
                runtime = r.get("runtime_rss_bytes", 0)
                code = max(0, r.get("code_rss_bytes", 0) - r.get("runtime_code_rss_bytes", 0))
                used = r["peak_rss_bytes"] - runtime - code
                out.append(_target(policy, f"{system} peak RSS above the interpreter and its code "
                                   f"({runtime >> 20} MiB, + {code >> 20} MiB of library code run later) / "
                                   f"memory bound ({int(bound) >> 20} MiB)", used / bound, 1.0, at_least=False))
    return out
