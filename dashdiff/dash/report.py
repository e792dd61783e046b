"""LoRA-Dash read-out: one record per launched layer (``DashLayerInfo``), read from a model or
pipeline (``dash_layers``), and its two figures: all layers at once (``dash_overview_figure``) and one
layer in detail (``dash_layer_figure``; matplotlib, imported only there, see ``dashdiff.plotting``).
``dashdiff.inspect_plots`` renders them as images for the app."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from ..walk import iter_layers, resolve_adapter

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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


# --------------------------------------------------------------------------- figures


def dash_overview_figure(layers: Sequence[DashLayerInfo], title: str = "LoRA-Dash") -> "Figure":
    """All layers at once. Left: where each selected direction sits in its layer's spectrum
    (0 = largest σ, 1 = smallest), coloured by change rate. Right: the selected change rates
    against the layer's median one (log scale): how strongly LoRA amplified those directions."""
    from ..plotting import label_rows, new_figure, rows_height

    if not layers:
        raise ValueError("dashdiff: no LoRA-Dash layers to plot")
    from matplotlib.colors import LogNorm

    names = [l.name for l in layers]
    fig = new_figure(11, rows_height(len(layers)))
    ax_pos, ax_rate = fig.subplots(1, 2, sharey=True, width_ratios=(3, 2))

    xs, ys, cs = [], [], []
    for row, l in enumerate(layers):
        for i, rate in zip(l.indices.tolist(), l.selected_rates.tolist()):
            xs.append(i / max(l.k - 1, 1))
            ys.append(row)
            cs.append(rate)
    positive = [c for c in cs if c > 0 and math.isfinite(c)]
    norm = LogNorm(min(positive), max(positive)) if positive and min(positive) < max(positive) else None
    points = ax_pos.scatter(xs, ys, c=[max(c, 1e-300) for c in cs], cmap="viridis", norm=norm, s=22,
                            edgecolors="black", linewidths=0.3)
    ax_pos.set_xlim(-0.03, 1.03)
    ax_pos.set_xlabel("position in the singular-value spectrum (0 = largest σ, 1 = smallest)")
    ax_pos.set_title("selected directions")
    ax_pos.grid(axis="x", alpha=0.3)
    label_rows(ax_pos, names)
    fig.colorbar(points, ax=ax_pos, label="change rate |Δσ|/σ", location="top", shrink=0.6)

    for row, l in enumerate(layers):
        rates = [r for r in l.selected_rates.tolist() if r > 0]
        ax_rate.scatter(rates, [row] * len(rates), s=14, color="tab:red", label="selected" if row == 0 else None)
        if math.isfinite(l.median_rate) and l.median_rate > 0:
            ax_rate.scatter([l.median_rate], [row], marker="|", s=60, color="gray",
                            label="median, all directions" if row == 0 else None)
    ax_rate.set_xscale("log")
    ax_rate.set_xlabel("change rate |Δσ|/σ at launch")
    ax_rate.set_title("selected vs. all directions")
    ax_rate.grid(axis="x", alpha=0.3, which="both")
    ax_rate.legend(loc="lower right", fontsize=7)

    steps = sorted({l.launch_step for l in layers})
    launched = f"launched at step {steps[0]}" if len(steps) == 1 else f"launched at steps {steps[0]}..{steps[-1]}"
    s = max(int(l.indices.numel()) for l in layers)
    fig.suptitle(f"{title}: {len(layers)} layers, s = {s} directions each, {launched}")
    return fig


def dash_layer_figure(layer: DashLayerInfo) -> "Figure":
    """One layer in detail: its whole singular-value spectrum σ_i (top) and every direction's
    change rate (bottom), with the selected directions marked and numbered by rank."""
    from ..plotting import new_figure, short_name

    fig = new_figure(10, 5.5)
    ax_sigma, ax_rate = fig.subplots(2, 1, sharex=True)
    idx = torch.arange(layer.k)
    sigma = layer.sigma.clone()
    ok = sigma > 0
    ax_sigma.plot(idx[ok], sigma[ok], color="tab:blue", lw=1.2, label="σ_i of W0")
    sel = layer.indices
    ax_sigma.scatter(sel, layer.sigma[sel].clamp_min(1e-300), color="tab:red", zorder=3, s=30, label="selected")
    for rank, i in enumerate(sel.tolist(), 1):
        ax_sigma.annotate(str(rank), (i, float(layer.sigma[i])), textcoords="offset points", xytext=(3, 5),
                          fontsize=7, color="tab:red")
    ax_sigma.set_yscale("log")
    ax_sigma.set_ylabel("singular value σ")
    ax_sigma.legend(fontsize=8)
    ax_sigma.grid(alpha=0.3, which="both")

    rate = layer.change_rate
    finite = ~torch.isnan(rate) & (rate > 0)
    ax_rate.scatter(idx[finite], rate[finite], s=6, color="gray", label="all directions")
    sel_rates = rate[sel]
    keep = ~torch.isnan(sel_rates) & (sel_rates > 0)
    ax_rate.scatter(sel[keep], sel_rates[keep], color="tab:red", s=30, zorder=3, label="selected")
    ax_rate.set_yscale("log")
    ax_rate.set_xlabel("direction index i (descending σ)")
    ax_rate.set_ylabel("change rate |Δσ_i|/σ_i")
    ax_rate.legend(fontsize=8)
    ax_rate.grid(alpha=0.3, which="both")

    extra = ""
    if layer.delta is not None and layer.delta.numel():
        extra = f"; learned δ: {', '.join(f'{d:+.3g}' for d in layer.delta.tolist())}"
    fig.suptitle(f"{short_name(layer.name)}: k = {layer.k}, launched at step {layer.launch_step}{extra}",
                 fontsize=10)
    return fig
