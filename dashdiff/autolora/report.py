"""AutoLoRA read-out: one record per layer (``AutoLoraLayerInfo``), one figure, and the rank report.

``autolora_layers`` reads the records from a model / pipeline with an AutoLoRA adapter,
``autolora_layers_from_report`` from a written ``autolora_ranks.json``; ``autolora_figure`` draws
them (ranks and α per layer; matplotlib, imported only there, see ``dashdiff.plotting``).
``write_rank_report(model_or_ranks_and_alphas, folder)`` writes ``autolora_ranks.md`` (a markdown
table: per layer k, rank, kept α mass and α), ``autolora_ranks.json`` (the same, machine-readable)
and ``autolora_ranks.png`` (the figure) next to a search's outputs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import torch

from ..files import RANK_REPORT_STEM as REPORT_STEM

if TYPE_CHECKING:
    from matplotlib.figure import Figure

INSTALL_HINT = "dashdiff: the rank picture needs matplotlib: pip install 'dashdiff[plots]' (or pass plot=False)"


@dataclass
class AutoLoraLayerInfo:
    """One AutoLoRA layer: ``alpha`` (k,) = softmax(β) in float64 and ``keep`` (k,) the components
    kept at ``threshold`` λ; ``outer_steps``: β steps taken (-1 when unknown)."""

    name: str
    alpha: torch.Tensor
    keep: torch.Tensor
    threshold: float
    outer_steps: int = 0
    rule: str = "softmax"

    @property
    def rank(self) -> int:
        return int(self.keep.sum())

    @property
    def k(self) -> int:
        return int(self.alpha.numel())

    @property
    def kept_mass(self) -> float:
        """Σ α_j over the kept components."""
        return float(sum(a for a, keep in zip(self.alpha.tolist(), self.keep.tolist()) if keep))


# --------------------------------------------------------------------------- records


def autolora_layers(obj, adapter_name: Optional[str] = None, threshold: Optional[float] = None
                    ) -> list[AutoLoraLayerInfo]:
    """α and the kept components of every layer of the AutoLoRA adapter of a model or pipeline.

    Unlike ``determine_ranks`` this does not refuse an adapter with no outer step: the Inspect
    view shows it (with ``outer_steps == 0``, α uniform) rather than failing."""
    from ..walk import iter_layers, resolve_adapter
    from .ranks import keep_mask, layer_threshold, outer_steps
    from .variant import AutoLoraVariant

    adapter = resolve_adapter(obj, "autolora", adapter_name)
    out = []
    for name, layer, a in iter_layers(obj, "autolora", adapter):
        lam = layer_threshold(layer, a, threshold)
        out.append(
            AutoLoraLayerInfo(
                name=name,
                alpha=AutoLoraVariant.alpha(layer, a).cpu(),
                keep=keep_mask(layer, a, lam).cpu(),
                threshold=float(lam),
                outer_steps=outer_steps(layer, a),
                rule=layer.autolora_settings[a]["rank_rule"],
            )
        )
    return out


def autolora_layers_from_report(report: Union[str, os.PathLike, Mapping[str, Any]]) -> list[AutoLoraLayerInfo]:
    """Layers from an ``autolora_ranks.json`` rank report: what remains of the search once the
    adapter was retrained as a plain LoRA with the found ranks, where the adapter file itself no
    longer holds β."""
    from .ranks import default_threshold

    if not isinstance(report, Mapping):
        with open(report, encoding="utf-8") as fh:
            report = json.load(fh)
    rows = report.get("layers") if isinstance(report, Mapping) else None
    if not isinstance(rows, list) or not rows:
        raise ValueError("dashdiff: not an AutoLoRA rank report (no 'layers' list)")
    out = []
    for row in rows:
        alpha = torch.tensor(row["alpha"], dtype=torch.float64)
        lam = report.get("threshold")
        out.append(
            AutoLoraLayerInfo(
                name=row["name"],
                alpha=alpha,
                keep=torch.tensor(row["kept"], dtype=torch.bool),
                threshold=float(default_threshold(alpha.numel(), lam)),
                outer_steps=int(report.get("outer_steps", row.get("outer_steps", -1))),
            )
        )
    return out


def _top_mask(alpha: torch.Tensor, rank: int) -> torch.Tensor:
    keep = torch.zeros(alpha.numel(), dtype=torch.bool)
    keep[torch.argsort(alpha, descending=True, stable=True)[:rank]] = True
    return keep


def report_layers(source: Any, adapter_name: Optional[str] = None, threshold: Optional[float] = None
                  ) -> list[AutoLoraLayerInfo]:
    """Records from a model / pipeline with an AutoLoRA adapter (refused before any β step, as
    ``determine_ranks``), from ``(ranks, alphas)`` (two ``{name: ...}`` dicts) or from
    ``{name: (rank, alpha)}``; for the dict forms the kept components are the ``rank`` largest α."""
    from .ranks import default_threshold, determine_ranks

    if isinstance(source, tuple) and len(source) == 2 and all(isinstance(x, Mapping) for x in source):
        ranks, alphas = source
        if set(ranks) != set(alphas):
            raise ValueError("dashdiff: ranks and alphas name different layers")
        pairs = {n: (ranks[n], alphas[n]) for n in ranks}
    elif isinstance(source, Mapping):
        pairs = dict(source)
    else:
        determine_ranks(source, threshold=threshold, adapter_name=adapter_name)  # refuses an unsearched adapter
        return autolora_layers(source, adapter_name, threshold)
    rows = []
    for name, (rank, alpha) in pairs.items():
        alpha = torch.as_tensor(alpha, dtype=torch.float64).flatten().cpu()
        if not 0 <= int(rank) <= alpha.numel():
            raise ValueError(f"dashdiff: rank {rank} of {name} is outside [0, k={alpha.numel()}]")
        rows.append(AutoLoraLayerInfo(name, alpha, _top_mask(alpha, int(rank)),
                                      float(default_threshold(alpha.numel(), threshold)), outer_steps=-1))
    return rows


# --------------------------------------------------------------------------- figure


def autolora_figure(layers: Sequence[AutoLoraLayerInfo], title: str = "AutoLoRA", hint: Optional[str] = None
                    ) -> "Figure":
    """Left: the rank each layer keeps out of k. Right: the selection weights α_j per layer and
    component (heat map), kept components (α_j >= λ) outlined. ``hint``: the ImportError message
    without matplotlib."""
    from ..plotting import PLOT_HINT, label_rows, new_figure, rows_height

    if not layers:
        raise ValueError("dashdiff: no AutoLoRA layers to plot")
    fig = new_figure(11, rows_height(len(layers)), hint or PLOT_HINT)
    from matplotlib.patches import Rectangle

    names = [l.name for l in layers]
    k = max(l.k for l in layers)
    ax_rank, ax_alpha = fig.subplots(1, 2, sharey=True, width_ratios=(2, 3))

    ranks = [l.rank for l in layers]
    ax_rank.barh(range(len(layers)), ranks, color="tab:green")
    ax_rank.set_xlim(0, k + 0.5)
    ax_rank.set_xlabel(f"rank kept (of k = {k})")
    ax_rank.set_title("per-layer rank")
    ax_rank.grid(axis="x", alpha=0.3)
    label_rows(ax_rank, names)

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
    return fig


# --------------------------------------------------------------------------- report


def _markdown(rows: Sequence[AutoLoraLayerInfo], threshold: Optional[float]) -> str:
    total = sum(r.rank for r in rows)
    full = sum(r.k for r in rows)
    lam = "1/k" if threshold is None else f"{threshold:g}"
    lines = [
        "# AutoLoRA ranks",
        "",
        f"{len(rows)} layers, total rank {total} of {full} searched components; threshold λ = {lam}.",
        "α = softmax(β) per layer, listed largest first; a component is kept when its α passes λ.",
        "",
        "| layer | k | rank | kept α mass | α (descending) |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        alphas = ", ".join(f"{a:.3f}" for a in sorted(r.alpha.tolist(), reverse=True))
        lines.append(f"| `{r.name}` | {r.k} | {r.rank} | {r.kept_mass:.3f} | {alphas} |")
    return "\n".join(lines) + "\n"


def write_rank_report(model_or_ranks_and_alphas: Any, folder: Union[str, Path], adapter_name: Optional[str] = None,
                      threshold: Optional[float] = None, plot: bool = True) -> dict[str, str]:
    """Write ``autolora_ranks.md``, ``autolora_ranks.json`` and (``plot``) ``autolora_ranks.png``
    into ``folder``; returns ``{"md", "json", "png"}`` paths. Input as ``report_layers``. Raises a
    one-line install hint, before writing anything, when ``plot`` and matplotlib is missing."""
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError as err:
            raise ImportError(INSTALL_HINT) from err
    rows = report_layers(model_or_ranks_and_alphas, adapter_name, threshold)
    if not rows:
        raise ValueError("dashdiff: no AutoLoRA layers to report")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"md": folder / f"{REPORT_STEM}.md", "json": folder / f"{REPORT_STEM}.json"}
    paths["md"].write_text(_markdown(rows, threshold), encoding="utf-8")
    record = {
        "threshold": threshold,
        "total_rank": sum(r.rank for r in rows),
        "layers": [{"name": r.name, "rank": r.rank, "alpha": r.alpha.tolist(), "kept": r.keep.tolist(), "k": r.k}
                   for r in rows],
    }
    paths["json"].write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    if plot:
        paths["png"] = folder / f"{REPORT_STEM}.png"
        autolora_figure(rows, hint=INSTALL_HINT).savefig(paths["png"])
    return {k: str(v) for k, v in paths.items()}
