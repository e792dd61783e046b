"""The loss guard: a NaN/inf loss stops the run, on every process together, before that step
changes any weight; and the fp16 grad scaler's skipped optimizer steps.

The guard's verdict is reduced across processes: a loss that is NaN on one process only must stop
all of them at the same point, not leave the others waiting forever in the next collective (the
gradient all-reduce) for the one that raised. The message names no command-line flag: a script
passes ``advice``, which words what its user can do.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from .records import NonFiniteLossError, PathLike

# What a script tells its user after a non-finite loss, given the last good checkpoint (or None).
Advice = Callable[[Optional[PathLike]], str]


def nonfinite_error(value: float, step: int, phase: str, last_checkpoint: Optional[PathLike],
                    advice: Optional[Advice] = None) -> NonFiniteLossError:
    """The error for a loss of ``value`` at 0-based optimizer ``step`` of ``phase``."""
    hint = advice(last_checkpoint) if advice is not None else ""
    if last_checkpoint:
        keep = f"the last good checkpoint is {last_checkpoint}" + (f"; {hint}" if hint else "")
    else:
        keep = "no checkpoint was saved before it" + (f" ({hint})" if hint else "")
    return NonFiniteLossError(
        f"loss is {value} at {phase} step {step + 1}: training stopped before this step changed any weight; {keep}. "
        "No final weights were written."
    )


def check_finite_loss(loss: torch.Tensor, step: int, phase: str, last_checkpoint: Optional[PathLike],
                      advice: Optional[Advice] = None) -> None:
    """Raise ``NonFiniteLossError`` if ``loss`` is NaN/inf on this process. Call it before
    ``backward``: the weights then still hold the last good step, and no checkpoint of the bad state
    is ever saved. Under several processes use :func:`reduced_loss` (or reduce first): a verdict of
    one process alone stops only that one."""
    value = float(loss.detach().float().mean())
    if not math.isfinite(value):
        raise nonfinite_error(value, step, phase, last_checkpoint, advice)


def reduced_loss(accelerator: Any, loss: torch.Tensor, step: int, phase: str, last_checkpoint: Optional[PathLike],
                 advice: Optional[Advice] = None) -> torch.Tensor:
    """The mean of ``loss`` over the processes, checked: NaN/inf on any process raises on all of them
    (the mean is non-finite everywhere). Every process must call it equally often (a collective)."""
    mean = accelerator.reduce(loss.detach(), "mean")
    check_finite_loss(mean, step, phase, last_checkpoint, advice)
    return mean


def loss_scale(optimizer: Any) -> Optional[float]:
    """The fp16 grad scaler's scale of an accelerate-prepared ``optimizer`` (its ``scaler``), None without
    one. Read it before ``optimizer.step()`` and pass it to :func:`step_skipped` after."""
    scaler = getattr(optimizer, "scaler", None)
    return None if scaler is None or not scaler.is_enabled() else float(scaler.get_scale())


def step_skipped(optimizer: Any, scale_before: Optional[float]) -> bool:
    """Whether the fp16 grad scaler skipped the ``optimizer.step()`` just taken (inf/NaN gradients).

    accelerate's ``step_was_skipped`` only sees a skip when the optimizer's ``step`` is not called; a
    fused optimizer (PyTorch's fused AdamW, Trainer's default) is called with ``found_inf`` and skips
    inside its kernel, so only the scaler backing off its scale (it does exactly on a skip) shows it."""
    if getattr(optimizer, "step_was_skipped", False):
        return True
    return scale_before is not None and float(optimizer.scaler.get_scale()) < scale_before


def optimizer_step(optimizer: Any) -> bool:
    """``optimizer.step()``; returns whether the fp16 grad scaler skipped it."""
    scale = loss_scale(optimizer)
    optimizer.step()
    return step_skipped(optimizer, scale)
