"""AutoLoRA read-out: selection weights α and the per-layer ranks they imply."""

from __future__ import annotations

from typing import Optional

import torch

from ..layer import DashdiffLinear
from ..walk import iter_layers, resolve_adapter
from .variant import AutoLoraVariant


def selection_weights(model, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
    """``{module_name: α}`` with α = softmax(β) in float64, shape (k,)."""
    adapter = resolve_adapter(model, "autolora", adapter_name)
    return {n: layer.autolora_alpha(a) for n, layer, a in iter_layers(model, "autolora", adapter)}


outer_steps = AutoLoraVariant.outer_steps  # β steps taken on a layer (0: α is its uniform initial value)


def default_threshold(k: int, threshold: Optional[float] = None) -> float:
    """λ: ``threshold`` if given, else 1/k (the published default) for a layer of initial rank k."""
    return 1.0 / k if threshold is None else threshold


def layer_threshold(layer: DashdiffLinear, adapter: str, threshold: Optional[float] = None) -> float:
    """The λ a layer's components are kept at: ``threshold``, else the config's, else 1/k."""
    lam = threshold if threshold is not None else layer.autolora_settings[adapter]["threshold"]
    return default_threshold(layer.lora_autolora_beta[adapter].numel(), lam)


def keep_mask(layer: DashdiffLinear, adapter: str, threshold: Optional[float] = None,
              rule: Optional[str] = None) -> torch.Tensor:
    """Boolean (k,): components kept. ``softmax`` rule: α_j >= λ (float64, no tolerance);
    ``published`` rule: β_j / Σβ >= λ. λ defaults to the config's threshold, else 1/k."""
    rule = rule or layer.autolora_settings[adapter]["rank_rule"]
    beta = layer.lora_autolora_beta[adapter].detach().to(torch.float64).cpu()
    lam = layer_threshold(layer, adapter, threshold)
    if rule == "softmax":
        return torch.softmax(beta, 0) >= lam
    if rule == "published":
        total = beta.sum()
        if total <= 0:
            raise ValueError(
                f"dashdiff: the published rank rule β_j/Σβ is undefined here (Σβ = {float(total):.4g} <= 0); "
                "use autolora_rank_rule='softmax'"
            )
        return beta / total >= lam
    raise ValueError(f"dashdiff: unknown rank rule {rule!r} (use 'softmax' or 'published')")


def determine_ranks(model, threshold: Optional[float] = None, adapter_name: Optional[str] = None,
                    rule: Optional[str] = None) -> dict[str, int]:
    """``{module_name: rank}``: the number of kept components per layer (see ``keep_mask``).
    Raises if no outer (β) step has been taken: the ranks would just be the uniform init."""
    adapter = resolve_adapter(model, "autolora", adapter_name)
    layers = list(iter_layers(model, "autolora", adapter))
    if any(outer_steps(layer, a) == 0 for _, layer, a in layers):
        raise RuntimeError(
            "dashdiff: determine_ranks before any AutoLoRA outer (β) step: α is still uniform, so every layer "
            "would keep its full rank. Run the search first (dashdiff.autolora.BilevelStep)."
        )
    return {n: int(keep_mask(layer, a, threshold, rule).sum()) for n, layer, a in layers}
