"""The fused LoRA + dash product: one rank-(r+s) path through two matmuls.

``y = B_cat · (c ⊙ (A_cat · x))`` with ``A_cat = [A; V_sᵀ]`` (r+s × in), ``B_cat = [B, U_s]``
(out × r+s) and ``c = [scaling·1_r; λ·δ]``. ``A_cat`` / ``B_cat`` are persistent storages of which
``A``, ``B``, ``V_sᵀ``, ``U_s`` are views, so no concatenation happens per forward. The custom
backward computes gradients for the trainable slices only: the frozen rows get none (so weight
decay and the optimizer never see them) and no out × in matrix is ever formed.
"""

from __future__ import annotations

import torch


class FusedDashLinear(torch.autograd.Function):
    """Inputs (leading dims of ``x`` are flattened to N):

    x: (..., in); a_cat: (k, in); b_cat: (out, k); coef: (k,) — compute-dtype tensors, k = r+s
    (or r before launch); a, b, delta: the trainable parameters, only routed for their
    gradients; lam: the runtime scale multiplying δ; r: the LoRA rank.
    Returns (..., out).
    """

    @staticmethod
    def forward(ctx, x, a_cat, b_cat, coef, a, b, delta, lam: float, r: int):
        h = x @ a_cat.t()  # (N, k)
        y = (h * coef) @ b_cat.t()
        ctx.save_for_backward(x, h, a_cat, b_cat, coef)
        ctx.lam, ctx.r = lam, r
        ctx.dtypes = (a.dtype, b.dtype, delta.dtype)
        ctx.delta_shape = delta.shape
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, h, a_cat, b_cat, coef = ctx.saved_tensors
        r, lam = ctx.r, ctx.lam
        k = h.shape[-1]
        in_f, out_f = x.shape[-1], grad_y.shape[-1]
        x2, h2, gy2 = x.reshape(-1, in_f), h.reshape(-1, k), grad_y.reshape(-1, out_f)

        g_hs = gy2 @ b_cat  # (N, k): gradient w.r.t. c ⊙ h
        g_h = g_hs * coef
        grad_x = grad_a = grad_b = grad_delta = None
        if ctx.needs_input_grad[0]:
            grad_x = (g_h @ a_cat).reshape(x.shape)
        if ctx.needs_input_grad[4]:
            grad_a = (g_h[:, :r].t() @ x2).to(ctx.dtypes[0])
        if ctx.needs_input_grad[5]:
            grad_b = (gy2.t() @ (h2[:, :r] * coef[:r])).to(ctx.dtypes[1])
        if ctx.needs_input_grad[6]:
            s = ctx.delta_shape[0]
            if k > r:
                grad_delta = (lam * (g_hs[:, r:] * h2[:, r:]).sum(0)).to(ctx.dtypes[2])
            else:  # before launch: δ takes part (DDP sees it) with an exactly-zero gradient
                grad_delta = torch.zeros(s, dtype=ctx.dtypes[2], device=grad_y.device)
        return grad_x, None, None, None, grad_a, grad_b, grad_delta, None, None
