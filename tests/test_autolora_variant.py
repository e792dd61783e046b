"""dashdiff.autolora.variant: the AutoLoRA method object's forward and the ranks it reads out."""

import peft
import pytest
import torch

import dashdiff
from dashdiff import AutoLoraConfig
from dash_models import Tiny


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
