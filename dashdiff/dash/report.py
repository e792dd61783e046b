"""LoRA-Dash read-out: one record per launched layer (``DashLayerInfo``), read from a model or
pipeline (``dash_layers``); ``dashdiff.inspect_plots`` draws them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..walk import iter_layers, resolve_adapter


@dataclass
class DashLayerInfo:
    """One LoRA-Dash layer after launch.

    ``indices`` (s,): the selected directions, positions in the descending singular values of
    the frozen weight, ordered by descending change rate. ``sigma`` / ``change_rate`` (k,): the
    whole spectrum and every direction's ``|Δσ_i| / σ_i`` at launch (NaN where σ is numerically
    zero). ``delta`` (s,): the learned coefficients on the directions, when known.
    """

    name: str
    indices: torch.Tensor
    sigma: torch.Tensor
    change_rate: torch.Tensor
    launch_step: int
    delta: Optional[torch.Tensor] = None

    @property
    def k(self) -> int:
        return int(self.sigma.numel())

    @property
    def selected_rates(self) -> torch.Tensor:
        return self.change_rate[self.indices]

    @property
    def median_rate(self) -> float:
        """Median change rate over the eligible directions: how far the selected ones stand out."""
        ok = self.change_rate[~torch.isnan(self.change_rate)]
        return float(ok.median()) if ok.numel() else float("nan")


def dash_layers(obj, adapter_name: Optional[str] = None) -> list[DashLayerInfo]:
    """Records of every launched layer of the LoRA-Dash adapter of a model or pipeline.

    Raises ValueError if the adapter has not launched (nothing was selected yet)."""
    adapter = resolve_adapter(obj, "dash", adapter_name)
    out: list[DashLayerInfo] = []
    for name, layer, a in iter_layers(obj, "dash", adapter):
        rec = layer.dash_record.get(a)
        if not layer.is_launched(a) or rec is None:
            continue
        out.append(
            DashLayerInfo(
                name=name,
                indices=rec["indices"].long().cpu(),
                sigma=rec["sigma"].double().cpu(),
                change_rate=rec["change_rate"].double().cpu(),
                launch_step=int(layer.lora_dash_launch_step[a]),
                # only the filled slots: unfilled ones (fewer eligible directions than s) stay 0
                delta=layer.lora_dash_delta[a].detach().double().cpu()[: rec["indices"].numel()],
            )
        )
    if not out:
        raise ValueError(
            f"dashdiff: LoRA-Dash adapter {adapter!r} has not launched yet (no directions selected): "
            "train past dash_warmup_steps, or call dashdiff.launch_dash(model)"
        )
    return out
