"""The fused LoRA + dash product: one rank-(r+s) path through two matmuls.

``y = (x · A_catᵀ) · (diag(c) · B_catᵀ)`` with ``A_cat = [A; V_sᵀ]`` (k × in), ``B_cat = [B, U_s]``
(out × k), ``c = λ·[scaling·1_r; δ]`` and k = r+s (r before launch). One flat storage per adapter
holds ``A_cat``, ``B_catᵀ`` and ``c``; ``A``, ``B``, ``V_sᵀ``, ``U_s`` and δ are views of it, so no
concatenation happens per forward and under autocast one cast covers everything. The custom
backward computes gradients for the trainable slices only: the frozen rows get none (so weight
decay and the optimizer never see them) and no out × in matrix is ever formed.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


_HALF = (torch.bfloat16, torch.float16)


def _mm_to(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` for a gradient of a ``dtype`` parameter. On CUDA, bf16 / fp16 operands of a float32
    parameter go through cuBLAS's float32 output (``out_dtype``): the float32 accumulator is kept
    instead of being rounded to bf16 and then cast back by the autograd engine (one kernel fewer)."""
    if dtype == torch.float32 and a.dtype in _HALF and a.is_cuda:
        return torch.mm(a, b, out_dtype=dtype)
    return a.mm(b)


def operands(flat: torch.Tensor, r: int, s: int, n_in: int, n_out: int, launched: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Views of a flat storage ``[A_cat (k×in) | B_catᵀ (k×out) | c (k)]``, k = r+s, for the active rank
    k' (r before launch, r+s after): ``a`` (k', in), ``a_t`` = aᵀ, ``b_t`` (k', out), ``coef`` (k', 1)
    and ``u_t`` = U_sᵀ (s, out), None before launch. Views, not copies: built once and cached."""
    k, o = r + s, flat.storage_offset()
    kk = k if launched else r
    n_a = k * n_in
    return (flat.as_strided((kk, n_in), (n_in, 1), o),
            flat.as_strided((n_in, kk), (1, n_in), o),
            flat.as_strided((kk, n_out), (n_out, 1), o + n_a),
            flat.as_strided((kk, 1), (1, 1), o + n_a + k * n_out),
            flat.as_strided((s, n_out), (n_out, 1), o + n_a + r * n_out) if launched else None)


class FusedDashLinear(torch.autograd.Function):
    """``FusedDashLinear.apply(x, a, b, delta, ops)`` with ``ops = (a_cat, a_t, b_t, coef, u_t, scale, lam, r)``.

    x: (..., in); a_cat (k, in), a_t = a_catᵀ, b_t = B_catᵀ (k, out), coef (k, 1) = c, u_t = U_sᵀ
    (s, out) or None before launch — compute-dtype tensors from ``operands``; a, b, delta: the
    trainable parameters, passed only to receive their gradients (the autograd engine casts those to
    the parameters' dtypes); scale = λ·scaling and lam = λ as floats; r: the LoRA rank. Returns
    (..., out). The operands travel in one plain tuple: they need no gradient, and fewer arguments
    make ``apply`` cheaper on this hot path (every forward of every targeted layer).
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


def autolora_reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: torch.Tensor, scaling: float
                       ) -> torch.Tensor:
    """``scaling · B diag(softmax(β)) A x`` in plain differentiable ops (double backward, tests)."""
    c = torch.softmax(beta, 0) * scaling
    if c.dtype != x.dtype:
        a, b, c = a.to(x.dtype), b.to(x.dtype), c.to(x.dtype)
    return (x @ a.t()) @ (b * c).t()


class FusedAutoLoraLinear(torch.autograd.Function):
    """``FusedAutoLoraLinear.apply(x, a, b, beta, scaling)``: ``y = scaling · B diag(softmax(β)) A x``.

    x: (..., in) in the compute dtype; a (k, in), b (out, k) the LoRA parameters; beta (k,) AutoLoRA's
    selection logits (α = softmax(β) in β's dtype, then cast); scaling a float. Returns (..., out).
    One autograd node instead of PEFT's two linears plus the softmax, cast and weighting nodes; the
    weights α scale B's columns (out × k) rather than the activations (tokens × k), and the backward
    skips whatever the caller does not need (the finite-difference passes want ∂β only). A backward
    with ``create_graph=True`` (exact Hessian-vector products) differentiates ``autolora_reference``.
    """

    @staticmethod
    def forward(ctx, x, a, b, beta, scaling):
        alpha = torch.softmax(beta, 0)
        c = alpha * scaling
        b_c = b * c  # (out, k), in the parameters' dtype: one cast below covers B and α
        ac = a
        if b_c.dtype != x.dtype:
            ac, b_c = a.to(x.dtype), b_c.to(x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        h = x2.mm(ac.t())  # (N, k)
        y = h.mm(b_c.t())
        # inputs saved as such (not their casts), so that a double backward can link to them
        ctx.save_for_backward(x, a, b, beta, h)
        ctx.ac, ctx.c, ctx.b_c, ctx.alpha, ctx.scaling = ac, c, b_c, alpha, scaling
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x, a, b, beta, h = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: differentiate plain ops instead
            inputs = [t for t, n in zip((x, a, b, beta), need) if n]
            with torch.enable_grad():
                y = autolora_reference(x, a, b, beta, ctx.scaling)
            gs = iter(torch.autograd.grad(y, inputs, grad_y, create_graph=True, allow_unused=True))
            return (*(next(gs) if n else None for n in need[:4]), None)
        x2 = x.reshape(-1, x.shape[-1])
        g = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_a = grad_b = grad_beta = None
        if need[0] or need[1]:
            g_h = g.mm(ctx.b_c)  # (N, k): gradient w.r.t. h
            grad_x = g_h.mm(ctx.ac).view(x.shape) if need[0] else None
            grad_a = _mm_to(g_h.t(), x2, a.dtype) if need[1] else None
        if need[2] or need[3]:
            gh = _mm_to(g.t(), h, b.dtype)  # (out, k): gradient w.r.t. b_c
            grad_b = gh * ctx.c if need[2] else None
            if need[3]:
                grad_c = (gh * b).sum(0).to(ctx.alpha.dtype)
                grad_beta = torch._softmax_backward_data(grad_c * ctx.scaling, ctx.alpha, 0, ctx.alpha.dtype)
        return grad_x, grad_a, grad_b, grad_beta, None


class PairedAutoLoraLinear(torch.autograd.Function):
    """Both finite-difference passes of AutoLoRA's hypergradient as one batch.

    ``PairedAutoLoraLinear.apply(x, beta, a2, b2, scaling)``: x (2n, ..., in) holds one batch twice,
    the copy to run at ``w+`` first, then the copy at ``w−``; a2 (2, k, in) and b2 (2, out, k) the
    LoRA factors at ``w± = w' ± εv``; beta (k,); scaling a float. Returns (2n, ..., out), copy i through
    ``scaling · B_i diag(softmax(β)) A_i``. The backward gives x its gradient and β the gradient of
    copy + *minus* that of copy −, the difference the central difference needs (a2, b2 get none).
    """

    @staticmethod
    def forward(ctx, x, beta, a2, b2, scaling):
        alpha = torch.softmax(beta, 0)
        c = alpha * scaling
        if a2.dtype != x.dtype:
            a2, b2, c = a2.to(x.dtype), b2.to(x.dtype), c.to(x.dtype)
        xs = x.reshape(2, -1, x.shape[-1])  # (2, n·tokens, in): the two copies
        h = torch.bmm(xs, a2.transpose(1, 2))  # (2, N, k)
        bc = b2 * c  # (2, out, k)
        y = torch.bmm(h, bc.transpose(1, 2))
        ctx.save_for_backward(h)
        ctx.a2, ctx.b2, ctx.bc, ctx.alpha, ctx.scaling, ctx.x_shape = a2, b2, bc, alpha, scaling, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        (h,) = ctx.saved_tensors
        g = grad_y.reshape(2, -1, grad_y.shape[-1])
        need = ctx.needs_input_grad
        grad_x = torch.bmm(torch.bmm(g, ctx.bc), ctx.a2).view(ctx.x_shape) if need[0] else None
        grad_beta = None
        if need[1]:
            gc = (torch.bmm(g.transpose(1, 2), h) * ctx.b2).sum(1)  # (2, k): gradient w.r.t. c per copy
            grad_c = ((gc[0] - gc[1]) * ctx.scaling).to(ctx.alpha.dtype)
            grad_beta = torch._softmax_backward_data(grad_c, ctx.alpha, 0, ctx.alpha.dtype)
        return grad_x, grad_beta, None, None, None
