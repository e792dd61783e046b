"""LoRA-Dash / AutoLoRA tuner layer: math, lifecycle, PEFT runtime controls and bad input."""

import math

import peft
import pytest
import torch
from torch import nn

import dashdiff
from dashdiff import AutoLoraConfig, LoraDashConfig
from dashdiff.dash.kernel import FusedDashLinear, operands
from dashdiff.dash.selection import select_directions


def decaying_weight(out_f: int, in_f: int, seed: int = 0, decades: float = 4.0) -> torch.Tensor:
    """A weight with singular values decaying over ``decades`` orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    k = min(out_f, in_f)
    u, _ = torch.linalg.qr(torch.randn(out_f, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_f, k, generator=g, dtype=torch.float64))
    sigma = torch.logspace(0, -decades, k, dtype=torch.float64)
    return (u * sigma) @ v.t()


class Tiny(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        self.q_proj = nn.Linear(32, 48)
        self.o_proj = nn.Linear(48, 32)
        with torch.no_grad():
            self.q_proj.weight.copy_(decaying_weight(48, 32, seed).float())
            self.o_proj.weight.copy_(decaying_weight(32, 48, seed + 1).float())

    def forward(self, x):
        return self.o_proj(torch.tanh(self.q_proj(x)))


def dash_model(r=4, alpha=8, s=3, t=2, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = LoraDashConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "o_proj"], dash_warmup_steps=t,
                         dash_directions=s, init_lora_weights="gaussian", **kw)
    model = peft.get_peft_model(Tiny(seed), cfg)
    with torch.no_grad():  # B != 0 so that ΔW carries information at launch
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def layers(model):
    return {n: layer for n, layer, _ in dashdiff.walk.iter_layers(model, "dash")}


def reference_selection(w0, a, b, scaling, s):
    """Independent float64 SVD computation of the top-s change-rate directions."""
    u, sig, vh = torch.linalg.svd(w0.double(), full_matrices=False)
    dw = scaling * b.double() @ a.double()
    dsig = torch.diagonal(u.t() @ dw @ vh.t())
    rate = dsig.abs() / sig
    # METHODS.md: σ <= max(out, in)·eps32·σ_max is numerically zero and never selected
    rate[sig <= max(w0.shape) * torch.finfo(torch.float32).eps * sig[0]] = -1
    return torch.argsort(rate, descending=True)[:s], u, vh


def test_launch_matches_float64_svd_selection():
    for shape, seed in [((64, 40), 0), ((40, 64), 1), ((96, 96), 2)]:
        w0 = decaying_weight(*shape, seed=seed, decades=5).float()
        g = torch.Generator().manual_seed(seed)
        a = torch.randn(4, shape[1], generator=g) * 0.1
        b = torch.randn(shape[0], 4, generator=g) * 0.1
        sel = select_directions(w0, a, b, 2.0, 8)
        ref_idx, u, vh = reference_selection(w0, a, b, 2.0, 8)
        assert sel.indices.tolist() == ref_idx.tolist()
        # the stored directions are the singular pairs, up to a common sign per pair
        for j, i in enumerate(sel.indices.tolist()):
            sign = torch.sign(sel.u_s[:, j] @ u[:, i])
            torch.testing.assert_close(sel.u_s[:, j] * sign, u[:, i], atol=1e-6, rtol=0)
            torch.testing.assert_close(sel.v_s_t[j] * sign, vh[i], atol=1e-6, rtol=0)


def test_numerically_zero_directions_are_not_eligible():
    w0 = torch.zeros(16, 12)
    w0[:3, :3] = torch.diag(torch.tensor([3.0, 2.0, 1.0]))  # rank 3
    a, b = torch.randn(2, 12), torch.randn(16, 2)
    sel = select_directions(w0, a, b, 1.0, 5)
    assert sorted(sel.indices.tolist()) == [0, 1, 2]
    assert sel.u_s.shape == (16, 5) and torch.all(sel.u_s[:, 3:] == 0) and torch.all(sel.v_s_t[3:] == 0)
    assert torch.isnan(sel.change_rate[3:]).all()


@pytest.mark.parametrize("shape", [(40, 12), (12, 40)])
def test_numerically_zero_threshold_boundary_non_square(shape):
    """METHODS.md: σ <= max(out, in)·eps32·σ_max is numerically zero. Singular values 1 % either side
    of that threshold, and one between the min(out, in) and max(out, in) versions of it, on both a
    tall and a wide weight (the launch takes a different Gram matrix for each)."""
    eps32 = torch.finfo(torch.float32).eps
    top = 8.0  # σ_max != 1, so the threshold's σ_max factor matters
    t = max(shape) * eps32 * top
    sigma = torch.tensor([1.0, 0.5, 0.25, 1.01 * t / top, 0.99 * t / top, 0.5 * (min(shape) + max(shape)) * eps32],
                         dtype=torch.float64) * top
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(shape[0], sigma.numel(), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], sigma.numel(), generator=g, dtype=torch.float64))
    w0 = (u * sigma) @ v.t()  # rank 6; the other min(shape) - 6 singular values are 0
    a = torch.randn(2, shape[1], generator=g, dtype=torch.float64)
    b = torch.randn(shape[0], 2, generator=g, dtype=torch.float64)
    from dashdiff.dash.selection import _select_from_host_eig, gram_eig

    # both launch paths: W0's own spectrum, and a spectrum prefetched to the host (its own threshold code)
    for sel in (select_directions(w0, a, b, 1.0, min(shape)),
                _select_from_host_eig(w0, a, b, 1.0, min(shape), gram_eig(w0))):
        assert sorted(sel.indices.tolist()) == [0, 1, 2, 3]  # 1.01·threshold is eligible, the rest not
        assert torch.isfinite(sel.change_rate[:4]).all() and torch.isnan(sel.change_rate[4:]).all()
        torch.testing.assert_close(sel.sigma[:6], sigma, rtol=1e-5, atol=0)
    from dashdiff.dash.selection import spectrum

    spec = spectrum(w0)  # its contract: the columns of numerically-zero singular values are zero
    assert spec.eligible.tolist() == [True] * 4 + [False] * (min(shape) - 4)
    assert torch.all(spec.u[:, 4:] == 0) and torch.all(spec.v[:, 4:] == 0)


def test_zero_weight_has_no_eligible_direction():
    """An all-zero W0 (zero-initialised layers exist): σ_max = 0, so nothing is eligible and nothing is
    selected (no 0/0 change rates)."""
    from dashdiff.dash.selection import _select_from_host_eig, gram_eig

    w0, a, b = torch.zeros(6, 4), torch.randn(2, 4), torch.randn(6, 2)
    for sel in (select_directions(w0, a, b, 1.0, 2), _select_from_host_eig(w0, a, b, 1.0, 2, gram_eig(w0))):
        assert sel.indices.numel() == 0 and torch.isnan(sel.change_rate).all()
        assert torch.all(sel.u_s == 0) and torch.all(sel.v_s_t == 0)


def test_launch_refuses_more_directions_than_the_layer_has():
    # the launch's own check (the layer's constructor has another, with another message)
    msg = ("dash_directions s=5 exceeds min(out, in)=4 of a 4x6 layer: "
           "lower dash_directions or leave this layer out of target_modules.")
    with pytest.raises(ValueError) as err:
        select_directions(torch.randn(4, 6), torch.randn(2, 6), torch.randn(4, 2), 1.0, 5)
    assert str(err.value) == msg


def test_launch_path_follows_the_decompositions_device(monkeypatch):
    """A prefetched decomposition on W0's own device goes through ``spectrum`` (the host path is for a
    decomposition left on another device than W0's, e.g. a GPU launch after a host prefetch)."""
    from dashdiff.dash import selection as launch

    w0 = decaying_weight(12, 8, seed=5).float()
    eig = launch.gram_eig(w0)
    calls = []
    monkeypatch.setattr(launch, "_select_from_host_eig", lambda *args: calls.append("host"))
    sel = select_directions(w0, torch.randn(2, 8), torch.randn(12, 2), 1.0, 3, eig=eig)
    assert calls == [] and sel.indices.numel() == 3


def test_precomputed_gram_eig_is_used(monkeypatch):
    """select_directions with a prefetched eigendecomposition does not decompose W0 again (the point of
    the prefetch) and gives the same selection."""
    from dashdiff.dash import selection as launch

    w0 = decaying_weight(24, 16, seed=4).float()
    a, b = torch.randn(2, 16), torch.randn(24, 2)
    want = select_directions(w0, a, b, 1.0, 3)
    eig = launch.gram_eig(w0)
    monkeypatch.setattr(launch, "gram_eig", lambda w: (_ for _ in ()).throw(AssertionError("decomposed again")))
    got = select_directions(w0, a, b, 1.0, 3, eig=eig)
    assert got.indices.tolist() == want.indices.tolist()


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


def test_lifecycle_forward_and_gradients():
    model = dash_model(t=2)
    x = torch.randn(6, 32)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    # evaluation forwards never advance the warm-up
    model.eval()
    with torch.no_grad():
        model(x)
    assert all(layer._dash_steps["default"] == 0 for layer in layers(model).values())
    model.train()
    launched_at = []
    for step in range(1, 4):
        model(x).pow(2).mean().backward()
        deltas = [layer.lora_dash_delta["default"] for layer in layers(model).values()]
        if step <= 2:  # δ takes part before launch, with an exactly-zero gradient
            assert all(d.grad is not None and torch.all(d.grad == 0) for d in deltas)
        opt.step()
        opt.zero_grad()
        before = model(x).detach()
        if dashdiff.dash_step(model):
            launched_at.append(step)
            # launch leaves the output unchanged (δ = 0)
            torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-7)
    assert launched_at == [2]
    sel = dashdiff.selected_directions(model)
    assert set(sel) == {"q_proj", "o_proj"} and all(v.numel() == 3 for v in sel.values())

    # gradients reach A, B and δ only
    model(x).pow(2).mean().backward()
    for n, p in model.named_parameters():
        trainable = any(k in n for k in ("lora_A", "lora_B", "lora_dash_delta"))
        assert p.requires_grad == trainable, n
        if trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    for layer in layers(model).values():
        assert not layer.lora_dash_U["default"].requires_grad and not layer.lora_dash_V["default"].requires_grad

    # the dash forward equals W0 x + b + scaling·BAx + U_s diag(δ) V_sᵀ x
    for layer in layers(model).values():
        with torch.no_grad():
            layer.lora_dash_delta["default"].normal_(0, 0.3)
    layer = layers(model)["q_proj"]
    xin = torch.randn(5, 32)
    w0, bias = layer.base_layer.weight, layer.base_layer.bias
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    u, v, d = layer.lora_dash_U["default"], layer.lora_dash_V["default"], layer.lora_dash_delta["default"]
    expected = xin @ w0.t() + bias + 2.0 * xin @ a.t() @ b.t() + xin @ v.t() @ torch.diag(d) @ u.t()
    torch.testing.assert_close(layer(xin), expected, rtol=1e-5, atol=1e-6)
    # the stored directions are the ones the selection names
    rec = layer.dash_record["default"]
    _, uu, vh = reference_selection(w0.detach(), a.detach(), b.detach(), 2.0, 3)  # W0's float64 SVD
    assert torch.allclose(rec["sigma"], torch.linalg.svdvals(w0.double()), rtol=1e-8, atol=1e-10)
    assert rec["indices"].numel() == 3
    for j, i in enumerate(rec["indices"].tolist()):  # U_s column j, V_sᵀ row j: singular pair i, one sign
        sign = torch.sign(u[:, j].double() @ uu[:, i])
        torch.testing.assert_close(u[:, j].double() * sign, uu[:, i], rtol=0, atol=1e-6)
        torch.testing.assert_close(v[j].double() * sign, vh[i], rtol=0, atol=1e-6)


def test_selection_equals_reference_at_launch_time():
    model = dash_model(t=1)
    snapshot = {n: (layer.base_layer.weight.detach().clone(), layer.lora_A["default"].weight.detach().clone(),
                    layer.lora_B["default"].weight.detach().clone()) for n, layer in layers(model).items()}
    assert dashdiff.dash_step(model)
    for n, idx in dashdiff.selected_directions(model).items():
        ref, _, _ = reference_selection(*snapshot[n], 2.0, 3)
        assert idx.tolist() == ref.tolist(), n


def test_training_updates_views_and_survives_dtype_moves():
    model = dash_model(t=1)
    dashdiff.dash_step(model)
    x = torch.randn(4, 32)
    layer = layers(model)["q_proj"]
    a_before = layer.lora_A["default"].weight.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    u_before = layer.lora_dash_U["default"].clone()
    model(x).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(layer.lora_A["default"].weight, a_before)
    # frozen directions are untouched by the optimizer and by weight decay
    torch.testing.assert_close(layer.lora_dash_U["default"], u_before, rtol=0, atol=0)
    # a dtype round trip breaks the storage aliasing: the layer re-fuses and stays exact
    ref = model(x).detach()
    model.double()
    torch.testing.assert_close(model(x.double()).float(), ref, rtol=1e-5, atol=1e-6)
    model.float()
    torch.testing.assert_close(model(x), ref, rtol=1e-6, atol=1e-6)
    a_cat, _ = layer._storage("default")
    assert layer.lora_A["default"].weight.data_ptr() == a_cat.data_ptr()


def test_runtime_scale_merge_disable_and_multiple_adapters():
    model = dash_model(r=4, alpha=12, t=1)  # lora_alpha != r
    dashdiff.dash_step(model)
    for layer in layers(model).values():
        with torch.no_grad():
            layer.lora_dash_delta["default"].normal_(0, 0.5)
    x = torch.randn(3, 32)
    with model.disable_adapter():
        base = model(x)
    layer = layers(model)["q_proj"]
    xin = torch.randn(3, 32)
    full = layer(xin) - layer.base_layer(xin)
    layer.scale_layer(0.5)
    torch.testing.assert_close(layer(xin) - layer.base_layer(xin), 0.5 * full, rtol=1e-5, atol=1e-6)
    layer.unscale_layer()
    layer.set_scale("default", 0.5)
    torch.testing.assert_close(layer(xin) - layer.base_layer(xin), 0.5 * full, rtol=1e-5, atol=1e-6)
    layer.set_scale("default", 1.0)
    out = model(x)
    model.merge_adapter()
    torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), base)
    # a second adapter on the same layers, switched by name
    model.add_adapter("other", LoraDashConfig(r=2, lora_alpha=2, target_modules=["q_proj", "o_proj"],
                                              dash_warmup_steps=1, dash_directions=2))
    assert dashdiff.dash_step(model, adapter_name="other")
    assert dashdiff.selected_directions(model, "other")["q_proj"].numel() == 2
    model.set_adapter("other")
    with torch.no_grad():
        other = model(x)
    model.set_adapter("default")
    torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(other, out)
    with pytest.raises(ValueError, match="several LoRA-Dash adapters"):
        dashdiff.selected_directions(model)


def test_autolora_forward_and_ranks():
    torch.manual_seed(0)
    cfg = AutoLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], init_lora_weights="gaussian")
    model = peft.get_peft_model(Tiny(), cfg)
    layer = {n: m for n, m, _ in dashdiff.walk.iter_layers(model, "autolora")}["q_proj"]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    alpha = dashdiff.selection_weights(model)["q_proj"]
    assert alpha.dtype == torch.float64 and torch.allclose(alpha, torch.full((4,), 0.25, dtype=torch.float64))
    xin = torch.randn(3, 32)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    beta = torch.tensor([2.0, 1.0, 0.5, -1.0])
    with torch.no_grad():
        layer.lora_autolora_beta["default"].copy_(beta)
    expected = layer.base_layer(xin) + 2.0 * xin @ a.t() @ torch.diag(torch.softmax(beta, 0)) @ b.t()
    torch.testing.assert_close(layer(xin), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="before any AutoLoRA outer"):
        dashdiff.determine_ranks(model)
    for _, m, ad in dashdiff.walk.iter_layers(model, "autolora"):
        m.lora_autolora_outer_steps[ad].add_(1)
    ranks = dashdiff.determine_ranks(model)
    expected_rank = int((torch.softmax(beta.double(), 0) >= 0.25).sum())
    assert ranks["q_proj"] == expected_rank == 1 and ranks["o_proj"] == 4  # uniform β: α_j = 1/k >= 1/k
    assert dashdiff.determine_ranks(model, rule="published")["q_proj"] == int((beta / beta.sum() >= 0.25).sum())
    with torch.no_grad():
        layer.lora_autolora_beta["default"].copy_(torch.tensor([-1.0, -1.0, 0.5, 0.2]))
    with pytest.raises(ValueError, match="undefined"):
        dashdiff.determine_ranks(model, rule="published")


def test_bad_inputs():
    class WithConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.lin = nn.Linear(4, 4)

    with pytest.raises(TypeError, match="not a dense torch.nn.Linear.*bf16/fp16"):
        peft.get_peft_model(WithConv(), LoraDashConfig(r=2, target_modules=["conv"]))

    class FakeQuantLinear(nn.Linear):
        pass

    m = WithConv()
    m.lin = FakeQuantLinear(4, 4)
    with pytest.raises(TypeError, match="FakeQuantLinear"):
        peft.get_peft_model(m, AutoLoraConfig(r=2, target_modules=["lin"]))
    with pytest.raises(ValueError, match=r"dash_directions s=9 exceeds min\(out, in\)=4"):
        peft.get_peft_model(WithConv(), LoraDashConfig(r=2, target_modules=["lin"], dash_directions=9))
    for bad in [dict(use_dora=True), dict(lora_bias=True), dict(fan_in_fan_out=True), dict(init_lora_weights="pissa"),
                dict(init_lora_weights="olora"), dict(layer_replication=[(0, 1)])]:
        with pytest.raises(ValueError, match="does not define these LoraConfig options"):
            LoraDashConfig(r=2, target_modules=["lin"], **bad)
        with pytest.raises(ValueError, match="does not define"):
            AutoLoraConfig(r=2, target_modules=["lin"], **bad)
    with pytest.raises(ValueError, match="no LoRA-Dash adapter"):
        dashdiff.selected_directions(peft.get_peft_model(WithConv(), AutoLoraConfig(r=2, target_modules=["lin"])))


def test_rslora_scaling_is_kept():
    """use_rslora: ΔW = (α/√r)·B A = 4·B A here (not α/r = 2) in the forward, in the launch's change
    rates and in the export."""
    model = dash_model(r=4, alpha=8, t=1, use_rslora=True)
    layer = layers(model)["q_proj"]
    assert layer.base_scaling("default") == pytest.approx(8 / math.sqrt(4))
    assert layer.runtime_scale("default") == pytest.approx(1.0)
    w0, bias = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    a, b = layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone()
    dw = 4.0 * b.double() @ a.double()
    x = torch.randn(5, 32)
    torch.testing.assert_close(layer(x), x @ w0.t() + bias + (x.double() @ dw.t()).float(), rtol=1e-5, atol=1e-6)
    assert dashdiff.dash_step(model)
    u, sig, vh = torch.linalg.svd(w0.double(), full_matrices=False)
    rate = torch.diagonal(u.t() @ dw @ vh.t()).abs() / sig  # every σ of this weight is eligible
    torch.testing.assert_close(layer.dash_record["default"]["change_rate"], rate, rtol=1e-6, atol=0)
    f = next(f for f in dashdiff.export.plain_lora_factors(model) if f.module.endswith("q_proj"))
    torch.testing.assert_close((f.b @ f.a).double(), dw, rtol=0, atol=1e-6)  # δ = 0 right after launch


def test_prefetched_spectra_give_the_same_launch():
    plain, pre = dash_model(t=2, seed=3), dash_model(t=2, seed=3)
    handle = dashdiff.prefetch_spectra(pre)
    handle.wait()
    assert all("default" in layer.eig_cache for layer in layers(pre).values())
    x = torch.randn(4, 32)
    for m in (plain, pre):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        torch.manual_seed(1)
        for _ in range(2):
            m(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            dashdiff.dash_step(m)
    a, b = dashdiff.selected_directions(plain), dashdiff.selected_directions(pre)
    assert {k: v.tolist() for k, v in a.items()} == {k: v.tolist() for k, v in b.items()}
    for n in layers(plain):
        torch.testing.assert_close(layers(pre)[n].lora_dash_U["default"].abs(), layers(plain)[n].lora_dash_U["default"].abs())
    assert all(not layer.eig_cache for layer in layers(pre).values())  # consumed at launch


def test_prefetch_options():
    model = dash_model(t=2, seed=3)
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        dashdiff.prefetch_spectra(model, device="gpu")
    handle = dashdiff.prefetch_spectra(model, device="cpu", workers=2)
    handle.wait()
    assert handle.done and all("default" in layer.eig_cache for layer in layers(model).values())


def test_launch_does_not_wait_for_a_slow_prefetch(monkeypatch):
    # Workers stuck on their layers (a slow host): the launch must decompose every layer in line,
    # those not started and those still on a worker, and select exactly what a launch without
    # prefetch selects. The workers are released 20 s later, so a launch that waits for them fails.
    import threading
    import time
    from dashdiff.dash import prefetch

    release = threading.Event()
    original = prefetch.SpectrumPrefetcher._host

    def stuck(self, i):
        release.wait(20)
        return original(self, i)

    monkeypatch.setattr(prefetch.SpectrumPrefetcher, "_host", stuck)
    plain, pre = dash_model(t=1, seed=3), dash_model(t=1, seed=3)
    handle = dashdiff.prefetch_spectra(pre, workers=1)
    n = len(layers(pre))
    t0 = time.perf_counter()
    report = dashdiff.dash_step(pre)
    assert report
    elapsed = time.perf_counter() - t0
    release.set()
    assert elapsed < 10, f"the launch waited {elapsed:.1f} s for the workers"
    assert handle.report.in_line == n and handle.report.prefetched == 0
    assert report.prefetch is handle.report
    dashdiff.dash_step(plain)
    a, b = dashdiff.selected_directions(plain), dashdiff.selected_directions(pre)
    assert {k: v.tolist() for k, v in a.items()} == {k: v.tolist() for k, v in b.items()}
    handle.wait()  # the released worker's late result is dropped, not installed after the launch
    assert all(not layer.eig_cache for layer in layers(pre).values())


def test_launch_after_a_finished_prefetch_uses_it():
    pre = dash_model(t=1, seed=3)
    handle = dashdiff.prefetch_spectra(pre, workers=2)
    handle.wait()
    assert dashdiff.dash_step(pre)
    assert handle.report.prefetched == len(layers(pre)) and handle.report.in_line == 0


def test_half_precision_base_trains_the_models_own_parameters():
    # PEFT upcasts half-precision adapters to float32 by replacing the Parameter objects: the
    # fused path must follow the model's current parameters, before and after launch.
    torch.manual_seed(0)
    cfg = LoraDashConfig(r=4, lora_alpha=4, target_modules=["q_proj", "o_proj"], dash_warmup_steps=1,
                         dash_directions=2, init_lora_weights="gaussian")
    model = peft.get_peft_model(Tiny().to(torch.bfloat16), cfg)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    for launched in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().pow(2).mean()
        loss.backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert p.dtype == torch.float32 and p.grad is not None, n
                if "lora_B" in n or ("lora_dash_delta" in n and launched):
                    assert p.grad.abs().sum() > 0, n
        model.zero_grad()
        if not launched:
            dashdiff.launch_dash(model)
            for layer in layers(model).values():
                with torch.no_grad():
                    layer.lora_dash_delta["default"].fill_(0.1)


def test_autocast_forward_follows_every_weight_update():
    # Under autocast the layer reads a low-precision copy of its storage, refreshed per forward: after
    # each optimizer step the output must follow the new A, B, δ (float32 reference, bf16 tolerance).
    model = dash_model(t=1, seed=5)
    dashdiff.launch_dash(model)
    x = torch.randn(6, 32)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=2.0)
    before = None
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        with torch.no_grad():
            ref = model(x)
        torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)
        if before is not None:
            assert (ref - before).abs().max() > 0.1  # the step changed the output well beyond the tolerance
        before = ref
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_host_spectrum_launch_matches_float64_svd(shape):
    # The launch from a spectrum prefetched to the host (weights on a GPU in real runs) takes a
    # different arrangement of the products; reference: float64 SVD of W0 and the explicit ΔW.
    from dashdiff.dash.selection import _select_from_host_eig, gram_eig

    torch.manual_seed(0)
    w = torch.randn(*shape, dtype=torch.float64) * torch.logspace(0, -2, shape[1], dtype=torch.float64)
    a, b = torch.randn(4, shape[1]) * 0.1, torch.randn(shape[0], 4) * 0.1
    got = _select_from_host_eig(w.float(), a, b, 2.0, 5, gram_eig(w.float()))
    u, sig, vh = torch.linalg.svd(w.float().double(), full_matrices=False)
    dsig = torch.einsum("ik,ij,jk->k", u, 2.0 * b.double() @ a.double(), vh.t())
    want = torch.topk(dsig.abs() / sig, 5).indices
    assert got.indices.tolist() == want.tolist()
    torch.testing.assert_close(got.change_rate, dsig.abs() / sig, rtol=1e-9, atol=1e-12)
    # every σ_i (measured relative error 3.1e-10 at the smallest σ of the square case: the Gram route)
    torch.testing.assert_close(got.sigma, sig, rtol=3e-9, atol=0)
    for j, i in enumerate(want.tolist()):  # each chosen rank-1 direction u_i v_iᵀ (sign-free)
        torch.testing.assert_close(torch.outer(got.u_s[:, j], got.v_s_t[j]), torch.outer(u[:, i], vh[i]),
                                   rtol=0, atol=1e-9)


_EXIT_SCRIPT = """
import time, peft, torch, dashdiff
from torch import nn
from dashdiff.dash import prefetch
class M(nn.Module):
    def __init__(self):
        super().__init__(); self.q_proj = nn.Linear(200, 200)
    def forward(self, x): return self.q_proj(x)
m = peft.get_peft_model(M(), dashdiff.LoraDashConfig(r=2, lora_alpha=2, target_modules=["q_proj"],
                        dash_warmup_steps=1, dash_directions=2, init_lora_weights="gaussian"))
orig = prefetch.SpectrumPrefetcher._host
def slow(self, i):
    out = orig(self, i)
    x = torch.randn(700, 700, dtype=torch.float64)
    for _ in range(4):  # native work still running on the worker when the script ends
        torch.linalg.eigh(x @ x.T)
    return out
prefetch.SpectrumPrefetcher._host = slow
handle = dashdiff.prefetch_spectra(m, workers=1)
time.sleep(0.2)
assert dashdiff.dash_step(m) and handle.report.in_line == 1
"""


def test_script_exits_cleanly_while_a_prefetch_worker_is_busy():
    # The launch does not wait for a worker's layer; a worker torn down inside a native call at
    # interpreter exit aborted the process ("terminate called without an active exception", rc 134:
    # a two-GPU LLaMA run, reproduced here on the CPU).
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "terminate called" not in proc.stderr


@pytest.mark.parametrize("shape", [(40, 64), (64, 40)])
def test_tied_change_rates_keep_the_larger_singular_values(shape):
    """B = 0 (ΔW = 0): every change rate is 0, so the order among them is the tie-break: the launch
    keeps the directions of the largest σ, in order (a stable sort), on both launch paths."""
    from dashdiff.dash.selection import _select_from_host_eig, gram_eig

    w0 = decaying_weight(*shape, seed=6, decades=2).float()
    a, b = torch.randn(2, shape[1]), torch.zeros(shape[0], 2)
    for sel in (select_directions(w0, a, b, 1.0, 6), _select_from_host_eig(w0, a, b, 1.0, 6, gram_eig(w0))):
        assert sel.indices.tolist() == [0, 1, 2, 3, 4, 5]
        assert torch.all(sel.change_rate == 0)
