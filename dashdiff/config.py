"""What dashdiff's adapter configurations share. Each method's config lives in its folder
(``dash.config.LoraDashConfig``, ``autolora.config.AutoLoraConfig``): a PEFT ``LoraConfig``
subclass, so diffusers' ``add_adapter``, ``peft.get_peft_model`` and ``peft.inject_adapter_in_model``
take it unchanged.

Each registers dashdiff's tuner layer through PEFT's custom-module mapping (``register_layer``).
The mapping is keyed on ``nn.Module`` so that *every* matched target reaches dashdiff's layer,
which then refuses anything that is not exactly ``nn.Linear`` with a message; keyed on
``nn.Linear``, a Conv2d or quantized target would silently fall back to PEFT's own layer and lose
the method.
"""

from __future__ import annotations

from typing import Any

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


def check_unsupported(cfg: LoraConfig, method: str) -> None:
    """Refuse inherited ``LoraConfig`` options the method does not define (named in the message)."""
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


def register_layer(cfg: LoraConfig) -> None:
    """Make PEFT build ``DashdiffLinear`` for every target of ``cfg`` (see module docstring)."""
    from .layer import DashdiffLinear  # the layer imports the configs: import late

    cfg._register_custom_module({nn.Module: DashdiffLinear})


def adapter_kind(config: object) -> str:
    """The method of a PEFT config: a key of ``registry.VARIANTS`` ('dash', 'autolora'), or 'lora'."""
    from .registry import VARIANTS  # the variants import the configs: import late

    for kind, variant in VARIANTS.items():
        if isinstance(config, variant.config_class):
            return kind
    return "lora"
