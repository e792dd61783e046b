"""Adapter configurations: PEFT ``LoraConfig`` subclasses, so diffusers' ``add_adapter``,
``peft.get_peft_model`` and ``peft.inject_adapter_in_model`` take them unchanged.

Both register dashdiff's tuner layer through PEFT's custom-module mapping. The mapping is keyed
on ``nn.Module`` so that *every* matched target reaches dashdiff's layer, which then refuses
anything that is not exactly ``nn.Linear`` with a message; keyed on ``nn.Linear``, a Conv2d or
quantized target would silently fall back to PEFT's own layer and lose the method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from peft import LoraConfig
from torch import nn

# Inherited LoraConfig options that neither method defines, with the value that means "off".
_UNSUPPORTED_DEFAULTS: dict[str, object] = {
    "use_dora": False,
    "lora_bias": False,
    "fan_in_fan_out": False,
    "layer_replication": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "arrow_config": None,
    "use_bdlora": None,
    "velora_config": None,
    "monteclora_config": None,
    "kasa_config": None,
    "mica": False,
    "megatron_config": None,
    "trainable_token_indices": None,
}
_SUPPORTED_INITS = (True, False, "gaussian")


def _check_unsupported(cfg: LoraConfig, method: str) -> None:
    bad = []
    for name, off in _UNSUPPORTED_DEFAULTS.items():
        if hasattr(cfg, name) and getattr(cfg, name) not in (off, None, False):
            bad.append(f"{name}={getattr(cfg, name)!r}")
    if cfg.init_lora_weights not in _SUPPORTED_INITS:
        bad.append(f"init_lora_weights={cfg.init_lora_weights!r}")
    if bad:
        raise ValueError(
            f"{method} does not define these LoraConfig options: {', '.join(bad)}. Remove them "
            f"(supported init_lora_weights: True, False, 'gaussian'); use a plain peft.LoraConfig "
            "if you need them."
        )


def _register(cfg: LoraConfig) -> None:
    from .layer import DashdiffLinear  # the layer imports the configs: import late

    cfg._register_custom_module({nn.Module: DashdiffLinear})


@dataclass
class LoraDashConfig(LoraConfig):
    """LoRA-Dash (Si et al., ICLR 2025): plain LoRA for ``dash_warmup_steps`` optimizer steps,
    then a learnable coefficient on each of the ``dash_directions`` task-specific directions
    of the frozen weight. ``r`` stays the LoRA rank."""

    dash_warmup_steps: int = field(default=100, metadata={"help": "t: optimizer steps before launch"})
    dash_directions: int = field(default=8, metadata={"help": "s: directions per layer"})

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_unsupported(self, "LoraDashConfig")
        if self.dash_warmup_steps < 0:
            raise ValueError(f"dash_warmup_steps must be >= 0, got {self.dash_warmup_steps}")
        if self.dash_directions < 1:
            raise ValueError(f"dash_directions must be >= 1, got {self.dash_directions}")
        _register(self)


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
        _check_unsupported(self, "AutoLoraConfig")
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
        _register(self)


def adapter_kind(config: object) -> str:
    """The method of a PEFT config: a key of ``registry.VARIANTS`` ('dash', 'autolora'), or 'lora'."""
    from .registry import VARIANTS  # the variants import the configs: import late

    for kind, variant in VARIANTS.items():
        if isinstance(config, variant.config_class):
            return kind
    return "lora"
