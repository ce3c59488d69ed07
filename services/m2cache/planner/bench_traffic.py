"""Bytes per token per tier from an ``m2cache bench`` run (its results.json), for
planning other hardware with the access pattern measured here: each m2cache
configuration's shares of the bytes used (HBM hits, DRAM, SSD) are applied to
the planned model's bytes under the same policy."""
from __future__ import annotations

import json
from pathlib import Path

from m2cache.errors import InvalidArgument
from m2cache.planner import traffic as tr
from m2cache.planner.shapes import ModelShape


def bench_shape(doc: dict) -> ModelShape:
    """The benchmark's synthetic model (its config.shape)."""
    s = doc["config"]["shape"]
    name = f"synth-l{s['num_layers']}-h{s['hidden']}-f{s['ffn']}"
    return ModelShape(name=name, family="llama", num_layers=s["num_layers"], d_model=s["hidden"], d_ffn=s["ffn"],
                      num_heads=s["heads"], num_kv_heads=s["kv_heads"], vocab=s["vocab"], dtype="float16")


def load(path: Path, shape: ModelShape) -> list[tuple[str, tr.Traffic]]:
    """(label, traffic for ``shape``) per m2cache configuration of the run's main model."""
    try:
        doc = json.loads(Path(path).read_text())
        source = bench_shape(doc)
    except (OSError, ValueError, KeyError) as err:
        raise InvalidArgument(f"{path}: not an m2cache bench results.json ({err})") from None
    out = []
    for r in doc["results"]:
        if r.get("model") != source.name or not r["system"].startswith("m2cache") or "error" in r:
            continue
        measured = tr.from_bench(source, r)
        used = measured.used_bytes
        ratios = tr.ratios_of((r.get("info") or {}).get("ratios"))
        target = tr.used_bytes(shape, ratios)
        total = sum(target.values())
        share = lambda v: total * v / used if used else 0.0
        label = f"{r['system']} {r['policy']} {100 * r['fraction']:.0f}%"
        out.append((label, tr.Traffic(used=target, hbm=share(measured.hbm), dram=share(measured.dram),
                                      ssd=share(measured.ssd), through=share(measured.through),
                                      dense=float(shape.dense_bytes),
                                      neuron_fraction=measured.neuron_fraction, sequential=measured.sequential,
                                      ranked=measured.ranked, source=f"m2cache bench {path}",
                                      extra={"policy": "mixed" if measured.ranked else "full", "bench": label,
                                             "fraction": r["fraction"]})))
    if not out:
        raise InvalidArgument(f"{path}: no m2cache configurations of {source.name} to take bytes per token from")
    return out
