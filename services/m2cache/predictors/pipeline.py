"""End-to-end jobs on a store, shared by the CLI commands and the Ranker service:
train predictors from calibration text; search the band ratios."""
from __future__ import annotations

import hashlib
import logging
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from m2cache.store.reader import NeuronStore
from m2cache.errors import FailedPrecondition, InvalidArgument
from m2cache.local.loader import load_model
from m2cache.model.providers import ChoiceProvider, FullProvider
from m2cache.predictors import storage
from m2cache.predictors.collect import DEFAULT_SEQ_LEN, collect_ffn_inputs, full_weights, tokenize
from m2cache.predictors.evaluate import stepwise_score
from m2cache.predictors import budget as budget_mod
from m2cache.predictors.budget import DEFAULT_COST
from m2cache.predictors.checkpoint import TrainCheckpoint, fingerprint
from m2cache.predictors.predictor import Predictor, parse_ranks
from m2cache.predictors.ranking import Ranker
from m2cache.predictors.churn import DEFAULT_WINDOW, MissCounter
from m2cache.predictors.search import DEFAULT_MAX_MISS, candidates, policy_record, search
from m2cache.predictors.train import TrainConfig, steps_per_layer, train_layer

log = logging.getLogger(__name__)

# progress(stage, step, total, loss)
Progress = Callable[[str, int, int, float], None]

DEFAULT_TRAIN_TOKENS = 16384
DEFAULT_SEARCH_TOKENS = 1024
DEFAULT_EPOCHS = 2


@dataclass(frozen=True, slots=True)
class TrainJob:
    text: str
    rank: str | int | None = None  # "R" or "R0,R1,..."; None: the largest that fits ``cost`` (bits for qcopy)
    max_tokens: int = DEFAULT_TRAIN_TOKENS
    epochs: int = DEFAULT_EPOCHS
    device: str = "cpu"
    source: str = ""  # where the text came from (provenance only)
    kind: str = "auto"  # a kind of kinds/ or "auto" (the measured best that fits ``cost``)
    cost: float = DEFAULT_COST  # predictor bytes per token / the layer's FFN bytes
    ahead_cost: float = 0.0  # > 0: also train look-ahead scorers (layer l+1 from layer l's input) of this cost
    resume: bool = True  # continue an interrupted run of the same job (checkpoint.py)

    def __post_init__(self):
        if not 0 < self.cost <= 1 or not 0 <= self.ahead_cost <= 1:
            raise InvalidArgument(f"--cost {self.cost} must be in (0, 1] and --ahead-cost {self.ahead_cost} in [0, 1]")


@dataclass(frozen=True, slots=True)
class TrainPlan:
    """What a job trains on a given store: kind and rank per layer, and the look-ahead scorers'."""

    kind: str
    ranks: list[int]
    ahead_kind: str | None
    ahead_rank: int

    @classmethod
    def for_job(cls, job: TrainJob, m, layout) -> "TrainPlan":
        budget = budget_mod.ffn_bytes(layout, m.d_ffn)
        kind = job.kind
        if job.rank and kind == "auto":  # an explicit rank asks for a low-rank kind
            kind = "fc1" if m.ffn_kind == "relu" else "gateup"
        kind, rank = budget_mod.choose_kind(kind, m.ffn_kind, m.d_model, m.d_ffn, job.cost * budget)
        ranks = parse_ranks(job.rank, m.num_layers, m.d_model, m.d_ffn) if job.rank else [rank] * m.num_layers
        ahead_kind, ahead_rank = None, 0
        if job.ahead_cost and m.num_layers > 1:
            ahead_kind = {"mlp": "mlp", "lowrank": "lowrank"}.get(kind, "fc1" if m.ffn_kind == "relu" else "gateup")
            # (a gate or qcopy copy needs layer l+1's own input: its look-ahead is low-rank gate + up)
            ahead_kind, ahead_rank = budget_mod.choose_kind(ahead_kind, m.ffn_kind, m.d_model, m.d_ffn,
                                                            job.ahead_cost * budget)
        return cls(kind, ranks, ahead_kind, ahead_rank)

    def parts(self, num_layers: int) -> list[tuple[str, int]]:
        """("layer", i) for every layer, then ("ahead", i) for i >= 1 if look-ahead is on."""
        out = [("layer", i) for i in range(num_layers)]
        return out + ([("ahead", i) for i in range(1, num_layers)] if self.ahead_kind else [])


@dataclass(frozen=True, slots=True)
class SearchJob:
    text: str
    budget: float
    step: float = 0.1
    objective: str = "ppl"
    max_tokens: int = DEFAULT_SEARCH_TOKENS
    device: str = "cpu"
    source: str = ""
    max_miss: float | None = DEFAULT_MAX_MISS  # None: no cap (the lowest score wins)
    window: int = DEFAULT_WINDOW  # the workers' cache window the misses are counted with


def check_device(device: str) -> str:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FailedPrecondition(f"device {device!r}: CUDA is not available on this machine")
    return device


@contextmanager
def open_store(store_dir):
    """The store, closed on exit (before any write: py-lmdb allows one handle per process)."""
    store = NeuronStore(store_dir)
    try:
        yield store
    finally:
        store.close()


def run_training(store_dir, job: TrainJob, progress: Progress | None = None) -> int:
    """Collect FFN inputs, train one predictor per layer (and the look-ahead
    scorers), save it; returns the new version. Every finished layer is
    checkpointed beside the store, so re-running an interrupted job continues."""
    device = check_device(job.device)
    with open_store(store_dir) as store:
        m, layout = store.manifest, store.layout
        plan = TrainPlan.for_job(job, m, layout)
        key = fingerprint(text=hashlib.sha256(job.text.encode()).hexdigest(), plan=asdict(plan), tokens=job.max_tokens,
                          epochs=job.epochs, manifest=m.to_json().decode())
        ckpt = TrainCheckpoint(store_dir, key)
        if not job.resume:
            ckpt.parts.clear()
        model, tokenizer, bank = load_model(store, device)
        seqs = _sequences(store, tokenizer, job.text, job.max_tokens, model)
        inputs = None
        if any(not ckpt.done(_part_name(p)) for p in plan.parts(m.num_layers)):
            inputs = collect_ffn_inputs(model, FullProvider(bank), seqs,
                                        progress and (lambda i, n: progress("collect", i, n, 0.0)))
        predictor = train_on_inputs(inputs, bank, m, layout, job, progress, ckpt)
        predictor.meta["tokens"] = sum(s.numel() for s in seqs)
    if progress:
        progress("save", 0, 1, 0.0)
    version = storage.save_predictor(store_dir, predictor, predictor.meta)
    ckpt.remove()
    log.info("saved predictor v%d (%s, ranks %s) to %s", version, plan.kind, plan.ranks, store_dir)
    return version


def train_on_inputs(inputs: list[torch.Tensor] | None, bank, m, layout, job: TrainJob, progress: Progress | None = None,
                    ckpt: TrainCheckpoint | None = None) -> Predictor:
    """The job's predictor from recorded FFN inputs (inputs[l]: [N, d]); parts
    already in ``ckpt`` are reused, new ones added to it as they finish."""
    plan = TrainPlan.for_job(job, m, layout)
    config = TrainConfig(kind=plan.kind, epochs=job.epochs, device=check_device(job.device))
    parts, losses = (ckpt.parts, ckpt.losses) if ckpt is not None else ({}, {})
    todo = [p for p in plan.parts(m.num_layers) if _part_name(p) not in parts]
    total = len(todo) * steps_per_layer(inputs[0].shape[0], config) if todo else 0
    done = 0

    def on_step(loss: float) -> None:
        nonlocal done
        done += 1
        if progress:
            progress("train", done, total, loss)

    for prefix, layer in todo:
        vectors, bias = full_weights(bank, layer)
        if prefix == "layer":
            pred, loss = train_layer(inputs[layer], vectors, bias, m.ffn_kind, plan.ranks[layer], config, on_step)
        else:
            pred, loss = train_layer(inputs[layer - 1], vectors, bias, m.ffn_kind, plan.ahead_rank, config, on_step,
                                     x_target=inputs[layer], kind=plan.ahead_kind)
        if ckpt is not None:
            ckpt.add(_part_name((prefix, layer)), pred.tensors(), loss)
        else:
            parts[_part_name((prefix, layer))], losses[_part_name((prefix, layer))] = pred.tensors(), loss
    predictor = Predictor.from_tensors({f"{name}.{k}": t for name, part in parts.items() for k, t in part.items()})
    predictor.meta = {
        "kind": plan.kind, "ahead_kind": plan.ahead_kind, "loss": "per-kind (train.py)",
        "tokens": int(inputs[0].shape[0]) if inputs else None,
        "final_loss": [losses[f"layer.{i}"] for i in range(m.num_layers)], "epochs": job.epochs,
        "cost_target": job.cost, "ahead_cost_target": job.ahead_cost, "text": job.source,
        "cost": predictor.cost(budget_mod.ffn_bytes(layout, m.d_ffn), budget_mod.ffn_flops(m.d_model, m.d_ffn, m.ffn_kind)),
    }
    return predictor


def _part_name(part: tuple[str, int]) -> str:
    return f"{part[0]}.{part[1]}"


def run_search(store_dir, job: SearchJob, progress: Callable[[int, int, float], None] | None = None) -> dict:
    """Algorithm 1 over the store's newest predictor; saves and returns the policy."""
    device = check_device(job.device)
    with open_store(store_dir) as store:
        ranker = Ranker(storage.load_predictor(store).to(device))
        model, tokenizer, bank = load_model(store, device)
        seqs = _sequences(store, tokenizer, job.text, job.max_tokens, model)
        layout, m = store.layout, store.manifest
        cands = candidates(job.budget, layout, m.d_ffn, job.step)

        def score(ratios):
            misses = MissCounter(m, job.budget, ratios.to_dict(), job.window)
            s = stepwise_score(model, seqs, ChoiceProvider(bank, misses.wrap(ranker.choose(ratios))))
            return s, misses.miss_fraction

        best, scored = search(score, cands, job.objective, progress, job.max_miss)
    policy = policy_record(best, job.budget, job.objective, ranker.predictor.version, layout,
                           sum(s.numel() for s in seqs), len(cands), job.source, job.max_miss, scored)
    storage.save_policy(store_dir, policy)
    return policy


def sequences(store, tokenizer, text: str, max_tokens: int, model) -> list[torch.Tensor]:
    """Text -> token sequences the way every job here cuts them."""
    return _sequences(store, tokenizer, text, max_tokens, model)


def _sequences(store, tokenizer, text: str, max_tokens: int, model) -> list[torch.Tensor]:
    if tokenizer is None:
        raise FailedPrecondition(f"{store.path} holds no tokenizer files; cannot tokenize calibration text")
    seq_len = min(DEFAULT_SEQ_LEN, model.config.max_position_embeddings)
    return tokenize(tokenizer, text, seq_len, max_tokens, model.config.bos_token_id)
