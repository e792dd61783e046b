"""dashdiff: LoRA-Dash and AutoLoRA adapters for diffusers and transformers, built on PEFT."""

from __future__ import annotations

from typing import Any

from .autolora.config import AutoLoraConfig
from .autolora.ranks import determine_ranks, selection_weights
from .autolora.report import write_rank_report
from .autolora.search import BilevelStep, retrain_config, split_train_val
from .dash.config import LoraDashConfig
from .dash.lifecycle import dash_step, launch_dash, selected_directions
from .dash.prefetch import prefetch_spectra
from .export import export_lora
from .layer import DashdiffLinear
from .state import load_adapter, save_adapter

__version__ = "0.1.0"

__all__ = [
    "AutoLoraConfig",
    "BilevelStep",
    "DashdiffLinear",
    "LoraDashCallback",
    "LoraDashConfig",
    "dash_step",
    "determine_ranks",
    "export_lora",
    "launch_dash",
    "load_adapter",
    "prefetch_spectra",
    "retrain_config",
    "save_adapter",
    "selected_directions",
    "selection_weights",
    "split_train_val",
    "write_rank_report",
]


def __getattr__(name: str) -> Any:
    # The Trainer callback pulls in transformers' training machinery: loaded on first use only.
    if name == "LoraDashCallback":
        from .callbacks import LoraDashCallback

        return LoraDashCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
