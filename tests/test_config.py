"""dashdiff.config: unsupported LoraConfig options and layer types are refused with the reason."""

import peft
import pytest
from torch import nn

import dashdiff
from dashdiff import AutoLoraConfig, LoraDashConfig


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
