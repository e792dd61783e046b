"""dashdiff/autolora/kernel.py: the fused AutoLoRA function gives each input that wants a gradient the
right one, whichever of x, A, B, β are frozen."""

from __future__ import annotations

import itertools

import pytest
import torch

from dashdiff.autolora.kernel import FusedAutoLoraLinear

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
