"""AutoLoRA (Zhang et al., NAACL 2024): everything of the method in one folder.

- ``config``: the adapter configuration (a ``peft.LoraConfig`` subclass)
- ``variant``: the method on a ``DashdiffLinear`` (state, forward, plain factors, state tensors, record)
- ``kernel``: the fused and the paired (finite-difference) autograd functions of the forward
- ``search``: the bi-level search from the user's loop (``BilevelStep``), data split, retrain config
- ``ranks``: selection weights α and the per-layer ranks they imply
- ``report``: the rank report (markdown, JSON, figure)

Submodules load on first use (``import dashdiff`` stays light, and the layer can import the kernel
without the search, which imports the layer).
"""

from __future__ import annotations

from .._lazy import lazy_getattr

# public name -> submodule
_EXPORTS = {
    "AutoLoraConfig": "config",
    "BilevelStep": "search",
    "default_adam": "search",
    "double_batch": "search",
    "retrain_config": "search",
    "split_indices": "search",
    "split_train_val": "search",
    "determine_ranks": "ranks",
    "keep_mask": "ranks",
    "selection_weights": "ranks",
    "write_rank_report": "report",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
