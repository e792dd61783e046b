"""The one home of the names of the files dashdiff writes and of its safetensors header.

Every weight file dashdiff writes carries one metadata key, ``HEADER_KEY``, holding JSON: the
training state (``state.save_adapter``, ``kind: "state"``) and the plain exports
(``export.export_lora``, ``kind: "export"``).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

HEADER_KEY = "dashdiff"  # safetensors header key of dashdiff's own JSON metadata
HEADER_VERSION = 1

STATE_FILE_NAME = "dashdiff_adapter.safetensors"  # save_adapter's file in a folder
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # export, diffusers format
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"  # export, kohya / A1111 format
PEFT_WEIGHT_NAME = "adapter_model.safetensors"  # export, PEFT format
PEFT_CONFIG_NAME = "adapter_config.json"
MERGED_RECORD_NAME = "dashdiff_export.json"  # merged exports: the header as a side file
RANK_REPORT_STEM = "autolora_ranks"  # AutoLoRA rank report: <stem>.md / .json / .png


def header_metadata(header: Mapping[str, Any]) -> dict[str, str]:
    """The safetensors metadata entry that carries ``header``."""
    return {HEADER_KEY: json.dumps(header)}


def read_header(metadata: Mapping[str, str]) -> dict[str, Any]:
    """dashdiff's header from a safetensors file's metadata; ``{}`` when there is none or it is not
    a JSON object (a plain LoRA, a foreign or damaged file). Strict readers check further."""
    text = metadata.get(HEADER_KEY)
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
