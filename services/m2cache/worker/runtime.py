"""Assembles a worker from the tiers: manifest, dense weights and tokenizer come
through the DramTier; FFN neurons come through the HBM neuron cache."""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from m2cache.codec.format import Manifest, Precision
from m2cache.errors import InvalidArgument
from m2cache.local.memory import return_freed_memory, trim_freed_memory
from m2cache.model.config import ModelConfig
from m2cache.model.ffn import DenseFFN
from m2cache.model.model import CausalLM, attention_names
from m2cache.model.weights import compute_dtype
from m2cache.worker.choosers import Choosers
from m2cache.worker.compute import ComputeThread
from m2cache.worker.config import WorkerConfig
from m2cache.worker.dense_stream import AttentionStreamer, plan_resident
from m2cache.worker import energy
from m2cache.worker.engine import Engine, Request, Sequence
from m2cache.worker.fetcher import TierFetcher
from m2cache.worker.neuron_cache import NeuronCache
from m2cache.worker.provider import CachedProvider, DenseProvider
from m2cache_client.pb import worker_pb2

log = logging.getLogger(__name__)


def cache_shares(ratios: dict[str, float] | None, manifest: Manifest) -> dict[Precision, float]:
    """Split the HBM budget across precisions in proportion to the bytes each band
    moves per token (all FULL when there is no policy)."""
    if not ratios:
        return {Precision.FULL: 1.0}
    layout = manifest.layout
    return {p: ratios.get(p.name.lower(), 0.0) * layout.num_bytes(p) for p in Precision}


class WorkerRuntime:
    def __init__(self, config: WorkerConfig, fetcher: TierFetcher, manifest: Manifest,
                 model: CausalLM, tokenizer, choosers: Choosers, streamer: AttentionStreamer | None = None,
                 compute: ComputeThread | None = None, owns_compute: bool = False):
        """``compute``: the thread ``model`` was built on (worker/compute.py), where the cache is
        built and the decode loop runs (closed with the runtime if ``owns_compute``); without one
        the runtime starts its own."""
        self._own_compute = compute is None or owns_compute
        self.compute = compute or ComputeThread()
        try:
            self.compute.call(self._assemble, config, fetcher, manifest, model, tokenizer, choosers, streamer)
        except BaseException:
            if self._own_compute:
                self.compute.close()
            raise

    def _assemble(self, config: WorkerConfig, fetcher: TierFetcher, manifest: Manifest, model: CausalLM, tokenizer,
                  choosers: Choosers, streamer: AttentionStreamer | None) -> None:
        self.config = config
        self.model_name = config.model
        self.fetcher = fetcher
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.choosers = choosers
        self.streamer = streamer
        dense = config.cache_fraction >= 1 and choosers.ratios is None  # budget >= model, every neuron FULL
        self.cache = build_cache(manifest, 0.0 if dense else config.cache_fraction, choosers.ratios,
                                 config.window, config.device)
        if dense:
            self.provider = DenseProvider(dense_layers(manifest, fetcher.neurons, model.dtype, config.device))
        else:
            if self.cache.holds_everything:  # load it all now: no I/O once serving
                self.cache.fill(lambda layer, prec, ids: fetcher.neurons(layer, prec, ids, layer))
            self.provider = CachedProvider(self.cache, manifest.layout, fetcher.neurons, manifest.num_layers,
                                           prefetch=config.prefetches)
        trim_freed_memory()  # the build's staging copies, freed between buffers it keeps (local/memory.py)
        self.engine = Engine(model, self.provider, tokenizer, config.max_batch, config.max_queue,
                             config.queue_timeout_s, config.max_context, attention=streamer, compute=self.compute)
        self.energy = energy.for_engine(self.engine, config.hardware, config.grid_gco2_per_kwh)
        log.info("worker %s: model %s (%d layers, %s), %s, cache budget %.0f%% of FFN (%d MiB), window %d, tiers %s",
                 config.worker_id, config.model, manifest.num_layers, model.dtype,
                 "dense path (budget holds the model)" if dense else f"policy {choosers.ratios or 'all FULL'}",
                 100 * config.cache_fraction, self.cache.budget_bytes >> 20, config.window, config.dram_target)

    @classmethod
    def connect(cls, config: WorkerConfig, choosers: Choosers | None = None) -> "WorkerRuntime":
        """Load the model through the DramTier; ``choosers`` overrides the policy's."""
        fetcher = TierFetcher.from_config(config)
        manifest, policy = fetcher.manifest()
        compute = ComputeThread()  # the model is built where it will be decoded (worker/compute.py)
        try:
            model, streamer = compute.call(_build_model, config, manifest, fetcher)
            tokenizer = _tokenizer(fetcher, manifest)
            choosers = choosers or compute.call(Choosers.build, config, manifest, policy)
        except BaseException:
            compute.close()
            raise
        return cls(config, fetcher, manifest, model, tokenizer, choosers, streamer, compute, owns_compute=True)

    # ---- requests ------------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidArgument("this model has no tokenizer: send prompt_token_ids")
        return list(self.tokenizer.encode(prompt))

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The model's chat template when it has one; else "role: content" lines
        ending with "assistant:" (tiny story models have no template)."""
        if self.tokenizer is None:
            raise InvalidArgument("this model has no tokenizer: send prompt_token_ids")
        return chat_prompt_ids(self.tokenizer, messages)

    def submit(self, request: Request) -> Sequence:
        choose = self.choosers.full if request.full_precision else self.choosers.default
        return self.engine.submit(request, choose)

    def close(self) -> None:
        self.engine.close()
        if self._own_compute:
            self.compute.close()
        if self.streamer is not None:
            self.streamer.close()
        self.fetcher.close()

    # ---- stats -----------------------------------------------------------------------
    def snapshot(self) -> tuple[int, int, int, int]:
        """(HBM hits, misses, bytes hit, bytes fetched) so far, in neurons and bytes; the
        dense path holds every neuron: each step hits all of them."""
        if isinstance(self.provider, DenseProvider):
            steps, m = self.provider.steps, self.manifest
            return steps * m.num_layers * m.d_ffn, 0, steps * self.provider.num_bytes, 0
        c = self.cache.stats
        return c.hits, c.misses, c.bytes_hit, self.provider.stats.bytes_fetched

    def stats_for(self, seq: Sequence, before: tuple[int, int, int, int]) -> worker_pb2.GenerationStats:
        """Stats over the sequence's lifetime (tier bytes are the worker's, shared by a batch)."""
        hits, misses, b_hbm, b_fetch = (a - b for a, b in zip(self.snapshot(), before))
        decode_s = max(seq.finished_at - seq.first_token_at, 1e-9)
        return worker_pb2.GenerationStats(
            prompt_tokens=len(seq.request.prompt_ids), generated_tokens=len(seq.generated),
            ttft_s=seq.first_token_at - seq.submitted,
            tokens_per_s=(len(seq.generated) - 1) / decode_s if len(seq.generated) > 1 else 0.0,
            bytes=worker_pb2.TierBytes(hbm=b_hbm, dram=b_fetch),
            hbm_hit_rate=hits / (hits + misses) if hits + misses else 0.0,
            finish_reason=seq.finish_reason, **self.energy.request_fields(seq),
        )

    def worker_stats(self) -> worker_pb2.WorkerStats:
        hits, misses, b_hbm, b_fetch = self.snapshot()
        total = hits + misses
        resident = self.provider.num_bytes if isinstance(self.provider, DenseProvider) else self.cache.num_bytes
        return worker_pb2.WorkerStats(
            requests=self.engine.requests, active=self.engine.num_active, tokens=self.engine.tokens,
            hbm_hit_rate=hits / total if total else 0.0,
            bytes=worker_pb2.TierBytes(hbm=b_hbm, dram=b_fetch),
            cache_bytes=resident, cache_budget_bytes=max(resident, self.cache.budget_bytes),
        )


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Prompt ids of a chat: the tokenizer's chat template when it has one, else
    "role: content" lines ending with "assistant:" (tiny story models have no template).

    transformers 5 returns a BatchEncoding (a Mapping, not a dict) from
    ``apply_chat_template(tokenize=True)``; asking for the plain text and encoding it
    ourselves gives the same ids on every version."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return list(tokenizer.encode(text))


def build_cache(manifest: Manifest, fraction: float, ratios: dict[str, float] | None, window: int,
                device: str = "cpu") -> NeuronCache:
    """The HBM neuron cache for ``fraction`` of the model's FULL FFN bytes, split across
    the precisions the policy uses (cache_shares)."""
    record_bytes = {p: manifest.layout.num_bytes(p) for p in Precision}
    return NeuronCache(manifest.num_layers, manifest.d_ffn, record_bytes, cache_capacities(manifest, fraction, ratios),
                       window, torch.device(device))


def cache_capacities(manifest: Manifest, fraction: float, ratios: dict[str, float] | None) -> dict[Precision, int]:
    """Rows per layer and precision of ``build_cache``'s cache."""
    layout = manifest.layout
    ffn_bytes = manifest.num_layers * manifest.d_ffn * layout.num_bytes(Precision.FULL)
    return NeuronCache.capacities(manifest.num_layers, manifest.d_ffn, {p: layout.num_bytes(p) for p in Precision},
                                  int(ffn_bytes * fraction), cache_shares(ratios, manifest))


def dense_layers(manifest: Manifest, fetch, dtype: torch.dtype, device: str = "cpu") -> list[DenseFFN]:
    """Every layer's neurons at FULL precision, fetched once and fused (the dense path)."""
    layout, all_ids = manifest.layout, torch.arange(manifest.d_ffn)
    out = []
    for layer in range(manifest.num_layers):
        vectors, bias = layout.decode(fetch(layer, Precision.FULL, all_ids, layer), Precision.FULL)
        out.append(DenseFFN.from_vectors(vectors.to(device), None if bias is None else bias.to(device), dtype))
    return out


def _build_model(config: WorkerConfig, manifest: Manifest,
                 fetcher: TierFetcher) -> tuple[CausalLM, AttentionStreamer | None]:
    """The model with every dense part resident, or, over ``dense_budget_bytes``,
    the first layers resident and the rest's attention streamed."""
    return_freed_memory()  # the staging copies freed while building leave RSS (local/memory.py)
    model_config = ModelConfig.from_hf(manifest.hf_config)
    dtype = compute_dtype(manifest.dtype)
    if not config.dense_budget_bytes:
        return CausalLM(model_config, fetcher.dense(), config.device, dtype), None
    resident, streamed = plan_resident(manifest, lambda i: attention_names(model_config, i, manifest.dense),
                                       config.dense_budget_bytes, dtype)
    model = CausalLM(model_config, fetcher.dense(resident), config.device, dtype, streamed_layers=frozenset(streamed))
    log.info("dense budget %d B: %d layers' attention streamed", config.dense_budget_bytes, len(streamed))
    return model, AttentionStreamer(model, fetcher.dense, streamed) if streamed else None


def _tokenizer(fetcher: TierFetcher, manifest: Manifest):
    names = list(manifest.files)
    if not any(n in manifest.files for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    import transformers

    with tempfile.TemporaryDirectory(prefix="m2cache-tok-") as tmp:
        for name in names:
            Path(tmp, name).write_bytes(fetcher.file(name))
        return transformers.AutoTokenizer.from_pretrained(tmp, local_files_only=True)
