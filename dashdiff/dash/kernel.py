"""The fused LoRA + dash product: one rank-(r+s) path through two matmuls.

``y = (x · A_catᵀ) · (diag(c) · B_catᵀ)`` with ``A_cat = [A; V_sᵀ]`` (k × in), ``B_cat = [B, U_s]``
(out × k), ``c = λ·[scaling·1_r; δ]`` and k = r+s (r before launch). One flat storage per adapter
holds ``A_cat``, ``B_catᵀ`` and ``c``; ``A``, ``B``, ``V_sᵀ``, ``U_s`` and δ are views of it, so no
concatenation happens per forward and under autocast one cast covers everything. The custom
backward computes gradients for the trainable slices only: the frozen rows get none (so weight
decay and the optimizer never see them) and no out × in matrix is ever formed.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

# absolute: bench/ab_dash_function.py --old loads a copy of this file as a standalone module
from dashdiff.ops import mm_to as _mm_to


class OperandViews(NamedTuple):
    """Views of a flat storage for the active rank k' (r before launch, r+s after): ``a`` (k', in),
    ``a_t`` = aᵀ, ``b_t`` (k', out), ``coef`` (k', 1) and ``u_t`` = U_sᵀ (s, out), None before launch."""

    a: torch.Tensor
    a_t: torch.Tensor
    b_t: torch.Tensor
    coef: torch.Tensor
    u_t: Optional[torch.Tensor]


class DashKernelArgs(NamedTuple):
    """The operands of ``FusedDashLinear``: ``OperandViews``' five in the compute dtype, then
    ``scale`` = λ·scaling and ``lam`` = λ as floats and ``r`` the LoRA rank (``coef`` already
    multiplied by λ)."""

    a_cat: torch.Tensor
    a_t: torch.Tensor
    b_t: torch.Tensor
    coef: torch.Tensor
    u_t: Optional[torch.Tensor]
    scale: float
    lam: float
    r: int


def operands(flat: torch.Tensor, r: int, s: int, n_in: int, n_out: int, launched: bool) -> OperandViews:
    """Views of a flat storage ``[A_cat (k×in) | B_catᵀ (k×out) | c (k)]``, k = r+s (see
    ``OperandViews``). Views, not copies: built once and cached."""
    k, o = r + s, flat.storage_offset()
    kk = k if launched else r
    n_a = k * n_in
    return OperandViews(flat.as_strided((kk, n_in), (n_in, 1), o),
                        flat.as_strided((n_in, kk), (1, n_in), o),
                        flat.as_strided((kk, n_out), (n_out, 1), o + n_a),
                        flat.as_strided((kk, 1), (1, 1), o + n_a + k * n_out),
                        flat.as_strided((s, n_out), (n_out, 1), o + n_a + r * n_out) if launched else None)


class FusedDashLinear(torch.autograd.Function):
    """``FusedDashLinear.apply(x, a, b, delta, ops)`` with ``ops`` a ``DashKernelArgs``.

    x: (..., in); a_cat (k, in), a_t = a_catᵀ, b_t = B_catᵀ (k, out), coef (k, 1) = c, u_t = U_sᵀ
    (s, out) or None before launch — compute-dtype tensors from ``operands``; a, b, delta: the
    trainable parameters, passed only to receive their gradients (the autograd engine casts those to
    the parameters' dtypes); scale = λ·scaling and lam = λ as floats; r: the LoRA rank. Returns
    (..., out). The operands travel in one tuple: they need no gradient, and fewer arguments make
    ``apply`` cheaper on this hot path (every forward of every targeted layer); the caller caches it.
    """

    @staticmethod
    def forward(ctx, x, a, b, delta, ops):
        a_cat, a_t, b_t, coef, u_t, scale, lam, r = ops
        x2 = x.reshape(-1, x.shape[-1])
        h = x2.mm(a_t)  # (N, k)
        bc_t = b_t * coef  # (k, out): the coefficients scale B_cat's columns, cheaper than scaling h
        y = h.mm(bc_t)
        ctx.save_for_backward(x2, h)  # activations: through saved-tensor hooks (checkpointing)
        ctx.ops, ctx.bc_t, ctx.x_shape, ctx.s, ctx.wide = ops, bc_t, x.shape, delta.shape[0], a.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x2, h = ctx.saved_tensors
        a_cat, a_t, b_t, coef, u_t, scale, lam, r = ctx.ops
        g = grad_y.reshape(-1, grad_y.shape[-1])
        need = ctx.needs_input_grad
        g_h = F.linear(g, ctx.bc_t)  # (N, k): gradient w.r.t. h
        grad_x = g_h.mm(a_cat).view(ctx.x_shape) if need[0] else None
        grad_a = _mm_to((g_h if u_t is None else g_h[:, :r]).t(), x2, ctx.wide) if need[1] else None
        grad_b = grad_delta = None
        if need[2] or need[3]:
            # (k, out) = (gradient w.r.t. bc)ᵀ, row-major, so its transposed slice has B's (column-major)
            # layout and the autograd engine accumulates it without a layout-fixing copy.
            gh_t = _mm_to(h.t(), g, ctx.wide)
            if need[2]:
                grad_b = (gh_t if u_t is None else gh_t[:r]).t()
                if scale != 1.0:
                    grad_b = grad_b * scale
            if need[3]:
                if u_t is not None:  # ∂/∂δ_j = λ Σ_o U_oj (gᵀh)_oj
                    grad_delta = (gh_t[r:] * u_t).sum(1)
                    if lam != 1.0:
                        grad_delta = grad_delta * lam
                else:  # before launch: δ takes part (DDP sees it) with an exactly-zero gradient
                    grad_delta = torch.zeros(ctx.s, dtype=ctx.wide, device=g.device)
        return grad_x, grad_a, grad_b, grad_delta, None
