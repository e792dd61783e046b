"""``LoraDashConfig``: LoRA-Dash's adapter configuration, a ``peft.LoraConfig`` subclass."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import LoraConfig

from ..config import check_unsupported, register_layer


@dataclass
class LoraDashConfig(LoraConfig):
    """LoRA-Dash (Si et al., ICLR 2025): plain LoRA for ``dash_warmup_steps`` optimizer steps,
    then a learnable coefficient on each of the ``dash_directions`` task-specific directions
    of the frozen weight. ``r`` stays the LoRA rank."""

    dash_warmup_steps: int = field(default=100, metadata={"help": "t: optimizer steps before launch"})
    dash_directions: int = field(default=8, metadata={"help": "s: directions per layer"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_unsupported(self, "LoraDashConfig")
        if self.dash_warmup_steps < 0:
            raise ValueError(f"dash_warmup_steps must be >= 0, got {self.dash_warmup_steps}")
        if self.dash_directions < 1:
            raise ValueError(f"dash_directions must be >= 1, got {self.dash_directions}")
        register_layer(self)
