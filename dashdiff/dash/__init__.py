"""LoRA-Dash (Si et al., ICLR 2025): everything of the method in one folder.

- ``config``: the adapter configuration (a ``peft.LoraConfig`` subclass)
- ``variant``: the method on a ``DashdiffLinear`` (state, forward, plain factors, state tensors, record)
- ``kernel``: the fused rank-(r+s) autograd function of the forward
- ``selection``: the launch math (float64 spectrum of ``W0``, change rates, top-s directions)
- ``lifecycle``: counting optimizer steps, launching (also across processes), reading the selection
- ``prefetch``: the launch's eigendecompositions computed in the background before launch
- ``report``: what a launch selected, one record per layer, and its two figures

Submodules load on first use (``import dashdiff`` stays light, and the layer can import the kernel
without the lifecycle, which imports the layer).
"""

from __future__ import annotations

from .._lazy import lazy_getattr

# public name -> submodule
_EXPORTS = {
    "LoraDashConfig": "config",
    "dash_step": "lifecycle",
    "launch_dash": "lifecycle",
    "selected_directions": "lifecycle",
    "prefetch_spectra": "prefetch",
    "SpectrumPrefetcher": "prefetch",
    "FinishReport": "prefetch",
    "select_directions": "selection",
    "Selection": "selection",
    "GramEig": "selection",
    "gram_eig": "selection",
    "FusedDashLinear": "kernel",
    "DashLayerInfo": "report",
    "dash_layers": "report",
    "dash_overview_figure": "report",
    "dash_layer_figure": "report",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
