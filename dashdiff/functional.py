"""The fused LoRA + dash product: one rank-(r+s) path through two matmuls.

``y = (B_cat diag(c)) · (A_cat · x)`` with ``A_cat = [A; V_sᵀ]`` (r+s × in), ``B_cat = [B, U_s]``
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
        b_c = b_cat * coef  # (out, k): the coefficients scale B's columns, cheaper than scaling h
        y = h.mm(b_c.t())
        ctx.save_for_backward(x2, h)  # activations: through saved-tensor hooks (checkpointing)
        ctx.fused, ctx.b_c, ctx.x_shape, ctx.s = fused, b_c, x.shape, delta.shape[0]
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x2, h = ctx.saved_tensors
        a_cat, b_cat, coef, lam, r = ctx.fused
        g = grad_y.reshape(-1, grad_y.shape[-1])
        need = ctx.needs_input_grad
        g_h = g.mm(ctx.b_c)  # (N, k): gradient w.r.t. h
        grad_x = g_h.mm(a_cat).view(ctx.x_shape) if need[0] else None
        grad_a = g_h[:, :r].t().mm(x2) if need[1] else None
        grad_b = grad_delta = None
        if need[2] or need[3]:
            gh = g.t().mm(h)  # (out, k): gradient w.r.t. b_c
            if need[2]:
                grad_b = gh[:, :r] * coef[:r]
            if need[3]:
                if h.shape[1] > r:  # ∂/∂δ_j = λ Σ_o U_oj (gᵀh)_oj
                    grad_delta = (gh[:, r:] * b_cat[:, r:]).sum(0)
                    if lam != 1.0:
                        grad_delta = grad_delta * lam
                else:  # before launch: δ takes part (DDP sees it) with an exactly-zero gradient
                    grad_delta = torch.zeros(ctx.s, dtype=g.dtype, device=g.device)
        return grad_x, grad_a, grad_b, grad_delta, None
