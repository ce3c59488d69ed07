"""Resident parts over the device budget: the attention projections of the
layers that do not fit are streamed through the tiers every step, overlapped
with compute (M2Cache loads >= 2 layers ahead of the layer being computed).

``AttentionStreamer`` is the model's attention source (``CausalLM.forward(...,
attention=streamer)``): the layer loop pulls a streamed layer's weights when it
reaches it; each pull starts the fetch ``LOOKAHEAD`` streamed layers further on,
and a step's first pulls were started when the previous step's last layers ran.
The weights are never installed into the model."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

from m2cache.codec.format import Manifest
from m2cache.errors import FailedPrecondition
from m2cache.model.layers import AttentionWeights
from m2cache.model.model import CausalLM

LOOKAHEAD = 2


def plan_resident(manifest: Manifest, model_attention_names: Callable[[int], list[str]], budget_bytes: int,
                  dtype: torch.dtype = torch.float32) -> tuple[list[str], dict[int, list[str]]]:
    """(resident dense names, {streamed layer: its attention tensor names}). Embeddings,
    head and norms always stay; attention layers stay first-come while they fit."""
    def nbytes(name: str) -> int:
        meta = manifest.dense[name]
        return int(torch.Size(meta["shape"]).numel()) * dtype.itemsize

    per_layer = {i: model_attention_names(i) for i in range(manifest.num_layers)}
    attention = {n for names in per_layer.values() for n in names}
    resident = [n for n in manifest.dense if n not in attention]
    used = sum(nbytes(n) for n in resident)
    streamed: dict[int, list[str]] = {}
    for i, names in per_layer.items():
        size = sum(nbytes(n) for n in names)
        if not streamed and used + size <= budget_bytes:
            resident += names
            used += size
        else:
            streamed[i] = names
    if 0 in streamed or used > budget_bytes:
        raise FailedPrecondition(
            f"dense budget {budget_bytes} B cannot hold the embeddings, norms and layer 0's attention ({used} B needed)")
    return resident, streamed


class AttentionStreamer:
    """Fetches streamed layers' attention ahead of use; see module doc."""

    def __init__(self, model: CausalLM, fetch_dense: Callable[[list[str]], dict[str, torch.Tensor]],
                 streamed: dict[int, list[str]]):
        self.model = model
        self.fetch_dense = fetch_dense
        self.order = sorted(streamed)  # streamed layers in the order the loop reaches them
        self.streamed = streamed
        self.bytes = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dense-stream")
        self._pending: dict[int, Future] = {}
        for layer in self.order[:LOOKAHEAD]:
            self._start(layer)

    def _start(self, layer: int) -> None:
        if layer not in self._pending:
            self._pending[layer] = self._pool.submit(self._load, layer)

    def _load(self, layer: int) -> AttentionWeights:
        tensors = self.fetch_dense(self.streamed[layer])
        self.bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        return self.model.attention_weights(layer, tensors)

    def __call__(self, layer: int) -> AttentionWeights:
        """Layer ``layer``'s weights (waits for its fetch); starts the one LOOKAHEAD further
        on (wrapping to the next step's first layers)."""
        k = self.order.index(layer)
        self._start(layer)
        self._start(self.order[(k + LOOKAHEAD) % len(self.order)])
        return self._pending.pop(layer).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
