"""AutoLoRA's autograd kernels: ``y = scaling · B diag(softmax(β)) A x`` as one node
(``FusedAutoLoraLinear``), both finite-difference passes of the hypergradient as one batched node
(``PairedAutoLoraLinear``), and the plain-ops reference used for double backward.
"""

from __future__ import annotations

import torch

from ..ops import mm_to as _mm_to


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
