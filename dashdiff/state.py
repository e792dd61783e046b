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
from .export import config_from_dict, config_to_dict, find_config
from .files import HEADER_KEY, HEADER_VERSION, STATE_FILE_NAME, header_metadata
from .layer import DashdiffLinear
from .registry import METHODS, VARIANTS
from .variant import MethodVariant
from .walk import base_model, components, full_name, iter_lora_layers, resolve_adapter


def _file_path(path: Union[str, os.PathLike]) -> Path:
    path = Path(path)
    return path / STATE_FILE_NAME if path.is_dir() else path


def _layer_tensors(layer: LoraLayer, adapter: str) -> dict[str, torch.Tensor]:
    """Suffix -> tensor for one layer's adapter (the model's own tensors, not copies)."""
    out = {"lora_A.weight": layer.lora_A[adapter].weight, "lora_B.weight": layer.lora_B[adapter].weight}
    variant = _variant(layer, adapter)
    if variant is not None:
        out.update(variant.state_tensors(layer, adapter))
    return out


def _variant(layer: LoraLayer, adapter: str) -> Optional[MethodVariant]:
    """The dashdiff method of ``adapter`` on ``layer``; None for plain LoRA (and PEFT's own layers)."""
    return layer.method(adapter) if isinstance(layer, DashdiffLinear) else None


def _kind(layer: LoraLayer, adapter: str) -> str:
    variant = _variant(layer, adapter)
    return "lora" if variant is None else variant.kind


def _layers_config(layers: list[tuple[str, LoraLayer]], adapter: str):
    """A config rebuilt from the layers, for models whose PEFT config was not kept."""
    name0, layer = layers[0]
    variant = _variant(layer, adapter)
    common = dict(
        r=layer.r[adapter],
        lora_alpha=layer.lora_alpha[adapter],
        target_modules=sorted(n for n, _ in layers),
        use_rslora=bool(layer.use_rslora.get(adapter, False)),
    )
    if variant is not None:
        return variant.layer_config(layer, adapter, common)
    from peft import LoraConfig

    ranks = {n: l.r[adapter] for n, l in layers}
    alphas = {n: l.lora_alpha[adapter] for n, l in layers}
    return LoraConfig(**common, rank_pattern=ranks, alpha_pattern=alphas)


def save_adapter(model_or_pipeline, path: Union[str, os.PathLike], adapter_name: Optional[str] = None) -> str:
    """Save the full training state of one adapter (the only one if ``adapter_name`` is None) to
    one safetensors file (``path``, or ``path/dashdiff_adapter.safetensors`` for a folder).
    Written to a temporary name and renamed: an interrupted save leaves an old file intact.
    Returns the file path."""
    adapter = resolve_adapter(model_or_pipeline, None, adapter_name)
    tensors: dict[str, torch.Tensor] = {}
    layers_meta: dict[str, dict[str, Any]] = {}
    by_comp: dict[str, list[tuple[str, LoraLayer]]] = {}
    for comp, _, name, layer in iter_lora_layers(model_or_pipeline, adapter):
        key = full_name(comp, name)
        by_comp.setdefault(comp, []).append((name, layer))
        for suffix, t in _layer_tensors(layer, adapter).items():
            tensors[f"{key}.{suffix}"] = t
        variant = _variant(layer, adapter)
        meta: dict[str, Any] = {"method": _kind(layer, adapter), "r": layer.r[adapter]}
        if variant is not None:
            meta.update(variant.header(layer, adapter))
            for suffix, t in variant.record_tensors(layer, adapter).items():
                tensors[f"{key}.{suffix}"] = t
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
    safeio.save_safetensors(tensors, file, {"format": "pt", **header_metadata(header)})
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


def _fit_message(file: Path, adapter: str, missing: list[str], extra: list[str]) -> str:
    msg = [f"dashdiff: {file} does not fit this model's adapter {adapter!r}."]
    if missing:
        msg.append(f"Modules in the file but not adapted in the model ({len(missing)}): {', '.join(missing[:10])}"
                   + (" ..." if len(missing) > 10 else "") + ".")
    if extra:
        msg.append(f"Modules adapted in the model but not in the file ({len(extra)}): {', '.join(extra[:10])}"
                   + (" ..." if len(extra) > 10 else "") + ".")
    msg.append("Was it trained on another base model or with other target_modules?")
    return " ".join(msg)


def _whole(value: Any, lo: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= lo


# Bounds on what a file may ask for, checked before anything is allocated: a header claiming a huge
# rank (r = 2,000,000 in a 260 KB file) must be refused from the numbers, not by running out of memory.
def _parse_header(file: Path, header: dict) -> tuple[dict[str, Any], dict[str, dict]]:
    """(configs per component, layers) from a state header, every field type-checked."""
    configs, layers = header.get("configs"), header.get("layers")
    if not isinstance(header.get("adapter_name"), str) or not isinstance(configs, dict) or not configs \
            or not isinstance(layers, dict) or not layers:
        raise ValueError(f"dashdiff: {file}: the '{HEADER_KEY}' header lacks adapter_name, configs or layers (a "
                         "damaged or hand-edited file)")
    parsed = {}
    for comp_name, entry in configs.items():
        try:
            parsed[comp_name] = config_from_dict(entry)
        except Exception as err:  # noqa: BLE001 - any failure of the config's own checks
            raise ValueError(f"dashdiff: {file}: the stored config of {comp_name or 'the model'!r} is invalid "
                             f"({type(err).__name__}: {err})") from None
    for name, meta in layers.items():
        if not isinstance(meta, dict) or meta.get("method") not in METHODS or not _whole(meta.get("r"), 1) \
                or (meta["method"] in VARIANTS and not VARIANTS[meta["method"]].check_header(meta)):
            raise ValueError(f"dashdiff: {file}: layer {name!r} in the header has no valid method / r / s ({meta!r})")
    return parsed, layers


def _split_name(name: str, comps: dict) -> tuple[Optional[str], str]:
    """(component, module name relative to it) of a file's layer name; component None if unknown."""
    if "" in comps:
        return "", name
    comp, _, rel = name.partition(".")
    return (comp, rel) if comp in comps else (None, name)


def _features(module: nn.Module) -> Optional[tuple[int, int]]:
    """(in, out) of a Linear or of a LoRA layer's base Linear; None for anything else."""
    if isinstance(module, LoraLayer) and isinstance(getattr(module, "in_features", None), int):
        return module.in_features, module.out_features
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return None


def _expected(meta: dict, n_in: int, n_out: int) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Suffix -> (shape, is floating point) of one layer's tensors, from its header entry."""
    r = meta["r"]
    out = {"lora_A.weight": ((r, n_in), True), "lora_B.weight": ((n_out, r), True)}
    if meta["method"] in VARIANTS:
        out.update(VARIANTS[meta["method"]].expected_tensors(meta, n_in, n_out))
    return out


def _check_tensor(file: Path, key: str, t: torch.Tensor, shape: tuple[int, ...], floating: bool,
                  model_shape: Optional[tuple[int, ...]] = None) -> None:
    if tuple(t.shape) != shape:
        where = model_shape if model_shape is not None else shape
        raise ValueError(
            f"dashdiff: {file}: {key} has shape {tuple(t.shape)} in the file but {tuple(where)} in the "
            "model: this adapter was trained for another base model (or another r / dash_directions). Load it "
            "into the base model it was trained on, or into a model without this adapter so that it is "
            "injected from the stored config."
        )
    if floating != t.is_floating_point():
        raise ValueError(f"dashdiff: {file}: {key} is {t.dtype}, expected a "
                         f"{'floating-point' if floating else 'integer'} tensor (a damaged or hand-edited file)")
    if floating and not bool(torch.isfinite(t).all()):
        raise ValueError(f"dashdiff: {file}: {key} holds NaN or infinite values: the run that wrote it had "
                         "diverged; load an earlier checkpoint")


def _validate(obj, file: Path, tensors: dict[str, torch.Tensor], header: dict, adapter: str) -> tuple[dict, dict]:
    """Check the whole file against itself and the model before anything is changed; returns
    (configs of the components that need the adapter injected, the model's existing layers)."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    configs, wanted = _parse_header(file, header)
    comps = {name: _component(obj, name, file) for name in configs}
    to_inject = {name: cfg for name, cfg in configs.items()
                 if not any(True for _ in iter_lora_layers(comps[name], adapter))}
    present = {full_name(c, n): layer for c, _, n, layer in iter_lora_layers(obj, adapter) if c in configs}

    # which modules the adapter covers once injected: the existing layers, plus what each stored
    # config's target_modules would adapt (PEFT's own matching)
    covered: dict[str, tuple[nn.Module, Optional[Any]]] = {k: (v, None) for k, v in present.items()}
    for comp_name, cfg in to_inject.items():
        root = base_model(comps[comp_name])
        if isinstance(cfg.target_modules, str) and cfg.target_modules == "all-linear":
            raise ValueError(f"dashdiff: {file}: target_modules 'all-linear' cannot be checked before injection; "
                             "save the adapter with an explicit list")
        for name, module in root.named_modules():
            if _features(module) is not None and check_target_module_exists(cfg, name):
                covered[full_name(comp_name, name)] = (module, cfg)
    missing = sorted(set(wanted) - set(covered))
    extra = sorted(set(covered) - set(wanted))
    if missing or extra:
        raise ValueError(_fit_message(file, adapter, missing, extra))

    known: set[str] = set()
    for name, meta in wanted.items():
        module, cfg = covered[name]
        n_in, n_out = _features(module)
        k = min(n_in, n_out)
        if meta["r"] > k or meta.get("s", 0) > k:
            raise ValueError(f"dashdiff: {file}: {name} claims rank r={meta['r']}"
                             + (f", s={meta['s']}" if "s" in meta else "")
                             + f" but the layer is {n_out}x{n_in} (at most {k}): a damaged or hand-edited file")
        if cfg is not None:  # to be injected: the config must give this layer the file's rank
            comp_name, rel = _split_name(name, configs)
            r_cfg = cfg.rank_pattern.get(get_pattern_key(cfg.rank_pattern.keys(), rel), cfg.r)
            if r_cfg != meta["r"]:
                raise ValueError(f"dashdiff: {file}: the stored config gives {name} rank {r_cfg}, the layer list "
                                 f"says {meta['r']} (a damaged or hand-edited file)")
        else:
            kind = _kind(module, adapter)
            if kind != meta["method"]:
                raise ValueError(
                    f"dashdiff: {file}: {name} holds a {meta['method']!r} adapter in the file but a {kind!r} adapter "
                    f"named {adapter!r} in the model; delete the model's adapter first or load under another "
                    "adapter_name")
        model_tensors = _layer_tensors(module, adapter) if cfg is None else {}
        for suffix, (shape, floating) in _expected(meta, n_in, n_out).items():
            key = f"{name}.{suffix}"
            if key not in tensors:
                raise ValueError(f"dashdiff: {file} lacks tensor {key} (a damaged or hand-edited file)")
            dst = model_tensors.get(suffix)
            _check_tensor(file, key, tensors[key], tuple(dst.shape) if dst is not None else shape, floating,
                          tuple(dst.shape) if dst is not None else None)
            known.add(key)
        if meta["method"] in VARIANTS:
            known |= VARIANTS[meta["method"]].check_record(file, name, meta, tensors, k, _check_tensor)
    stray = sorted(set(tensors) - known)
    if stray:
        raise ValueError(f"dashdiff: {file} holds {len(stray)} tensor(s) that belong to no layer of its header "
                         f"(e.g. {stray[0]}): a damaged or hand-edited file")
    return {n: (comps[n], cfg) for n, cfg in to_inject.items()}, present


_ABSENT = object()


class _Undo:
    """Enough of a model's state to put it back exactly if injection fails half-way: every module's
    children, parameters and buffers, the LoRA layers' per-adapter dicts, the ParameterDicts' key
    lists and the PEFT configs."""

    def __init__(self, comps: list[nn.Module]) -> None:
        self.saved, self.configs = [], []
        own = ("_modules", "_parameters", "_buffers")
        for comp in comps:
            for module in comp.modules():
                # a ParameterDict (a dashdiff layer's δ / β / counters) lists its keys in its own `_keys`
                # dict besides `_parameters`: left holding a new adapter's key, it breaks every later
                # iteration of the dict, a second load of the same file included
                extra = {k: dict(v) for k, v in vars(module).items()
                         if isinstance(module, (LoraLayer, nn.ParameterDict)) and isinstance(v, dict)
                         and k not in own}
                self.saved.append((module, dict(module._modules), dict(module._parameters), dict(module._buffers),
                                   extra))
            # attributes injection may add or fill: PEFT's config dict, diffusers' "loaded" flag
            for holder in {id(h): h for h in (comp, base_model(comp))}.values():
                for attr in ("peft_config", "_hf_peft_config_loaded"):
                    value = vars(holder).get(attr, _ABSENT)
                    self.configs.append((holder, attr, dict(value) if isinstance(value, dict) else value, value))

    def restore(self) -> None:
        for module, children, params, buffers, extra in self.saved:
            module._modules.clear(); module._modules.update(children)  # noqa: E702
            module._parameters.clear(); module._parameters.update(params)  # noqa: E702
            module._buffers.clear(); module._buffers.update(buffers)  # noqa: E702
            for k, v in extra.items():
                getattr(module, k).clear()
                getattr(module, k).update(v)
        for holder, attr, copy, value in self.configs:
            if value is _ABSENT:
                vars(holder).pop(attr, None)
            elif isinstance(value, dict):
                value.clear()
                value.update(copy)
                vars(holder)[attr] = value
            else:
                vars(holder)[attr] = value


def load_adapter(model_or_pipeline, path: Union[str, os.PathLike], adapter_name: Optional[str] = None):
    """Load a file written by ``save_adapter`` into a model, ``PeftModel`` or pipeline, in place.

    The whole file is checked first, against itself and the model: the stored configs, every
    layer's module (it exists and is a Linear the config targets), each rank against the layer's
    size, every tensor's shape, dtype and finiteness, no stray tensors. Only then are components
    that lack the adapter injected from the stored config and every tensor copied; each LoRA-Dash
    layer's launch record and step counters are restored, so outputs are identical and training
    continues (launched layers stay launched). On any refusal the model is left exactly as it was.
    ``adapter_name`` renames the adapter (default: the stored name). Returns ``model_or_pipeline``.
    """
    file = _file_path(path)
    tensors, header = _read_state(file)
    adapter = adapter_name or header.get("adapter_name")
    injections, _ = _validate(model_or_pipeline, file, tensors, header, adapter)
    wanted = header["layers"]

    undo = _Undo([comp for comp, _ in injections.values()])
    try:
        # 1. inject where needed (the file fits: checked above)
        for comp, cfg in injections.values():
            _inject(comp, cfg, adapter)
        present = {full_name(c, n): layer for c, _, n, layer in iter_lora_layers(model_or_pipeline, adapter)
                   if c in header["configs"]}
        plan: list[tuple[str, LoraLayer, dict[str, torch.Tensor]]] = []
        for name in wanted:
            layer = present[name]
            targets = _layer_tensors(layer, adapter)
            for suffix, dst in targets.items():  # cannot fail after _validate; kept as a guard
                if tensors[f"{name}.{suffix}"].shape != dst.shape:
                    raise ValueError(f"dashdiff: {file}: {name}.{suffix} does not fit the injected layer")
            plan.append((name, layer, targets))
    except BaseException:
        undo.restore()
        raise

    # 2. copy in place (LoRA-Dash's A/B/U/V are views of one storage: never rebind them)
    with torch.no_grad():
        for name, layer, targets in plan:
            for suffix, dst in targets.items():
                dst.copy_(tensors[f"{name}.{suffix}"])
            variant = _variant(layer, adapter)
            if variant is not None:
                variant.load_record(layer, adapter, name, tensors)
    return model_or_pipeline
