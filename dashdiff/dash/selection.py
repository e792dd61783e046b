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


@dataclass
class GramEig:
    """The expensive, training-independent half of a launch: eigenvectors (k, k) and singular values
    (k,) descending of the smaller Gram matrix of ``W0`` (``W0 W0ᵀ`` when ``wide`` (out <= in),
    else ``W0ᵀ W0``). Cacheable: it depends on the frozen weight only."""

    evecs: torch.Tensor
    sigma: torch.Tensor
    wide: bool


def gram_eig(w0: torch.Tensor) -> GramEig:
    """Float64 eigendecomposition of ``w0``'s (out, in) smaller Gram matrix."""
    w = w0.detach().to(torch.float64)
    wide = w.shape[0] <= w.shape[1]
    evals, evecs = torch.linalg.eigh(w @ w.t() if wide else w.t() @ w)
    return GramEig(evecs=evecs.flip(1), sigma=evals.flip(0).clamp_min(0).sqrt(), wide=wide)


def spectrum(w0: torch.Tensor, eig: GramEig | None = None) -> Spectrum:
    """Float64 thin SVD of ``w0`` (out, in), from ``eig`` (computed if not given)."""
    eig = gram_eig(w0) if eig is None else eig
    w = w0.detach().to(torch.float64)
    evecs, sigma = eig.evecs.to(w.device), eig.sigma.to(w.device)
    out_f, in_f = w.shape
    # σ ≤ max(out, in)·eps32·σ_max is numerically zero: not eligible (METHODS.md).
    eligible = sigma > max(out_f, in_f) * _EPS32 * sigma[0]
    safe = torch.where(eligible, sigma, torch.ones_like(sigma))
    if eig.wide:
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
    w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, s: int, eig: GramEig | None = None
) -> Selection:
    """Top-``s`` directions of ``w0`` by change rate ``|Δσ_i| / σ_i`` under ``ΔW = scaling·B A``;
    ``eig`` is a precomputed ``gram_eig(w0)`` (see ``dashdiff.dash.prefetch``)."""
    out_f, in_f = w0.shape
    if s > min(out_f, in_f):
        raise ValueError(
            f"dash_directions s={s} exceeds min(out, in)={min(out_f, in_f)} of a {out_f}x{in_f} layer: "
            "lower dash_directions or leave this layer out of target_modules."
        )
    if eig is not None and eig.evecs.device != w0.device:
        return _select_from_host_eig(w0, a, b, scaling, s, eig)
    spec = spectrum(w0, eig)
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


def _select_from_host_eig(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, s: int,
                          eig: GramEig) -> Selection:
    """``select_directions`` for a spectrum prefetched to the host while ``w0`` lives elsewhere (a
    GPU): the same float64 math, arranged so that only (r, k)-sized products and the s chosen
    columns cross between the devices. Moving every layer's k × k eigenvectors to the GPU instead
    cost most of a launch that came after a finished prefetch (BENCHMARKS.md).

    Wide (out <= in): u = evecs, v = W0ᵀ u / σ, so A v = (A W0ᵀ) u / σ. Tall: v = evecs,
    u = W0 v / σ, so uᵀ B = vᵀ (W0ᵀ B) / σ. The small factors are formed on ``w0``'s device."""
    host = eig.evecs.device
    w = w0.detach().to(torch.float64)
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    out_f, in_f = w.shape
    sigma = eig.sigma.to(torch.float64)
    eligible = sigma > max(out_f, in_f) * _EPS32 * sigma[0]
    safe = torch.where(eligible, sigma, torch.ones_like(sigma))
    vecs = eig.evecs.to(torch.float64)
    if eig.wide:
        ub = vecs.t() @ b64.to(host)  # (k, r)
        av = (a64 @ w.t()).to(host) @ vecs / safe  # (r, k)
    else:
        ub = vecs.t() @ (w.t() @ b64).to(host) / safe[:, None]  # (k, r)
        av = a64.to(host) @ vecs  # (r, k)
    dsigma = scaling * (ub * av.t()).sum(1)
    rate = dsigma.abs() / safe
    rate = torch.where(eligible, rate, torch.full_like(rate, float("nan")))
    ranked = torch.where(eligible, rate, torch.full_like(rate, -1.0))
    order = torch.sort(ranked, descending=True, stable=True).indices
    idx = order[: min(s, int(eligible.sum()))]
    chosen = vecs[:, idx].to(w.device)
    scale = safe[idx].to(w.device)
    u_s = torch.zeros(out_f, s, dtype=torch.float64, device=w.device)
    v_s_t = torch.zeros(s, in_f, dtype=torch.float64, device=w.device)
    if eig.wide:
        u_s[:, : idx.numel()] = chosen
        v_s_t[: idx.numel()] = (chosen.t() @ w) / scale[:, None]
    else:
        v_s_t[: idx.numel()] = chosen.t()
        u_s[:, : idx.numel()] = (w @ chosen) / scale
    return Selection(indices=idx.to(w.device), u_s=u_s, v_s_t=v_s_t, sigma=sigma.to(w.device),
                     change_rate=rate.to(w.device))
