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
    """``FusedDashLinear.apply(x, a, b, delta, fused)`` with ``fused = (a_cat, b_cat, coef, lam, r)``.

    x: (..., in); a_cat: (k, in); b_cat: (out, k); coef: (k,) — compute-dtype tensors, k = r+s
    (or r before launch); a, b, delta: the trainable parameters, passed only to receive their
    gradients (the autograd engine casts those to the parameters' dtypes); lam: the runtime scale
    multiplying δ; r: the LoRA rank. Returns (..., out). The storages travel in one plain tuple:
    they need no gradient, and fewer arguments make ``apply`` cheaper on this hot path.
    """

    @staticmethod
    def forward(ctx, x, a, b, delta, fused):
        a_cat, b_cat, coef, lam, r = fused
        x2 = x.reshape(-1, x.shape[-1])
        h = x2.mm(a_cat.t())  # (N, k)
        hs = h * coef
        y = hs.mm(b_cat.t())
        ctx.save_for_backward(x2, h, hs)  # activations: through saved-tensor hooks (checkpointing)
        ctx.fused, ctx.x_shape, ctx.s = fused, x.shape, delta.shape[0]
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x2, h, hs = ctx.saved_tensors
        a_cat, b_cat, coef, lam, r = ctx.fused
        g = grad_y.reshape(-1, grad_y.shape[-1])
        g_hs = g.mm(b_cat)  # (N, k): gradient w.r.t. c ⊙ h
        g_h = g_hs * coef
        need = ctx.needs_input_grad
        grad_x = g_h.mm(a_cat).view(ctx.x_shape) if need[0] else None
        grad_a = g_h[:, :r].t().mm(x2) if need[1] else None
        grad_b = g.t().mm(hs[:, :r]) if need[2] else None
        grad_delta = None
        if need[3]:
            if h.shape[1] > r:
                grad_delta = (g_hs * h).sum(0)[r:]  # over all k columns: fewer ops than slicing first
                if lam != 1.0:
                    grad_delta = grad_delta * lam
            else:  # before launch: δ takes part (DDP sees it) with an exactly-zero gradient
                grad_delta = torch.zeros(ctx.s, dtype=g.dtype, device=g.device)
        return grad_x, grad_a, grad_b, grad_delta, None
