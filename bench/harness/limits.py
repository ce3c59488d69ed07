"""Physical limits, fidelity and the targets, computed from one run's figures.

Physical limit of a configuration: each tier's bytes per token over that
tier's measured bandwidth; tiers can overlap at best, so the slowest tier
bounds the token time. Two SSD bandwidths are used: the device's sequential
bandwidth (``limit_tok_s``: what the disk allows) and the store's record read
path (``limit_store_path_tok_s``: what LMDB reads of records give).
"""
from __future__ import annotations

from pathlib import Path

from m2cache.codec.format import Precision

TARGET_FRACTION = 0.25


def ffn_bytes(store_path: Path) -> int:
    """The model's FFN bytes at FULL precision (record bytes, the checkpoint dtype)."""
    from m2cache.store.reader import NeuronStore

    store = NeuronStore(store_path)
    try:
        m = store.manifest
        return m.num_layers * m.d_ffn * m.layout.num_bytes(Precision.FULL)
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
    """Tokens of every 100% FULL configuration against the dense reference of its model."""
    refs = {r["model"]: r["generated_ids"] for r in results if r["system"] == "dense-reference" and "error" not in r}
    out = []
    for r in results:
        if "error" in r or r["system"] == "dense-reference" or r.get("policy") != "full" or r.get("fraction") != 1.0:
            continue
        if r["model"] in refs:
            ref = refs[r["model"]]
            out.append({"model": r["model"], "system": r["system"], "identical": r["generated_ids"] == ref,
                        "tokens": len(ref), "first_mismatch": next((i for i, (a, b) in enumerate(zip(ref, r["generated_ids"]))
                                                                    if a != b), None)})
    return out


def _find(results, model, system, fraction=None, policy=None):
    for r in results:
        if (r["model"], r["system"]) == (model, system) and "error" not in r and \
                (fraction is None or r.get("fraction") == fraction) and (policy is None or r.get("policy") == policy):
            return r
    return None


def targets(results: list[dict], model: str) -> list[dict]:
    """The issue's targets at the 25% budget, for each m2cache policy."""
    f = TARGET_FRACTION
    acc = _find(results, model, "accelerate-offload", f)
    dense = _find(results, model, "dense-reference")
    out = []
    for policy in ("full", "mixed"):
        local = _find(results, model, "m2cache-inprocess", f, policy)
        stack = _find(results, model, "m2cache-stack", f, policy)
        pairs = [("m2cache in-process / Accelerate offload", local, acc, 10.0),
                 ("m2cache in-process / dense reference", local, dense, 0.5),
                 ("full stack / m2cache in-process", stack, local, 0.8)]
        for name, a, b, goal in pairs:
            if a and b:
                v = a["decode_tok_s"] / b["decode_tok_s"]
                out.append({"policy": policy, "target": name, "value": v, "goal": goal, "met": v >= goal})
        for name, r in (("m2cache in-process / physical limit", local), ("full stack / physical limit", stack)):
            if r and r.get("ratio_to_limit_tok_s") is not None:
                v = r["ratio_to_limit_tok_s"]
                out.append({"policy": policy, "target": name, "value": v, "goal": 0.5, "met": v >= 0.5})
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
    doc["targets"] = targets(doc["results"], doc["config"]["shape"]["name"] if "name" in doc["config"]["shape"]
                             else _shape_name(doc["config"]["shape"]))


def _shape_name(shape: dict) -> str:
    return f"synth-l{shape['num_layers']}-h{shape['hidden']}-f{shape['ffn']}"
