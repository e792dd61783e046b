"""dashdiff/training/guard.py: the NaN / loss guard (its message neutral, the advice worded by the
script) and its reduction across processes before the verdict."""

import math

import pytest
import torch

from dashdiff import training as T


def test_the_nan_message_is_neutral_and_the_script_words_the_advice():
    plain = str(T.nonfinite_error(math.nan, 2, "search", None))
    assert plain.startswith("loss is nan at search step 3: training stopped before this step changed any weight")
    assert "--" not in plain and "no checkpoint was saved before it" in plain
    worded = str(T.nonfinite_error(math.inf, 0, "train", "out/checkpoint-2", lambda last: f"resume from {last}"))
    assert "the last good checkpoint is out/checkpoint-2; resume from out/checkpoint-2." in worded


def test_the_loss_guard_reduces_before_its_verdict():
    class Acc:
        calls = 0

        def reduce(self, tensor, reduction):
            Acc.calls += 1
            return tensor * float("nan")  # another process's loss was NaN: the mean is NaN everywhere

    with pytest.raises(T.NonFiniteLossError, match="at train step 5"):
        T.reduced_loss(Acc(), torch.tensor(1.0), 4, "train", None)
    assert Acc.calls == 1


# --------------------------------------------------------------------------- the verdict and the fp16 skips


def test_the_verdict_on_every_kind_of_loss():
    """Finite losses pass (a finite mean of a batch of losses included); NaN, +inf, -inf anywhere in the loss
    stop, in any dtype; the message carries the value, the 1-based step and the phase word for word."""
    for ok in (torch.tensor(0.0), torch.tensor([1e30, -1e30]), torch.tensor(3.5, dtype=torch.bfloat16),
               torch.tensor(65000.0, dtype=torch.float16)):
        T.check_finite_loss(ok, 0, "train", None)
    for bad, word in ((torch.tensor(float("nan")), "nan"), (torch.tensor([1.0, float("inf")]), "inf"),
                      (torch.tensor(-float("inf"), dtype=torch.bfloat16), "-inf"),
                      (torch.tensor([2.0, float("nan")], dtype=torch.float16), "nan")):
        with pytest.raises(T.NonFiniteLossError) as e:
            T.check_finite_loss(bad, 6, "search", "ck/checkpoint-3", lambda last: f"resume from {last}")
        assert str(e.value) == (f"loss is {word} at search step 7: training stopped before this step changed any "
                                "weight; the last good checkpoint is ck/checkpoint-3; resume from ck/checkpoint-3. "
                                "No final weights were written.")


def test_the_nan_message_without_a_checkpoint_and_with_or_without_advice():
    assert str(T.nonfinite_error(math.nan, 0, "train", None)) == (
        "loss is nan at train step 1: training stopped before this step changed any weight; no checkpoint was "
        "saved before it. No final weights were written.")
    assert str(T.nonfinite_error(math.inf, 1, "train", None, lambda last: f"got {last}")) == (
        "loss is inf at train step 2: training stopped before this step changed any weight; no checkpoint was "
        "saved before it (got None). No final weights were written.")
    assert str(T.nonfinite_error(math.nan, 1, "train", "c/checkpoint-1")) == (
        "loss is nan at train step 2: training stopped before this step changed any weight; the last good "
        "checkpoint is c/checkpoint-1. No final weights were written.")
    assert str(T.nonfinite_error(math.nan, 1, "train", "c/checkpoint-1", lambda last: "")) == (
        "loss is nan at train step 2: training stopped before this step changed any weight; the last good "
        "checkpoint is c/checkpoint-1. No final weights were written.")  # empty advice: no dangling "; "
    assert isinstance(T.nonfinite_error(math.nan, 0, "train", None), RuntimeError)


def test_reduced_loss_returns_the_mean_of_every_process():
    class Acc:
        seen = []

        def reduce(self, tensor, reduction):
            Acc.seen.append((tensor.requires_grad, reduction))
            return (tensor + torch.tensor(3.0)) / 2  # this process 1.0, another 3.0

    loss = torch.tensor(1.0, requires_grad=True)
    mean = T.reduced_loss(Acc(), loss, 0, "train", None)
    assert mean.item() == 2.0 and Acc.seen == [(False, "mean")]  # detached: no graph through the collective


class Scaler:
    def __init__(self, scale, enabled=True, after=None):
        self.scale, self.enabled, self.after = scale, enabled, after

    def is_enabled(self):
        return self.enabled

    def get_scale(self):
        return self.scale


class Opt:
    """accelerate's AcceleratedOptimizer as the guard sees it: ``scaler``, ``step_was_skipped``, ``step``."""

    def __init__(self, scaler=None, skipped_flag=False):
        self.scaler, self.step_was_skipped, self.steps = scaler, skipped_flag, 0

    def step(self):
        self.steps += 1
        if self.scaler is not None and self.scaler.after is not None:
            self.scaler.scale = self.scaler.after  # the scaler's update after the step


def test_loss_scale_and_skipped_steps():
    assert T.loss_scale(Opt()) is None  # bf16 / fp32: no scaler
    assert T.loss_scale(Opt(Scaler(2.0**16, enabled=False))) is None
    assert T.loss_scale(Opt(Scaler(2.0**16))) == 65536.0 and isinstance(T.loss_scale(Opt(Scaler(8))), float)
    # skipped: accelerate saw it, or the scale backed off (a fused optimizer skips inside its kernel)
    assert T.step_skipped(Opt(skipped_flag=True), None) is True
    assert T.step_skipped(Opt(Scaler(1024.0)), 2048.0) is True
    assert T.step_skipped(Opt(Scaler(2048.0)), 2048.0) is False
    assert T.step_skipped(Opt(Scaler(4096.0)), 2048.0) is False  # the scale grew after a run of good steps
    assert T.step_skipped(Opt(), None) is False
    assert T.step_skipped(Opt(Scaler(1.0)), None) is False  # no scale read before: nothing to compare


def test_optimizer_step_reports_what_the_scaler_did():
    for before, after, want in ((2048.0, 1024.0, True), (2048.0, 2048.0, False), (2048.0, 4096.0, False)):
        opt = Opt(Scaler(before, after=after))
        assert T.optimizer_step(opt) is want and opt.steps == 1
    opt = Opt()
    assert T.optimizer_step(opt) is False and opt.steps == 1
    opt = Opt(Scaler(2048.0, enabled=False, after=1.0))  # a disabled scaler's scale means nothing
    assert T.optimizer_step(opt) is False


def test_a_plain_torch_optimizer_has_no_scaler_and_no_skip_flag():
    """Not every optimizer is accelerate's: a bare torch optimizer has neither ``scaler`` nor
    ``step_was_skipped``; that means no loss scaling and no skipped step, not an error."""
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    sgd = torch.optim.SGD([p], lr=0.5)
    assert not hasattr(sgd, "scaler") and not hasattr(sgd, "step_was_skipped")
    assert T.loss_scale(sgd) is None and T.step_skipped(sgd, None) is False
    assert T.optimizer_step(sgd) is False and p.detach().tolist() == [0.5, 0.5]  # the step was taken
