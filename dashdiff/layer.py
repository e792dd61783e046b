"""dashdiff's tuner layer: one PEFT LoRA ``Linear`` subclass that holds, per adapter, a plain
LoRA or one of dashdiff's methods (so they can share a model).

The methods are PEFT ``LoraVariant`` objects (``dashdiff.variant.MethodVariant``) chosen from
``dashdiff.registry.VARIANTS`` by the config and kept, as PEFT does, in ``lora_variant[adapter]``;
each declares its per-adapter containers, which this layer creates. LoRA-Dash's state is described
in ``dashdiff.dash.variant``, AutoLoRA's in ``dashdiff.autolora.variant``.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .autolora.variant import AutoLoraVariant
from .config import adapter_kind
from .dash.selection import Selection
from .dash.variant import LoraDashVariant
from .registry import VARIANTS
from .variant import MethodVariant


def _stock_save_hook(module: "DashdiffLinear", state_dict, prefix, local_metadata) -> None:
    # PEFT's and diffusers' stock save paths go through get_peft_model_state_dict; the files they
    # write load in stock loaders as plain rank-r LoRA and silently lose the dash term / α.
    if not any(k != "lora" for k in module.adapter_kind.values()):
        return
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "get_peft_model_state_dict" and "peft" in frame.f_code.co_filename:
            warnings.warn(
                    "dashdiff: a stock PEFT/diffusers save (get_peft_model_state_dict, save_pretrained, "
                    "save_lora_weights) of LoRA-Dash / AutoLoRA layers writes a file that stock loaders read "
                    "as a plain rank-r LoRA, dropping the dash term (δ, U_s, V_s) or AutoLoRA's α. Use "
                    "dashdiff.export_lora(...) for a stock-loadable file and dashdiff.save_adapter(...) for "
                    "the full training state.",
                UserWarning,
                stacklevel=2,
            )
            return
        frame = frame.f_back


def _after_state_load(module: "DashdiffLinear", incompatible_keys: Any) -> None:
    for variant in VARIANTS.values():
        variant.after_state_load(module)


def _names(role: str) -> tuple[str, ...]:
    return tuple(n for v in VARIANTS.values() for n, r in v.containers.items() if r == role)


class DashdiffLinear(LoraLinear):
    """PEFT LoRA ``Linear`` whose adapters may be any method of ``registry.VARIANTS``.

    Only an exact ``nn.Linear`` base is accepted: the methods need the dense weight (SVD at
    launch, merging), and subclasses such as quantized linears would give wrong results.
    """

    adapter_layer_names = LoraLayer.adapter_layer_names + _names("parameter")
    other_param_names = LoraLayer.other_param_names + _names("buffer") + ("adapter_kind",) + tuple(
        n for v in VARIANTS.values() for n in v.settings)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs: Any) -> None:
        base = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        if type(base) is not nn.Linear:
            where = kwargs.get("current_key") or kwargs.get("target_name") or "a target module"
            raise TypeError(
                f"dashdiff: {where} is a {type(base).__module__}.{type(base).__name__}, not a dense "
                "torch.nn.Linear. LoRA-Dash and AutoLoRA adapt dense nn.Linear layers only (they need the "
                "dense weight for the launch SVD and for merging). Quantized linears (bitsandbytes 8/4-bit, "
                "GPTQ, AWQ, ...) are not supported: load the base model in bf16/fp16. Otherwise remove this "
                "module from target_modules."
            )
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self._register_state_dict_hook(_stock_save_hook)
        self.register_load_state_dict_post_hook(_after_state_load)

    # ------------------------------------------------------------------ construction
    def _ensure_containers(self) -> None:
        if "adapter_kind" in self.__dict__:
            return
        for variant in VARIANTS.values():
            for name, role in variant.containers.items():
                setattr(self, name, nn.ParameterDict({}) if role == "parameter" else BufferDict({}, persistent=True))
        self.adapter_kind: dict[str, str] = {}
        for variant in VARIANTS.values():
            for name in variant.settings + variant.caches:
                setattr(self, name, {})
        self._base_scaling: dict[str, float] = {}

    def resolve_lora_variant(self, *, config, **kwargs: Any):
        """PEFT's hook for a method's variant object: dashdiff's methods come from the registry."""
        variant = VARIANTS.get(adapter_kind(config))
        return variant() if variant is not None else super().resolve_lora_variant(config=config, **kwargs)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs: Any) -> None:
        self._ensure_containers()
        kind = adapter_kind(config)
        variant = VARIANTS.get(kind)
        if variant is not None:
            variant.check(self, adapter_name, config, kwargs.get("current_key") or kwargs.get("target_name")
                          or "a target")
        # before PEFT's update_layer: the variant's init (called from it) fuses with this scaling
        self._base_scaling[adapter_name] = (lora_alpha / math.sqrt(r) if config.use_rslora else lora_alpha / r)
        # PEFT creates A, B, then calls the variant's init (resolve_lora_variant) and set_adapter
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        self.adapter_kind[adapter_name] = kind

    # ------------------------------------------------------------------ helpers
    def method(self, adapter: str) -> Optional[MethodVariant]:
        """The dashdiff method of ``adapter`` (None for a plain LoRA adapter)."""
        variant = self.lora_variant.get(adapter)
        return variant if isinstance(variant, MethodVariant) else None

    def base_scaling(self, adapter: str) -> float:
        """``lora_alpha / r`` (``/ sqrt(r)`` with rslora): the scaling before any runtime scale."""
        r, alpha = self.r[adapter], self.lora_alpha[adapter]
        return alpha / math.sqrt(r) if self.use_rslora.get(adapter, False) else alpha / r

    def runtime_scale(self, adapter: str) -> float:
        """λ, the factor a user set through ``scale_layer`` / ``set_scale`` (1 by default)."""
        return self.scaling[adapter] / self.base_scaling(adapter)

    # LoRA-Dash / AutoLoRA per-layer operations, kept on the layer for callers (they live in the variants)
    def is_launched(self, adapter: str) -> bool:
        return LoraDashVariant.is_launched(self, adapter)

    def advance(self, adapter: str) -> bool:
        return LoraDashVariant.advance(self, adapter)

    def compute_launch(self, adapter: str) -> Selection:
        return LoraDashVariant.compute_launch(self, adapter)

    def apply_launch(self, adapter: str, sel: Selection, step: Optional[int] = None) -> None:
        LoraDashVariant.apply_launch(self, adapter, sel, step)

    def _storage(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        return LoraDashVariant.storage(self, adapter)

    def autolora_alpha(self, adapter: str) -> torch.Tensor:
        """α = softmax(β) in float64, (k,)."""
        return AutoLoraVariant.alpha(self, adapter)

    # ------------------------------------------------------------------ math
    def plain_factors(self, adapter: str, keep: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """This adapter as a plain LoRA with the scale folded in: ``ΔW = B' A'`` at runtime scale 1.

        Returns A' (rank, in), B' (out, rank) in float32 (float64 for float64 adapters); the method
        (``MethodVariant.plain_factors``) adds its part to the LoRA one: LoRA-Dash rank r+s after
        launch, AutoLoRA α folded in and the components in boolean mask ``keep`` (all if None).
        """
        a = self.lora_A[adapter].weight.detach()
        b = self.lora_B[adapter].weight.detach()
        dt = torch.float64 if a.dtype == torch.float64 else torch.float32
        a, b = a.to(dt), b.to(dt) * self.base_scaling(adapter)
        variant = self.method(adapter)
        if variant is not None:
            a, b = variant.plain_factors(self, adapter, a, b, keep)
        return a.contiguous(), b.contiguous()

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``ΔW`` (out, in) at the current runtime scale, base weight dtype; used by merge/unmerge."""
        a, b = self.plain_factors(adapter)
        dtype = self.get_base_layer().weight.dtype
        return ((b @ a) * self.runtime_scale(adapter)).to(dtype)

    def _adapter_input(self, x: torch.Tensor, adapter: str, dtype: torch.dtype) -> torch.Tensor:
        """The adapter's input: its dropout (skipped when it is the identity), then ``dtype``."""
        dropout = self._modules["lora_dropout"]._modules[adapter]
        if not isinstance(dropout, nn.Identity):
            x = dropout(x)
        return x if x.dtype == dtype else x.to(dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("dashdiff layers do not support mixed-batch `adapter_names`; call set_adapter instead")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        variants = self.lora_variant
        for adapter in self.active_adapters:
            if adapter not in self._modules["lora_A"]._modules:
                continue
            variant = variants.get(adapter)
            if variant is not None:  # the one dispatch: the method's forward adds its update
                result = variant.forward(self, adapter, x, result)
                continue
            lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
            h = lora_a(self.lora_dropout[adapter](self._cast_input_dtype(x, lora_a.weight.dtype)))
            result = result + lora_b(h) * self.scaling[adapter]
        return result if result.dtype == result_dtype else result.to(result_dtype)

    def __repr__(self) -> str:
        return "dashdiff." + nn.Module.__repr__(self)
