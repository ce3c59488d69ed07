"""Bytes one decoded token moves, per tier: measured by ``m2cache bench``
(its results.json) or predicted by the cache model below.

Records are counted as stored (FULL in the checkpoint dtype, INT8/INT4 packed).

Cache model (batch 1, one token):
- the policy fixes the bytes a token computes with: per layer ``round(r_p * F)``
  neurons at precision p (all FULL without a policy);
- the HBM neuron cache (budget f of the FULL FFN bytes) keeps neurons used in the
  last ``window`` tokens. Of a token's neurons a fraction ``reuse`` was used by a
  recent token (1 for all-FULL, where every token uses every neuron; ~0.8 for a
  trained predictor per M2Cache). The window's working set is
  ``need * (1 + (1 - reuse) * (window - 1))`` and the hit rate
  ``reuse * min(1, f / working_set)``, or the share of all the policy's records
  the cache can hold if that is more;
- misses come from the DRAM tier, then a CXL tier, in proportion to the share of
  the records outside the HBM cache (of the policy precisions' copies) each holds;
  the rest from the SSD.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from m2cache.codec.format import Precision
from m2cache.errors import InvalidArgument
from m2cache.planner.shapes import ModelShape

ALL_FULL = {"full": 1.0, "int8": 0.0, "int4": 0.0}
DEFAULT_REUSE = 0.8  # M2Cache: ~80% of a token's neurons were cached for the previous one


@dataclass(frozen=True, slots=True)
class Traffic:
    """Bytes per decoded token. ``used``: precision name -> record bytes the token
    computes with; ``hbm``: of those, found in device memory; ``dram``/``cxl``/``ssd``:
    read from those tiers (ssd may exceed the misses when whole layers are preloaded);
    ``dense``: non-FFN weights read by compute; ``dense_streamed``: of those, the
    bytes that cross from DRAM every token (over the device budget)."""

    used: dict
    hbm: float
    dram: float = 0.0
    cxl: float = 0.0
    ssd: float = 0.0
    dense: float = 0.0
    dense_streamed: float = 0.0
    neuron_fraction: float = 1.0
    resident_matrices: bool = False  # FFN resident as fused matrices (dense reference, the dense path): no records
    sequential: bool = False  # lower-tier reads are long contiguous runs (whole layers, all-FULL misses)
    ranked: bool = False  # a predictor ranks every layer's neurons each token (mixed policies)
    through: float = 0.0  # of ``ssd``, bytes read through on a fetch (the rest: whole-layer preloads into DRAM)
    streamed: bool = False  # whole layers read and decoded every token, nothing cached (naive streaming)
    page_cached: float = 0.0  # share of the SSD reads the OS page cache serves (assumed)
    device_bytes: float | None = None  # what the block device delivered for the SSD reads (measured runs)
    source: str = "cache model"
    extra: dict = field(default_factory=dict)

    @property
    def used_bytes(self) -> float:
        return float(sum(self.used.values()))

    @property
    def miss_bytes(self) -> float:
        return max(self.used_bytes - self.hbm, 0.0)

    @property
    def cold_share(self) -> float:
        """SSD bytes that reach the device per SSD byte asked for: measured where known
        (below 1: neighbours in one page, page-cache hits; above: readahead), else from
        ``page_cached``."""
        if self.device_bytes is not None and self.ssd > 0:
            return self.device_bytes / self.ssd
        return 1.0 - self.page_cached

    def split(self, total: float) -> dict:
        """``total`` bytes spread over precisions in proportion to ``used``."""
        u = self.used_bytes
        return {p: total * b / u for p, b in self.used.items()} if u else {}


def _dense_path(result: dict, ratios: dict) -> bool:
    """The dense reference, and m2cache at a budget that holds the model at FULL with no
    policy: the worker's dense path (fused matrices, no records, no ranking)."""
    if result["system"] == "dense-reference":
        return True
    return (result["system"] in ("m2cache-inprocess", "m2cache-stack") and float(result.get("fraction", 0)) >= 1
            and ratios.get("full", 0) >= 1.0)


def ratios_of(policy: dict | None) -> dict:
    """Band ratios {"full", "int8", "int4"} (all FULL when there is no policy)."""
    if not policy:
        return dict(ALL_FULL)
    out = {p: float(policy.get(p, 0.0)) for p in ("full", "int8", "int4")}
    if any(v < 0 for v in out.values()) or sum(out.values()) > 1 + 1e-9:
        raise InvalidArgument(f"band ratios {out} must be >= 0 and sum to <= 1")
    return out


def used_bytes(shape: ModelShape, ratios: dict) -> dict:
    """precision name -> record bytes per token: round(r * F) neurons per layer (ranker/bands.py)."""
    out, edge, prev = {}, 0.0, 0
    for name in ("full", "int8", "int4"):  # cumulative rounding, as BandRatios.counts
        edge += ratios.get(name, 0.0)
        upto = round(edge * shape.d_ffn)
        count = max(upto - prev, 0)
        prev = max(prev, upto)
        if count:
            out[name] = float(shape.num_layers * count * shape.record_bytes(Precision[name.upper()]))
    return out


def policy_copy_bytes(shape: ModelShape, ratios: dict) -> float:
    """Bytes of every neuron at each precision the policy uses (what a lower tier holds)."""
    return float(sum(shape.num_layers * shape.layer_ffn_bytes(Precision[p.upper()])
                     for p, r in ratios.items() if r > 0))


def hit_rate(need: float, fraction: float, reuse: float, window: int) -> float:
    """HBM hit rate of the cache model; ``need``: bytes used per token / FULL FFN bytes."""
    if need <= 0:
        return 1.0
    working_set = need * (1.0 + (1.0 - reuse) * (max(window, 1) - 1))
    return reuse * min(1.0, fraction / working_set)


def cache_model(shape: ModelShape, ratios: dict, hbm_fraction: float, lower: dict, reuse: float | None = None,
                window: int = 4, dense_streamed: float = 0.0) -> Traffic:
    """Traffic of ``shape`` under ``ratios`` with an HBM cache of ``hbm_fraction`` of the FULL
    FFN bytes; ``lower``: tier kind -> bytes of neuron records that tier holds (dram, cxl)."""
    used = used_bytes(shape, ratios)
    total = sum(used.values())
    all_full = ratios.get("full", 0) >= 1.0
    reuse = 1.0 if all_full else (DEFAULT_REUSE if reuse is None else reuse)
    copy = policy_copy_bytes(shape, ratios)
    held = min(hbm_fraction * shape.ffn_bytes, copy)
    # at least the share of all the policy's records the cache can hold, whatever the reuse
    h = max(hit_rate(total / shape.ffn_bytes, hbm_fraction, reuse, window), held / copy if copy else 1.0)
    misses = total * (1.0 - h)
    rest = copy - held
    served, left = {}, 1.0
    for kind in ("dram", "cxl"):  # misses are records outside the HBM cache: share of those each tier holds
        share = min(left, lower.get(kind, 0.0) / rest) if rest > 0 else 0.0
        served[kind] = misses * share
        left -= share
    return Traffic(used=used, hbm=total * h, dram=served["dram"], cxl=served["cxl"], ssd=misses * left,
                   through=misses * left, sequential=all_full, ranked=not all_full,
                   dense=float(shape.dense_bytes), dense_streamed=dense_streamed,
                   neuron_fraction=sum(ratios.values()), source="cache model",
                   extra={"hbm_hit_rate": h, "reuse": reuse, "window": window})


def from_bench(shape: ModelShape, result: dict) -> Traffic:
    """Traffic of one ``m2cache bench`` configuration (an entry of results.json's ``results``):
    its measured bytes per token per tier; the bytes used follow from its policy."""
    if "error" in result:
        raise InvalidArgument(f"bench result {result.get('system')} failed: {result['error']}")
    bpt = result["bytes_per_token"]
    ratios = ratios_of((result.get("info") or {}).get("ratios"))
    used = used_bytes(shape, ratios)
    system = result["system"]
    if system == "naive-streaming":  # every layer read whole at FULL: nothing cached
        used = {"full": float(shape.ffn_bytes)}
    dram, ssd = float(bpt.get("dram", 0.0)), float(bpt.get("ssd", 0.0))
    through = ssd  # in-process: every SSD byte is a miss read on the fetch path
    if system == "m2cache-stack":  # the DramTier serves misses from Redis or reads them through; it also preloads
        h = result.get("dram_hit_rate")
        misses = max(sum(used.values()) - float(bpt.get("hbm", 0.0)), 0.0)
        through = min(ssd, misses - dram if h is None else dram * (1.0 / h - 1.0) if h > 0 else misses)
    return Traffic(used=used, hbm=float(bpt.get("hbm", 0.0)), dram=dram, ssd=ssd, through=max(through, 0.0),
                   dense=float(shape.dense_bytes),
                   neuron_fraction=sum(ratios.values()), resident_matrices=_dense_path(result, ratios),
                   sequential=ratios.get("full", 0) >= 1.0, ranked=ratios.get("full", 0) < 1.0,
                   streamed=system == "naive-streaming", source="m2cache bench",
                   extra={"device_read_bytes": float(result.get("device_read_bytes_per_token", 0.0)),
                          "system": system})
