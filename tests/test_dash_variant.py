"""dashdiff.dash.variant: the LoRA-Dash method object's storage, dtypes, autocast and rsLoRA scaling."""

import math

import peft
import pytest
import torch

import dashdiff
from dashdiff import LoraDashConfig
from dash_models import Tiny, dash_model, layers


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
