"""Fitting one layer's predictor on recorded FFN inputs (any kind).

Targets come from the layer's FULL weights (vectors [F, nvec, d]) applied to the
calibration inputs: SwiGLU g = x . gate_i, u = x . up_i, activation a = silu(g) * u;
ReLU pre = x . fc1_i + b_i. Losses (why):
- ``gateup``: relative squared error of the implied activation,
  ||silu(g~) u~ - a||^2 / ||a||^2 per token, plus a small relative error on g~
  and u~ themselves. The activation error weighs each neuron by how large it
  is, which is what ranking the top neurons needs; the pre-activation term
  keeps small neurons' signs from drifting. Initialised from the whitened SVD
  (fit.py), so training only refines an already good map.
- ``fc1``: relative squared error of the pre-activation.
- ``gatecopy``: the gate is exact, so only |up| is fitted, weighted by |silu(g)|.
- ``mlp`` / ``lowrank``: the standardised log-magnitude of each neuron within
  its token (scale-free; the log tames the heavy tail), by mean squared error.
A look-ahead predictor is the same kind fitted with layer l's inputs and
layer l+1's targets (``x_in`` differs from ``x_target``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from m2cache.errors import InvalidArgument
from m2cache.predictors import fit
from m2cache.predictors.kinds import (Fc1Predictor, GateCopyPredictor, GateUpPredictor, LayerPredictor,
                                      LowRankPredictor, MLPPredictor, QCopyPredictor)
from m2cache.predictors.kinds.base import FACTOR_DTYPE

LOG_EPS = 1e-6
PRE_WEIGHT = 0.1  # weight of the pre-activation term in the gateup loss


@dataclass(frozen=True, slots=True)
class TrainConfig:
    kind: str = "gateup"
    epochs: int = 2
    batch_size: int = 256
    lr: float = 0.0  # 0: the kind's default (LR below)
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        if self.epochs < 0 or self.batch_size < 1 or self.lr < 0:
            raise InvalidArgument(f"bad training settings: epochs={self.epochs} batch={self.batch_size} lr={self.lr}")

    def learning_rate(self) -> float:
        return self.lr or LR[self.kind]


LR = {"qcopy": 1e-3, "gateup": 2e-3, "fc1": 2e-3, "gatecopy8": 2e-3, "gatecopy4": 2e-3, "mlp": 1e-2, "lowrank": 1e-2}


@dataclass(slots=True)
class Targets:
    """What the layer really computes on the calibration tokens."""

    ffn_kind: str
    pre: torch.Tensor  # [N, F] gate (SwiGLU) or fc1 + bias (ReLU) pre-activation
    up: torch.Tensor | None  # [N, F] up projection (SwiGLU)

    @classmethod
    def compute(cls, vectors: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, ffn_kind: str) -> "Targets":
        x = x.to(vectors.device, torch.float32)
        pre = x @ vectors[:, 0].T
        if ffn_kind == "relu":
            return cls(ffn_kind, pre + bias if bias is not None else pre, None)
        return cls(ffn_kind, pre, x @ vectors[:, 1].T)

    def rows(self, idx: torch.Tensor) -> "Targets":
        return Targets(self.ffn_kind, self.pre[idx], None if self.up is None else self.up[idx])

    def activation(self) -> torch.Tensor:
        return F.silu(self.pre) * self.up if self.ffn_kind == "swiglu" else F.relu(self.pre)


def ranking_targets(magnitudes: torch.Tensor) -> torch.Tensor:
    """[N, F] |activations| -> [N, F] standardised log-magnitudes per row."""
    t = torch.log(magnitudes + LOG_EPS)
    return (t - t.mean(dim=-1, keepdim=True)) / t.std(dim=-1, keepdim=True).clamp_min(1e-6)


def _rel(err: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ||err||^2 / ||ref||^2."""
    return ((err ** 2).sum(-1) / (ref ** 2).sum(-1).clamp_min(1e-12)).mean()


@dataclass(slots=True)
class _Spec:
    """A kind's trainable parameters, forward, loss and final (resident) form."""

    params: list[torch.Tensor]
    forward: Callable
    loss: Callable  # (out, targets rows, x rows) -> scalar
    finish: Callable[[list[torch.Tensor]], LayerPredictor]


def _gateup(x, m_gate, m_up, rank, cov) -> _Spec:
    ag, bg = fit.reduced_rank(cov, m_gate, rank)
    au, bu = fit.reduced_rank(cov, m_up, rank)

    def forward(xb, p):
        return (xb @ p[0]) @ p[1], (xb @ p[2]) @ p[3]

    def loss(out, t: Targets, xb):
        g, u = out
        a = t.activation()
        return _rel(F.silu(g) * u - a, a) + PRE_WEIGHT * (_rel(g - t.pre, t.pre) + _rel(u - t.up, t.up))

    return _Spec([ag, bg, au, bu], forward, loss, lambda p: GateUpPredictor(*(q.to(FACTOR_DTYPE) for q in p)))


def _fc1(x, m_fc1, bias, rank, cov) -> _Spec:
    a, b = fit.reduced_rank(cov, m_fc1, rank)
    bias = torch.zeros(m_fc1.shape[1]) if bias is None else bias.float().cpu()

    def forward(xb, p):
        return (xb @ p[0]) @ p[1] + bias.to(xb.device)

    def loss(out, t: Targets, xb):
        return _rel(out - t.pre, t.pre)

    return _Spec([a, b], forward, loss,
                 lambda p: Fc1Predictor(p[0].to(FACTOR_DTYPE), p[1].to(FACTOR_DTYPE), bias.to(FACTOR_DTYPE)))


def _gatecopy(x, gate_rows, up_rows, rank, cov, bits) -> _Spec:
    au, bu = fit.reduced_rank(cov, up_rows.T, rank) if rank else (torch.zeros(x.shape[1], 0), torch.zeros(0, up_rows.shape[0]))
    up_abs = (x.float() @ up_rows.T).abs().mean(0)  # [F] mean |up| on the calibration text
    gq = GateCopyPredictor.from_gate(gate_rows.cpu(), au, bu, up_abs, bits).gate()  # [F, d] dequantised gate rows

    def forward(xb, p):
        return (xb @ p[0]) @ p[1]

    def loss(out, t: Targets, xb):
        s = F.silu(xb @ gq.to(xb.device).T)  # exact (quantised) gate, [B, F]
        return _rel(s * (out - t.up), t.activation())

    return _Spec([au, bu] if rank else [], forward, loss,
                 lambda p: GateCopyPredictor.from_gate(gate_rows.cpu(), (p or [au])[0].to(FACTOR_DTYPE),
                                                       (p or [au, bu])[1].to(FACTOR_DTYPE), up_abs.to(FACTOR_DTYPE), bits))


def _scored(d, f, width, gen, kind) -> _Spec:
    """mlp (relu(x w1 + b1) w2 + b2) or lowrank ((x a) b + bias); w2 / b start at
    zero so the first scores are the targets' per-row mean, not noise."""
    w1 = torch.randn(d, width, generator=gen) / math.sqrt(d)
    if kind == "mlp":
        params = [w1, torch.zeros(width), torch.zeros(width, f), torch.zeros(f)]

        def forward(xb, p):
            return torch.relu(xb @ p[0] + p[1]) @ p[2] + p[3]

        finish = lambda p: MLPPredictor(*(q.to(FACTOR_DTYPE) for q in p))  # noqa: E731
    else:
        params = [w1, torch.zeros(width, f), torch.zeros(f)]

        def forward(xb, p):
            return (xb @ p[0]) @ p[1] + p[2]

        finish = lambda p: LowRankPredictor(*(q.float() for q in p))  # noqa: E731

    def loss(out, t: Targets, xb):
        return F.mse_loss(out, ranking_targets(t.activation().abs()))

    return _Spec(params, forward, loss, finish)


def build_spec(kind: str, x_in: torch.Tensor, x_target: torch.Tensor, vectors: torch.Tensor,
               bias: torch.Tensor | None, rank: int, seed: int = 0) -> _Spec:
    """Initial parameters for ``kind`` of width ``rank``. vectors [F, nvec, d] FULL."""
    w = vectors.float().cpu()
    if kind == "qcopy":
        if x_in is not x_target:
            raise InvalidArgument("a qcopy predictor cannot look ahead: layer l+1's rows need layer l+1's input")
        q = QCopyPredictor.from_rows(w[:, 0], w[:, 1], rank, x_in.float().cpu())  # no gradient steps
        return _Spec([], lambda xb, p: None, lambda *a: torch.zeros(()), lambda p: q)
    cov = fit.covariance(x_in)
    same = x_in is x_target

    def proj(i: int) -> torch.Tensor:  # [d, F] map from x_in to projection i of x_target
        return w[:, i].T if same else fit.ahead_map(x_in, x_target, w[:, i])

    if kind == "gateup":
        return _gateup(x_in, proj(0), proj(1), rank, cov)
    if kind == "fc1":
        return _fc1(x_in, proj(0), bias, rank, cov)
    if kind in ("gatecopy8", "gatecopy4"):
        if not same:
            raise InvalidArgument("a gate copy cannot look ahead: layer l+1's gate needs layer l+1's input")
        return _gatecopy(x_in, w[:, 0], w[:, 1], rank, cov, 8 if kind == "gatecopy8" else 4)
    if kind in ("mlp", "lowrank"):
        return _scored(x_in.shape[1], w.shape[0], rank, torch.Generator().manual_seed(seed), kind)
    raise InvalidArgument(f"unknown predictor kind {kind!r}")


def steps_per_layer(num_rows: int, config: TrainConfig) -> int:
    return config.epochs * math.ceil(num_rows / config.batch_size)


def train_layer(x_in: torch.Tensor, vectors: torch.Tensor, bias: torch.Tensor | None, ffn_kind: str, rank: int,
                config: TrainConfig, on_step: Callable[[float], None] | None = None,
                x_target: torch.Tensor | None = None, kind: str | None = None) -> tuple[LayerPredictor, float]:
    """Fit one layer's predictor. x_in [N, d]: the predictor's inputs; x_target
    [N, d]: the FFN inputs its targets come from (default x_in; layer l+1's for
    a look-ahead predictor); vectors [F, nvec, d] FULL weights. Returns
    (predictor in its resident form on CPU, mean loss of the last epoch)."""
    kind = kind or config.kind
    dev = torch.device(config.device)
    x_target = x_in if x_target is None else x_target
    spec = build_spec(kind, x_in, x_target, vectors, bias, rank, config.seed)
    params = [p.to(dev).requires_grad_() for p in spec.params]
    if not params:  # nothing to fit (qcopy)
        return spec.finish([]), 0.0
    targets = Targets.compute(vectors.to(dev), None if bias is None else bias.to(dev), x_target.to(dev), ffn_kind)
    x = x_in.to(dev, torch.float32)
    last = float("nan")
    steps = steps_per_layer(x.shape[0], config)
    if steps:
        opt = torch.optim.Adam(params, lr=config.learning_rate())
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.learning_rate(), total_steps=steps, pct_start=0.1)
        gen = torch.Generator().manual_seed(config.seed)
        for _ in range(config.epochs):
            order = torch.randperm(x.shape[0], generator=gen).to(dev)
            total = 0.0
            for lo in range(0, x.shape[0], config.batch_size):
                idx = order[lo : lo + config.batch_size]
                loss = spec.loss(spec.forward(x[idx], params), targets.rows(idx), x[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * idx.numel()
                if on_step:
                    on_step(loss.item())
            last = total / x.shape[0]
    return spec.finish([p.detach().cpu() for p in params]), last
