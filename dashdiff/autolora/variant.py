"""AutoLoRA on one ``DashdiffLinear``: ``ΔW = scaling · B diag(softmax(β)) A``.

Per adapter: ``lora_autolora_beta`` β (k,) trainable, ``lora_autolora_outer_steps`` (β steps taken,
int64 ()), and ``autolora_settings`` (threshold, rank rule) from the config.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import torch
from torch import nn

from ..ops import compute_dtype
from ..variant import ExportedFactors, MethodVariant, TensorSpec
from .config import AutoLoraConfig
from .kernel import FusedAutoLoraLinear, PairedAutoLoraLinear

if TYPE_CHECKING:
    from ..layer import DashdiffLinear


class AutoLoraVariant(MethodVariant):
    """AutoLoRA (Zhang et al., NAACL 2024): LoRA components weighted by α = softmax(β)."""

    kind = "autolora"
    label = "AutoLoRA"
    config_class = AutoLoraConfig
    containers = {"lora_autolora_beta": "parameter", "lora_autolora_outer_steps": "buffer"}
    settings = ("autolora_settings",)
    state_names = ("lora_autolora_beta", "lora_autolora_outer_steps")
    # _fd_pairs: adapter -> (A±, B±) stacked (2, k, in), (2, out, k), set only inside ``paired``
    caches = ("_fd_pairs",)

    @staticmethod
    def init(module: "DashdiffLinear", adapter_name: str, config: Any = None, **kwargs: Any) -> None:
        a = module.lora_A[adapter_name].weight
        r = module.r[adapter_name]
        module.lora_autolora_beta[adapter_name] = nn.Parameter(torch.ones(r, dtype=a.dtype, device=a.device))
        module.lora_autolora_outer_steps[adapter_name] = torch.zeros((), dtype=torch.long, device=a.device)
        module.autolora_settings[adapter_name] = {
            "threshold": config.autolora_threshold,
            "rank_rule": config.autolora_rank_rule,
        }

    @staticmethod
    def alpha(module: "DashdiffLinear", adapter: str) -> torch.Tensor:
        """α = softmax(β) in float64, (k,)."""
        return torch.softmax(module.lora_autolora_beta[adapter].detach().to(torch.float64), 0)

    @staticmethod
    def outer_steps(module: "DashdiffLinear", adapter: str) -> int:
        """β steps the search took on this layer (0: α is still its uniform initial value)."""
        return int(module.lora_autolora_outer_steps[adapter])

    # ------------------------------------------------------------------ forward
    @staticmethod
    def forward(module: "DashdiffLinear", active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs: Any) -> torch.Tensor:
        adapter = active_adapter
        mods = module._modules
        a_p = mods["lora_A"]._modules[adapter]._parameters["weight"]
        b_p = mods["lora_B"]._modules[adapter]._parameters["weight"]
        beta = mods["lora_autolora_beta"]._parameters[adapter]
        dtype = compute_dtype(x, a_p.dtype)
        pair = module._fd_pairs.get(adapter)
        if pair is not None:
            if x.shape[0] % 2:
                raise RuntimeError(
                    f"dashdiff: the batched finite-difference pass expects the doubled batch on dim 0 of every "
                    f"adapted layer's input, got shape {tuple(x.shape)}: pass fd_batched=False to BilevelStep")
            return result + PairedAutoLoraLinear.apply(module._adapter_input(x, adapter, dtype), beta, *pair,
                                                       module.scaling[adapter])
        return result + FusedAutoLoraLinear.apply(module._adapter_input(x, adapter, dtype), a_p, b_p, beta,
                                                  module.scaling[adapter])

    @staticmethod
    @contextmanager
    def paired(layers: Sequence[tuple["DashdiffLinear", str]],
               pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
        """For the duration, each ``(layer, adapter)`` runs its input's two halves (dim 0) through the
        factors ``pairs[i]`` = (A±, B±) stacked (2, k, in), (2, out, k): the search's batched
        finite-difference pass (``PairedAutoLoraLinear``)."""
        try:
            for (layer, adapter), pair in zip(layers, pairs):
                layer._fd_pairs[adapter] = pair
            yield
        finally:
            for layer, adapter in layers:
                layer._fd_pairs.pop(adapter, None)

    # ------------------------------------------------------------------ export
    @staticmethod
    def plain_factors(module: "DashdiffLinear", adapter: str, a: torch.Tensor, b: torch.Tensor,
                      keep: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """α folded into B, then the components in boolean mask ``keep`` (all if None); α not renormalised."""
        b = b * AutoLoraVariant.alpha(module, adapter).to(a.dtype)
        if keep is not None:
            keep = keep.to(a.device)
            a, b = a[keep], b[:, keep]
        return a, b

    @classmethod
    def export(cls, module: "DashdiffLinear", adapter: str, threshold: Optional[float]) -> ExportedFactors:
        from .ranks import keep_mask

        keep = keep_mask(module, adapter, threshold)
        record = {"method": cls.kind, "r": module.r[adapter], "k": module.r[adapter], "rank": int(keep.sum()),
                  "kept": torch.nonzero(keep).flatten().tolist()}
        a, b = module.plain_factors(adapter, keep)
        return ExportedFactors(a, b, record, caveat=cls.outer_steps(module, adapter) == 0)

    @staticmethod
    def caveat(adapter: str, count: int, example: str) -> str:
        return (f"dashdiff: AutoLoRA adapter {adapter!r} has taken no outer (β) step in {count} layer(s) "
                f"(e.g. {example}): α is still its initial value, so the ranks are not searched ones.")

    # ------------------------------------------------------------------ training state
    @staticmethod
    def expected_tensors(meta: dict[str, Any], n_in: int, n_out: int) -> dict[str, TensorSpec]:
        return {"lora_autolora_beta": ((meta["r"],), True), "lora_autolora_outer_steps": ((), False)}

    @staticmethod
    def layer_config(module: "DashdiffLinear", adapter: str, common: dict[str, Any]) -> Any:
        s = module.autolora_settings[adapter]
        return AutoLoraConfig(**common, autolora_threshold=s["threshold"], autolora_rank_rule=s["rank_rule"])
