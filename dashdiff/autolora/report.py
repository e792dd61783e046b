"""The AutoLoRA rank report written next to a search's outputs.

``write_rank_report(model_or_ranks_and_alphas, folder)`` writes ``autolora_ranks.md`` (a markdown
table: per layer k, rank, kept α mass and α), ``autolora_ranks.json`` (the same, machine-readable)
and ``autolora_ranks.png`` (ranks and α per layer; matplotlib, imported only here).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

REPORT_STEM = "autolora_ranks"
INSTALL_HINT = "dashdiff: the rank picture needs matplotlib: pip install 'dashdiff[plots]' (or pass plot=False)"


@dataclass
class RankRow:
    """One layer: ``alpha`` (k,) = softmax(β) in float64, ``kept`` (k,) the components kept."""

    name: str
    rank: int
    alpha: list[float]
    kept: list[bool]

    @property
    def k(self) -> int:
        return len(self.alpha)

    @property
    def kept_mass(self) -> float:
        return float(sum(a for a, keep in zip(self.alpha, self.kept) if keep))


def _top_mask(alpha: torch.Tensor, rank: int) -> list[bool]:
    keep = torch.zeros(alpha.numel(), dtype=torch.bool)
    keep[torch.argsort(alpha, descending=True, stable=True)[:rank]] = True
    return keep.tolist()


def rank_rows(source: Any, adapter_name: Optional[str] = None, threshold: Optional[float] = None) -> list[RankRow]:
    """Rows from a model / pipeline with an AutoLoRA adapter (ranks as ``determine_ranks``), from
    ``(ranks, alphas)`` (two ``{name: ...}`` dicts) or from ``{name: (rank, alpha)}``; for the
    dict forms the kept components are the ``rank`` largest α."""
    if isinstance(source, tuple) and len(source) == 2 and all(isinstance(x, Mapping) for x in source):
        ranks, alphas = source
        if set(ranks) != set(alphas):
            raise ValueError("dashdiff: ranks and alphas name different layers")
        pairs = {n: (ranks[n], alphas[n]) for n in ranks}
    elif isinstance(source, Mapping):
        pairs = dict(source)
    else:
        from .ranks import determine_ranks, keep_mask
        from .walk import iter_layers, resolve_adapter

        adapter = resolve_adapter(source, "autolora", adapter_name)
        ranks = determine_ranks(source, threshold=threshold, adapter_name=adapter)
        rows = []
        for name, layer, a in iter_layers(source, "autolora", adapter):
            keep = keep_mask(layer, a, threshold)
            rows.append(RankRow(name, ranks[name], layer.autolora_alpha(a).cpu().tolist(), keep.tolist()))
        return rows
    rows = []
    for name, (rank, alpha) in pairs.items():
        alpha = torch.as_tensor(alpha, dtype=torch.float64).flatten().cpu()
        if not 0 <= int(rank) <= alpha.numel():
            raise ValueError(f"dashdiff: rank {rank} of {name} is outside [0, k={alpha.numel()}]")
        rows.append(RankRow(name, int(rank), alpha.tolist(), _top_mask(alpha, int(rank))))
    return rows


def _markdown(rows: Sequence[RankRow], threshold: Optional[float]) -> str:
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
        alphas = ", ".join(f"{a:.3f}" for a in sorted(r.alpha, reverse=True))
        lines.append(f"| `{r.name}` | {r.k} | {r.rank} | {r.kept_mass:.3f} | {alphas} |")
    return "\n".join(lines) + "\n"


def _figure(rows: Sequence[RankRow], path: Path) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # optional extra `plots` / `app`
        raise ImportError(INSTALL_HINT) from err

    n = len(rows)
    k = max(r.k for r in rows)
    # Object-oriented API on an Agg canvas: no pyplot, no global backend change for the caller.
    fig = Figure(figsize=(10, 1.2 + 0.28 * n), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_rank, ax_alpha = fig.subplots(1, 2, width_ratios=(1, 1.4), sharey=True)
    ys = list(range(n))
    ax_rank.barh(ys, [r.k for r in rows], color="#dddddd", label="searched k")
    ax_rank.barh(ys, [r.rank for r in rows], color="#3b75af", label="rank kept")
    ax_rank.set_yticks(ys, [r.name for r in rows], fontsize=7)
    ax_rank.invert_yaxis()
    ax_rank.set_xlabel("rank")
    ax_rank.legend(loc="lower right", fontsize=7)
    grid = torch.full((n, k), float("nan"), dtype=torch.float64)
    for i, r in enumerate(rows):
        grid[i, : r.k] = torch.tensor(r.alpha)
    im = ax_alpha.imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    for i, r in enumerate(rows):  # mark the kept components
        for j, keep in enumerate(r.kept):
            if keep:
                ax_alpha.plot(j, i, marker="o", ms=3, color="white")
    ax_alpha.set_xlabel("component j (dot: kept)")
    fig.colorbar(im, ax=ax_alpha, label="α = softmax(β)")
    fig.suptitle(f"AutoLoRA: total rank {sum(r.rank for r in rows)} of {sum(r.k for r in rows)}")
    fig.savefig(path)


def write_rank_report(model_or_ranks_and_alphas: Any, folder: Union[str, Path], adapter_name: Optional[str] = None,
                      threshold: Optional[float] = None, plot: bool = True) -> dict[str, str]:
    """Write ``autolora_ranks.md``, ``autolora_ranks.json`` and (``plot``) ``autolora_ranks.png``
    into ``folder``; returns ``{"md", "json", "png"}`` paths. Input as ``rank_rows``. Raises a
    one-line install hint, before writing anything, when ``plot`` and matplotlib is missing."""
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError as err:
            raise ImportError(INSTALL_HINT) from err
    rows = rank_rows(model_or_ranks_and_alphas, adapter_name, threshold)
    if not rows:
        raise ValueError("dashdiff: no AutoLoRA layers to report")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"md": folder / f"{REPORT_STEM}.md", "json": folder / f"{REPORT_STEM}.json"}
    paths["md"].write_text(_markdown(rows, threshold), encoding="utf-8")
    record = {
        "threshold": threshold,
        "total_rank": sum(r.rank for r in rows),
        "layers": [{**asdict(r), "k": r.k} for r in rows],
    }
    paths["json"].write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    if plot:
        paths["png"] = folder / f"{REPORT_STEM}.png"
        _figure(rows, paths["png"])
    return {k: str(v) for k, v in paths.items()}
