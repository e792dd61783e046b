"""LoRA-Dash for ``transformers.Trainer`` (and TRL's trainers, which subclass it).

A LoRA-Dash adapter counts *optimizer* steps and launches after ``dash_warmup_steps`` of them
(METHODS.md). Trainer never calls :func:`dashdiff.dash_step` by itself; this callback does, once
per optimizer step::

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
                      callbacks=[dashdiff.LoraDashCallback()])

Why ``on_optimizer_step``: Trainer calls it right after ``optimizer.step()`` and only on the
micro-batch that ends a gradient-accumulation window, so it fires exactly once per optimizer
step whatever ``gradient_accumulation_steps`` is, and before the next forward, as the launch
needs. (``on_step_end`` would also fire once per step, but after the scheduler; ``on_substep_end``
fires per micro-batch and must not be used.) A step the fp16 grad scaler skipped (inf/NaN
gradients, ``optimizer.step_was_skipped``) does not count, as in dashdiff's own scripts.
Evaluation and generation never reach this callback, so they never advance the warm-up.

Trainer's own checkpoints (a stock ``save_pretrained``) hold δ, U_s, V_s and the step counters,
so ``trainer.train(resume_from_checkpoint=...)`` continues to the same launch (dashdiff warns
about the stock save because stock *loaders* would drop those tensors). For a file that stock
PEFT loads correctly, write the result with ``dashdiff.export_lora(model, folder, format="peft")``.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .training.guard import loss_scale, step_skipped
from .training.run import dash_optimizer_step
from .walk import iter_layers, resolve_adapter

logger = logging.getLogger(__name__)


class LoraDashCallback(TrainerCallback):
    """Advance LoRA-Dash warm-up once per optimizer step and launch when it is due.

    ``adapter_name``: the LoRA-Dash adapter to drive; None drives every LoRA-Dash adapter of the
    model. After the launch, ``launch_step`` holds the optimizer step (``state.global_step``
    numbering, 1-based) it happened after, and an entry ``{"dash_launch_step", "step",
    "dash_launch_seconds"}`` is added to ``state.log_history`` (so it lands in
    ``trainer_state.json``).
    """

    def __init__(self, adapter_name: Optional[str] = None) -> None:
        self.adapter_name = adapter_name
        self.launch_step: Optional[int] = None
        self._scale: Optional[float] = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Any = None, **kwargs: Any) -> None:
        # Fail at the start rather than silently never launching.
        if model is None:
            return
        if self.adapter_name is not None:
            resolve_adapter(model, "dash", self.adapter_name)  # raises, naming the adapters found
        else:
            _require_dash(model)

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              optimizer: Any = None, **kwargs: Any) -> None:
        # the fp16 scaler's scale before the step: a fused optimizer's skip shows only as its back-off
        self._scale = loss_scale(optimizer)

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          model: Any = None, optimizer: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise RuntimeError("LoraDashCallback: Trainer passed no model to on_optimizer_step")
        # The scripts' per-optimizer-step hook: a step the fp16 scaler skipped (the weights did not
        # move) does not count; at the launch every process must have chosen the same directions.
        # state.global_step is incremented after this event: this is optimizer step global_step + 1.
        report = dash_optimizer_step(model, state.global_step + 1, step_skipped(optimizer, self._scale),
                                     self.adapter_name)
        if report is None:
            return
        self.launch_step, seconds = report["step"], report["seconds"]
        logger.warning(
            "dashdiff: LoRA-Dash launched after optimizer step %d (%d layers, %.2f s)",
            self.launch_step, report["layers"], seconds,
        )
        state.log_history.append(
            {"dash_launch_step": self.launch_step, "step": self.launch_step, "dash_launch_seconds": seconds}
        )


def _require_dash(model: Any) -> None:
    if not any(True for _ in iter_layers(model, "dash")):
        raise ValueError(
            "LoraDashCallback: the model has no LoRA-Dash adapter; inject one with dashdiff.LoraDashConfig "
            "(peft.get_peft_model(model, LoraDashConfig(...))) before building the Trainer"
        )
