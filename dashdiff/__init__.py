"""dashdiff: LoRA-Dash and AutoLoRA adapters for diffusers and transformers, built on PEFT."""

from .config import AutoLoraConfig, LoraDashConfig
from .dash import dash_step, launch_dash, selected_directions
from .prefetch import prefetch_spectra
from .layer import DashdiffLinear
from .ranks import determine_ranks, selection_weights

__all__ = [
    "AutoLoraConfig",
    "DashdiffLinear",
    "LoraDashConfig",
    "dash_step",
    "determine_ranks",
    "launch_dash",
    "prefetch_spectra",
    "selected_directions",
    "selection_weights",
]
__version__ = "0.1.0"

from .export import export_lora  # noqa: E402
from .state import load_adapter, save_adapter  # noqa: E402

__all__ += ["export_lora", "load_adapter", "save_adapter"]

from .callbacks import LoraDashCallback  # noqa: E402

__all__ += ["LoraDashCallback"]

from .autolora import BilevelStep, retrain_config, split_train_val  # noqa: E402
from .rank_report import write_rank_report  # noqa: E402

__all__ += ["BilevelStep", "retrain_config", "split_train_val", "write_rank_report"]
