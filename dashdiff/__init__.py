"""dashdiff: LoRA-Dash and AutoLoRA adapters for diffusers and transformers, built on PEFT.

Every public name loads its module on first use (PEP 562), and so does a submodule named as an
attribute (``dashdiff.export``): ``import dashdiff`` itself imports neither torch nor PEFT, so a
script's help text, a version check or a tool that only inspects the package stays fast.
"""

from __future__ import annotations


from ._lazy import lazy_getattr

__version__ = "0.1.0"

# public name -> the module that holds it
_EXPORTS = {
    "AutoLoraConfig": "autolora.config",
    "BilevelStep": "autolora.search",
    "DashdiffLinear": "layer",
    "LoraDashCallback": "callbacks",  # transformers' Trainer machinery
    "LoraDashConfig": "dash.config",
    "dash_step": "dash.lifecycle",
    "determine_ranks": "autolora.ranks",
    "export_lora": "export",
    "launch_dash": "dash.lifecycle",
    "load_adapter": "state",
    "prefetch_spectra": "dash.prefetch",
    "retrain_config": "autolora.search",
    "save_adapter": "state",
    "selected_directions": "dash.lifecycle",
    "selection_weights": "autolora.ranks",
    "split_train_val": "autolora.search",
    "write_rank_report": "autolora.report",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS, bind=True)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
