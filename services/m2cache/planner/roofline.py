"""Seconds per decoded token from bytes per tier, bandwidths, compute and the
engine's measured overhead.

    t_token = t_fixed + combine(t_work, t_io)

- ``t_fixed``  = per_token_s + layers x per_layer_s: the engine's cost per step
  that does not scale with bytes (norms, attention over the KV cache, Python,
  kernel launches), probed on a measured profile, assumed on the others;
- ``t_work``   = max(flops / (peak x efficiency), device-memory bytes / HBM bandwidth)
  + the engine's per-byte cost of the records it computes with (a measured
  profile's ``per_byte_s``: the kernel's pass over the records in place, and the
  copies of a miss); the dense weights and a resident FFN's fused matrices are
  read in the compute dtype;
- ``t_io``     = bytes from DRAM, CXL and SSD over each tier's bandwidth into the
  device (on measured runs the bytes the block device delivered); tiers stream in
  parallel, so the slowest bounds them;
- ``combine``  = max when the engine overlaps transfers with compute (prefetch),
  else the sum.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from m2cache.codec.format import DTYPES
from m2cache.planner.profiles import HardwareProfile
from m2cache.planner.shapes import ModelShape
from m2cache.planner.traffic import Traffic

@dataclass(frozen=True, slots=True)
class Prediction:
    seconds_per_token: float
    ttft_s: float
    bound: str  # the term that sets the speed: fixed | compute | hbm | engine | dram | cxl | ssd
    terms: dict = field(default_factory=dict)  # term -> seconds per token

    @property
    def tok_s(self) -> float:
        return 1.0 / self.seconds_per_token


def compute_bytes(profile: HardwareProfile, shape: ModelShape, traffic: Traffic) -> float:
    """Bytes the compute reads from device memory per token: the dense weights in the compute
    dtype (the checkpoint's), plus the FFN where it is resident as fused matrices (the dense
    path). A measured engine's record paths are costed by its per-byte figures (engine_bytes_s:
    the kernel computes on the records in place, so those figures include the FFN's compute);
    an assumed profile reads the records as stored."""
    itemsize = DTYPES[shape.dtype].itemsize
    dense = shape.decode_dense_params * itemsize
    if traffic.resident_matrices:
        return dense + traffic.neuron_fraction * shape.ffn_bytes
    if profile.engine.per_byte_s:
        return dense
    return dense + traffic.used_bytes


def engine_bytes_s(profile: HardwareProfile, traffic: Traffic) -> float:
    """The measured engine's per-byte cost of handling records (0 on assumed profiles)."""
    c = profile.engine.per_byte_s
    if not c or traffic.resident_matrices:
        return 0.0
    if traffic.streamed and "record_stream" in c:  # whole layers, no cache: its own read-and-decode path
        return traffic.used_bytes * c["record_stream"]
    mixed = traffic.ranked and "record_mixed" in c  # measured on the policy's own mix of precisions
    if mixed:
        t = traffic.used_bytes * c["record_mixed"]
    else:
        t = sum(b * c.get(f"record_{p}", 0.0) for p, b in traffic.used.items())
    return t + traffic.miss_bytes * miss_s_per_byte(c, traffic, c.get("miss_mixed" if mixed else "miss", 0.0))


def miss_s_per_byte(c: dict, traffic: Traffic, miss: float) -> float:
    """A miss byte's engine cost. The probe measures a miss on a warm local store, so
    its figure holds the page-cache read (``warm_read``, s/B); a miss read from the
    device, or from a DRAM / CXL tier, is priced by that tier's term (io_terms), so
    the page-cache read is taken out for those bytes. A worker on the store's host
    reads the records file itself (short-circuit), exactly as in-process does."""
    warm = min(c.get("warm_read", 0.0), miss)
    lower = traffic.dram + traffic.cxl + traffic.ssd
    if lower <= 0:
        return miss - warm * min(1.0, traffic.cold_share)
    elsewhere = (traffic.dram + traffic.cxl + traffic.ssd * min(1.0, traffic.cold_share)) / lower
    return miss - warm * elsewhere


def io_terms(profile: HardwareProfile, traffic: Traffic) -> dict:
    """Seconds of each lower tier's reads at its bandwidth (whole-layer runs at its sequential
    bandwidth), SSD bytes scaled by ``cold_share`` (on measured runs: what reached the device,
    so a scattered record costs the pages it spans)."""
    cold = traffic.cold_share
    ssd = [((traffic.ssd - traffic.through) * cold, True), (traffic.through * cold, traffic.sequential)]
    out = {}
    for kind, parts in (("dram", [(traffic.dram + traffic.dense_streamed, traffic.sequential)]),
                        ("cxl", [(traffic.cxl, False)]),
                        ("ssd", ssd)):
        tier = profile.tier(kind) or _next_slower(profile, kind)
        seconds = sum(n / (tier.sequential_bandwidth if seq and tier.sequential_bandwidth else tier.bandwidth)
                      for n, seq in parts if n > 0)
        if seconds > 0:
            out[kind] = seconds
    return out


def _next_slower(profile: HardwareProfile, kind: str):
    """A tier the profile lacks is served by the next slower one it has (an SSD always)."""
    order = ("dram", "cxl", "ssd")
    for k in order[order.index(kind):]:
        if profile.tier(k) is not None:
            return profile.tier(k)
    return profile.tiers[-1]


def predict(profile: HardwareProfile, shape: ModelShape, traffic: Traffic, prompt_len: int = 128,
            cold_start: bool = False) -> Prediction:
    """Decode seconds per token and time to first token for ``traffic`` on ``profile``
    (TTFT on a warm cache, or of a fresh worker with ``cold_start``)."""
    eng = profile.engine
    hbm = profile.tiers[0]
    per_layer = eng.per_layer_s + (eng.per_layer_choose_s if traffic.ranked else 0.0)
    terms = {"fixed": eng.per_token_s + shape.num_layers * per_layer,
             "compute": shape.flops_per_token(traffic.neuron_fraction) / (profile.flops * profile.efficiency),
             "hbm": compute_bytes(profile, shape, traffic) / hbm.bandwidth,
             "engine": engine_bytes_s(profile, traffic)}
    terms.update(io_terms(profile, traffic))
    work = max(terms["compute"], terms["hbm"]) + terms["engine"]
    io = max((terms[k] for k in ("dram", "cxl", "ssd") if k in terms), default=0.0)
    t = terms["fixed"] + (max(work, io) if eng.overlap else work + io)
    bound = max((k for k in terms if k != "fixed"), key=lambda k: terms[k])
    if terms["fixed"] > max(work, io):
        bound = "fixed"
    return Prediction(seconds_per_token=t, ttft_s=ttft(profile, shape, traffic, terms, prompt_len, cold_start),
                      bound=bound,
                      terms=terms)


def ttft(profile: HardwareProfile, shape: ModelShape, traffic: Traffic, terms: dict, prompt_len: int,
         cold_start: bool = False) -> float:
    """Prefill of ``prompt_len`` tokens: one step whose compute grows with the prompt
    (its neuron bands are shared by the prompt's rows, so its bytes are one token's);
    on a fresh worker (``cold_start``) every record comes from below the empty HBM cache."""
    compute = terms["compute"] * prompt_len
    cold = {k: v for k, v in terms.items() if k in ("dram", "cxl", "ssd")}
    if cold_start and traffic.hbm and not traffic.resident_matrices:  # the hits of a warm token are misses at first
        tier = profile.tier("dram") or profile.tiers[-1]
        cold["dram"] = cold.get("dram", 0.0) + traffic.hbm / tier.bandwidth
    work = max(compute, terms["hbm"]) + terms["engine"]
    io = max(cold.values(), default=0.0)
    return terms["fixed"] + (max(work, io) if profile.engine.overlap else work + io)
