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
def test_fp16_overflow_with_fused_adamw_is_seen_as_a_skipped_step():
    """accelerate's real fp16 GradScaler with fused AdamW (the scripts' and Trainer's optimizer): an
    overflowing step is skipped inside the kernel, which accelerate's ``step_was_skipped`` misses;
    ``dashdiff.training.step_skipped`` sees it (the scaler backs off), and not on a finite step."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from dashdiff.training import loss_scale, step_skipped

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        acc = Accelerator(mixed_precision="fp16")
        model = torch.nn.Linear(8, 4).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        model, opt = acc.prepare(model, opt)
        for overflow in (False, True, False):
            with acc.autocast():
                loss = model(torch.randn(2, 8, device="cuda")).float().pow(2).mean()
            acc.backward(loss * (float("inf") if overflow else 1.0))
            before = acc.unwrap_model(model).weight.detach().clone()
            scale = loss_scale(opt)
            opt.step()
            assert step_skipped(opt, scale) == overflow
            assert torch.equal(before, acc.unwrap_model(model).weight.detach()) == overflow
            opt.zero_grad()
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
