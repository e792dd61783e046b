"""LoRA-Dash launch: find a layer's task-specific directions.

Everything here is float64. The spectrum of ``W0`` comes from an eigendecomposition of the
smaller Gram matrix rather than float32 ``torch.linalg.svd``: the change rate divides by σ_i, so
the selection leans on the small singular values, which float32 SVD of large layers gets wrong
(METHODS.md), while the float64 Gram route matches a float64 SVD and is faster.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_EPS32 = torch.finfo(torch.float32).eps


@dataclass
class Spectrum:
    """Thin SVD ``W0 = U diag(σ) Vᵀ``: u (out, k), sigma (k,) descending, v (in, k), k = min(out, in).
    Columns of numerically-zero singular values are zero and ``eligible`` is False there."""

    u: torch.Tensor
    sigma: torch.Tensor
    v: torch.Tensor
    eligible: torch.Tensor


@dataclass
class Selection:
    """A launch result. indices (≤ s,): into the descending singular values, ordered by descending
    change rate; u_s (out, s), v_s_t (s, in): the directions (zero in unfilled slots);
    sigma (k,), change_rate (k,): every direction's σ_i and |Δσ_i|/σ_i (NaN where not eligible)."""

    indices: torch.Tensor
    u_s: torch.Tensor
    v_s_t: torch.Tensor
    sigma: torch.Tensor
    change_rate: torch.Tensor


def spectrum(w0: torch.Tensor) -> Spectrum:
    """Float64 thin SVD of ``w0`` (out, in) through ``eigh`` of its smaller Gram matrix."""
    w = w0.detach().to(torch.float64)
    out_f, in_f = w.shape
    wide = out_f <= in_f
    gram = w @ w.t() if wide else w.t() @ w
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(0), evecs.flip(1)  # descending
    sigma = evals.clamp_min(0).sqrt()
    # σ ≤ max(out, in)·eps32·σ_max is numerically zero: not eligible (METHODS.md).
    eligible = sigma > max(out_f, in_f) * _EPS32 * sigma[0]
    safe = torch.where(eligible, sigma, torch.ones_like(sigma))
    if wide:
        u = evecs
        v = (w.t() @ u) / safe
    else:
        v = evecs
        u = (w @ v) / safe
    mask = eligible.to(w.dtype)
    return Spectrum(u=u * mask, sigma=sigma, v=v * mask, eligible=eligible)


def diagonal_projection(spec: Spectrum, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``Δσ_i = u_iᵀ (scaling·B A) v_i`` for every i, without forming B A: (k,), float64.
    a: (r, in), b: (out, r)."""
    ub = spec.u.t() @ b.detach().to(torch.float64)  # (k, r)
    av = a.detach().to(torch.float64) @ spec.v  # (r, k)
    return scaling * (ub * av.t()).sum(1)


def select_directions(
    w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, s: int
) -> Selection:
    """Top-``s`` directions of ``w0`` by change rate ``|Δσ_i| / σ_i`` under ``ΔW = scaling·B A``."""
    out_f, in_f = w0.shape
    if s > min(out_f, in_f):
        raise ValueError(
            f"dash_directions s={s} exceeds min(out, in)={min(out_f, in_f)} of a {out_f}x{in_f} layer: "
            "lower dash_directions or leave this layer out of target_modules."
        )
    spec = spectrum(w0)
    dsigma = diagonal_projection(spec, a, b, scaling)
    rate = dsigma.abs() / torch.where(spec.eligible, spec.sigma, torch.ones_like(spec.sigma))
    rate = torch.where(spec.eligible, rate, torch.full_like(rate, float("nan")))
    ranked = torch.where(spec.eligible, rate, torch.full_like(rate, -1.0))
    order = torch.sort(ranked, descending=True, stable=True).indices
    n_ok = int(spec.eligible.sum())
    idx = order[: min(s, n_ok)]
    u_s = torch.zeros(out_f, s, dtype=torch.float64, device=w0.device)
    v_s_t = torch.zeros(s, in_f, dtype=torch.float64, device=w0.device)
    u_s[:, : idx.numel()] = spec.u[:, idx]
    v_s_t[: idx.numel()] = spec.v[:, idx].t()
    return Selection(indices=idx, u_s=u_s, v_s_t=v_s_t, sigma=spec.sigma, change_rate=rate)
