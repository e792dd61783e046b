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
def test_checkpoints_written_on_cuda_pass_the_checks_and_resume(tmp_path):
    """Issue 13: a checkpoint written on CUDA (optimizer.bin, the RNG file and extra_state.pt with
    β's Adam state hold CUDA tensors) passes the pre-resume check (weights_only, read on CPU,
    memory-mapped) and resumes the AutoLoRA search to the same losses and adapter."""
    from pathlib import Path

    from safetensors.torch import load_file

    import test_commonsense_train as ct
    from dashdiff import training as T
    from dashdiff.tiny import resolve_model

    base = Path(resolve_model("tiny-llama", cache_dir=str(tmp_path / "cache")))
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    record = ct.run_main(ct.cli(base, full, "autolora"))
    assert record["device"].startswith("cuda")
    assert T.validate_checkpoint(full / "checkpoint-search-2")["step"] == 2
    ct.run_main(ct.cli(base, resumed, "autolora", "--resume_from_checkpoint", str(full / "checkpoint-search-2")))
    search = [[(r["step"], r["loss"]) for r in ct.steps(d) if r.get("phase") == "search" and "loss" in r]
              for d in (full, resumed)]
    assert [s for s, _ in search[1]] == [s for s, _ in search[0][2:]]
    # CUDA kernels need not be bit-reproducible run to run: a loose tolerance, far below a wrong resume's
    assert max(abs(a - b) for (_, a), (_, b) in zip(search[1], search[0][2:])) <= 1e-4
    assert ct.max_diff(load_file(full / "adapter_model.safetensors"),
                       load_file(resumed / "adapter_model.safetensors")) <= 1e-4
