"""HBM neuron cache: per layer and precision, a preallocated slot matrix of raw
neuron records plus a pointer array of neuron ids (LLM in a flash's layout).

- Rows ``[0, num_used)`` of ``slots`` are live; ``slot_ids[row]`` is the neuron in
  that row and ``where[neuron]`` its row (-1 when absent).
- Leaving rows are overwritten by the last live rows (no reallocation, no
  compaction of the whole matrix); new rows are appended.
- Windowing: a neuron used in the last ``window`` steps is never evicted. When
  the budget cannot hold the window plus the step's new neurons, the surplus is
  computed from the fetched bytes and not cached (results never depend on it).

Records stay in their stored form (INT8/INT4 stay packed); they are decoded
when a layer computes. No I/O here: the caller fetches misses.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from m2cache.codec.format import Precision


class PrecisionSlots:
    """Slots of one layer at one precision."""

    def __init__(self, num_neurons: int, record_bytes: int, capacity: int, window: int, device: torch.device):
        self.record_bytes = record_bytes
        self.capacity = capacity
        self.window = window
        self.slots = torch.empty((capacity, record_bytes), dtype=torch.uint8, device=device)  # [cap, rb]
        self.slot_ids = torch.full((capacity,), -1, dtype=torch.long)  # [cap] neuron per row
        self.where = torch.full((num_neurons,), -1, dtype=torch.long)  # [N] row per neuron
        self.last_used = torch.full((num_neurons,), -(2**62), dtype=torch.long)  # [N] step
        self.num_used = 0

    @property
    def num_bytes(self) -> int:
        return self.num_used * self.record_bytes

    def contains(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [n] long -> bool [n]."""
        return self.where[ids] >= 0

    def touch(self, ids: torch.Tensor, step: int) -> None:
        self.last_used[ids] = step

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """Records of cached ``ids`` [n] -> uint8 [n, rb] (on the cache device)."""
        rows = self.where[ids]
        assert bool((rows >= 0).all()), "gather of a neuron that is not cached"
        return self.slots[rows.to(self.slots.device)]

    def admit(self, ids: torch.Tensor, records: torch.Tensor, step: int) -> int:
        """Cache as many of ``ids`` [m] (records [m, rb]) as the window allows.
        Returns how many were admitted (a prefix of ``ids``)."""
        free = self.capacity - self.num_used
        need = int(ids.numel())
        if need > free:
            free += self._evict(need - free, step)
        take = min(need, free)
        if take:
            rows = torch.arange(self.num_used, self.num_used + take)
            self.slots[rows.to(self.slots.device)] = records[:take].to(self.slots.device, non_blocking=True)
            self.slot_ids[rows] = ids[:take]
            self.where[ids[:take]] = rows
            self.num_used += take
        return take

    def _evict(self, want: int, step: int) -> int:
        """Evict up to ``want`` least recently used neurons outside the window."""
        live = self.slot_ids[: self.num_used]
        age = self.last_used[live]
        outside = (age <= step - self.window).nonzero().flatten()  # rows evictable
        if outside.numel() == 0:
            return 0
        order = torch.argsort(age[outside])[:want]
        victims = outside[order]  # rows to drop
        self._drop_rows(victims)
        return int(victims.numel())

    def _drop_rows(self, rows: torch.Tensor) -> None:
        """Overwrite dropped rows with the last live rows; shrink num_used."""
        n_new = self.num_used - int(rows.numel())
        self.where[self.slot_ids[rows]] = -1
        dropped = torch.zeros(self.num_used, dtype=torch.bool)
        dropped[rows] = True
        holes = rows[rows < n_new]  # dropped rows that stay inside the live range
        tail = torch.arange(n_new, self.num_used)
        movers = tail[~dropped[n_new:]]  # live rows beyond the new end
        if holes.numel():
            dev = self.slots.device
            self.slots[holes.to(dev)] = self.slots[movers.to(dev)]
            moved_ids = self.slot_ids[movers]
            self.slot_ids[holes] = moved_ids
            self.where[moved_ids] = holes
        self.slot_ids[n_new : self.num_used] = -1
        self.num_used = n_new


@dataclass
class NeuronCache:
    """All layers' slots. ``capacity[prec]`` rows per layer and precision."""

    num_layers: int
    num_neurons: int
    record_bytes: dict[Precision, int]
    capacity: dict[Precision, int]
    window: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError("window must be >= 1 token")
        self.layers = [
            {p: PrecisionSlots(self.num_neurons, self.record_bytes[p], self.capacity[p], self.window, self.device)
             for p in Precision}
            for _ in range(self.num_layers)
        ]

    @classmethod
    def with_budget(cls, num_layers: int, num_neurons: int, record_bytes: dict[Precision, int],
                    budget_bytes: int, shares: dict[Precision, float], window: int,
                    device: torch.device | str = "cpu") -> "NeuronCache":
        """Split ``budget_bytes`` evenly across layers and by ``shares`` (summing to
        1) across precisions; capacity never exceeds the layer's neuron count."""
        per_layer = budget_bytes // max(num_layers, 1)
        total = sum(shares.values()) or 1.0
        capacity = {
            p: min(num_neurons, int(per_layer * shares.get(p, 0.0) / total) // record_bytes[p]) for p in Precision
        }
        return cls(num_layers, num_neurons, record_bytes, capacity, window, torch.device(device))

    def slots(self, layer: int, prec: Precision) -> PrecisionSlots:
        return self.layers[layer][prec]

    @property
    def num_bytes(self) -> int:
        return sum(s.num_bytes for layer in self.layers for s in layer.values())

    @property
    def budget_bytes(self) -> int:
        return sum(s.capacity * s.record_bytes for layer in self.layers for s in layer.values())
