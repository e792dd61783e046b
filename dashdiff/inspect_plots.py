"""What a LoRA-Dash or AutoLoRA adapter learned, as data and as plots (the app's Inspect view).

Two steps, kept apart so the data can be checked without drawing anything:

- ``dash_layers`` (``dash.report``) / ``autolora_layers`` (``autolora.report``) read per-layer
  records from a model or pipeline that carries dashdiff adapters (injected in memory, or restored
  by ``dashdiff.load_adapter``). Plain exported LoRA files hold only the folded factors, so none of
  this can be read from them.
- ``plot_*`` render each method's figures (``dash.report`` / ``autolora.report``, next to the
  records they draw) into a PIL image (PNG-encoded once, so what the app serves is exactly what the
  function returns).

Plots are behind the ``plots`` extra (``pip install "dashdiff[plots]"``): matplotlib is imported
inside the drawing functions only (``dashdiff.plotting``), and a missing one raises an
ImportError naming the extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from .autolora.report import AutoLoraLayerInfo, autolora_figure, autolora_layers, autolora_layers_from_report
from .dash.report import DashLayerInfo, dash_layer_figure, dash_layers, dash_overview_figure
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
    """``dash.report.dash_overview_figure`` as an image: where the selected directions sit in each
    layer's spectrum, and their change rates against the layer's median one."""
    return _to_image(dash_overview_figure(layers, title))


def plot_dash_layer(layer: DashLayerInfo) -> "Image.Image":
    """``dash.report.dash_layer_figure`` as an image: one layer's spectrum and change rates."""
    return _to_image(dash_layer_figure(layer))


def plot_autolora(layers: Sequence[AutoLoraLayerInfo], title: str = "AutoLoRA") -> "Image.Image":
    """``autolora.report.autolora_figure`` as an image: per-layer ranks and the α heat map."""
    return _to_image(autolora_figure(layers, title))
