"""The fused layers' CUDA paths: bf16 operands with float32 parameters, where the weight gradients
come out of cuBLAS in float32 (``functional._mm_to``). Skipped without a GPU; run on the device
machine with ``pytest tests/test_cuda.py``."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dashdiff.autolora.kernel import FusedAutoLoraLinear, autolora_reference
from dashdiff.dash.kernel import FusedDashLinear, operands

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
def test_fused_dash_before_launch_gives_delta_a_zero_gradient_on_its_device():
    """Before the launch δ (s,) takes part in the backward with an exactly-zero gradient that the
    backward creates itself (no product yields it): made on the default device instead of the
    parameters' (mutants FusedDashLinear.backward 70, 73), it is an autograd device error on CUDA
    and passes every CPU test. A and B get plain LoRA's gradients (bf16 operands, float32 results)."""
    torch.manual_seed(0)
    dev, r, s, n_in, n_out, lam, base = torch.device(DEV), 4, 3, 96, 80, 0.7, 2.0
    a = torch.randn(r, n_in, device=dev, requires_grad=True)
    b = torch.randn(n_out, r, device=dev, requires_grad=True)
    d = torch.zeros(s, device=dev, requires_grad=True)
    # V_sᵀ and U_s are zero until the launch fills them
    flat = torch.cat([a.detach().flatten(), torch.zeros(s * n_in, device=dev), b.detach().t().flatten(),
                      torch.zeros(s * n_out, device=dev), torch.full((r,), base, device=dev),
                      d.detach()]).to(torch.bfloat16)
    a_cat, a_t, b_t, coef, u_t = operands(flat, r, s, n_in, n_out, launched=False)
    assert u_t is None and a_cat.shape == (r, n_in)
    x = torch.randn(3, 50, n_in, device=dev, requires_grad=True)
    y = FusedDashLinear.apply(x.to(torch.bfloat16), a, b, d, (a_cat, a_t, b_t, coef * lam, u_t, base * lam, lam, r))
    gy = torch.randn_like(y)
    g_x, g_a, g_b, g_d = torch.autograd.grad(y, (x, a, b, d), gy)
    assert (g_d.device, g_d.dtype) == (d.device, torch.float32) and torch.equal(g_d, torch.zeros_like(d))
    assert [(t.device, t.dtype) for t in (g_x, g_a, g_b)] == [(a.device, torch.float32)] * 3

    def reference(x, a, b):  # plain LoRA, scaled by λ·scaling
        return lam * base * x @ a.t() @ b.t()

    prims = [t.detach().double().requires_grad_() for t in (x, a, b)]
    want = torch.autograd.grad(reference(*prims), prims, gy.double())
    _close(y, reference(*prims).detach(), 2e-2)
    for g_got, g_want in zip((g_x, g_a, g_b), want):
        _close(g_got, g_want, 2e-2)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


@cuda
def test_fused_weight_gradients_keep_the_float32_accumulator():
    """With bf16 operands and float32 parameters, both fused functions' weight gradients come out of cuBLAS's
    float32-output product (``ops.mm_to``), not out of a bf16 product that autograd then casts to float32.

    The reference is the same products in float64 of the very bf16 operands the kernels multiply: the
    activations and the bf16 intermediates (h = x Aᵀ, g_h = g (B c)ᵀ), recomputed here by the kernels' own
    calls on the same tensors (the same cuBLAS call on the same shapes gives the same bits). The correct
    gradients then differ from it only by float32 accumulation: products of bf16 numbers are exact in float32,
    and the sums run over 150 / 80 terms (estimated ~1e-6 relative, norm-wise). A gradient rounded to bf16 is
    off by up to 2^-9 per entry, ~5e-4 norm-wise: FusedDashLinear.backward 29 (grad_a) and 44 (grad_b and
    grad_δ), FusedAutoLoraLinear.backward 72 (grad_a) and 83 (grad_b, grad_β), the ``_mm_to(..., None)``
    mutants, which test_fused_*_bf16_gradients_are_float32_and_accurate (2e-2 against an all-float64
    reference) cannot resolve.

    Measured on an H100 (2026-11-28, printed with ``-rP``): relative errors 8.8e-8 to 3.8e-7; a CPU dry run
    with cuBLAS's float32 output emulated gave 4e-8 to 1e-7, and ``mm_to`` returning the bf16 product (the
    mutants) 1.3e-3 to 2.3e-3. REL = 4e-6 is ~10x the largest measured and ~300x below the mutants (all four
    killed on that H100 by tests/scripts/plant_mutants.py)."""
    import torch.nn.functional as F

    REL = 4e-6
    errors = {}
    torch.manual_seed(0)
    dev, r, s, n_in, n_out, lam, base = torch.device(DEV), 4, 3, 96, 80, 0.7, 2.0
    a = torch.randn(r, n_in, device=dev, requires_grad=True)
    b = torch.randn(n_out, r, device=dev, requires_grad=True)
    d = torch.randn(s, device=dev, requires_grad=True)
    v, u = torch.randn(s, n_in, device=dev), torch.randn(n_out, s, device=dev)
    flat = torch.cat([a.detach().flatten(), v.flatten(), b.detach().t().flatten(), u.t().flatten(),
                      torch.full((r,), base, device=dev), d.detach()]).to(torch.bfloat16)
    a_cat, a_t, b_t, coef, u_t = operands(flat, r, s, n_in, n_out, launched=True)
    xb = torch.randn(3, 50, n_in, device=dev).to(torch.bfloat16)
    y = FusedDashLinear.apply(xb, a, b, d, (a_cat, a_t, b_t, coef * lam, u_t, base * lam, lam, r))
    gy = torch.randn_like(y)
    g_a, g_b, g_d = torch.autograd.grad(y, (a, b, d), gy)
    assert [t.dtype for t in (g_a, g_b, g_d)] == [torch.float32] * 3
    # the kernel's bf16 operands, by its own calls (forward: h = x2 A_catᵀ; backward: g_h = g (B_cat c)ᵀ)
    x2, g = xb.reshape(-1, n_in), gy.reshape(-1, n_out)
    h = x2.mm(a_t)
    g_h = F.linear(g, b_t * (coef * lam))
    gh_t = h.double().t() @ g.double()  # (k, out)
    errors["dash A"] = _rel(g_a, g_h[:, :r].double().t() @ x2.double())
    errors["dash B"] = _rel(g_b, gh_t[:r].t() * (base * lam))
    errors["dash delta"] = _rel(g_d, (gh_t[r:] * u_t.double()).sum(1) * lam)

    k, n_in, n_out, scaling = 6, 64, 72, 1.5
    a = torch.randn(k, n_in, device=dev, requires_grad=True)
    b = torch.randn(n_out, k, device=dev, requires_grad=True)
    beta = torch.randn(k, device=dev, requires_grad=True)
    xb = torch.randn(2, 40, n_in, device=dev).to(torch.bfloat16)
    y = FusedAutoLoraLinear.apply(xb, a, b, beta, scaling)
    gy = torch.randn_like(y)
    g_a, g_b, g_beta = torch.autograd.grad(y, (a, b, beta), gy)
    assert [t.dtype for t in (g_a, g_b, g_beta)] == [torch.float32] * 3
    alpha = torch.softmax(beta.detach(), 0)  # float32, as the forward computes it
    c = alpha * scaling
    x2, g = xb.reshape(-1, n_in), gy.reshape(-1, n_out)
    h = x2.mm(a.detach().to(torch.bfloat16).t())
    g_h = g.mm((b.detach() * c).to(torch.bfloat16))
    gh = g.double().t() @ h.double()  # (out, k)
    errors["autolora A"] = _rel(g_a, g_h.double().t() @ x2.double())
    errors["autolora B"] = _rel(g_b, gh * c.double())
    grad_c = (gh * b.detach().double()).sum(0) * scaling
    al = alpha.double()
    beta_err = _rel(g_beta, al * (grad_c - (al * grad_c).sum()))  # softmax's backward
    errors["autolora beta"] = beta_err
    print({name: f"{e:.2e}" for name, e in errors.items()})
    assert all(e < REL for e in errors.values()), errors


@cuda
def test_directions_digest_of_a_model_on_the_gpu():
    """The launch's cross-process check hashes U_s and V_sᵀ of every layer on the host in float64: a launched
    model moved to the GPU has the digest it had on the CPU. Kills run.directions_digest 10 and 12 (the copy to
    the host dropped: a CUDA tensor has no ``.numpy()``), CPU-equivalent mutants."""
    import peft
    from torch import nn

    import dashdiff
    from dashdiff import training as T

    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("q_proj", nn.Linear(12, 16))
    net.add_module("o_proj", nn.Linear(16, 12))
    model = peft.get_peft_model(net, dashdiff.LoraDashConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"],
                                                             dash_directions=2, init_lora_weights="gaussian"))
    dashdiff.launch_dash(model)
    on_cpu = T.directions_digest(model)
    assert T.directions_digest(model.to(DEV)) == on_cpu


def _svd_launch(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, s: int):
    """A launch's reference from a float64 SVD of W0 on the CPU and the explicit ΔW = scaling·B A:
    (top-s indices, σ, every change rate |u_iᵀ ΔW v_i| / σ_i, U, Vᵀ)."""
    u, sig, vh = torch.linalg.svd(w0.detach().cpu().double(), full_matrices=False)
    dw = scaling * b.detach().cpu().double() @ a.detach().cpu().double()
    rate = torch.einsum("ik,ij,jk->k", u, dw, vh.t()).abs() / sig
    return torch.topk(rate, s).indices, sig, rate, u, vh


@cuda
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)], ids=["wide", "tall"])
def test_dash_launch_on_cuda_from_a_host_spectrum_matches_float64_svd(shape):
    """A GPU launch after a host prefetch (the decomposition on the CPU, W0 / A / B on the GPU) takes
    ``_select_from_host_eig``, whose device moves only matter across devices: every output must be
    on W0's device and match the SVD. Wide and tall run different branches; the same-device launch
    (no decomposition / one on the GPU) and ``spectrum`` from the host decomposition are checked
    too. Kills selection.py's CPU-equivalent mutants: select_directions 17-28 (dispatch arguments),
    99, 103, 108, 112, _select_from_host_eig 1, 30, 33, 36, 38, 89, 91, 96, 100, 105, 109, 126-128,
    spectrum 9, 10 (a ``.to(None)`` / default-device zeros: a device error or a CPU output).
    Tolerances: this code run on the CPU (DEV = "cpu": same-device paths only) measured at most 3e-14
    relative on σ, 2e-12 on the change rates, 3e-14 on the directions; 1e-9 leaves room for cuSOLVER's
    eigh (not measured yet) and is far below any wrong product's error (O(1)); the top-6 rates are
    3 % apart, so the order cannot flip."""
    from dashdiff.dash.selection import gram_eig, select_directions, spectrum

    torch.manual_seed(0)
    out_f, in_f = shape
    w0 = (torch.randn(*shape, dtype=torch.float64) * torch.logspace(0, -2, in_f, dtype=torch.float64)).float()
    a, b = torch.randn(4, in_f) * 0.1, torch.randn(out_f, 4) * 0.1
    idx, sig, rate, u, vh = _svd_launch(w0, a, b, 2.0, 5)
    host = gram_eig(w0)  # on the CPU, where the prefetcher leaves it
    dev = torch.device(DEV)
    w0_d, a_d, b_d = w0.to(dev), a.to(dev), b.to(dev)
    for eig in (host, None, gram_eig(w0_d)):
        sel = select_directions(w0_d, a_d, b_d, 2.0, 5, eig=eig)
        outs = {"indices": sel.indices, "u_s": sel.u_s, "v_s_t": sel.v_s_t, "sigma": sel.sigma,
                "change_rate": sel.change_rate}
        assert {k: t.device for k, t in outs.items()} == {k: w0_d.device for k in outs}, eig
        assert {k: t.dtype for k, t in outs.items()} == {k: torch.float64 for k in outs} | {"indices": torch.int64}
        assert sel.indices.tolist() == idx.tolist()
        torch.testing.assert_close(sel.sigma.cpu(), sig, rtol=1e-9, atol=0)
        torch.testing.assert_close(sel.change_rate.cpu(), rate, rtol=1e-9, atol=1e-12)
        for j, i in enumerate(idx.tolist()):  # each chosen rank-1 direction u_i v_iᵀ (sign-free)
            torch.testing.assert_close(torch.outer(sel.u_s[:, j], sel.v_s_t[j]).cpu(), torch.outer(u[:, i], vh[i]),
                                       rtol=0, atol=1e-9)
    spec = spectrum(w0_d, host)
    assert [t.device for t in (spec.u, spec.sigma, spec.v, spec.eligible)] == [w0_d.device] * 4
    assert bool(spec.eligible.all())
    torch.testing.assert_close(spec.sigma.cpu(), sig, rtol=1e-9, atol=0)
    # U diag(σ) Vᵀ gives W0 back: the reference is W0 itself
    torch.testing.assert_close(((spec.u * spec.sigma) @ spec.v.t()).cpu(), w0.double(), rtol=0, atol=1e-10)


# --------------------------------------------------------------------------- device audit (issue 12)
# The scripts, the app and the evaluation on a GPU: each of these crashed, or would crash, where a
# tensor made on the CPU meets the cuda batch. tests/test_devices.py checks the training step on the
# CPU (meta device); these run the real paths on cuda.

ROOT = Path(__file__).resolve().parents[1]
SUBJECT = str(ROOT / "assets" / "subject")
DEV = "cuda"  # the device these checks are for (a CPU dry run of the test code sets "cpu")


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _step_loss(db, model: str, device: str, latents: bool) -> list[float]:
    """One DreamBooth micro-batch (prior preservation, Min-SNR) on ``device``, batch tensors there as
    accelerate's loader leaves them; inputs drawn from a CPU generator as the script does."""
    from dashdiff.testing import resolve_model

    path = resolve_model(model)
    family = db.detect_family(path)
    args = db.parse_args(["--pretrained_model_name_or_path", path, "--instance_data_dir", SUBJECT,
                          "--instance_prompt", "a photo of sks toy", "--resolution", "64", "--output_dir", "unused",
                          "--report_to", "none", "--snr_gamma", "5"])
    db.resolve_defaults(args, family)
    models = db.load_models(args, family, path, torch.float32)
    for m in (models.vae, models.unet, *models.text_encoders):
        m.to(device)
    g = torch.Generator().manual_seed(3)
    batch = {"original_size": torch.tensor([[64, 64], [80, 72]], device=device),
             "crop_top_left": torch.tensor([[0, 0], [8, 4]], device=device),
             "prompts": ["a photo of sks toy", "a photo of a toy"]}
    if latents:
        batch["latent_params"] = torch.randn(2, 8, 8, 8, generator=g).to(device)
    else:
        batch["pixel_values"] = torch.rand(2, 3, 64, 64, generator=g).mul(2).sub(1).to(device)
    inputs = db.draw_inputs(batch, models, torch.Generator().manual_seed(0), torch.device(device), args,
                            torch.float32)
    loss_fn = db.LossFn(models, args, db.PromptCache(), [], prior=True)
    losses = [loss_fn(models.unet, inputs), loss_fn(models.unet, db.double_inputs(inputs))]
    return [float(x) for x in losses]


@cuda
@pytest.mark.parametrize("model,latents", [("tiny-sdxl", False), ("tiny-sdxl", True), ("tiny-sd", False)])
def test_dreambooth_step_on_cuda_matches_cpu(model, latents):
    """SDXL's time ids (the crash of issue 12), VAE sampling, noise, timesteps, the prior mask and
    the doubled batch on cuda; the CPU generators make the same inputs on both devices, so the losses
    agree (cuDNN convolutions may use TF32: 1e-2 relative)."""
    db = _load("dreambooth_dash", ROOT / "train" / "dreambooth_dash.py")
    got, want = _step_loss(db, model, DEV, latents), _step_loss(db, model, "cpu", latents)
    assert got == pytest.approx(want, rel=1e-2)


@cuda
def test_dreambooth_sdxl_every_method_runs_on_cuda(tmp_path):
    """The scripts as a user runs them on one GPU (bf16): every method, text-encoder training,
    cached latents, prior preservation with class images generated on the GPU, validation images,
    the reference output and the kohya export."""
    sys.path.insert(0, str(ROOT / "tests"))
    from launch_utils import accelerate_launch

    common = ["--pretrained_model_name_or_path", "tiny-sdxl", "--instance_data_dir", SUBJECT,
              "--instance_prompt", "a photo of sks toy", "--resolution", "64", "--train_batch_size", "2",
              "--learning_rate", "1e-3", "--report_to", "none", "--mixed_precision", "bf16",
              "--save_reference_output", "--output_kohya_format", "--num_inference_steps", "2"]
    lora = common + ["--method", "lora", "--train_text_encoder", "--max_train_steps", "2", "--snr_gamma", "5",
                     "--validation_prompt", "a photo of sks toy", "--num_validation_images", "1",
                     "--output_dir", str(tmp_path / "lora")]
    dash = common + ["--method", "dash", "--dash_warmup_steps", "1", "--dash_directions", "4", "--max_train_steps", "3",
                     "--train_text_encoder", "--cache_latents", "--with_prior_preservation", "--class_prompt", "a photo of a toy",
                     "--num_class_images", "2", "--class_data_dir", str(tmp_path / "class"),
                     "--output_dir", str(tmp_path / "dash")]
    auto = common + ["--method", "autolora", "--autolora_search_steps", "2", "--max_train_steps", "2",
                     "--output_dir", str(tmp_path / "autolora")]
    runs = str(ROOT / "tests" / "scripts" / "dreambooth_runs.py")
    proc = accelerate_launch(runs, *lora, "--next", *dash, "--next", *auto, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for name in ("lora", "dash", "autolora"):
        record = json.loads((tmp_path / name / "dashdiff_run.json").read_text())
        assert record["status"] == "done" and record["family"] == "sdxl", record
        assert (tmp_path / name / "pytorch_lora_weights_kohya.safetensors").is_file()
    assert (tmp_path / "lora" / "validation_0.png").is_file()
    assert len(list((tmp_path / "class").glob("*.png"))) == 2


@cuda
def test_app_renders_every_method_on_cuda(tmp_path):
    """The app's load (full-state files converted on the GPU) and render path, fp16 on cuda."""
    import dashdiff
    from dashdiff.testing import tiny_sdxl_pipeline

    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    folders = {}
    for slot, cfg in (("dash", dashdiff.LoraDashConfig(r=4, lora_alpha=4, target_modules=targets, dash_directions=2)),
                      ("autolora", dashdiff.AutoLoraConfig(r=4, lora_alpha=4, target_modules=targets))):
        pipe = tiny_sdxl_pipeline()
        pipe.unet.add_adapter(cfg)
        with torch.no_grad():
            for n, p in pipe.unet.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3)
        if slot == "dash":
            dashdiff.launch_dash(pipe.unet)
        folders[slot] = tmp_path / slot
        folders[slot].mkdir()
        dashdiff.save_adapter(pipe, folders[slot])
    app = _load("dashdiff_app", ROOT / "app.py")
    r = app.Renderer("tiny-sdxl", device=DEV)
    try:
        for slot, folder in folders.items():
            r.load(slot, folder / app.STATE_FILE)
        images = r.render("a photo of sks toy", seed=1, steps=3, width=64, height=64)
    finally:
        r.close()
    assert len(images) == 3
    base, dash, auto = (np.asarray(im, dtype=np.float32) for im in images)
    assert np.abs(base - dash).mean() > 0.5 and np.abs(base - auto).mean() > 0.5  # the adapters act


@cuda
def test_commonsense_eval_generates_on_cuda(tmp_path):
    """commonsense_eval.py on the GPU (fp16, beam search), with a launched LoRA-Dash adapter file."""
    import dashdiff
    from launch_utils import load_script

    DATASETS = load_script("train/commonsense_data.py", reuse=True).DATASETS
    from dashdiff.testing import resolve_model
    from transformers import AutoModelForCausalLM

    base = resolve_model("tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(base)
    from peft import inject_adapter_in_model

    inject_adapter_in_model(dashdiff.LoraDashConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                    dash_directions=2, init_lora_weights=False), model)
    dashdiff.launch_dash(model)
    adapter = tmp_path / "dash.safetensors"
    dashdiff.save_adapter(model, adapter)
    script = _load("commonsense_eval", ROOT / "train" / "commonsense_eval.py")
    out = tmp_path / "out"
    payload = script.main(script.parse_args([
        "--dataset", "all", "--data_dir", str(ROOT / "tests" / "fixtures" / "commonsense"), "--base_model", base,
        "--lora_weights", str(adapter), "--limit", "2", "--batch_size", "2", "--max_new_tokens", "4",
        "--device", DEV, "--output_dir", str(out), "--no_progress"]))
    assert payload["complete"] and list(payload["accuracy"]) == list(DATASETS)
    assert all(len(json.loads((out / f"{n}.json").read_text())) == 2 for n in DATASETS)


@cuda
def test_checkpoints_written_on_cuda_pass_the_checks_and_resume(tmp_path):
    """Issue 13: a checkpoint written on CUDA (optimizer.bin, the RNG file and extra_state.pt with
    β's Adam state hold CUDA tensors) passes the pre-resume check (weights_only, read on CPU,
    memory-mapped) and resumes the AutoLoRA search to the same losses and adapter."""
    from pathlib import Path

    from safetensors.torch import load_file

    import test_commonsense_train as ct
    from dashdiff import training as T
    from dashdiff.testing import resolve_model

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


@cuda
def test_fp16_overflow_with_fused_adamw_is_seen_as_a_skipped_step():
    """accelerate's real fp16 GradScaler with fused AdamW (the scripts' and Trainer's optimizer): an
    overflowing step is skipped inside the kernel, which accelerate's ``step_was_skipped`` misses;
    ``dashdiff.training.step_skipped`` sees it (the scaler backs off), and not on a finite step."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import GradScalerKwargs

    from dashdiff.training import loss_scale, step_skipped

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        # A small initial scale: at accelerate's 2**16 a fp16 matmul gradient may really overflow on the
        # first "finite" step (the scaler's usual start-up back-off), which is a skip, not this test's case.
        acc = Accelerator(mixed_precision="fp16", kwargs_handlers=[GradScalerKwargs(init_scale=2.0 ** 8)])
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


@cuda
def test_dreambooth_eval_generates_from_an_fp16_folder_on_cuda(tmp_path):
    """dreambooth_eval's pipeline from mini-sd (saved fp16) on the GPU in its default dtype: every
    component in fp16 and a finite image (without one explicit dtype the UNet met half embeddings
    from the fp16 text encoder and raised)."""
    de = _load("dreambooth_eval", ROOT / "train" / "dreambooth_eval.py")
    pipe = de.load_pipeline("mini-sd", device=DEV)
    want = de.pipeline_dtype(DEV)  # float16 on the GPU
    assert {p.dtype for p in pipe.unet.parameters()} | {p.dtype for p in pipe.text_encoder.parameters()} == {want}
    samples = de.generate_images(pipe, ["a photo of a toy on the beach"], [0], tmp_path / "images", steps=4,
                                 resolution=64)
    pixels = np.asarray(de.load_images([samples[0].file])[0], dtype=np.float32)
    assert pixels.shape == (64, 64, 3) and np.isfinite(pixels).all() and pixels.std() > 1.0
