"""``AutoLoraConfig``: AutoLoRA's adapter configuration, a ``peft.LoraConfig`` subclass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from peft import LoraConfig

from ..config import check_unsupported, register_layer


@dataclass
class AutoLoraConfig(LoraConfig):
    """AutoLoRA (Zhang et al., NAACL 2024): ``ΔW = scaling · B diag(softmax(β)) A`` with ``r`` the
    initial rank k; the per-layer rank is read off α = softmax(β) after the bi-level search."""

    autolora_threshold: Optional[float] = field(
        default=None, metadata={"help": "λ: keep components with α_j >= λ; None means 1/k"}
    )
    autolora_rank_rule: Literal["softmax", "published"] = field(
        default="softmax", metadata={"help": "softmax: α = softmax(β); published: β_j / Σβ"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_unsupported(self, "AutoLoraConfig")
        if self.autolora_rank_rule not in ("softmax", "published"):
            raise ValueError(
                f"autolora_rank_rule must be 'softmax' or 'published', got {self.autolora_rank_rule!r}"
            )
        if self.autolora_threshold is not None and not 0 < self.autolora_threshold <= 1:
            raise ValueError(f"autolora_threshold must be in (0, 1], got {self.autolora_threshold}")
        if self.rank_pattern or self.alpha_pattern:
            raise ValueError(
                "AutoLoraConfig searches one initial rank k = r for every layer: remove "
                "rank_pattern / alpha_pattern (the per-layer ranks are the search's output)."
            )
        register_layer(self)
