"""The methods dashdiff's layer knows: ``kind -> variant class``.

A third method is one new folder with its ``MethodVariant`` subclass (and its config) plus one
entry here; the layer, saving, loading and exporting go through the variant.
"""

from __future__ import annotations

from .autolora.variant import AutoLoraVariant
from .dash.variant import LoraDashVariant
from .variant import MethodVariant

VARIANTS: dict[str, type[MethodVariant]] = {v.kind: v for v in (LoraDashVariant, AutoLoraVariant)}
METHODS = ("lora", *VARIANTS)  # every method name a header may carry ("lora": plain PEFT LoRA)
