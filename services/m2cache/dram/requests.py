"""What the DRAM tier (dram/tier.py) is asked and answers, as plain data: the service
(dram/server.py) maps its protos to and from these."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


@dataclass(frozen=True, slots=True)
class FetchRequest:
    model: str
    layer: int
    precision: int
    neuron_ids: Sequence[int]
    all_neurons: bool = False
    current_layer: int = 0
    caller_id: str = ""


@dataclass(frozen=True, slots=True)
class Batch:
    neuron_ids: list[int]
    record_bytes: int
    payload: bytes
    crc32: list[int]
    codec: str = "dense"
    record_lengths: list[int] = field(default_factory=list)  # codec "bitmap": stored length per record


@dataclass(frozen=True, slots=True)
class LayerUse:
    layer: int
    precision: int
    used_ids: Sequence[int]
    missed_ids: Sequence[int]
