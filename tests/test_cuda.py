"""The fused layers' CUDA paths: bf16 operands with float32 parameters, where the weight gradients
come out of cuBLAS in float32 (``functional._mm_to``). Skipped without a GPU; run on the device
machine with ``pytest tests/test_cuda.py``."""

import pytest
import torch

from dashdiff.functional import FusedAutoLoraLinear, FusedDashLinear, autolora_reference, operands

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _close(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    err = (got.double() - want).norm() / want.norm()
    assert err < rel, f"relative error {err:.2e} >= {rel}"


@cuda
def test_fused_dash_bf16_gradients_are_float32_and_accurate():
    torch.manual_seed(0)
    dev, r, s, n_in, n_out, lam, base = "cuda", 4, 3, 96, 80, 0.7, 2.0
    a = torch.randn(r, n_in, device=dev, requires_grad=True)
    b = torch.randn(n_out, r, device=dev, requires_grad=True)
    d = torch.randn(s, device=dev, requires_grad=True)
    v, u = torch.randn(s, n_in, device=dev), torch.randn(n_out, s, device=dev)
    x = torch.randn(3, 50, n_in, device=dev, requires_grad=True)
    flat = torch.cat([a.detach().flatten(), v.flatten(), b.detach().t().flatten(), u.t().flatten(),
                      torch.full((r,), base, device=dev), d.detach()]).to(torch.bfloat16)
    a_cat, a_t, b_t, coef, u_t = operands(flat, r, s, n_in, n_out, launched=True)
    y = FusedDashLinear.apply(x.to(torch.bfloat16), a, b, d, (a_cat, a_t, b_t, coef * lam, u_t, base * lam, lam, r))
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, a, b, d), gy)
    assert [t.dtype for t in got] == [torch.float32] * 4

    def reference(x, a, b, d):
        return lam * base * x @ a.t() @ b.t() + lam * x @ v.double().t() @ torch.diag(d) @ u.double().t()

    prims = [t.detach().double().requires_grad_() for t in (x, a, b, d)]
    want = torch.autograd.grad(reference(*prims), prims, gy.double())
    _close(y, reference(*prims).detach(), 2e-2)
    for g_got, g_want in zip(got, want):
        _close(g_got, g_want, 2e-2)


@cuda
def test_fused_autolora_bf16_gradients_are_float32_and_accurate():
    torch.manual_seed(0)
    dev, k, n_in, n_out, scaling = "cuda", 6, 64, 72, 1.5
    a = torch.randn(k, n_in, device=dev, requires_grad=True)
    b = torch.randn(n_out, k, device=dev, requires_grad=True)
    beta = torch.randn(k, device=dev, requires_grad=True)
    x = torch.randn(2, 40, n_in, device=dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = FusedAutoLoraLinear.apply(x.to(torch.bfloat16), a, b, beta, scaling)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, (a, b, beta), gy)
    assert [t.dtype for t in got] == [torch.float32] * 3
    prims = [t.detach().double().requires_grad_() for t in (a, b, beta)]
    want = torch.autograd.grad(autolora_reference(x.double(), *prims, scaling), prims, gy.double())
    for g_got, g_want in zip(got, want):
        _close(g_got, g_want, 2e-2)


@cuda
def test_app_caps_and_cancel_on_cuda():
    """Issue 13: on a GPU the app allows 1024 px and 100 steps, refuses more, and a cancelled
    1024 px render stops at the end of the step under way."""
    import threading

    app = _load("dashdiff_app", ROOT / "app.py")
    r = app.Renderer("tiny-sdxl", device=DEV)
    try:
        assert r.limits.size == (64, 1024) and r.limits.steps == (1, 100)
        with pytest.raises(app.RenderError, match=r"Width must be from 64 to 1024 \(the cap on cuda"):
            r.render("a toy", steps=2, width=1032, height=64)
        cancel, seen = threading.Event(), []

        def on_step(step, steps):
            seen.append(step)
            if step == 2:
                cancel.set()

        with pytest.raises(app.Cancelled):
            r.render("a toy", steps=100, width=1024, height=1024, methods=["base"], on_step=on_step, cancel=cancel)
        assert seen == [1, 2]
        assert len(r.render("a toy", steps=2, width=64, height=64, methods=["base"])) == 1
    finally:
        r.close()
