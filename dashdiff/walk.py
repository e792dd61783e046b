"""Finding adapters in a model, a ``PeftModel`` or a diffusers pipeline: the components, the model
under its wrappers, the LoRA layers and the adapter names. The one place that walks a model.

Module names are relative to the component's base model (under DDP / torch.compile / PEFT
wrappers) and, for pipelines, prefixed with the component name, as in diffusers' LoRA keys.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Optional

from peft.tuners.lora.layer import LoraLayer
from torch import nn

from .layer import DashdiffLinear
from .registry import VARIANTS

# Pipeline components that can carry LoRA adapters, in diffusers' key-prefix naming.
PIPELINE_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")


class AdapterLayer(NamedTuple):
    """One dashdiff adapter on one layer: full module name, the layer, the adapter name."""

    name: str
    layer: DashdiffLinear
    adapter: str


class LoraLayerEntry(NamedTuple):
    """One PEFT LoRA layer of a component: component prefix ("" for a lone model), the component's
    base model, the module name relative to it, the layer."""

    component: str
    root: nn.Module
    module: str
    layer: LoraLayer


def components(obj) -> list[tuple[str, nn.Module]]:
    """``[(prefix, module)]``: ``[("", model)]`` for a model, ``[("unet", unet), ...]`` for a pipeline."""
    if isinstance(obj, nn.Module):
        return [("", obj)]
    found = [(n, getattr(obj, n)) for n in PIPELINE_COMPONENTS if isinstance(getattr(obj, n, None), nn.Module)]
    if not found:
        raise TypeError(f"dashdiff: expected a torch model or a diffusers pipeline, got {type(obj).__name__}")
    return found


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel / DeepSpeed containers (accelerate's
    ``extract_model_from_parallel``); torch.compile and accelerate's autocast forward stay on."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def base_model(module: nn.Module) -> nn.Module:
    """The model under DDP / torch.compile / PEFT wrappers (``PeftModel`` -> ``LoraModel`` -> model),
    a compiled model under PEFT's wrappers included: module names are relative to it.

    A plain loop rather than ``unwrap_parallel``: it runs on every ``dash_step``, and accelerate's
    helper also scans the whole model for compiled regions."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    while isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or hasattr(module, "_orig_mod"):
        module = module.module if hasattr(module, "module") else module._orig_mod
    if isinstance(module, PeftModel):
        module = module.base_model
    if isinstance(module, BaseTuner):
        module = module.model
    return getattr(module, "_orig_mod", module)


def full_name(component: str, module: str) -> str:
    return f"{component}.{module}" if component else module


def iter_lora_layers(obj, adapter_name: Optional[str] = None) -> Iterator[LoraLayerEntry]:
    """Every PEFT LoRA layer holding ``adapter_name`` (any adapter if None): dashdiff layers and
    ordinary PEFT LoRA layers."""
    for prefix, comp in components(obj):
        root = base_model(comp)
        for name, mod in root.named_modules():
            if isinstance(mod, LoraLayer) and (adapter_name is None or adapter_name in mod.lora_A):
                yield LoraLayerEntry(prefix, root, name, mod)


def iter_layers(obj, kind: Optional[str] = None, adapter_name: Optional[str] = None) -> Iterator[AdapterLayer]:
    """Every dashdiff adapter of ``kind`` ('dash', 'autolora', 'lora' or None for all) on a
    ``DashdiffLinear``, optionally only ``adapter_name``."""
    for prefix, _, name, mod in iter_lora_layers(obj):
        if not isinstance(mod, DashdiffLinear):
            continue
        full = full_name(prefix, name)
        for adapter, k in mod.adapter_kind.items():
            if (kind is None or k == kind) and (adapter_name is None or adapter == adapter_name):
                yield AdapterLayer(full, mod, adapter)


def adapter_names(obj, kind: Optional[str] = None) -> list[str]:
    """Sorted names of the adapters of ``kind`` (None: every LoRA-type adapter) anywhere in ``obj``."""
    if kind is None:
        return sorted({a for entry in iter_lora_layers(obj) for a in entry.layer.lora_A.keys()})
    return sorted({a for _, _, a in iter_layers(obj, kind)})


def resolve_adapter(obj, kind: Optional[str], adapter_name: Optional[str]) -> str:
    """The adapter name to use: the given one (checked to exist), or the only adapter of ``kind``
    (None: of any LoRA-type adapter, plain PEFT LoRA included)."""
    names = adapter_names(obj, kind)
    if kind is None:
        missing = f"the model has no adapter named {adapter_name!r}"
        none = "the model has no LoRA / LoRA-Dash / AutoLoRA adapter"
        several = f"the model has several adapters {names}"
    else:
        label = VARIANTS[kind].label if kind in VARIANTS else kind
        missing = f"no {label} adapter named {adapter_name!r}"
        none = f"the model has no {label} adapter (inject one with a dashdiff config first)"
        several = f"several {label} adapters {names}"
    if adapter_name is not None:
        if adapter_name not in names:
            raise ValueError(f"dashdiff: {missing} (found: {names or 'none'})")
        return adapter_name
    if not names:
        raise ValueError(f"dashdiff: {none}")
    if len(names) > 1:
        raise ValueError(f"dashdiff: {several}: pass adapter_name=")
    return names[0]
