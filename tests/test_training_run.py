"""dashdiff/training/run.py: the run lifecycle both training scripts share (issue 15).
The scripts' end-to-end files exercise it in real runs; these are its rules on their own."""

import peft
import pytest
import torch
from torch import nn

import dashdiff
from dashdiff import training as T


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(12, 16)
        self.o_proj = nn.Linear(16, 12)

    def forward(self, x):
        return self.o_proj(torch.tanh(self.q_proj(x)))


def dash_model(warmup: int = 1) -> nn.Module:
    torch.manual_seed(0)
    cfg = dashdiff.LoraDashConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"], dash_warmup_steps=warmup,
                                  dash_directions=2, init_lora_weights="gaussian")
    return peft.get_peft_model(Net(), cfg)


def test_skipped_steps_do_not_count_and_the_launch_reports_its_directions():
    model = dash_model(warmup=2)
    assert T.dash_optimizer_step(model, 1, skipped=True) is None  # the fp16 scaler skipped it
    assert T.dash_optimizer_step(model, 2, skipped=False) is None
    report = T.dash_optimizer_step(model, 3, skipped=False)
    assert report["step"] == 3 and report["layers"] == 2 and report["num_processes"] == 1
    assert report["direction_digests"] == [T.directions_digest(model)]
    assert T.dash_optimizer_step(model, 4, skipped=False) is None  # launched once


def test_directions_that_differ_between_processes_stop_the_run(monkeypatch):
    import accelerate.state
    import accelerate.utils

    class TwoProcesses:
        num_processes = 2

    monkeypatch.setattr(accelerate.state, "PartialState", TwoProcesses)
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda mine: mine + ["0123456789abcdef"])
    with pytest.raises(RuntimeError, match="differs between processes"):
        T.dash_optimizer_step(dash_model(), 1, skipped=False)


def test_step_log_positions_of_both_scripts_rows():
    assert T.log_position({"phase": "search", "step": 3}) == (0, 3)  # commonsense
    assert T.log_position({"phase": "pre-launch", "phase_kind": "train", "step": 2}) == (1, 2)  # DreamBooth
    assert T.log_position({"event": "eval", "step": 1}) == (2, 1)  # no phase: after everything
