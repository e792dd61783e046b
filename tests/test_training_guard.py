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
