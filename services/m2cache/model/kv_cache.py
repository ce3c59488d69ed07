"""A KV cache of per-sequence slots. Each slot is one row of a preallocated
[num_slots, max_len] buffer per layer with its own length, so sequences of
different lengths decode together in one batched forward (the attention
mask hides each row's unused tail). Slots are allocated, freed and reused."""
from __future__ import annotations

import torch

from m2cache.errors import InvalidArgument, ResourceExhausted


class KVCache:
    """k, v: [num_layers, num_slots, max_len, num_kv_heads, head_dim]; lengths: [num_slots]."""

    def __init__(self, num_layers: int, num_slots: int, max_len: int, num_kv_heads: int, head_dim: int,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        shape = (num_layers, num_slots, max_len, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.max_len = max_len
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first

    @classmethod
    def for_model(cls, config, num_slots: int = 1, max_len: int | None = None,
                  device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "KVCache":
        """A cache shaped for ``config`` (a ModelConfig); max_len defaults to its context length."""
        max_len = max_len or config.max_position_embeddings
        return cls(config.num_layers, num_slots, max_len, config.num_kv_heads, config.head_dim, device, dtype)

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]

    @property
    def num_free(self) -> int:
        return len(self._free)

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
        return int(self.lengths[slot])

    # ---- used by the model's forward ----------------------------------------------
    def positions(self, slots: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """slots: [B] -> absolute positions [B, T] of the next ``num_tokens`` tokens of each row."""
        start = self.lengths[slots]  # [B]
        if int(start.max()) + num_tokens > self.max_len:
            raise ResourceExhausted(f"sequence would exceed the KV cache length {self.max_len}")
        return start[:, None] + torch.arange(num_tokens, device=start.device)

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [B, Hkv, T, D] written at rows ``slots`` [B], positions [B, T]."""
        rows = slots[:, None]  # [B, 1] broadcasts against positions [B, T]
        self.k[layer][rows, positions] = k.transpose(1, 2).to(self.k.dtype)  # [B, T, Hkv, D]
        self.v[layer][rows, positions] = v.transpose(1, 2).to(self.v.dtype)

    def read(self, layer: int, slots: torch.Tensor, key_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``key_len`` positions of rows ``slots`` -> k, v: [B, Hkv, key_len, D]."""
        k = self.k[layer, slots, :key_len].transpose(1, 2)
        v = self.v[layer, slots, :key_len].transpose(1, 2)
        return k, v

    def advance(self, slots: torch.Tensor, num_tokens: int) -> None:
        """After a forward step: every row in ``slots`` grew by ``num_tokens``."""
        self.lengths[slots] += num_tokens

    def truncate(self, slot: int, length: int) -> None:
        """Forget positions >= length of a slot (e.g. to re-run a suffix)."""
        if not 0 <= length <= self.length(slot):
            raise InvalidArgument(f"cannot truncate slot {slot} of length {self.length(slot)} to {length}")
        self.lengths[slot] = length
