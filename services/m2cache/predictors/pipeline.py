"""End-to-end jobs on a store, shared by the CLI commands and the Ranker service:
train predictors from calibration text; search the band ratios."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from m2cache.store.reader import NeuronStore
from m2cache.errors import FailedPrecondition
from m2cache.model.loader import load_model
from m2cache.model.providers import ChoiceProvider, FullProvider
from m2cache.predictors import storage
from m2cache.predictors.collect import DEFAULT_SEQ_LEN, collect_ffn_inputs, full_weights, tokenize
from m2cache.predictors.evaluate import stepwise_score
from m2cache.predictors.predictor import parse_ranks
from m2cache.predictors.ranking import Ranker
from m2cache.predictors.search import candidates, policy_record, search
from m2cache.predictors.train import TrainConfig, train_predictor

log = logging.getLogger(__name__)

# progress(stage, step, total, loss)
Progress = Callable[[str, int, int, float], None]

DEFAULT_TRAIN_TOKENS = 16384
DEFAULT_SEARCH_TOKENS = 1024
DEFAULT_EPOCHS = 4


@dataclass(frozen=True, slots=True)
class TrainJob:
    text: str
    rank: str | int | None = None  # "R" or "R0,R1,..."; None: default per layer
    max_tokens: int = DEFAULT_TRAIN_TOKENS
    epochs: int = DEFAULT_EPOCHS
    device: str = "cpu"
    source: str = ""  # where the text came from (provenance only)


@dataclass(frozen=True, slots=True)
class SearchJob:
    text: str
    budget: float
    step: float = 0.1
    objective: str = "ppl"
    max_tokens: int = DEFAULT_SEARCH_TOKENS
    device: str = "cpu"
    source: str = ""


def check_device(device: str) -> str:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FailedPrecondition(f"device {device!r}: CUDA is not available on this machine")
    return device


@contextmanager
def _loaded(store_dir):
    """The store, closed on exit (before any write: py-lmdb allows one handle per process)."""
    store = NeuronStore(store_dir)
    try:
        yield store
    finally:
        store.close()


def run_training(store_dir, job: TrainJob, progress: Progress | None = None) -> int:
    """Collect FFN inputs, train one predictor per layer, save it; returns the new version."""
    device = check_device(job.device)
    with _loaded(store_dir) as store:
        model, tokenizer, bank = load_model(store, device)
        seqs = _sequences(store, tokenizer, job.text, job.max_tokens, model)
        inputs = collect_ffn_inputs(model, FullProvider(bank), seqs,
                                    progress and (lambda i, n: progress("collect", i, n, 0.0)))
        m = store.manifest
        ranks = parse_ranks(job.rank, m.num_layers, m.d_model, m.d_ffn)
        config = TrainConfig(epochs=job.epochs, device=device)
        predictor = train_predictor(inputs, lambda l: full_weights(bank, l), m.ffn_kind, ranks, config, progress)
    if progress:
        progress("save", 0, 1, 0.0)
    version = storage.save_predictor(store_dir, predictor, {**predictor.meta, "text": job.source})
    log.info("saved predictor v%d (ranks %s) to %s", version, ranks, store_dir)
    return version


def run_search(store_dir, job: SearchJob, progress: Callable[[int, int, float], None] | None = None) -> dict:
    """Algorithm 1 over the store's newest predictor; saves and returns the policy."""
    device = check_device(job.device)
    with _loaded(store_dir) as store:
        ranker = Ranker(storage.load_predictor(store).to(device))
        model, tokenizer, bank = load_model(store, device)
        seqs = _sequences(store, tokenizer, job.text, job.max_tokens, model)
        layout, m = store.layout, store.manifest
        cands = candidates(job.budget, layout, m.d_ffn, job.step)

        def score(ratios):
            return stepwise_score(model, seqs, ChoiceProvider(bank, ranker.choose(ratios)))

        best, _ = search(score, cands, job.objective, progress)
    policy = policy_record(best, job.budget, job.objective, ranker.predictor.version, layout,
                           sum(s.numel() for s in seqs), len(cands), job.source)
    storage.save_policy(store_dir, policy)
    return policy


def _sequences(store, tokenizer, text: str, max_tokens: int, model) -> list[torch.Tensor]:
    if tokenizer is None:
        raise FailedPrecondition(f"{store.path} holds no tokenizer files; cannot tokenize calibration text")
    seq_len = min(DEFAULT_SEQ_LEN, model.config.max_position_embeddings)
    return tokenize(tokenizer, text, seq_len, max_tokens, model.config.bos_token_id)
