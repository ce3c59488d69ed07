"""Initialising low-rank predictors from the layer's own weights.

A rank-r map x -> x @ A @ B that best reproduces a projection y = x @ M of
calibration inputs (least squares over the calibration tokens, not over the
weights alone): with C = E[x x^T] = L L^T, E||x M - x A B||^2 = ||L^T (M - A B)||_F^2,
so the optimum is the truncated SVD of K = L^T M = U S V^T:
A = L^{-T} U_r [d, r], B = S_r V_r^T [r, F]. With M = W^T (the layer's gate,
up or fc1 rows) this is the activation-whitened truncated SVD; plain SVD
(C = I) wastes rank on directions the inputs never take.

Look-ahead (layer l+1's projection from layer l's input p): the same with
M = C_pp^{-1} C_p,x W^T, the least-squares map from p to layer l+1's input,
composed with its weights (reduced-rank regression).
"""
from __future__ import annotations

import torch

_RIDGE = 1e-5  # relative ridge on the covariance: keeps the Cholesky factor well defined


def covariance(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """E[x^T y] over rows, float64: x [N, d], y [N, e] (default x) -> [d, e]."""
    x = x.double()
    y = x if y is None else y.double()
    return x.T @ y / x.shape[0]


def _cholesky(c: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    return torch.linalg.cholesky(c + _RIDGE * c.diagonal().mean().clamp_min(1e-12) * eye)


def reduced_rank(cov: torch.Tensor, m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` (A [d, r], B [r, F]) float32 with x A B ~ x m under E[x x^T] = cov."""
    l = _cholesky(cov)
    u, s, vh = torch.linalg.svd(l.T @ m.double(), full_matrices=False)
    r = min(rank, s.numel())
    a = torch.linalg.solve_triangular(l.T, u[:, :r], upper=True)  # L^{-T} U_r
    return a.float(), (s[:r, None] * vh[:r]).float()


def ahead_map(x_prev: torch.Tensor, x_next: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Least-squares map [d, F] from layer l's inputs to layer l+1's projection x_next @ w^T."""
    cpp = covariance(x_prev)
    l = _cholesky(cpp)
    t = torch.cholesky_solve(covariance(x_prev, x_next), l)  # C_pp^{-1} C_pn  [d, d]
    return t @ w.double().T
