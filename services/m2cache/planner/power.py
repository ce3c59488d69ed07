"""What a token costs: energy, carbon and money from a profile's power model.

Pure arithmetic, shared by the planner (predicted seconds per token) and the
worker's live accounting (measured or modelled joules, m2cache/worker/energy.py).

- Power while serving = the compute device at its active power + the host +
  every tier's static power (DRAM 26 W per 256 GB, 2 W per SSD: M2Cache's model).
- Carbon = operational (kWh x grid intensity, 820 gCO2/kWh by default, M2Cache's
  figure) + embodied (the box's manufacturing carbon spread over its lifetime).
- Money = the box's price per hour (+ the energy bill where the price excludes it).
"""
from __future__ import annotations

from dataclasses import dataclass

from m2cache.errors import InvalidArgument
from m2cache.planner.profiles import HardwareProfile

J_PER_KWH = 3.6e6
DEFAULT_GRID_GCO2_PER_KWH = 820.0  # M2Cache's carbon model
DEFAULT_USD_PER_KWH = 0.15  # only for profiles whose price excludes energy (owned boxes)


@dataclass(frozen=True, slots=True)
class Tariff:
    """The grid a box runs on."""

    grid_gco2_per_kwh: float = DEFAULT_GRID_GCO2_PER_KWH
    usd_per_kwh: float = DEFAULT_USD_PER_KWH

    def __post_init__(self) -> None:
        if self.grid_gco2_per_kwh < 0 or self.usd_per_kwh < 0:
            raise InvalidArgument("grid intensity and energy price must be >= 0")


def serving_power_w(profile: HardwareProfile) -> float:
    """Watts while decoding: device active + host + tiers' static power."""
    return profile.device_active_w + profile.static_w


def idle_power_w(profile: HardwareProfile) -> float:
    return profile.device_idle_w + profile.static_w


def carbon_g(profile: HardwareProfile, joules: float, seconds: float, tariff: Tariff) -> float:
    """Operational + embodied gCO2 of ``joules`` spent over ``seconds`` of the box's time."""
    return joules / J_PER_KWH * tariff.grid_gco2_per_kwh + profile.embodied_g_per_s * seconds


def cost_usd(profile: HardwareProfile, joules: float, seconds: float, tariff: Tariff) -> float:
    """The box's price for ``seconds``, plus the energy bill where its price excludes energy."""
    energy = 0.0 if profile.price_includes_energy else joules / J_PER_KWH * tariff.usd_per_kwh
    return profile.price_per_hour_usd * seconds / 3600.0 + energy


@dataclass(frozen=True, slots=True)
class TokenCost:
    tok_s: float
    power_w: float
    joules_per_token: float
    tok_per_joule: float
    gco2_per_token: float
    usd_per_token: float
    tok_per_dollar: float


def token_cost(profile: HardwareProfile, seconds_per_token: float, tariff: Tariff = Tariff()) -> TokenCost:
    """Costs of one decoded token at batch 1 taking ``seconds_per_token`` on the whole box."""
    if seconds_per_token <= 0:
        raise InvalidArgument("seconds per token must be > 0")
    watts = serving_power_w(profile)
    joules = watts * seconds_per_token
    usd = cost_usd(profile, joules, seconds_per_token, tariff)
    return TokenCost(tok_s=1.0 / seconds_per_token, power_w=watts, joules_per_token=joules,
                     tok_per_joule=1.0 / joules, gco2_per_token=carbon_g(profile, joules, seconds_per_token, tariff),
                     usd_per_token=usd, tok_per_dollar=1.0 / usd if usd > 0 else float("inf"))
