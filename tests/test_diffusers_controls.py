"""PEFT / diffusers runtime controls on a launched LoRA-Dash UNet (lora_alpha != r): the runtime
scale halves the whole update, dash term included; fuse / unfuse round-trip; disable gives the base."""

import pytest
import torch

import dashdiff
from dashdiff.testing import tiny_sd_pipeline


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    p = tiny_sd_pipeline()
    p.unet.add_adapter(dashdiff.LoraDashConfig(r=4, lora_alpha=12, init_lora_weights="gaussian",
                                               target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                               dash_warmup_steps=1, dash_directions=3))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, prm in p.unet.named_parameters():
            if "lora_B" in n:
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.05)
    dashdiff.launch_dash(p.unet)
    with torch.no_grad():
        for n, prm in p.unet.named_parameters():
            if "lora_dash_delta" in n:
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.5)
    return p


def unet_inputs():
    g = torch.Generator().manual_seed(2)
    return (torch.randn(1, 4, 32, 32, generator=g), torch.tensor([500]), torch.randn(1, 77, 32, generator=g))


def capture(unet, layer, **kw):
    """Run the UNet, return the (input, output) the given layer saw."""
    seen = {}
    handle = layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach(), y=out.detach()))
    sample, t, ehs = unet_inputs()
    with torch.no_grad():
        out = unet(sample, t, encoder_hidden_states=ehs, **kw).sample
    handle.remove()
    return seen["x"], seen["y"], out


def test_scale_and_set_adapters_halve_the_full_update(pipe):
    unet = pipe.unet
    name, layer, _ = next(dashdiff.walk.iter_layers(unet, "dash"))
    assert layer.is_launched("default") and layer.lora_alpha["default"] != layer.r["default"]
    x, y_half, _ = capture(unet, layer, cross_attention_kwargs={"scale": 0.5})
    with torch.no_grad():
        full = layer(x) - layer.base_layer(x)  # scale restored after the call
    torch.testing.assert_close(y_half - layer.base_layer(x), 0.5 * full, rtol=1e-5, atol=1e-6)
    # the dash term is part of what gets halved
    dash_part = x @ layer.lora_dash_V["default"].t() @ torch.diag(layer.lora_dash_delta["default"].detach()) \
        @ layer.lora_dash_U["default"].t()
    assert dash_part.abs().max() > 1e-3

    pipe.set_adapters(["default"], adapter_weights=[0.5])
    assert layer.scaling["default"] == pytest.approx(0.5 * 12 / 4)
    with torch.no_grad():
        torch.testing.assert_close(layer(x) - layer.base_layer(x), 0.5 * full, rtol=1e-5, atol=1e-6)
    pipe.set_adapters(["default"], adapter_weights=[1.0])


def test_fuse_unfuse_and_disable(pipe):
    unet = pipe.unet
    _, layer, _ = next(dashdiff.walk.iter_layers(unet, "dash"))
    w0 = layer.base_layer.weight.detach().clone()
    _, _, out = capture(unet, layer)
    pipe.fuse_lora(components=["unet"])
    _, _, fused = capture(unet, layer)
    torch.testing.assert_close(fused, out, rtol=1e-4, atol=1e-5)
    pipe.unfuse_lora(components=["unet"])
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)
    _, _, unfused = capture(unet, layer)
    torch.testing.assert_close(unfused, out, rtol=1e-5, atol=1e-6)
    unet.disable_adapters()
    x, y, _ = capture(unet, layer)
    torch.testing.assert_close(y, layer.base_layer(x))
    unet.enable_adapters()
