"""Full training state of one adapter in ONE safetensors file, for resuming or inspecting.

Unlike ``export_lora`` (a plain LoRA for stock loaders), this keeps everything a LoRA-Dash /
AutoLoRA run needs to continue exactly. Tensor keys, ``<module>`` being the module name relative
to the base model (prefixed ``unet.`` / ``text_encoder.`` / ... for pipelines):

- every layer: ``<module>.lora_A.weight`` (r, in), ``<module>.lora_B.weight`` (out, r), unscaled;
- LoRA-Dash: ``<module>.lora_dash_delta`` δ (s,), ``<module>.lora_dash_U`` U_s (out, s),
  ``<module>.lora_dash_V`` V_sᵀ (s, in), ``<module>.lora_dash_step`` (warm-up counter, int64 ()),
  ``<module>.lora_dash_launch_step`` (int64 (), -1 before launch); after launch
  ``<module>.dash_record.indices`` (≤ s,) int64, ``.sigma`` (k,) and ``.change_rate`` (k,) float64
  for all k = min(out, in) directions;
- AutoLoRA: ``<module>.lora_autolora_beta`` β (k,), ``<module>.lora_autolora_outer_steps`` int64 ().

Header key ``dashdiff`` (JSON): ``kind: "state"``, ``adapter_name``, ``configs`` per component
(``{"class": "LoraDashConfig" | "AutoLoraConfig" | "LoraConfig", "fields": {...}}``) and
``layers`` (per module: method, r, s / launched).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from peft import PeftModel, inject_adapter_in_model
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from . import safeio
from .config import AutoLoraConfig, LoraDashConfig
from .export import (
    HEADER_KEY,
    HEADER_VERSION,
    config_from_dict,
    config_to_dict,
    find_config,
    full_name,
    iter_lora_layers,
    resolve_any_adapter,
)
from .layer import DashdiffLinear
from .walk import components

STATE_FILE_NAME = "dashdiff_adapter.safetensors"  # used when a folder is given as the path

_DASH_TENSORS = ("lora_dash_delta", "lora_dash_U", "lora_dash_V", "lora_dash_step", "lora_dash_launch_step")
_AUTOLORA_TENSORS = ("lora_autolora_beta", "lora_autolora_outer_steps")
_RECORD_FIELDS = ("indices", "sigma", "change_rate")


def _file_path(path: Union[str, os.PathLike]) -> Path:
    path = Path(path)
    return path / STATE_FILE_NAME if path.is_dir() else path


def _layer_tensors(layer: LoraLayer, adapter: str) -> dict[str, torch.Tensor]:
    """Suffix -> tensor for one layer's adapter (the model's own tensors, not copies)."""
    out = {"lora_A.weight": layer.lora_A[adapter].weight, "lora_B.weight": layer.lora_B[adapter].weight}
    kind = _kind(layer, adapter)
    if kind == "dash":
        out.update({name: getattr(layer, name)[adapter] for name in _DASH_TENSORS})
    elif kind == "autolora":
        out.update({name: getattr(layer, name)[adapter] for name in _AUTOLORA_TENSORS})
    return out


def _kind(layer: LoraLayer, adapter: str) -> str:
    return layer.adapter_kind.get(adapter, "lora") if isinstance(layer, DashdiffLinear) else "lora"


def _layers_config(layers: list[tuple[str, LoraLayer]], adapter: str):
    """A config rebuilt from the layers, for models whose PEFT config was not kept."""
    name0, layer = layers[0]
    kind = _kind(layer, adapter)
    common = dict(
        r=layer.r[adapter],
        lora_alpha=layer.lora_alpha[adapter],
        target_modules=sorted(n for n, _ in layers),
        use_rslora=bool(layer.use_rslora.get(adapter, False)),
    )
    if kind == "dash":
        return LoraDashConfig(**common, dash_directions=layer.dash_directions[adapter],
                              dash_warmup_steps=layer.dash_warmup_steps[adapter])
    if kind == "autolora":
        s = layer.autolora_settings[adapter]
        return AutoLoraConfig(**common, autolora_threshold=s["threshold"], autolora_rank_rule=s["rank_rule"])
    from peft import LoraConfig

    ranks = {n: l.r[adapter] for n, l in layers}
    alphas = {n: l.lora_alpha[adapter] for n, l in layers}
    return LoraConfig(**common, rank_pattern=ranks, alpha_pattern=alphas)


def save_adapter(model_or_pipeline, path: Union[str, os.PathLike], adapter_name: Optional[str] = None) -> str:
    """Save the full training state of one adapter (the only one if ``adapter_name`` is None) to
    one safetensors file (``path``, or ``path/dashdiff_adapter.safetensors`` for a folder).
    Written to a temporary name and renamed: an interrupted save leaves an old file intact.
    Returns the file path."""
    adapter = resolve_any_adapter(model_or_pipeline, adapter_name)
    tensors: dict[str, torch.Tensor] = {}
    layers_meta: dict[str, dict[str, Any]] = {}
    by_comp: dict[str, list[tuple[str, LoraLayer]]] = {}
    for comp, _, name, layer in iter_lora_layers(model_or_pipeline, adapter):
        key = full_name(comp, name)
        by_comp.setdefault(comp, []).append((name, layer))
        for suffix, t in _layer_tensors(layer, adapter).items():
            tensors[f"{key}.{suffix}"] = t
        kind = _kind(layer, adapter)
        meta: dict[str, Any] = {"method": kind, "r": layer.r[adapter]}
        if kind == "dash":
            launched = layer.is_launched(adapter)
            meta.update(s=layer.dash_directions[adapter], launched=launched)
            record = layer.dash_record.get(adapter)
            if launched and record is not None:
                for field_name in _RECORD_FIELDS:
                    tensors[f"{key}.dash_record.{field_name}"] = record[field_name]
        layers_meta[key] = meta
    configs = {}
    for comp_name, comp in components(model_or_pipeline):
        if comp_name in by_comp:
            cfg = find_config(comp, adapter) or _layers_config(by_comp[comp_name], adapter)
            configs[comp_name] = config_to_dict(cfg)
    from . import __version__

    header = {
        "format_version": HEADER_VERSION,
        "dashdiff_version": __version__,
        "kind": "state",
        "adapter_name": adapter,
        "configs": configs,
        "layers": layers_meta,
    }
    file = _file_path(path)
    safeio.save_safetensors(tensors, file, {"format": "pt", HEADER_KEY: json.dumps(header)})
    return str(file)


def _read_state(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, meta = safeio.read_safetensors(file)
    if HEADER_KEY not in meta:
        raise ValueError(
            f"dashdiff: {file} has no '{HEADER_KEY}' header: it is not a dashdiff adapter file. A plain LoRA loads "
            "with pipe.load_lora_weights(...) or PeftModel.from_pretrained(...)."
        )
    try:
        header = json.loads(meta[HEADER_KEY])
    except json.JSONDecodeError as err:
        raise ValueError(f"dashdiff: {file}: the '{HEADER_KEY}' header is not valid JSON ({err})") from err
    if header.get("kind") != "state":
        raise ValueError(
            f"dashdiff: {file} is a dashdiff *export* (a plain LoRA, {header.get('export_format')!r} format), not a "
            "training state: load it with the stock loader (pipe.load_lora_weights / PeftModel.from_pretrained)."
        )
    if header.get("format_version", 0) > HEADER_VERSION:
        raise ValueError(
            f"dashdiff: {file} was written by a newer dashdiff (state format {header['format_version']}); upgrade dashdiff"
        )
    return tensors, header


def _inject(comp: nn.Module, cfg, adapter: str) -> None:
    """Add ``adapter`` to a component that lacks it, the way its library does."""
    try:
        from diffusers import ModelMixin
    except ImportError:  # pragma: no cover
        ModelMixin = ()
    if isinstance(comp, PeftModel):
        comp.add_adapter(adapter, cfg)
        comp.set_adapter(adapter)  # PeftModel.add_adapter leaves a new adapter inactive
    elif isinstance(comp, ModelMixin):
        comp.add_adapter(cfg, adapter_name=adapter)
    else:
        inject_adapter_in_model(cfg, comp, adapter_name=adapter)


def _component(obj, name: str, file: Path) -> nn.Module:
    for comp_name, comp in components(obj):
        if comp_name == name:
            return comp
    label = "a single model" if name == "" else f"pipeline component {name!r}"
    have = [n or "(model)" for n, _ in components(obj)]
    raise ValueError(f"dashdiff: {file} holds an adapter for {label}, but the target has {have}")


def load_adapter(model_or_pipeline, path: Union[str, os.PathLike], adapter_name: Optional[str] = None):
    """Load a file written by ``save_adapter`` into a model, ``PeftModel`` or pipeline, in place.

    Components that lack the adapter get it injected from the stored config first. Every tensor is
    copied and each LoRA-Dash layer's launch record and step counters are restored, so outputs are
    identical and training continues (launched layers stay launched). All checks (missing modules,
    shapes) run before anything is copied. ``adapter_name`` renames the adapter (default: the
    stored name). Returns ``model_or_pipeline``.
    """
    file = _file_path(path)
    tensors, header = _read_state(file)
    adapter = adapter_name or header["adapter_name"]

    # 1. inject where needed
    for comp_name, entry in header["configs"].items():
        comp = _component(model_or_pipeline, comp_name, file)
        if not any(True for _ in iter_lora_layers(comp, adapter)):
            _inject(comp, config_from_dict(entry), adapter)

    # 2. match the file's layers with the model's, check everything before copying
    present = {full_name(c, n): layer for c, _, n, layer in iter_lora_layers(model_or_pipeline, adapter)
               if c in header["configs"]}
    wanted = header["layers"]
    missing = sorted(set(wanted) - set(present))
    extra = sorted(set(present) - set(wanted))
    if missing or extra:
        msg = [f"dashdiff: {file} does not fit this model's adapter {adapter!r}."]
        if missing:
            msg.append(f"Modules in the file but not adapted in the model ({len(missing)}): {', '.join(missing[:10])}"
                       + (" ..." if len(missing) > 10 else "") + ".")
        if extra:
            msg.append(f"Modules adapted in the model but not in the file ({len(extra)}): {', '.join(extra[:10])}"
                       + (" ..." if len(extra) > 10 else "") + ".")
        msg.append("Was it trained on another base model or with other target_modules?")
        raise ValueError(" ".join(msg))
    plan: list[tuple[str, LoraLayer, dict[str, torch.Tensor]]] = []
    for name, meta in wanted.items():
        layer = present[name]
        kind = _kind(layer, adapter)
        if kind != meta["method"]:
            raise ValueError(
                f"dashdiff: {file}: {name} holds a {meta['method']!r} adapter in the file but a {kind!r} adapter named "
                f"{adapter!r} in the model; delete the model's adapter first or load under another adapter_name"
            )
        targets = _layer_tensors(layer, adapter)
        for suffix, dst in targets.items():
            key = f"{name}.{suffix}"
            if key not in tensors:
                raise ValueError(f"dashdiff: {file} lacks tensor {key} (a damaged or hand-edited file)")
            src = tensors[key]
            if src.shape != dst.shape:
                raise ValueError(
                    f"dashdiff: {file}: {key} has shape {tuple(src.shape)} in the file but {tuple(dst.shape)} in the "
                    "model: this adapter was trained for another base model (or another r / dash_directions). Load it "
                    "into the base model it was trained on, or into a model without this adapter so that it is "
                    "injected from the stored config."
                )
        plan.append((name, layer, targets))

    # 3. copy in place (LoRA-Dash's A/B/U/V are views of one storage: never rebind them)
    with torch.no_grad():
        for name, layer, targets in plan:
            for suffix, dst in targets.items():
                dst.copy_(tensors[f"{name}.{suffix}"])
            if isinstance(layer, DashdiffLinear) and _kind(layer, adapter) == "dash":
                if f"{name}.dash_record.indices" in tensors:
                    layer.dash_record[adapter] = {
                        f: tensors[f"{name}.dash_record.{f}"].clone() for f in _RECORD_FIELDS
                    }
                else:
                    layer.dash_record.pop(adapter, None)
                layer._refresh_mirrors()
    return model_or_pipeline
