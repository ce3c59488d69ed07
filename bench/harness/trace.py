"""Trace-driven mode: a real model's per-token neuron choices, replayed on the
wide synthetic model so its I/O and cache behaviour follow real statistics.

A random-weight model's neurons have no activation structure (its hit rate
equals the budget); a real one's do: a few neurons carry most of the mass and
a token's set overlaps its neighbours'. ``record`` runs a real model (e.g.
SmolLM2-135M) one token per forward over real text (WikiText-2) and keeps every
layer's band choice {FULL, INT8, INT4: neuron ids} of every token, made by the
oracle (true activation magnitudes) or the store's trained predictor.
``TracePolicy`` replays them on a model of other widths:

- layers proportionally: wide layer l takes the real layer floor(l * L_real / L_wide);
- neurons proportionally: real neuron i becomes the wide neurons
  [floor(i * F_wide / F_real), floor((i + 1) * F_wide / F_real)), so every band
  keeps its fraction of the layer and its overlap between tokens;
- token t of the replay (one forward: the prefill, then each decode step) takes
  the trace's token t (wrapping around at the end).

Everything it produces is labelled "trace-driven" (policy name, report, JSON).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from m2cache.codec.format import Precision
from m2cache.predictors.bands import BandRatios

log = logging.getLogger(__name__)


@dataclass
class Trace:
    """steps[t][layer] = {precision code: sorted neuron ids (int32)} of token t."""

    source: str  # the model the choices come from
    chooser: str  # "oracle" | "trained predictor vN"
    text: str  # where the tokens come from
    ratios: dict[str, float]
    num_layers: int
    d_ffn: int
    perplexity: float  # of the recorded model under these choices (stepwise)
    steps: list[list[dict[int, torch.Tensor]]] = field(default_factory=list)

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        torch.save(asdict(self), tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> "Trace":
        return cls(**torch.load(path, weights_only=True))

    def meta(self) -> dict:
        d = asdict(self)
        d.pop("steps")
        return {**d, "tokens": len(self.steps)}


def record(store_path: Path, token_ids: list[int], chooser: str, ratios: BandRatios, text_label: str) -> Trace:
    """Run the store's model one token per forward over ``token_ids`` and record every choice."""
    from m2cache.local.loader import load_model
    from m2cache.model.providers import ChoiceProvider
    from m2cache.predictors.evaluate import stepwise_score
    from m2cache.predictors.ranking import oracle_choose
    from m2cache.store.reader import NeuronStore

    from bench.harness.policy import load_mixed_policy

    store = NeuronStore(store_path)
    try:
        m = store.manifest
        model, _tok, bank = load_model(store)
        if chooser == "oracle":
            base, label = oracle_choose(bank, m.ffn_kind, ratios), "oracle"
        else:
            policy = load_mixed_policy(store_path, m, ratios)
            if not policy.source.startswith("trained"):
                raise RuntimeError(f"{store_path} has no trained predictor to record (train one or use the oracle)")
            base, label, ratios = policy.choose(), policy.source, policy.ratios
        steps: list[list[dict]] = []

        def choose(layer: int, x: torch.Tensor) -> dict:
            choice = base(layer, x)
            if layer == 0:
                steps.append([{} for _ in range(m.num_layers)])
            steps[-1][layer] = {int(p): torch.as_tensor(ids).to(torch.int32).sort().values for p, ids in choice.items()}
            return choice

        score = stepwise_score(model, [torch.tensor(token_ids)], ChoiceProvider(bank, choose))
    finally:
        store.close()
    name = Path(m.source).name if m.source else store_path.name
    return Trace(name, label, text_label, ratios.to_dict(), m.num_layers, m.d_ffn, score.perplexity, steps)


class TracePolicy:
    """Replays a Trace on a model with ``num_layers`` layers of ``d_ffn`` neurons."""

    def __init__(self, trace: Trace, num_layers: int, d_ffn: int):
        if not trace.steps:
            raise ValueError("empty trace")
        self.trace = trace
        self.ratios = BandRatios.from_dict(trace.ratios)
        self.layer_map = [min(trace.num_layers - 1, layer * trace.num_layers // num_layers)
                          for layer in range(num_layers)]
        edges = torch.div(torch.arange(trace.d_ffn + 1) * d_ffn, trace.d_ffn, rounding_mode="floor")  # [F_real + 1]
        self.starts, self.counts = edges[:-1], edges[1:] - edges[:-1]  # [F_real] each
        self._mapped: dict[tuple[int, int], dict[Precision, torch.Tensor]] = {}
        self.source = (f"trace-driven: {trace.chooser} choices of {trace.source} on {trace.text} "
                       f"({len(trace.steps)} tokens), neurons {trace.d_ffn}->{d_ffn}, layers "
                       f"{trace.num_layers}->{num_layers}")

    def wide_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Real neuron ids [n] (sorted) -> the wide neurons they map to, sorted [~n * F_wide / F_real]."""
        ids = ids.long()
        counts = self.counts[ids]
        base = torch.repeat_interleave(self.starts[ids], counts)
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        return base + torch.arange(base.numel()) - first

    def choice(self, step: int, layer: int) -> dict[Precision, torch.Tensor]:
        key = (step % len(self.trace.steps), layer)
        if key not in self._mapped:
            real = self.trace.steps[key[0]][self.layer_map[layer]]
            self._mapped[key] = {Precision(p): self.wide_ids(ids) for p, ids in real.items()}
        return self._mapped[key]

    def choose(self):
        """A choose function with its own clock: each call for layer 0 starts the next token.
        (The prefetch thread asks only for layers >= 1, within the current token.)"""
        state = {"step": -1}

        def choose(layer: int, x: torch.Tensor) -> dict[Precision, torch.Tensor]:
            if layer == 0:
                state["step"] += 1
            return self.choice(max(state["step"], 0), layer)

        return choose


def overlap_stats(trace: Trace, window: int = 4) -> dict:
    """The locality the HBM cache can use, per layer and token averaged over the trace:

    - ``reuse_in_window``: fraction of a token's kept neurons (any band) that one of the
      previous ``window`` tokens also kept;
    - ``same_band_reuse_in_window``: the same, counting a neuron only if it was kept in the
      same precision band (the cache keeps one slot set per precision, so a neuron moving
      between bands is a miss);
    - ``kept_fraction``: the fraction of each layer a token keeps."""
    hits = same = total = 0
    for t in range(window, len(trace.steps)):
        for layer in range(trace.num_layers):
            now = trace.steps[t][layer]
            past = [trace.steps[t - k][layer] for k in range(1, window + 1)]
            recent = torch.unique(torch.cat([_kept(c) for c in past]))
            hits += int(torch.isin(_kept(now), recent).sum())
            for p, ids in now.items():
                band = torch.cat([c[p].long() for c in past if p in c] or [torch.zeros(0, dtype=torch.long)])
                same += int(torch.isin(ids.long(), band).sum())
            total += _kept(now).numel()
    kept = sum(_kept(s).numel() for s in trace.steps[0]) / (trace.num_layers * trace.d_ffn)
    return {"window": window, "reuse_in_window": hits / total if total else math.nan,
            "same_band_reuse_in_window": same / total if total else math.nan, "kept_fraction": kept}


def _kept(choice: dict) -> torch.Tensor:
    return torch.cat([ids.long() for ids in choice.values()]) if choice else torch.zeros(0, dtype=torch.long)
