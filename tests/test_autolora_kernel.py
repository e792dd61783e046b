"""dashdiff.autolora.kernel: the fused AutoLoRA function, the paired finite-difference function and the plain-ops reference."""

from __future__ import annotations

import itertools

import pytest
import torch
from autolora_nets import F64

from dashdiff.autolora.kernel import FusedAutoLoraLinear


@pytest.mark.parametrize("x_dtype", [F64, torch.float32])
def test_paired_function_on_token_batches_and_mixed_dtypes(x_dtype):
    """PairedAutoLoraLinear on a (2n, tokens, in) batch: copy i goes through scaling·B_i diag(softmax β) A_i,
    x gets its gradient and β the gradient of copy + minus that of copy − (written out here); with
    float32 activations and float64 factors the output is float32 (the factors are cast)."""
    from dashdiff.autolora.kernel import PairedAutoLoraLinear

    g = torch.Generator().manual_seed(0)
    k, n_in, n_out, scaling = 4, 6, 5, 1.5
    x = torch.randn(4, 3, n_in, generator=g, dtype=F64)
    a2, b2 = torch.randn(2, k, n_in, generator=g, dtype=F64), torch.randn(2, n_out, k, generator=g, dtype=F64)
    beta = torch.randn(k, generator=g, dtype=F64).requires_grad_()
    gy = torch.randn(4, 3, n_out, generator=g, dtype=F64)
    xin = x.to(x_dtype).requires_grad_()
    y = PairedAutoLoraLinear.apply(xin, beta, a2, b2, scaling)
    assert y.dtype == x_dtype and y.shape == (4, 3, n_out)
    gx, gb = torch.autograd.grad(y, (xin, beta), gy.to(x_dtype))

    xr = x.clone().requires_grad_()
    alpha = torch.softmax(beta, 0)
    copies = [scaling * xr[2 * i:2 * i + 2] @ a2[i].t() @ (b2[i] * alpha).t() for i in (0, 1)]
    want_y = torch.cat(copies)
    want_gx, = torch.autograd.grad(want_y, xr, gy, retain_graph=True)
    want_gb, = torch.autograd.grad((copies[0] * gy[:2]).sum() - (copies[1] * gy[2:]).sum(), beta)
    tol = dict(rtol=1e-12, atol=1e-12) if x_dtype == F64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.double(), want_y, **tol)
    torch.testing.assert_close(gx.double(), want_gx, **tol)
    torch.testing.assert_close(gb, want_gb, **tol)
    # a frozen β (no gradient wanted): x still gets its gradient, and β none
    y2 = PairedAutoLoraLinear.apply(xin, beta.detach(), a2, b2, scaling)
    (gx2,) = torch.autograd.grad(y2, xin, gy.to(x_dtype))
    torch.testing.assert_close(gx2.double(), want_gx, **tol)


def test_autolora_reference_casts_to_the_activations_dtype():
    """The plain-ops reference (double backward) with float32 activations and float64 factors: computed
    in float32, equal to the float64 product to float32 rounding."""
    from dashdiff.autolora.kernel import autolora_reference

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, generator=g, dtype=F64)
    a, b, beta = (torch.randn(4, 6, generator=g, dtype=F64), torch.randn(5, 4, generator=g, dtype=F64),
                  torch.randn(4, generator=g, dtype=F64))
    y = autolora_reference(x.float(), a, b, beta, 1.5)
    assert y.dtype == torch.float32
    want = 1.5 * x @ a.t() @ (b * torch.softmax(beta, 0)).t()
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


SUBSETS = [c for n in range(1, 5) for c in itertools.combinations(range(4), n)]


def _reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: torch.Tensor, scaling: float) -> torch.Tensor:
    """y = scaling · x Aᵀ diag(softmax(β)) Bᵀ, from plain ops (independent of the kernel module)."""
    return scaling * (x @ a.t()) * torch.softmax(beta, 0) @ b.t()


@pytest.mark.parametrize("trains", SUBSETS, ids=lambda c: "+".join("x A B beta".split()[i] for i in c))
def test_fused_autolora_gradients_for_every_subset_of_trained_inputs(trains: tuple[int, ...]) -> None:
    """Catches a gradient keyed on another input's flag, e.g. A left without one when B is frozen and x
    needs none (the first adapted layer of a model whose B is frozen). float64: the kernel's products
    against the reference's agree to rounding (1e-10 is far below any wrong gradient's error)."""
    torch.manual_seed(0)
    k, n_in, n_out, scaling = 4, 6, 5, 1.5
    values = [torch.randn(3, n_in, dtype=torch.float64), torch.randn(k, n_in, dtype=torch.float64),
              torch.randn(n_out, k, dtype=torch.float64), torch.randn(k, dtype=torch.float64)]
    ins = [v.clone().requires_grad_(i in trains) for i, v in enumerate(values)]
    y = FusedAutoLoraLinear.apply(*ins, scaling)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, [ins[i] for i in trains], gy)
    refs = [v.clone().requires_grad_(i in trains) for i, v in enumerate(values)]
    want_y = _reference(*refs, scaling)
    want = torch.autograd.grad(want_y, [refs[i] for i in trains], gy)
    torch.testing.assert_close(y, want_y.detach(), rtol=1e-10, atol=1e-12)
    for g, w in zip(got, want):
        assert g is not None
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
