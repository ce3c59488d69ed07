"""Hardware profiles: memory tiers (capacity, bandwidth into the compute device,
static power), the compute device (peak rate, power), the engine's per-token
overhead on it, and the box's price and embodied carbon.

Shipped profiles are YAML files in ``m2cache/planner/hardware/`` (loaded with
importlib.resources); ``load(name_or_path)`` also takes any YAML file of the same
schema, e.g. one written by ``m2cache plan --measure-profile`` (docs/PLANNING.md).
"""
from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from m2cache.errors import InvalidArgument

GB = 1e9
TIER_KINDS = ("hbm", "dram", "cxl", "ssd")


@dataclass(frozen=True, slots=True)
class Tier:
    """One memory tier. ``bandwidth`` is what the compute device gets from it
    (bytes/s): the tier's own bandwidth or its link's, whichever is lower."""

    name: str
    kind: str  # hbm | dram | cxl | ssd
    capacity_bytes: float
    bandwidth: float  # bytes/s into the compute device
    power_w: float = 0.0  # static power of the tier as installed
    sequential_bandwidth: float = 0.0  # for long contiguous runs (whole layers), when it differs; 0 = bandwidth
    numa_node: int | None = None  # for a CXL expander: the CPU-less NUMA node it appears as
    source: str = ""


@dataclass(frozen=True, slots=True)
class Engine:
    """The engine's cost per decode step beyond bytes / bandwidth: a fixed cost per
    token and per layer, and (measured CPU profiles) seconds per byte of records the
    worker handles, by path. ``overlap``: tier transfers overlap compute (pipelined
    prefetch) when true, else they add up."""

    per_token_s: float = 0.0
    per_layer_s: float = 0.0
    per_byte_s: dict = field(default_factory=dict)  # path -> s/B: "record_full", ..., "miss", "warm_read"
    per_layer_choose_s: float = 0.0  # ranking a layer's neurons (mixed policies)
    overlap: bool = True
    source: str = "assumed"


@dataclass(frozen=True, slots=True)
class HardwareProfile:
    name: str
    description: str
    device: str  # "gpu" | "cpu": where layers compute
    flops: float  # peak FLOP/s at the compute dtype
    efficiency: float  # fraction of peak a batch-1 GEMV/GEMM reaches
    device_active_w: float
    device_idle_w: float
    host_w: float  # CPU, board, fans, NIC while serving (beyond the tiers' own power)
    price_per_hour_usd: float
    price_includes_energy: bool  # rental prices do; an owned box's amortisation does not
    embodied_kgco2: float
    lifetime_years: float
    tiers: tuple[Tier, ...]
    engine: Engine = Engine()
    sources: dict = field(default_factory=dict)
    measured: bool = False

    def __post_init__(self) -> None:
        if self.device not in ("gpu", "cpu"):
            raise InvalidArgument(f"profile {self.name}: device must be gpu or cpu, got {self.device!r}")
        if not self.tiers or self.tiers[0].kind != "hbm":
            raise InvalidArgument(f"profile {self.name}: the first tier must be the compute device's memory (hbm)")
        bad = [t.name for t in self.tiers if t.kind not in TIER_KINDS or t.bandwidth <= 0 or t.capacity_bytes < 0]
        if bad or self.flops <= 0 or not 0 < self.efficiency <= 1 or self.lifetime_years <= 0:
            raise InvalidArgument(f"profile {self.name}: out-of-range figures ({', '.join(bad) or 'compute/cost'})")

    def tier(self, kind: str) -> Tier | None:
        return next((t for t in self.tiers if t.kind == kind), None)

    @property
    def static_w(self) -> float:
        """Power while serving that does not scale with the work: host + tiers."""
        return self.host_w + sum(t.power_w for t in self.tiers)

    @property
    def embodied_g_per_s(self) -> float:
        """Embodied carbon amortised over the box's lifetime, gCO2 per second of use."""
        return self.embodied_kgco2 * 1000.0 / (self.lifetime_years * 365.25 * 24 * 3600)


def _tier(raw: dict, profile: str) -> Tier:
    try:
        bw = min(float(raw[k]) for k in ("bandwidth_gbs", "link_gbs") if k in raw) * GB
        power = float(raw.get("power_w", 0.0)) + float(raw.get("power_w_per_gb", 0.0)) * float(raw["capacity_gb"])
        seq = float(raw.get("sequential_gbs", 0.0)) * GB
        return Tier(name=str(raw.get("name", raw["kind"])), kind=str(raw["kind"]),
                    capacity_bytes=float(raw["capacity_gb"]) * GB, bandwidth=bw, power_w=power, sequential_bandwidth=seq,
                    numa_node=raw.get("numa_node"), source=str(raw.get("source", "")))
    except (KeyError, TypeError, ValueError) as err:
        raise InvalidArgument(f"profile {profile}: tier {raw!r}: {err} (needs kind, capacity_gb, bandwidth_gbs)") from None


def from_dict(raw: dict, where: str = "profile") -> HardwareProfile:
    """A profile from its YAML mapping (schema: docs/PLANNING.md, "Adding a profile")."""
    try:
        name = str(raw["name"])
        compute, power, cost = raw["compute"], raw["power"], raw["cost"]
        eng = raw.get("engine") or {}
        engine = Engine(per_token_s=float(eng.get("per_token_s", 0.0)), per_layer_s=float(eng.get("per_layer_s", 0.0)),
                        per_byte_s={k: float(v) for k, v in (eng.get("per_byte_s") or {}).items()},
                        per_layer_choose_s=float(eng.get("per_layer_choose_s", 0.0)),
                        overlap=bool(eng.get("overlap", True)), source=str(eng.get("source", "assumed")))
        return HardwareProfile(
            name=name, description=str(raw.get("description", "")), device=str(raw["device"]),
            flops=float(compute["flops"]), efficiency=float(compute.get("efficiency", 0.5)),
            device_active_w=float(power["device_active_w"]), device_idle_w=float(power.get("device_idle_w", 0.0)),
            host_w=float(power.get("host_w", 0.0)), price_per_hour_usd=float(cost["price_per_hour_usd"]),
            price_includes_energy=bool(cost.get("includes_energy", True)),
            embodied_kgco2=float(cost["embodied_kgco2"]), lifetime_years=float(cost.get("lifetime_years", 4)),
            tiers=tuple(_tier(t, name) for t in raw["tiers"]), engine=engine,
            sources=dict(raw.get("sources") or {}), measured=bool(raw.get("measured", False)))
    except (KeyError, TypeError, ValueError) as err:
        raise InvalidArgument(f"{where}: bad hardware profile ({type(err).__name__}: {err})") from None


def _shipped():
    return importlib.resources.files("m2cache.planner") / "hardware"


def shipped_names() -> list[str]:
    """Names of the profiles that ship with m2cache."""
    return sorted(p.name[:-5] for p in _shipped().iterdir() if p.name.endswith(".yaml"))


def load(name_or_path: str | Path) -> HardwareProfile:
    """A shipped profile by name, or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise InvalidArgument(f"no hardware profile file {path}")
        return from_dict(yaml.safe_load(path.read_text()), str(path))
    res = _shipped() / f"{name_or_path}.yaml"
    if not res.is_file():
        raise InvalidArgument(f"unknown hardware profile {name_or_path!r}; shipped: {', '.join(shipped_names())}, "
                              "or give a YAML file")
    return from_dict(yaml.safe_load(res.read_text()), f"profile {name_or_path}")


def to_dict(p: HardwareProfile) -> dict:
    """The YAML mapping of a profile (inverse of from_dict, tier power folded into power_w)."""
    return {
        "name": p.name, "description": p.description, "device": p.device, "measured": p.measured,
        "compute": {"flops": p.flops, "efficiency": p.efficiency},
        "power": {"device_active_w": p.device_active_w, "device_idle_w": p.device_idle_w, "host_w": p.host_w},
        "cost": {"price_per_hour_usd": p.price_per_hour_usd, "includes_energy": p.price_includes_energy,
                 "embodied_kgco2": p.embodied_kgco2,
                 "lifetime_years": p.lifetime_years},
        "engine": {"per_token_s": p.engine.per_token_s, "per_layer_s": p.engine.per_layer_s,
                   "per_byte_s": dict(p.engine.per_byte_s), "per_layer_choose_s": p.engine.per_layer_choose_s,
                   "overlap": p.engine.overlap, "source": p.engine.source},
        "tiers": [{"name": t.name, "kind": t.kind, "capacity_gb": t.capacity_bytes / GB, "bandwidth_gbs": t.bandwidth / GB,
                   "power_w": t.power_w, **({"numa_node": t.numa_node} if t.numa_node is not None else {}),
                   **({"sequential_gbs": t.sequential_bandwidth / GB} if t.sequential_bandwidth else {}),
                   "source": t.source} for t in p.tiers],
        "sources": dict(p.sources),
    }
