"""fp16 skipped optimizer steps on CPU, for the LoRA-Dash warm-up tests.

accelerate uses no grad scaler on CPU, so a test installs a real ``torch.amp.GradScaler("cpu")`` on
the Accelerator (the same object accelerate builds on CUDA under ``--mixed_precision fp16``) and
makes the scaled loss overflow at chosen optimizer steps: the backward then leaves inf/NaN
gradients, the scaler finds them, skips the step and backs off its scale, exactly as an fp16
overflow does. The scripts' optimizers are fused AdamW, which GradScaler skips *inside* the kernel.
"""

from __future__ import annotations

from typing import Iterable

import torch


class OverflowingScaler(torch.amp.GradScaler):
    """A CPU GradScaler whose scaled loss overflows (× inf) during optimizer steps ``skip`` (1-based)."""

    def __init__(self, skip: Iterable[int]) -> None:
        super().__init__("cpu", init_scale=2.0 ** 10, growth_interval=10 ** 6)
        self.skip = set(skip)
        self.updates = 0  # one ``update`` per optimizer step, skipped or not
        self.skipped = 0

    def scale(self, outputs):  # type: ignore[override]
        out = super().scale(outputs)
        return out * float("inf") if self.updates + 1 in self.skip else out

    def update(self, new_scale=None) -> None:  # type: ignore[override]
        before = self.get_scale()
        super().update(new_scale)
        self.skipped += self.get_scale() < before
        self.updates += 1


def with_overflowing_scaler(accelerator_cls: type, skip: Iterable[int], made: list) -> type:
    """A subclass of ``accelerator_cls`` holding an :class:`OverflowingScaler`; instances go to ``made``."""
    skip = tuple(skip)

    class Fp16Accelerator(accelerator_cls):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.scaler = OverflowingScaler(skip)
            made.append(self)

    return Fp16Accelerator
