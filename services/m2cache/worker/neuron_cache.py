"""HBM neuron cache: per layer and precision, a preallocated slot matrix of neuron
records plus a pointer array of neuron ids (LLM in a flash's layout), in the form
the kernels compute from (model/kernels: FULL rows in the checkpoint dtype,
INT8/INT4 rows packed with their scales), so a hit costs no copy and no decode.

- ``records[row]`` holds neuron ``neuron_at[row]``; ``row_of[neuron]`` is its row
  (-1 when absent). Rows are reused in place: a miss is written into a free or
  evicted row; nothing is compacted or reallocated.
- Windowing: a neuron used in the last ``window`` steps is never evicted. When
  the budget cannot hold the window plus the step's new neurons, the surplus is
  computed from the fetched bytes and not cached (results never depend on it).

``NeuronCache.bands(layer, want, step, take)`` is the one per-layer call: look
up, admit the misses (``take`` fetches them), hand back the compute's bands.
No I/O here: the caller's ``take`` does it. The bookkeeping (lookup, admission,
eviction) is two C calls per layer and precision (slots.c beside this file, built
by m2cache/native.py), with the same semantics in torch where it is unavailable.
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from m2cache import native
from m2cache.codec.format import Precision
from m2cache.errors import InvalidArgument
from m2cache.model.ffn import Band

# (precision, sorted miss ids [m]) -> their records uint8 [m, record_bytes] in ids order
Take = Callable[[Precision, torch.Tensor], torch.Tensor]
# (layer, precision, ids [m]) -> records uint8 [m, record_bytes] in ids order
Fill = Callable[[int, Precision, torch.Tensor], torch.Tensor]
_NEVER = -(2**62)


class PrecisionSlots:
    """Slots of one layer at one precision."""

    def __init__(self, num_neurons: int, record_bytes: int, capacity: int, window: int, device: torch.device):
        self.record_bytes = record_bytes
        self.capacity = capacity
        self.window = window
        # zero-filled: touched now, so the fast memory is resident before the first token
        self.records = torch.zeros((capacity, record_bytes), dtype=torch.uint8, device=device)  # [cap, rb]
        self.num_neurons = num_neurons
        tracked = num_neurons if capacity else 0  # a precision without room tracks nothing: every id misses
        self.neuron_at = torch.full((capacity,), -1, dtype=torch.long)  # [cap] neuron in each row
        self.row_of = torch.full((tracked,), -1, dtype=torch.long)  # [N] row of each neuron
        self.last_used = torch.full((tracked,), _NEVER, dtype=torch.long)  # [N] step
        self.num_used = 0
        self.identity = False  # every neuron resident, neuron i in row i (after NeuronCache.fill)

    @property
    def num_bytes(self) -> int:
        return self.num_used * self.record_bytes

    def contains(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [n] long -> bool [n]."""
        if not self.capacity:
            return torch.zeros(ids.shape, dtype=torch.bool)
        return self.row_of[ids] >= 0

    def lookup(self, ids: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step's neurons ``ids`` [n] -> (rows [n], -1 = miss; miss ids [m]; their
        positions in ids [m]). Marks them used at ``step`` (admitting the misses cannot
        evict them)."""
        if not self.capacity:
            return self._all_miss(ids)
        lib = _slots_library()
        if lib is None:
            rows = self.row_of[ids]
            self.last_used[ids] = step
            miss_pos = (rows < 0).nonzero().flatten()
            return rows, ids[miss_pos], miss_pos
        ids = ids.to(torch.long).contiguous()
        n = ids.numel()
        rows, miss = torch.empty(n, dtype=torch.long), torch.empty(2, n, dtype=torch.long)
        out = torch.empty(1, dtype=torch.long)
        lib.m2k_lookup(ids.data_ptr(), n, self.row_of.numel(), self.row_of.data_ptr(), self.last_used.data_ptr(),
                       step, rows.data_ptr(), miss[0].data_ptr(), miss[1].data_ptr(), out.data_ptr())
        m = int(out[0])
        if m < 0:
            raise InvalidArgument(f"neuron id {int(ids[-1 - m])} out of range: layers have {self.num_neurons}")
        return rows, miss[0, :m], miss[1, :m]

    def _all_miss(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < self.num_neurons:
            bad = ids[(ids < 0) | (ids >= self.num_neurons)][0]
            raise InvalidArgument(f"neuron id {int(bad)} out of range: layers have {self.num_neurons}")
        n = ids.numel()
        return torch.full((n,), -1, dtype=torch.long), ids.to(torch.long), torch.arange(n)

    def admit(self, miss_ids: torch.Tensor, miss_pos: torch.Tensor, fetched: torch.Tensor, rows: torch.Tensor,
              step: int) -> torch.Tensor | None:
        """Write as many of the fetched misses (records [m, rb], on the slots' device) as
        the window allows into free or evicted rows, and point ``rows`` (the band's, [n])
        at them. The rest are read from ``fetched``: returns the band's ``which`` [n]
        (1 = row of ``fetched``), or None when every miss was admitted."""
        lib = _slots_library()
        if lib is None:
            return self._admit_torch(miss_ids, miss_pos, fetched, rows, step)
        m = miss_ids.numel()
        which = torch.zeros(rows.numel(), dtype=torch.long)
        work, out = torch.empty(max(self.capacity, 1), dtype=torch.long), torch.empty(2, dtype=torch.long)
        on_cpu = self.records.device.type == "cpu"
        fetched = fetched.contiguous()
        lib.m2k_admit(miss_ids.data_ptr(), miss_pos.contiguous().data_ptr(), m, self.neuron_at.data_ptr(),
                      self.row_of.data_ptr(), self.last_used.data_ptr(), self.capacity, step, self.window,
                      rows.data_ptr(), which.data_ptr(), self.records.data_ptr() if on_cpu else None,
                      fetched.data_ptr() if on_cpu else None, self.record_bytes, work.data_ptr(), out.data_ptr())
        admitted, evicted = int(out[0]), int(out[1])
        self.num_used += admitted - evicted
        if not on_cpu and admitted:
            self.records[work[:admitted].to(self.records.device)] = fetched[:admitted]
        return which if admitted < m else None

    def _admit_torch(self, miss_ids, miss_pos, fetched, rows, step) -> torch.Tensor | None:
        dest = self.reserve(miss_ids, step)  # [m] rows, -1 = no room
        kept = dest >= 0
        if bool(kept.any()):
            self.records[dest[kept].to(self.records.device)] = fetched[kept.to(fetched.device)]
        rows[miss_pos[kept]] = dest[kept]
        surplus = ~kept
        if not bool(surplus.any()):
            return None
        which = torch.zeros(rows.numel(), dtype=torch.long)
        rows[miss_pos[surplus]] = surplus.nonzero().flatten()
        which[miss_pos[surplus]] = 1
        return which

    def reserve(self, ids: torch.Tensor, step: int) -> torch.Tensor:
        """Rows for as many of the uncached ``ids`` [m] as the window allows -> rows [m]
        (-1 for those left uncached, a suffix). The caller writes their records."""
        need = int(ids.numel())
        out = torch.full((need,), -1, dtype=torch.long)
        if need == 0 or self.capacity == 0:
            return out
        free = (self.neuron_at < 0).nonzero().flatten()
        if free.numel() < need:
            free = torch.cat([free, self._evict(need - free.numel(), step)])
        take = min(need, int(free.numel()))
        rows = free[:take]
        self.neuron_at[rows] = ids[:take]
        self.row_of[ids[:take]] = rows
        self.num_used += take
        out[:take] = rows
        return out

    def _evict(self, want: int, step: int) -> torch.Tensor:
        """Free up to ``want`` rows of the least recently used neurons outside the window."""
        used = (self.neuron_at >= 0).nonzero().flatten()
        age = self.last_used[self.neuron_at[used]]
        outside = used[age <= step - self.window]
        if outside.numel() == 0:
            return outside
        victims = outside[torch.argsort(self.last_used[self.neuron_at[outside]], stable=True)[:want]]
        self.row_of[self.neuron_at[victims]] = -1
        self.neuron_at[victims] = -1
        self.num_used -= int(victims.numel())
        return victims


@functools.cache
def _slots_library() -> ctypes.CDLL | None:
    """slots.c (None: no compiler, or M2CACHE_KERNELS=torch)."""
    P, I64 = ctypes.c_void_p, ctypes.c_int64
    return native.load(Path(__file__).with_name("slots.c"), "m2k_abi_version", 2, {
        "m2k_lookup": [P, I64, I64, P, P, I64, P, P, P, P],
        "m2k_admit": [P, P, I64, P, P, P, I64, I64, I64, P, P, P, P, I64, P, P]})


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    bytes_hit: int = 0
    bytes_missed: int = 0


@dataclass
class NeuronCache:
    """All layers' slots. ``capacity[prec]`` rows per layer and precision."""

    num_layers: int
    num_neurons: int
    record_bytes: dict[Precision, int]
    capacity: dict[Precision, int]
    window: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError("window must be >= 1 token")
        self.layers = [
            {p: PrecisionSlots(self.num_neurons, self.record_bytes[p], self.capacity.get(p, 0), self.window,
                               self.device) for p in Precision}
            for _ in range(self.num_layers)
        ]

    @classmethod
    def with_budget(cls, num_layers: int, num_neurons: int, record_bytes: dict[Precision, int],
                    budget_bytes: int, shares: dict[Precision, float], window: int,
                    device: torch.device | str = "cpu") -> "NeuronCache":
        """Split ``budget_bytes`` evenly across layers and by ``shares`` (summing to
        1) across precisions; capacity never exceeds the layer's neuron count. A budget
        that holds every neuron at every precision with a share holds them all."""
        capacity = cls.capacities(num_layers, num_neurons, record_bytes, budget_bytes, shares)
        return cls(num_layers, num_neurons, record_bytes, capacity, window, torch.device(device))

    @staticmethod
    def capacities(num_layers: int, num_neurons: int, record_bytes: dict[Precision, int], budget_bytes: int,
                   shares: dict[Precision, float]) -> dict[Precision, int]:
        """Rows per layer and precision of :meth:`with_budget`'s cache."""
        per_layer = budget_bytes // max(num_layers, 1)
        used = [p for p in Precision if shares.get(p, 0.0) > 0]
        if per_layer >= sum(num_neurons * record_bytes[p] for p in used):
            return {p: num_neurons for p in used}
        total = sum(shares.values()) or 1.0
        return {p: min(num_neurons, int(per_layer * shares.get(p, 0.0) / total) // record_bytes[p]) for p in Precision}

    @property
    def holds_everything(self) -> bool:
        """Every precision with room holds every neuron: after ``fill`` nothing ever misses."""
        caps = [s.capacity for s in self.layers[0].values() if s.capacity] if self.layers else []
        return bool(caps) and all(c == self.num_neurons for c in caps)

    def fill(self, fetch: Fill) -> None:
        """Load every neuron at every precision with room (a cache that holds everything:
        no I/O after this). ``fetch(layer, prec, ids)`` -> records [N, rb]."""
        ids = torch.arange(self.num_neurons)
        for layer, slots in enumerate(self.layers):
            for prec, s in slots.items():
                if s.capacity == self.num_neurons:
                    s.records.copy_(fetch(layer, prec, ids))
                    s.neuron_at.copy_(ids)
                    s.row_of.copy_(ids)
                    s.num_used = self.num_neurons
                    s.identity = True

    def slots(self, layer: int, prec: Precision) -> PrecisionSlots:
        return self.layers[layer][prec]

    @property
    def num_bytes(self) -> int:
        return sum(s.num_bytes for layer in self.layers for s in layer.values())

    @property
    def budget_bytes(self) -> int:
        return sum(s.capacity * s.record_bytes for layer in self.layers for s in layer.values())

    # ---- the per-layer call -------------------------------------------------------------
    def bands(self, layer: int, want: dict[Precision, torch.Tensor], step: int, take: Take) -> list[Band]:
        """want: precision -> sorted neuron ids of this step -> one Band per precision,
        hits read in place, misses fetched once (``take``), admitted where the window allows."""
        return [self._band(layer, Precision(p), ids, step, take) for p, ids in sorted(want.items()) if ids.numel()]

    def _band(self, layer: int, prec: Precision, ids: torch.Tensor, step: int, take: Take) -> Band:
        s = self.layers[layer][prec]
        if s.identity:  # everything resident in id order: a hit is row = id, nothing to track
            self._count(0, int(ids.numel()), s.record_bytes)
            return Band(prec, ids, (s.records,), ids)
        rows, miss_ids, miss_pos = s.lookup(ids, step)
        num_miss = int(miss_ids.numel())
        self._count(num_miss, int(ids.numel()) - num_miss, s.record_bytes)
        if num_miss == 0:
            return Band(prec, ids, (s.records,), rows)
        fetched = take(prec, miss_ids).to(s.records.device)  # [m, rb]
        which = s.admit(miss_ids, miss_pos, fetched, rows, step)  # admitted misses: read from their new rows
        if which is None:
            return Band(prec, ids, (s.records,), rows)
        return Band(prec, ids, (s.records, fetched), rows, which)

    def _count(self, misses: int, hits: int, record_bytes: int) -> None:
        self.stats.hits += hits
        self.stats.misses += misses
        self.stats.bytes_hit += hits * record_bytes
        self.stats.bytes_missed += misses * record_bytes
