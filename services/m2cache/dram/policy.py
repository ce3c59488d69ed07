"""M2Cache's layer-aware DRAM policy as a plain object (no Redis, no gRPC).

The unit of residency is a *layer unit* (model, layer, precision) holding any
subset of that layer's neuron records. Two areas share one byte budget:

- fixed area: every unit of the first ``num_pinned_layers`` layers; reserved
  ahead of dynamic units and never evicted;
- dynamic area: whole layers preloaded ``1..preload_ahead`` layers ahead of
  each caller's ``current_layer``, plus read-through records.

Eviction is by *next-use distance*: the number of layer steps until some live
caller next enters the unit's layer (decode wraps from the last layer to the
first). A reservation may only evict units needed strictly later than itself
(farthest first, least recently used among equals), so a read-through of the
layer a lone caller is leaving can never push out the layers it needs next.
The byte accounting never exceeds the budget; the tier writes Redis only
after a successful :meth:`reserve`, deleting the victims in the same round trip.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from m2cache.errors import InvalidArgument


@dataclass(frozen=True, slots=True)
class UnitKey:
    model: str
    layer: int
    prec: int


@dataclass(slots=True)
class Unit:
    key: UnitKey
    record_bytes: int
    pinned: bool
    neuron_ids: set[int] = field(default_factory=set)
    busy: int = 0        # reservations not yet committed: the unit's Redis writes are in flight
    last_used: int = 0   # policy tick of the last hit or write

    @property
    def nbytes(self) -> int:
        return len(self.neuron_ids) * self.record_bytes


@dataclass(frozen=True, slots=True)
class Reservation:
    """Records admitted to ``key`` and the units evicted to make room."""

    key: UnitKey
    neuron_ids: tuple[int, ...]
    evicted: tuple[tuple[UnitKey, tuple[int, ...]], ...]


@dataclass(slots=True)
class _Caller:
    model: str
    layer: int
    seen: float


class LayerAwarePolicy:
    """Decides what lives in the DRAM tier. Thread-safe; all state under one lock."""

    def __init__(self, budget_bytes: int, num_pinned_layers: int, preload_ahead: int,
                 caller_ttl_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        if budget_bytes < 0 or num_pinned_layers < 0 or preload_ahead < 0:
            raise InvalidArgument("budget, pinned layers and preload distance must be >= 0")
        self.budget_bytes = budget_bytes
        self.num_pinned_layers = num_pinned_layers
        self.preload_ahead = preload_ahead
        self.caller_ttl_s = caller_ttl_s
        self.clock = clock
        self.bytes_resident = 0
        self.num_evictions = 0
        self._num_layers: dict[str, int] = {}
        self._units: dict[UnitKey, Unit] = {}
        self._callers: dict[str, _Caller] = {}
        self._tick = 0
        self._lock = threading.Lock()

    # ---- models and callers ------------------------------------------------
    def register_model(self, model: str, num_layers: int) -> None:
        with self._lock:
            self._num_layers[model] = num_layers

    def is_pinned(self, layer: int) -> bool:
        return layer < self.num_pinned_layers

    def observe(self, caller_id: str, model: str, current_layer: int) -> list[int]:
        """Record where ``caller_id`` is; return the dynamic layers it needs
        preloaded: ``current_layer + 1 .. + preload_ahead`` (wrapping), pinned ones left out."""
        with self._lock:
            num_layers = self._num_layers[model]
            self._callers[caller_id] = _Caller(model, current_layer, self.clock())
            ahead = min(self.preload_ahead, num_layers - 1)
            window = [(current_layer + i) % num_layers for i in range(1, ahead + 1)]
            return [layer for layer in window if not self.is_pinned(layer)]

    def caller_layer(self, caller_id: str) -> int | None:
        with self._lock:
            caller = self._callers.get(caller_id)
            return None if caller is None else caller.layer

    def distance(self, key: UnitKey) -> int:
        """Layer steps until a live caller next enters ``key.layer``; the model's
        layer count when no caller is live (a caller in the layer now: a full cycle)."""
        with self._lock:
            return self._distance(key, self._live_layers())

    def _live_layers(self) -> dict[str, list[int]]:
        now = self.clock()
        for cid in [c for c, v in self._callers.items() if now - v.seen > self.caller_ttl_s]:
            del self._callers[cid]
        live: dict[str, list[int]] = {}
        for caller in self._callers.values():
            live.setdefault(caller.model, []).append(caller.layer)
        return live

    def _distance(self, key: UnitKey, live: dict[str, list[int]]) -> int:
        num_layers = self._num_layers.get(key.model, 1)
        layers = live.get(key.model)
        if not layers:
            return num_layers
        return min((key.layer - c - 1) % num_layers + 1 for c in layers)

    # ---- residency -----------------------------------------------------------
    def resident(self, key: UnitKey, neuron_ids: Iterable[int]) -> list[bool]:
        """Which of ``neuron_ids`` the policy believes are in Redis; touches the unit."""
        with self._lock:
            unit = self._units.get(key)
            if unit is None:
                return [False for _ in neuron_ids]
            self._tick += 1
            unit.last_used = self._tick
            return [nid in unit.neuron_ids for nid in neuron_ids]

    def num_resident(self, key: UnitKey) -> int:
        with self._lock:
            unit = self._units.get(key)
            return 0 if unit is None else len(unit.neuron_ids)

    def units(self) -> dict[UnitKey, tuple[int, bool]]:
        """Snapshot: unit -> (resident records, pinned)."""
        with self._lock:
            return {k: (len(u.neuron_ids), u.pinned) for k, u in self._units.items() if u.neuron_ids}

    def reserve(self, key: UnitKey, neuron_ids: Iterable[int], record_bytes: int,
                pinned: bool = False, evict: bool = True) -> Reservation | None:
        """Admit the records of ``neuron_ids`` not yet resident, evicting as the
        rules allow (not at all without ``evict``); None (and nothing evicted)
        when they do not fit."""
        with self._lock:
            unit = self._units.get(key)
            have = unit.neuron_ids if unit is not None else set()
            new_ids = tuple(dict.fromkeys(n for n in neuron_ids if n not in have))
            need = len(new_ids) * record_bytes
            shortfall = need - (self.budget_bytes - self.bytes_resident)
            victims = self._victims(key, shortfall, pinned) if evict or shortfall <= 0 else None
            if victims is None:
                return None
            evicted = tuple((v.key, tuple(v.neuron_ids)) for v in victims)
            for victim in victims:
                self._evict(victim)
            if unit is None:
                unit = self._units[key] = Unit(key, record_bytes, pinned)
            unit.neuron_ids.update(new_ids)
            unit.busy += 1
            self._tick += 1
            unit.last_used = self._tick
            self.bytes_resident += need
            assert self.bytes_resident <= self.budget_bytes, (self.bytes_resident, self.budget_bytes)
            return Reservation(key, new_ids, evicted)

    def can_admit(self, key: UnitKey, num_records: int, record_bytes: int, pinned: bool = False,
                  evict: bool = True) -> bool:
        """Whether :meth:`reserve` of ``num_records`` new records would succeed now (a dry run)."""
        with self._lock:
            shortfall = num_records * record_bytes - (self.budget_bytes - self.bytes_resident)
            if shortfall > 0 and not evict:
                return False
            return self._victims(key, shortfall, pinned) is not None

    def _victims(self, key: UnitKey, shortfall: int, pinned: bool) -> list[Unit] | None:
        if shortfall <= 0:
            return []
        live = self._live_layers()
        mine = self._distance(key, live)
        ranked = []
        for unit in self._units.values():
            if unit.pinned or unit.busy or unit.key == key or not unit.neuron_ids:
                continue
            dist = self._distance(unit.key, live)
            if pinned or dist > mine:
                ranked.append((-dist, unit.last_used, unit))
        ranked.sort(key=lambda t: (t[0], t[1]))
        chosen, freed = [], 0
        for _, _, unit in ranked:
            if freed >= shortfall:
                break
            chosen.append(unit)
            freed += unit.nbytes
        return chosen if freed >= shortfall else None

    def _evict(self, unit: Unit) -> None:
        self.bytes_resident -= unit.nbytes
        self.num_evictions += 1
        del self._units[unit.key]

    def commit(self, reservation: Reservation, ok: bool = True) -> None:
        """The reservation's Redis writes finished; ``ok=False`` takes its records back out."""
        with self._lock:
            unit = self._units.get(reservation.key)
            if unit is None:
                return
            unit.busy -= 1
            if not ok:
                self._forget(unit, reservation.neuron_ids)

    def forget(self, key: UnitKey, neuron_ids: Iterable[int]) -> None:
        """Records found missing from Redis: stop counting them (not while the
        unit's writes are in flight: they may be about to land)."""
        with self._lock:
            unit = self._units.get(key)
            if unit is not None and not unit.busy:
                self._forget(unit, neuron_ids)

    def _forget(self, unit: Unit, neuron_ids: Iterable[int]) -> None:
        for nid in neuron_ids:
            if nid in unit.neuron_ids:
                unit.neuron_ids.discard(nid)
                self.bytes_resident -= unit.record_bytes

    def clear(self) -> None:
        """Redis lost its data (restart): nothing is resident any more."""
        with self._lock:
            self._units.clear()
            self.bytes_resident = 0
