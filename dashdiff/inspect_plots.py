"""What a LoRA-Dash or AutoLoRA adapter learned, as data and as plots (the app's Inspect view).

Two steps, kept apart so the data can be checked without drawing anything:

- ``dash_layers`` (``dash.report``) / ``autolora_layers`` (``autolora.report``) read per-layer
  records from a model or pipeline that carries dashdiff adapters (injected in memory, or restored
  by ``dashdiff.load_adapter``). Plain exported LoRA files hold only the folded factors, so none of
  this can be read from them.
- ``plot_*`` draw those records with matplotlib into a PIL image (PNG-encoded once, so what the
  app serves is exactly what the function returns).

Plots are behind the ``plots`` extra (``pip install "dashdiff[plots]"``): matplotlib is imported
inside the drawing functions only (``dashdiff.plotting``), and a missing one raises an
ImportError naming the extra.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import torch

from .autolora.report import AutoLoraLayerInfo, autolora_figure, autolora_layers, autolora_layers_from_report
from .dash.report import DashLayerInfo, dash_layers
from .plotting import label_rows as _label_rows
from .plotting import new_figure as _new_figure
from .plotting import rows_height as _rows_height
from .plotting import short_name
from .plotting import to_image as _to_image

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "AutoLoraLayerInfo",
    "DashLayerInfo",
    "autolora_layers",
    "autolora_layers_from_report",
    "dash_layers",
    "plot_autolora",
    "plot_dash_layer",
    "plot_dash_overview",
    "short_name",
]


# --------------------------------------------------------------------------- drawing


def plot_dash_overview(layers: Sequence[DashLayerInfo], title: str = "LoRA-Dash") -> "Image.Image":
    """All layers at once. Left: where each selected direction sits in its layer's spectrum
    (0 = largest σ, 1 = smallest), coloured by change rate. Right: the selected change rates
    against the layer's median one (log scale): how strongly LoRA amplified those directions."""
    if not layers:
        raise ValueError("dashdiff: no LoRA-Dash layers to plot")
    from matplotlib.colors import LogNorm

    names = [l.name for l in layers]
    fig = _new_figure(11, _rows_height(len(layers)))
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
    _label_rows(ax_pos, names)
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
    return _to_image(fig)


def plot_dash_layer(layer: DashLayerInfo) -> "Image.Image":
    """One layer in detail: its whole singular-value spectrum σ_i (top) and every direction's
    change rate (bottom), with the selected directions marked and numbered by rank."""
    fig = _new_figure(10, 5.5)
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
    return _to_image(fig)


def plot_autolora(layers: Sequence[AutoLoraLayerInfo], title: str = "AutoLoRA") -> "Image.Image":
    """``autolora.report.autolora_figure`` as an image: per-layer ranks and the α heat map."""
    return _to_image(autolora_figure(layers, title))
