"""A KV cache of per-sequence slots. Each slot is one row of a preallocated
[num_slots, num_kv_heads, max_len, head_dim] buffer per layer with its own
length, so sequences of different lengths decode together in one batched
forward (the attention mask hides each row's unused tail). Slots are
allocated, freed and reused; nothing is reallocated per token.

``step(slots, T, window)`` plans one forward step once for every layer: the
positions, the mask (None where causality needs none: a lone sequence's decode
token sees its whole history; a prefill from position 0 is plain causal), and
for a lone sequence the slot whose history is read as a view, not gathered.

On CPU the buffers are anonymous mappings: zero, like ``torch.zeros``, but a
page becomes resident only when a position in it is first written, so a worker
sized for the model's whole context holds the memory of the tokens it has seen,
not of its ``max_len`` (8192 positions of SmolLM2 are 377 MB)."""
from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch

from m2cache.errors import InvalidArgument, ResourceExhausted


@dataclass(slots=True)
class Step:
    """What every layer of one forward step shares."""

    slots: torch.Tensor  # [B] long
    positions: torch.Tensor  # [B, T] absolute positions of the new tokens
    key_len: int  # keys visible to the longest row (its length after the step)
    mask: torch.Tensor | None  # bool [B, 1, T, key_len], or None (see is_causal)
    is_causal: bool  # SDPA's own causal mask suffices (prefill from 0, one row)
    slot: int | None  # B == 1: that row's slot (history read as a view)
    start: int  # B == 1: position of the first new token


def lazy_zeros(shape: tuple[int, ...], device: str | torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``torch.zeros(shape)``; on CPU backed by an anonymous mapping whose pages are
    faulted in (and counted in the resident set) only when written."""
    device = torch.device(device)
    numel = math.prod(shape)
    if device.type != "cpu" or numel == 0:
        return torch.zeros(shape, device=device, dtype=dtype)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # a 2 MiB huge page per first write would undo the point
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(buf, dtype=dtype, count=numel).view(shape)  # the tensor keeps buf alive


def causal_mask(positions: torch.Tensor, key_len: int, window: int | None) -> torch.Tensor:
    """positions: [B, T] absolute query positions -> bool [B, 1, T, key_len].

    Key j is visible to a query at position p iff j <= p (and j > p - window).
    This also hides cache rows past a short sequence's length in a mixed batch."""
    keys = torch.arange(key_len, device=positions.device)
    visible = keys[None, None, :] <= positions[:, :, None]
    if window is not None:
        visible &= keys[None, None, :] > positions[:, :, None] - window
    return visible.unsqueeze(1)


class KVCache:
    """k, v: [num_layers, num_slots, num_kv_heads, max_len, head_dim]; lengths: [num_slots]."""

    def __init__(self, num_layers: int, num_slots: int, max_len: int, num_kv_heads: int, head_dim: int,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        shape = (num_layers, num_slots, num_kv_heads, max_len, head_dim)
        self.k = lazy_zeros(shape, device, dtype)
        self.v = lazy_zeros(shape, device, dtype)
        # per (layer, slot) views [Hkv, max_len, D]: a lone row's write and read index nothing per step
        self._rows = [[(self.k[l, s], self.v[l, s]) for s in range(num_slots)] for l in range(num_layers)]
        self.lengths = [0] * num_slots  # host-side: read every step, never a device sync
        self.max_len = max_len
        self.device = torch.device(device)
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first

    @classmethod
    def for_model(cls, config, num_slots: int = 1, max_len: int | None = None,
                  device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "KVCache":
        """A cache shaped for ``config`` (a ModelConfig); max_len defaults to its context length."""
        max_len = max_len or config.max_position_embeddings
        return cls(config.num_layers, num_slots, max_len, config.num_kv_heads, config.head_dim, device, dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    # ---- slot bookkeeping ---------------------------------------------------------
    def allocate(self) -> int:
        """A free slot with length 0."""
        if not self._free:
            raise ResourceExhausted(f"all {self.num_slots} KV cache slots are in use")
        slot = self._free.pop()
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        """Return a slot; its rows are overwritten by the next sequence."""
        if not 0 <= slot < self.num_slots or slot in self._free:
            raise InvalidArgument(f"slot {slot} is not an allocated KV cache slot")
        self.lengths[slot] = 0
        self._free.append(slot)

    def length(self, slot: int) -> int:
        return self.lengths[slot]

    def truncate(self, slot: int, length: int) -> None:
        """Forget positions >= length of a slot (e.g. to re-run a suffix)."""
        if not 0 <= length <= self.length(slot):
            raise InvalidArgument(f"cannot truncate slot {slot} of length {self.length(slot)} to {length}")
        self.lengths[slot] = length

    # ---- used by the model's forward ----------------------------------------------
    def row(self, layer: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A slot's keys and values of one layer: [num_kv_heads, max_len, head_dim] views."""
        return self._rows[layer][slot]

    def step(self, slots: list[int], num_tokens: int, window: int | None) -> Step:
        """Plan a step appending ``num_tokens`` tokens to each row in ``slots``."""
        starts = [self.lengths[s] for s in slots]
        key_len = max(starts) + num_tokens
        if key_len > self.max_len:
            raise ResourceExhausted(f"sequence would exceed the KV cache length {self.max_len}")
        slot_t = torch.tensor(slots, dtype=torch.long, device=self.device)
        positions = torch.tensor(starts, dtype=torch.long, device=self.device)[:, None] + \
            torch.arange(num_tokens, device=self.device)
        lone = len(slots) == 1
        windowed = window is not None and key_len > window
        if lone and not windowed and num_tokens == 1:  # a decode token sees its whole history
            return Step(slot_t, positions, key_len, None, False, slots[0], starts[0])
        if lone and not windowed and starts[0] == 0:  # prefill from scratch: plain causal
            return Step(slot_t, positions, key_len, None, True, slots[0], 0)
        mask = causal_mask(positions, key_len, window)
        return Step(slot_t, positions, key_len, mask, False, slots[0] if lone else None, starts[0])

    def write(self, layer: int, step: Step, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [B, Hkv, T, D] written at the step's rows and positions."""
        if step.slot is not None:
            kr, vr = self._rows[layer][step.slot]
            kr.narrow(1, step.start, k.shape[2]).copy_(k[0])
            vr.narrow(1, step.start, v.shape[2]).copy_(v[0])
            return
        rows = step.slots[:, None]  # [B, 1] broadcasts against positions [B, T]
        self.k[layer].transpose(1, 2)[rows, step.positions] = k.transpose(1, 2).to(self.k.dtype)  # [B, T, Hkv, D]
        self.v[layer].transpose(1, 2)[rows, step.positions] = v.transpose(1, 2).to(self.v.dtype)

    def read(self, layer: int, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the step's rows -> [B, Hkv, key_len, D] (a view for one row)."""
        if step.slot is not None:
            kr, vr = self._rows[layer][step.slot]
            return kr.narrow(1, 0, step.key_len).unsqueeze(0), vr.narrow(1, 0, step.key_len).unsqueeze(0)
        return self.k[layer, step.slots, :, : step.key_len], self.v[layer, step.slots, :, : step.key_len]

    def advance(self, slots: list[int], num_tokens: int) -> None:
        """After a forward step: every row in ``slots`` grew by ``num_tokens``."""
        for s in slots:
            self.lengths[s] += num_tokens
