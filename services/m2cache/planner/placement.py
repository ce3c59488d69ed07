"""Which tier holds what, and what a token costs there.

For a profile and a model shape, per precision policy (all FULL, or mixed bands):
1. device memory (tier 0) keeps a reserve (KV cache for the context, 10% workspace),
   then the dense weights (attention, embeddings, head); dense weights that do not
   fit stream from DRAM every token (the worker's ``--dense-budget-bytes``);
2. the rest of device memory is the HBM neuron cache (``--cache-fraction``);
3. DRAM (the DramTier's Redis), then a CXL expander, hold copies of the policy's
   precisions as far as they fit (``--dram-budget-bytes``; ``--numa-node`` binds
   Redis to the expander's node); the SSD holds the whole store.
On a CPU profile the compute's own memory is DRAM, so the DRAM tier adds nothing
there and is not used (a CXL expander still is).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from m2cache.codec.format import Precision
from m2cache.errors import InvalidArgument
from m2cache.planner import power, roofline, traffic as tr
from m2cache.planner.profiles import HardwareProfile
from m2cache.planner.shapes import ModelShape

DEFAULT_MIXED = {"full": 0.2, "int8": 0.25, "int4": 0.25}  # m2cache bench's default band ratios
WORKSPACE = 0.10  # of device memory, for activations and allocator slack
OS_RESERVE = 0.10  # of DRAM, for the OS and the services themselves


@dataclass(frozen=True, slots=True)
class Options:
    context: int = 2048  # tokens of KV cache reserved (batch 1)
    prompt_len: int = 128  # for the TTFT
    window: int = 4
    reuse: float | None = None  # fraction of a token's neurons used by a recent token (None: 0.8)
    mixed: dict = field(default_factory=lambda: dict(DEFAULT_MIXED))
    tariff: power.Tariff = power.Tariff()


@dataclass(frozen=True, slots=True)
class Placement:
    policy: str  # "full" | "mixed"
    ratios: dict
    dense_resident_bytes: float
    dense_streamed_bytes: float
    cache_bytes: float
    cache_fraction: float
    lower: dict  # tier kind -> record bytes placed there (dram, cxl)
    store_bytes: float

    def flags(self, profile: HardwareProfile) -> str:
        """The ``m2cache up`` / worker flags that realise this placement."""
        out = [f"--cache-fraction {min(max(self.cache_fraction, 1e-3), 1.0):.3g}"]
        if self.lower.get("dram") or self.lower.get("cxl"):
            out.append(f"--dram-budget-bytes {int(self.lower.get('dram', 0) + self.lower.get('cxl', 0))}")
        cxl = profile.tier("cxl")
        if self.lower.get("cxl") and cxl is not None and cxl.numa_node is not None:
            out.append(f"--numa-node {cxl.numa_node}")
        if self.dense_streamed_bytes:
            out.append(f"--dense-budget-bytes {int(self.dense_resident_bytes)}")
        return " ".join(out)


@dataclass(frozen=True, slots=True)
class Plan:
    profile: str
    model: str
    placement: Placement
    traffic: tr.Traffic
    prediction: roofline.Prediction
    cost: power.TokenCost
    flags: str = ""

    def row(self) -> dict:
        """The machine-readable plan (``--json``)."""
        t, p, c = self.traffic, self.prediction, self.cost
        return {
            "profile": self.profile, "model": self.model, "policy": self.placement.policy,
            "ratios": self.placement.ratios, "tok_s": c.tok_s, "ttft_s": p.ttft_s, "bound": p.bound,
            "tok_per_joule": c.tok_per_joule, "joules_per_token": c.joules_per_token, "power_w": c.power_w,
            "gco2_per_token": c.gco2_per_token, "tok_per_dollar": c.tok_per_dollar, "usd_per_token": c.usd_per_token,
            "hbm_hit_rate": t.hbm / t.used_bytes if t.used_bytes else None,
            "bytes_per_token": {"used": t.used_bytes, "hbm": t.hbm, "dram": t.dram + t.dense_streamed, "cxl": t.cxl,
                                "ssd": t.ssd},
            "placement": {"dense_resident_bytes": self.placement.dense_resident_bytes,
                          "dense_streamed_bytes": self.placement.dense_streamed_bytes,
                          "cache_bytes": self.placement.cache_bytes, "cache_fraction": self.placement.cache_fraction,
                          "lower_bytes": dict(self.placement.lower), "store_bytes": self.placement.store_bytes},
            "flags": self.flags, "terms_s": dict(p.terms), "traffic_source": t.source,
        }


def place(profile: HardwareProfile, shape: ModelShape, policy: str, opts: Options) -> Placement:
    """Budgets per tier for one policy (see the module docstring)."""
    ratios = tr.ratios_of(opts.mixed if policy == "mixed" else None)
    hbm = profile.tiers[0].capacity_bytes
    avail = hbm * (1 - WORKSPACE) - shape.kv_bytes_per_token() * opts.context
    if avail <= 0:
        raise InvalidArgument(f"{profile.name}: {shape.name}'s KV cache for {opts.context} tokens does not fit")
    dense_resident = min(float(shape.dense_bytes), avail)
    streamed = float(shape.dense_bytes) - dense_resident
    copy = tr.policy_copy_bytes(shape, ratios)
    cache = min(max(avail - dense_resident, 0.0), copy)
    lower, need = {}, copy - cache
    for kind in ("dram", "cxl"):
        tier = profile.tier(kind)
        if tier is None or need <= 0 or (kind == "dram" and profile.device == "cpu"):
            continue
        room = tier.capacity_bytes * (1 - OS_RESERVE) - (streamed if kind == "dram" else 0.0)
        lower[kind] = max(min(room, need), 0.0)
        need -= lower[kind]
    store = float(sum(shape.num_layers * shape.layer_ffn_bytes(p) for p in Precision)) + shape.dense_bytes
    ssd = profile.tier("ssd")
    if ssd is not None and store > ssd.capacity_bytes:
        raise InvalidArgument(f"{profile.name}: the {shape.name} store ({store / 1e9:.0f} GB) exceeds the SSD")
    return Placement(policy, ratios, dense_resident, streamed, cache, cache / shape.ffn_bytes, lower, store)


def traffic_for(shape: ModelShape, placement: Placement, opts: Options) -> tr.Traffic:
    """The cache model's traffic for a placement (everything cached: no lower tier)."""
    copy = tr.policy_copy_bytes(shape, placement.ratios)
    if placement.cache_bytes >= copy:  # the device holds every record the policy can use
        used = tr.used_bytes(shape, placement.ratios)
        return tr.Traffic(used=used, hbm=float(sum(used.values())), dense=float(shape.dense_bytes),
                          ranked=placement.policy == "mixed",
                          dense_streamed=placement.dense_streamed_bytes,
                          neuron_fraction=sum(placement.ratios.values()), source="cache model (all resident)",
                          extra={"hbm_hit_rate": 1.0})
    return tr.cache_model(shape, placement.ratios, placement.cache_fraction, placement.lower, opts.reuse, opts.window,
                          placement.dense_streamed_bytes)


def plan(profile: HardwareProfile, shape: ModelShape, policy: str, opts: Options = Options(),
         traffic: tr.Traffic | None = None, cache_fraction: float | None = None) -> Plan:
    """Placement, traffic (the cache model's unless given), prediction and costs;
    ``cache_fraction`` fixes the HBM cache budget (a benchmark configuration's)."""
    placement = place(profile, shape, policy, opts)
    if cache_fraction is not None:
        placement = dataclasses.replace(placement, cache_fraction=cache_fraction,
                                        cache_bytes=cache_fraction * shape.ffn_bytes)
    traffic = traffic or traffic_for(shape, placement, opts)
    pred = roofline.predict(profile, shape, traffic, opts.prompt_len)
    cost = power.token_cost(profile, pred.seconds_per_token, opts.tariff)
    return Plan(profile.name, shape.name, placement, traffic, pred, cost, placement.flags(profile))


def best_plans(profile: HardwareProfile, shape: ModelShape, opts: Options = Options()) -> list[Plan]:
    """Both policies, fastest first."""
    plans = [plan(profile, shape, p, opts) for p in ("full", "mixed")]
    return sorted(plans, key=lambda p: -p.cost.tok_s)
