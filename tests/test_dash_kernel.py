"""dashdiff.dash.kernel: the fused LoRA-Dash autograd function against its reference, gradcheck and frozen
factors."""

import pytest
import torch
from dashdiff.dash.kernel import FusedDashLinear, operands


@pytest.mark.parametrize("scaling, lam", [(1.7, 0.6), (2.0, 1.0), (1.0, 2.0)])
def test_fused_function_gradcheck(scaling, lam):
    torch.manual_seed(0)
    r, s, n_in, n_out = 3, 2, 7, 5
    a = torch.randn(r, n_in, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n_out, r, dtype=torch.float64, requires_grad=True)
    d = torch.randn(s, dtype=torch.float64, requires_grad=True)
    v, u = torch.randn(s, n_in, dtype=torch.float64), torch.randn(n_out, s, dtype=torch.float64)
    x = torch.randn(2, 4, n_in, dtype=torch.float64, requires_grad=True)

    def fused(x, a, b, d):
        # the flat layout the layer uses: [A; V_sᵀ] row-major, [B, U_s]ᵀ row-major, [base·1_r; δ],
        # here with base = scaling / λ, so that c = λ·[base·1_r; δ] = [scaling·1_r; λ·δ]
        flat = torch.cat([a.detach().flatten(), v.flatten(), b.detach().t().flatten(), u.t().flatten(),
                          torch.full((r,), scaling / lam, dtype=torch.float64), d.detach()])
        a_cat, a_t, b_t, coef, u_t = operands(flat, r, s, n_in, n_out, launched=True)
        return FusedDashLinear.apply(x, a, b, d, (a_cat, a_t, b_t, coef * lam, u_t, scaling, lam, r))

    def reference(x, a, b, d):
        return scaling * x @ a.t() @ b.t() + lam * x @ v.t() @ torch.diag(d) @ u.t()

    torch.testing.assert_close(fused(x, a, b, d), reference(x, a, b, d))
    assert torch.autograd.gradcheck(fused, (x, a, b, d))
    gy = torch.randn(2, 4, n_out, dtype=torch.float64)
    g1 = torch.autograd.grad(fused(x, a, b, d), (x, a, b, d), gy)
    g2 = torch.autograd.grad(reference(x, a, b, d), (x, a, b, d), gy)
    for p, q in zip(g1, g2):
        torch.testing.assert_close(p, q)
    # some factors frozen (a frozen adapter in a trained network, only A or only B trained...): each
    # input that wants a gradient gets the full one, the others none
    import itertools

    for frozen in itertools.chain.from_iterable(itertools.combinations(range(1, 4), n) for n in (1, 2, 3)):
        args = [t.detach() if i in frozen else t for i, t in enumerate((x, a, b, d))]
        live = [i for i in range(4) if i not in frozen]
        got = torch.autograd.grad(fused(*args), [args[i] for i in live], gy)
        for i, g in zip(live, got):
            torch.testing.assert_close(g, g2[i], msg=f"frozen {frozen}, input {i}")
