"""What a LoRA-Dash or AutoLoRA adapter learned, as data and as plots (the app's Inspect view).

Two steps, kept apart so the data can be checked without drawing anything:

- ``dash_layers`` / ``autolora_layers`` read per-layer records from a model or pipeline that
  carries dashdiff adapters (injected in memory, or restored by ``dashdiff.load_adapter``).
  Plain exported LoRA files hold only the folded factors, so none of this can be read from them.
- ``plot_*`` draw those records with matplotlib into a PIL image (PNG-encoded once, so what the
  app serves is exactly what the function returns).

matplotlib is an optional dependency (``pip install "dashdiff[plots]"``): it is imported inside
the plotting functions only, and pyplot is never used. pyplot keeps global figure state, which is
not safe in a web server that runs handlers on several threads; a bare ``Figure`` is.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import torch

from .walk import iter_layers, resolve_adapter

if TYPE_CHECKING:
    from matplotlib.figure import Figure
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

_PLOT_HINT = 'dashdiff: plots need matplotlib: pip install "dashdiff[plots]" (or "dashdiff[app]")'
# Past this many layers the per-layer tick labels would overlap: label every n-th row only.
_MAX_LABELLED_ROWS = 60
_MAX_FIG_HEIGHT_IN = 24.0


# --------------------------------------------------------------------------- records


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


@dataclass
class AutoLoraLayerInfo:
    """One AutoLoRA layer: ``alpha`` (k,) = softmax(β) and the components kept at ``threshold``."""

    name: str
    alpha: torch.Tensor
    keep: torch.Tensor
    threshold: float
    outer_steps: int = 0  # -1 when unknown
    rule: str = "softmax"

    @property
    def rank(self) -> int:
        return int(self.keep.sum())

    @property
    def k(self) -> int:
        return int(self.alpha.numel())


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


def autolora_layers(obj, adapter_name: Optional[str] = None, threshold: Optional[float] = None
                    ) -> list[AutoLoraLayerInfo]:
    """α and the kept components of every layer of the AutoLoRA adapter of a model or pipeline.

    Unlike ``determine_ranks`` this does not refuse an adapter with no outer step: the Inspect
    view shows it (with ``outer_steps == 0``, α uniform) rather than failing."""
    from .ranks import keep_mask, outer_steps

    adapter = resolve_adapter(obj, "autolora", adapter_name)
    out = []
    for name, layer, a in iter_layers(obj, "autolora", adapter):
        settings = layer.autolora_settings[a]
        k = layer.lora_autolora_beta[a].numel()
        lam = threshold if threshold is not None else settings["threshold"]
        out.append(
            AutoLoraLayerInfo(
                name=name,
                alpha=layer.autolora_alpha(a).cpu(),
                keep=keep_mask(layer, a, lam).cpu(),
                threshold=1.0 / k if lam is None else float(lam),
                outer_steps=outer_steps(layer, a),
                rule=settings["rank_rule"],
            )
        )
    return out


def autolora_layers_from_report(report: Union[str, os.PathLike, Mapping[str, Any]]) -> list[AutoLoraLayerInfo]:
    """Layers from an ``autolora_ranks.json`` rank report (``dashdiff.rank_report``): what remains
    of the search once the adapter was retrained as a plain LoRA with the found ranks, where the
    adapter file itself no longer holds β."""
    if not isinstance(report, Mapping):
        with open(report, encoding="utf-8") as fh:
            report = json.load(fh)
    rows = report.get("layers") if isinstance(report, Mapping) else None
    if not isinstance(rows, list) or not rows:
        raise ValueError("dashdiff: not an AutoLoRA rank report (no 'layers' list)")
    out = []
    for row in rows:
        alpha = torch.tensor(row["alpha"], dtype=torch.float64)
        keep = torch.tensor(row["kept"], dtype=torch.bool)
        lam = report.get("threshold")
        out.append(
            AutoLoraLayerInfo(
                name=row["name"],
                alpha=alpha,
                keep=keep,
                threshold=1.0 / alpha.numel() if lam is None else float(lam),
                outer_steps=int(report.get("outer_steps", row.get("outer_steps", -1))),
            )
        )
    return out


# --------------------------------------------------------------------------- names

# Diffusers' module paths are long; these abbreviations keep plot labels readable.
_ABBREVIATIONS = (
    (r"^unet\.", ""),
    (r"^transformer\.", ""),
    (r"down_blocks\.", "down"),
    (r"up_blocks\.", "up"),
    (r"mid_block\.", "mid."),
    (r"attentions\.", "att"),
    (r"transformer_blocks\.", "tb"),
    (r"text_model\.encoder\.layers\.", "L"),
    (r"^text_encoder_2\.", "te2."),
    (r"^text_encoder\.", "te."),
    (r"self_attn\.", ""),
)


def short_name(name: str) -> str:
    """``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` -> ``down1.att0.tb0.attn1.to_q``."""
    for pattern, repl in _ABBREVIATIONS:
        name = re.sub(pattern, repl, name)
    return name


# --------------------------------------------------------------------------- drawing


def _new_figure(width: float, height: float) -> "Figure":
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # optional dependency
        raise ImportError(_PLOT_HINT) from e
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _to_image(fig: "Figure") -> "Image.Image":
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    img = Image.open(buf)
    img.load()
    return img


def _rows_height(n: int, per_row: float = 0.22, base: float = 1.6) -> float:
    return min(max(3.2, base + per_row * n), _MAX_FIG_HEIGHT_IN)


def _label_rows(ax, names: Sequence[str]) -> None:
    n = len(names)
    every = max(1, math.ceil(n / _MAX_LABELLED_ROWS))
    ticks = list(range(0, n, every))
    ax.set_yticks(ticks, [short_name(names[i]) for i in ticks], fontsize=7)
    ax.set_ylim(n - 0.5, -0.5)  # first layer on top, as in the model


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
    """Left: the rank each layer keeps out of k. Right: the selection weights α_j per layer and
    component (heat map), kept components (α_j >= λ) outlined."""
    if not layers:
        raise ValueError("dashdiff: no AutoLoRA layers to plot")
    from matplotlib.patches import Rectangle

    names = [l.name for l in layers]
    k = max(l.k for l in layers)
    fig = _new_figure(11, _rows_height(len(layers)))
    ax_rank, ax_alpha = fig.subplots(1, 2, sharey=True, width_ratios=(2, 3))

    ranks = [l.rank for l in layers]
    ax_rank.barh(range(len(layers)), ranks, color="tab:green")
    ax_rank.set_xlim(0, k + 0.5)
    ax_rank.set_xlabel(f"rank kept (of k = {k})")
    ax_rank.set_title("per-layer rank")
    ax_rank.grid(axis="x", alpha=0.3)
    _label_rows(ax_rank, names)

    grid = torch.full((len(layers), k), float("nan"), dtype=torch.float64)
    for row, l in enumerate(layers):
        grid[row, : l.k] = l.alpha
    image = ax_alpha.imshow(grid.numpy(), aspect="auto", cmap="magma", interpolation="nearest")
    if len(layers) <= 200:  # outlines become noise past that
        for row, l in enumerate(layers):
            for j in torch.nonzero(l.keep).flatten().tolist():
                ax_alpha.add_patch(Rectangle((j - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="cyan", lw=0.8))
    ax_alpha.set_xticks(range(k))
    ax_alpha.set_xlabel("component j (outlined: kept, α_j >= λ)")
    ax_alpha.set_title("selection weights α = softmax(β)")
    fig.colorbar(image, ax=ax_alpha, label="α_j")

    lams = sorted({round(l.threshold, 12) for l in layers})
    lam = f"λ = {lams[0]:.4g}" if len(lams) == 1 else f"λ = {lams[0]:.4g}..{lams[-1]:.4g}"
    steps = min(l.outer_steps for l in layers)  # -1: unknown (read from a rank report)
    note = {0: "  (no outer β step recorded: α is its initial value)", -1: ""}.get(steps, f", {steps} outer steps")
    fig.suptitle(f"{title}: {len(layers)} layers, total rank {sum(ranks)} of {sum(l.k for l in layers)}, "
                 f"{lam}{note}")
    return _to_image(fig)
