"""Finding dashdiff layers in a model, a ``PeftModel`` or a diffusers pipeline."""

from __future__ import annotations

from typing import Iterator, Optional

from torch import nn

from .layer import DashdiffLinear

# Pipeline components that can carry LoRA adapters, in diffusers' key-prefix naming.
PIPELINE_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")


def components(obj) -> list[tuple[str, nn.Module]]:
    """``[(prefix, module)]``: ``[("", model)]`` for a model, ``[("unet", unet), ...]`` for a pipeline."""
    if isinstance(obj, nn.Module):
        return [("", obj)]
    found = [(n, getattr(obj, n)) for n in PIPELINE_COMPONENTS if isinstance(getattr(obj, n, None), nn.Module)]
    if not found:
        raise TypeError(f"dashdiff: expected a torch model or a diffusers pipeline, got {type(obj).__name__}")
    return found


def base_model(module: nn.Module) -> nn.Module:
    """The model under DDP / torch.compile / PEFT wrappers (``PeftModel`` -> ``LoraModel`` -> model)."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    while isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or hasattr(module, "_orig_mod"):
        module = module.module if hasattr(module, "module") else module._orig_mod
    if isinstance(module, PeftModel):
        module = module.base_model
    if isinstance(module, BaseTuner):
        module = module.model
    return module


def iter_layers(obj, kind: Optional[str] = None, adapter_name: Optional[str] = None
                ) -> Iterator[tuple[str, DashdiffLinear, str]]:
    """Yield ``(module_name, layer, adapter)`` for every dashdiff adapter of ``kind`` ('dash',
    'autolora', 'lora' or None for all), module names relative to the base model (prefixed with
    the component name for pipelines, as in diffusers' LoRA keys)."""
    for prefix, comp in components(obj):
        root = base_model(comp)
        for name, mod in root.named_modules():
            if not isinstance(mod, DashdiffLinear):
                continue
            full = f"{prefix}.{name}" if prefix else name
            for adapter, k in mod.adapter_kind.items():
                if (kind is None or k == kind) and (adapter_name is None or adapter == adapter_name):
                    yield full, mod, adapter


def resolve_adapter(obj, kind: str, adapter_name: Optional[str]) -> str:
    """The adapter name to use: the given one (checked), or the only adapter of ``kind``."""
    names = sorted({a for _, _, a in iter_layers(obj, kind)})
    label = {"dash": "LoRA-Dash", "autolora": "AutoLoRA"}.get(kind, kind)
    if adapter_name is not None:
        if adapter_name not in names:
            raise ValueError(f"dashdiff: no {label} adapter named {adapter_name!r} (found: {names or 'none'})")
        return adapter_name
    if not names:
        raise ValueError(f"dashdiff: the model has no {label} adapter (inject one with a dashdiff config first)")
    if len(names) > 1:
        raise ValueError(f"dashdiff: several {label} adapters {names}: pass adapter_name=")
    return names[0]
