"""dashdiff.layer: PEFT's runtime controls (scale, merge, disable, several adapters) on DashdiffLinear."""

import pytest
import torch

import dashdiff
from dashdiff import LoraDashConfig
from dash_models import dash_model, layers


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
