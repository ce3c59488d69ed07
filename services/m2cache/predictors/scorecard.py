"""``m2cache eval``: the figures a user checks before trusting a store's
predictor and policy, on any text: perplexity of the dense model, of the
oracle's choice (true activations) and of the predictor's choice at the
store's policy (the same band ratios), decoded token by token; the
predictor's top-k recall per layer and its look-ahead recall; its cost."""
from __future__ import annotations

from dataclasses import dataclass

from m2cache.errors import FailedPrecondition
from m2cache.local.loader import load_model
from m2cache.model.providers import ChoiceProvider, FullProvider
from m2cache.predictors import budget as budget_mod
from m2cache.predictors import storage
from m2cache.predictors.bands import BandRatios
from m2cache.predictors.collect import collect_ffn_inputs, full_weights
from m2cache.predictors.evaluate import stepwise_score
from m2cache.predictors.pipeline import check_device, open_store, sequences
from m2cache.predictors.quality import ahead_recalls, layer_recalls
from m2cache.predictors.ranking import Ranker, oracle_choose

FRACS = (0.1, 0.25, 0.5)
DEFAULT_EVAL_TOKENS = 512
DEFAULT_RECALL_TOKENS = 2048


@dataclass(frozen=True, slots=True)
class EvalJob:
    text: str
    budget: float | None = None  # None: the store's default policy
    max_tokens: int = DEFAULT_EVAL_TOKENS  # perplexity tokens (decoded one by one)
    recall_tokens: int = DEFAULT_RECALL_TOKENS
    device: str = "cpu"
    source: str = ""


def run_eval(store_dir, job: EvalJob) -> dict:
    """The scorecard as a JSON-ready dict (keys documented in commands/eval.py)."""
    device = check_device(job.device)
    policy = storage.load_policy(store_dir, job.budget)
    if policy is None:
        what = f"no policy for budget {job.budget:g}" if job.budget is not None else "no policy"
        raise FailedPrecondition(f"{store_dir} has {what}; run `m2cache search-policy {store_dir} --text FILE "
                                 f"--budget {job.budget if job.budget is not None else 'B'}` first")
    ratios = BandRatios.from_dict(policy["ratios"])
    with open_store(store_dir) as store:
        predictor = storage.load_predictor(store).to(device)
        model, tokenizer, bank = load_model(store, device)
        m, layout = store.manifest, store.layout
        ppl_seqs = sequences(store, tokenizer, job.text, job.max_tokens, model)
        rec_seqs = sequences(store, tokenizer, job.text, job.recall_tokens, model)
        inputs = collect_ffn_inputs(model, FullProvider(bank), rec_seqs)
        weights = lambda layer: full_weights(bank, layer)  # noqa: E731
        rec = layer_recalls(inputs, weights, m.ffn_kind, {"predictor": lambda l, x, mags: predictor.scores(l, x)}, FRACS)
        ahead = ahead_recalls(inputs, weights, m.ffn_kind, predictor, FRACS) if m.num_layers > 1 else []
        ranker = Ranker(predictor, ratios)

        def ppl(provider) -> float:
            return stepwise_score(model, ppl_seqs, provider).perplexity

        dense = ppl(FullProvider(bank))
        oracle = ppl(ChoiceProvider(bank, oracle_choose(bank, m.ffn_kind, ratios)))
        pred = ppl(ChoiceProvider(bank, ranker.choose()))
    per_layer = rec["predictor"]
    cost = predictor.cost(budget_mod.ffn_bytes(layout, m.d_ffn), budget_mod.ffn_flops(m.d_model, m.d_ffn, m.ffn_kind))
    return {
        "ppl_dense": dense, "ppl_oracle": oracle, "ppl_predictor": pred,
        "ppl_predictor_vs_oracle": pred / oracle - 1.0,
        "recall_top10": _mean(per_layer, 0), "recall_top25": _mean(per_layer, 1), "recall_top50": _mean(per_layer, 2),
        "recall_top25_per_layer": [r[1] for r in per_layer],
        "ahead_recall_top25": _mean(ahead, 1) if ahead else None,
        "ahead_trained": bool(predictor.ahead),
        "ratios": ratios.to_dict(), "budget": policy.get("budget"), "byte_fraction": ratios.byte_fraction(layout),
        "predictor_version": predictor.version, "predictor_kind": predictor.meta.get("kind", predictor.kinds[0]),
        "predictor_ranks": predictor.ranks(), "predictor_cost": cost,
        "ppl_tokens": sum(s.numel() - 1 for s in ppl_seqs), "recall_tokens": int(inputs[0].shape[0]),
        "text": job.source,
    }


def _mean(rows: list[list[float]], i: int) -> float:
    return sum(r[i] for r in rows) / len(rows)
