"""Export an adapter as a *plain* LoRA that stock diffusers / PEFT / A1111 / ComfyUI load with no
dashdiff installed, or as a base model with the update merged in.

Every layer is written as ``ΔW = B' A'`` at runtime scale 1 (``DashdiffLinear.plain_factors``):
LoRA-Dash as rank r+s (``A' = [A; V_sᵀ]``, ``B' = [scaling·B, U_s diag(δ)]``), AutoLoRA with α
folded into B and the pruned components dropped (α not renormalised), plain LoRA with its
``lora_alpha / r`` folded into B. Formats (see ``export_lora``):

- ``diffusers``: ``pytorch_lora_weights.safetensors``, keys ``<component>.<module>.lora_A.weight``
  (rank, in) / ``.lora_B.weight`` (out, rank), no alphas: stock loaders then use scale 1 and read
  each layer's rank from its ``lora_B`` shape.
- ``peft``: ``adapter_config.json`` (a plain ``LoraConfig``, ``lora_alpha = r`` and
  ``alpha_pattern == rank_pattern`` so every layer's scale is 1) + ``adapter_model.safetensors``
  with keys ``base_model.model.<module>.lora_A.weight``.
- ``kohya``: ``pytorch_lora_weights_kohya.safetensors``, ``lora_unet_<module_with_underscores>``
  ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``; one common alpha with ``r_i / alpha``
  folded into ``lora_up`` (diffusers 0.42.1 mis-scales per-layer alphas); sd-scripts' metadata
  (``kohya_metadata``: base-model version, architecture, network dim / alpha) and zero factors
  completing partly adapted text-encoder attention layers (``_a1111_zero_fill``).
- ``merged``: the base model(s) with ``W0 + ΔW``, saved like ``save_pretrained``; the user's
  model is not modified.

The weight files carry a ``dashdiff`` header key (JSON) with the method, the adapter's config
and per layer ``(r, s)`` (LoRA-Dash) or the kept AutoLoRA components. ``lora_adapter_metadata``
is never written: diffusers requires it to hold only valid ``LoraConfig`` fields.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from . import safeio
from .files import (
    DIFFUSERS_WEIGHT_NAME,
    HEADER_KEY,
    HEADER_VERSION,
    KOHYA_WEIGHT_NAME,
    MERGED_RECORD_NAME,
    PEFT_CONFIG_NAME,
    PEFT_WEIGHT_NAME,
    header_metadata,
)
from .layer import DashdiffLinear
from .registry import VARIANTS
from .walk import adapter_names, base_model, components, full_name, iter_lora_layers

FORMATS = ("diffusers", "peft", "kohya", "merged")

_CONFIG_CLASSES = {"LoraConfig": LoraConfig, **{v.config_class.__name__: v.config_class for v in VARIANTS.values()}}


# --------------------------------------------------------------------------- shared helpers


def find_config(comp: nn.Module, adapter: str):
    """The PEFT config of ``adapter`` on a component (PeftModel, diffusers or injected model), or None."""
    for holder in (comp, getattr(comp, "_orig_mod", comp), base_model(comp)):
        cfgs = getattr(holder, "peft_config", None)
        if isinstance(cfgs, dict) and adapter in cfgs:
            return cfgs[adapter]
    return None


def config_to_dict(cfg) -> dict[str, Any]:
    """``{"class": name, "fields": {...}}``, JSON-safe (sets become sorted lists)."""
    fields = cfg.to_dict()
    for key, value in list(fields.items()):
        if isinstance(value, set):
            fields[key] = sorted(value)
    fields = json.loads(json.dumps(fields, default=str))  # enums -> their string values
    return {"class": type(cfg).__name__, "fields": fields}


def config_from_dict(entry: dict[str, Any]):
    """Rebuild a config stored by ``config_to_dict``; unknown fields are ignored (other versions)."""
    cls = _CONFIG_CLASSES.get(entry.get("class"), LoraConfig)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{k: v for k, v in entry.get("fields", {}).items() if k in known})


def _base_name_or_path(root: nn.Module, cfg) -> Optional[str]:
    if cfg is not None and getattr(cfg, "base_model_name_or_path", None):
        return cfg.base_model_name_or_path
    mcfg = getattr(root, "config", None)
    for key in ("_name_or_path", "name_or_path"):
        value = mcfg.get(key) if isinstance(mcfg, dict) else getattr(mcfg, key, None)
        if value:
            return str(value)
    return None


# --------------------------------------------------------------------------- plain factors


@dataclass
class PlainFactor:
    """One layer of the export: ``ΔW = b @ a`` with a (rank, in), b (out, rank), scale folded in."""

    component: str  # "unet", "text_encoder", ... ("" for a lone model)
    module: str  # module name relative to the component's base model
    a: torch.Tensor
    b: torch.Tensor
    record: dict[str, Any] = field(default_factory=dict)  # this layer's entry in the header

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def name(self) -> str:
        return full_name(self.component, self.module)


def _peft_lora_factors(layer: LoraLinear, adapter: str, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    if layer.use_dora.get(adapter, False) or getattr(layer, "lora_bias", {}).get(adapter, False):
        raise NotImplementedError(f"dashdiff: {where}: DoRA / lora_bias adapters cannot be exported as a plain LoRA")
    if getattr(layer, "fan_in_fan_out", False):
        raise NotImplementedError(f"dashdiff: {where}: fan_in_fan_out (Conv1D) layers are not supported")
    r, alpha = layer.r[adapter], layer.lora_alpha[adapter]
    # The scale from the config, not layer.scaling (which set_scale / scale_layer change at runtime).
    scale = alpha / math.sqrt(r) if layer.use_rslora.get(adapter, False) else alpha / r
    a = layer.lora_A[adapter].weight.detach()
    dt = torch.float64 if a.dtype == torch.float64 else torch.float32
    b = layer.lora_B[adapter].weight.detach().to(dt) * scale
    return a.to(dt).contiguous(), b.contiguous()


def plain_lora_factors(obj, adapter_name: str = "default", threshold: Optional[float] = None) -> list[PlainFactor]:
    """Every layer of ``adapter_name`` as a plain LoRA (see module docstring). AutoLoRA layers keep
    the components ``ranks.keep_mask(layer, adapter, threshold)`` selects; a layer left with rank 0
    is omitted. Warns for LoRA-Dash layers not launched yet (exported as rank r, no dash term)."""
    out: list[PlainFactor] = []
    scaled: list[str] = []
    caveats: dict[type, list[str]] = {}  # variant -> layers it flagged
    for comp, _, name, layer in iter_lora_layers(obj, adapter_name):
        where = full_name(comp, name)
        if isinstance(layer, DashdiffLinear):
            variant = layer.method(adapter_name)
            if variant is None:  # a plain LoRA adapter on a dashdiff layer
                a, b = layer.plain_factors(adapter_name)
                record: dict[str, Any] = {"method": "lora", "r": layer.r[adapter_name]}
            else:
                a, b, record, caveat = variant.export(layer, adapter_name, threshold)
                if caveat:
                    caveats.setdefault(type(variant), []).append(where)
            if abs(layer.runtime_scale(adapter_name) - 1.0) > 1e-12:
                scaled.append(where)
        elif isinstance(layer, LoraLinear):
            a, b = _peft_lora_factors(layer, adapter_name, where)
            record = {"method": "lora", "r": layer.r[adapter_name]}
        else:
            raise NotImplementedError(
                f"dashdiff: {where} is a PEFT {type(layer).__name__}; only Linear LoRA layers can be exported"
            )
        if a.shape[0] == 0:  # every AutoLoRA component pruned: the layer is unchanged
            record["dropped"] = True
        out.append(PlainFactor(comp, name, a, b, record))
    if not out:
        raise ValueError(f"dashdiff: no layer holds an adapter named {adapter_name!r} (found: {adapter_names(obj) or 'none'})")
    for variant in VARIANTS.values():  # registry order: one warning per method
        if flagged := caveats.get(variant):
            warnings.warn(variant.caveat(adapter_name, len(flagged), flagged[0]), UserWarning, stacklevel=3)
    if scaled:
        warnings.warn(
            f"dashdiff: a runtime LoRA scale is set on {len(scaled)} layer(s) (e.g. {scaled[0]}); the export is at "
            "scale 1, as trained: set the scale again in the loader.",
            UserWarning,
            stacklevel=3,
        )
    return out


def _header(obj, fmt: str, adapter: str, factors: list[PlainFactor], threshold: Optional[float]) -> dict[str, Any]:
    configs = {}
    for comp_name, comp in components(obj):
        if any(f.component == comp_name for f in factors):
            cfg = find_config(comp, adapter)
            configs[comp_name] = config_to_dict(cfg) if cfg is not None else None
    methods = sorted({f.record["method"] for f in factors})
    from . import __version__

    return {
        "format_version": HEADER_VERSION,
        "dashdiff_version": __version__,
        "kind": "export",
        "export_format": fmt,
        "adapter_name": adapter,
        "method": methods[0] if len(methods) == 1 else "mixed",
        "threshold": threshold,
        "configs": configs,
        "layers": {f.name: f.record for f in factors},
    }


# --------------------------------------------------------------------------- key naming


def _is_pipeline(obj) -> bool:
    return not isinstance(obj, nn.Module)


def _lone_prefix(model: nn.Module, fmt: str) -> str:
    """The diffusers key prefix for a model passed on its own (not in a pipeline)."""
    try:
        from diffusers import ModelMixin
    except ImportError:  # pragma: no cover - diffusers is a dependency
        ModelMixin = ()
    root = base_model(model)
    if isinstance(root, ModelMixin):
        return "unet" if "UNet" in type(root).__name__ else "transformer"
    raise ValueError(
        f"dashdiff: format={fmt!r} is for diffusers pipelines and models (UNet / transformer); "
        f"{type(root).__name__} is not one: use format='peft' (or 'merged')."
    )


def _canonical_module(root: nn.Module, module: str) -> str:
    """Module name as published SD LoRA files spell it. transformers 5 flattened CLIP's text
    models (no ``text_model.`` level); older stacks, A1111 and ComfyUI expect ``text_model.`` and
    diffusers strips it again where the model has none, so write it."""
    if type(root).__name__.startswith("CLIPText") and not hasattr(root, "text_model") and not module.startswith("text_projection"):
        return "text_model." + module
    return module


def _diffusers_key(obj, roots: dict[str, nn.Module], f: PlainFactor) -> str:
    prefix = f.component or _lone_prefix(roots[""], "diffusers")
    return f"{prefix}.{_canonical_module(roots[f.component], f.module)}"


def _is_sdxl(obj) -> bool:
    """SDXL: a second text encoder, or a UNet with SDXL's text_time added conditioning (a
    training host may carry only the first text encoder)."""
    if not _is_pipeline(obj):
        return False
    if getattr(obj, "text_encoder_2", None) is not None:
        return True
    unet = getattr(obj, "unet", None)
    return unet is not None and getattr(base_model(unet).config, "addition_embed_type", None) == "text_time"


def _kohya_key(obj, roots: dict[str, nn.Module], f: PlainFactor) -> str:
    comp = f.component or _lone_prefix(roots[""], "kohya")
    if comp == "unet":
        head = "lora_unet_"
    elif comp == "text_encoder":
        head = "lora_te1_" if _is_sdxl(obj) else "lora_te_"
    elif comp == "text_encoder_2":
        head = "lora_te2_"
    else:
        raise ValueError(f"dashdiff: format='kohya' covers SD / SDXL UNets and text encoders, not {comp!r}")
    return head + _canonical_module(roots[f.component], f.module).replace(".", "_")


# --------------------------------------------------------------------------- kohya metadata

KOHYA_NETWORK_MODULE = "networks.lora"  # kohya sd-scripts' LoRA module: what A1111 / Forge show as the type
SDXL_BASE_MODEL_VERSION = "sdxl_base_v1-0"  # sd-scripts' MODEL_VERSION_SDXL_BASE_V1_0
_SAI_IMPLEMENTATION = {"sdxl": "https://github.com/Stability-AI/generative-models", "sd1": "diffusers", "sd2": "diffusers"}
# Text encoders that A1111 runs as open_clip (OpenCLIP ViT-bigG of SDXL, ViT-H of SD 2.x): their attention is one
# nn.MultiheadAttention, patched only when a LoRA holds q, k, v AND out_proj for that layer (else skipped silently).
_ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "out_proj")


def base_model_family(obj) -> str:
    """``"sdxl"``, ``"sd2"`` or ``"sd1"`` from the UNet's config: SDXL's ``text_time`` added
    conditioning (or a second text encoder), SD 2.x's 1024-wide cross-attention (OpenCLIP ViT-H);
    anything else is taken for SD 1.x (768-wide CLIP ViT-L, and the tiny test models)."""
    if _is_sdxl(obj):
        return "sdxl"
    unet = getattr(obj, "unet", None) if _is_pipeline(obj) else obj
    config = getattr(base_model(unet), "config", None) if isinstance(unet, nn.Module) else None
    if getattr(config, "addition_embed_type", None) == "text_time":  # a lone SDXL UNet
        return "sdxl"
    return "sd2" if getattr(config, "cross_attention_dim", None) == 1024 else "sd1"


def _prediction_type(obj, prediction_type: Optional[str]) -> str:
    if prediction_type is None:
        sched = getattr(obj, "scheduler", None) if _is_pipeline(obj) else None
        prediction_type = getattr(getattr(sched, "config", None), "prediction_type", None) or "epsilon"
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"dashdiff: prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    return prediction_type


def kohya_metadata(family: str, v_prediction: bool, ranks: list[int], alpha: float, title: str) -> dict[str, str]:
    """The safetensors metadata kohya sd-scripts writes and A1111 / Forge read, as strings.

    A1111's ``detect_version`` labels a LoRA SDXL when ``ss_base_model_version`` starts with
    ``sdxl_``, SD2 when ``ss_v2 == "True"``, else SD1, and its Lora tab hides files of another
    version than the loaded checkpoint. ``ss_network_dim`` / ``ss_network_alpha`` are the rank and
    alpha when every layer has the same rank; with per-layer ranks (AutoLoRA, or LoRA-Dash layers
    not launched) they are ``"Dynamic"``, as sd-scripts' ``resize_lora.py`` writes for such files
    (loaders read each layer's rank from its tensors)."""
    v2 = family == "sd2"
    if family == "sdxl":
        version, arch, resolution = SDXL_BASE_MODEL_VERSION, "stable-diffusion-xl-v1-base", "1024x1024"
    else:
        # sd-scripts' get_model_version_str_for_sd1_sd2 and sai_model_spec.determine_architecture
        version = ("sd_v2" if v2 else "sd_v1") + ("_v" if v_prediction else "")
        if v2:
            arch = "stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512"
        else:
            arch = "stable-diffusion-v1"
        resolution = "768x768" if v2 and v_prediction else "512x512"
    uniform = len(set(ranks)) == 1
    meta = {
        "ss_network_module": KOHYA_NETWORK_MODULE,
        "ss_network_dim": str(ranks[0]) if uniform else "Dynamic",
        "ss_network_alpha": str(float(alpha)) if uniform else "Dynamic",
        "ss_base_model_version": version,
        "ss_v2": str(v2),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": _SAI_IMPLEMENTATION[family],
        "modelspec.title": title,
        "modelspec.resolution": resolution,
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
    }
    if not uniform:
        meta["ss_training_comment"] = (
            f"dashdiff export with per-layer ranks {min(ranks)}..{max(ranks)}; each layer's lora_up carries "
            f"r_i / alpha (alpha {float(alpha):g}), so every layer loads at scale 1")
    return meta


def _a1111_zero_fill(roots: dict[str, nn.Module], active: list[PlainFactor]) -> list[PlainFactor]:
    """Rank-1 zero factors for the attention projections a text-encoder layer lacks among q, k, v,
    out_proj when it has any of them. A1111 applies an open_clip attention (SDXL's second encoder,
    SD 2.x's encoder) only with all four, and diffusers (0.42.1) recognises kohya text-encoder keys
    by an out_proj entry; a zero ΔW changes nothing in any loader."""
    have = {(f.component, f.module) for f in active}
    fills = []
    for comp in ("text_encoder", "text_encoder_2"):
        layers = {f.module.rsplit(".", 1)[0] for f in active
                  if f.component == comp and f.module.rsplit(".", 1)[-1] in _ATTN_PROJ}
        for layer in sorted(layers):
            for proj in _ATTN_PROJ:
                name = f"{layer}.{proj}"
                if (comp, name) in have:
                    continue
                try:
                    mod = roots[comp].get_submodule(name)
                except AttributeError:
                    continue  # an attention without this projection: nothing any loader could patch
                if not isinstance(mod, nn.Linear):
                    continue
                like = active[0].a  # the file's dtype and device
                fills.append(PlainFactor(comp, name, like.new_zeros(1, mod.in_features),
                                         like.new_zeros(mod.out_features, 1), {"zero_fill": True}))
    return fills


# --------------------------------------------------------------------------- writers


def _active(factors: list[PlainFactor]) -> list[PlainFactor]:
    return [f for f in factors if f.rank > 0]


def _write_diffusers(obj, folder: Path, factors, header) -> Path:
    roots = {c: base_model(m) for c, m in components(obj)}
    tensors = {}
    for f in _active(factors):
        key = _diffusers_key(obj, roots, f)
        tensors[f"{key}.lora_A.weight"] = f.a
        tensors[f"{key}.lora_B.weight"] = f.b
    path = folder / DIFFUSERS_WEIGHT_NAME
    safeio.save_safetensors(tensors, path, {"format": "pt", **header_metadata(header)})
    return path


def _write_kohya(obj, folder: Path, factors, header, prediction_type: Optional[str] = None) -> Path:
    roots = {c: base_model(m) for c, m in components(obj)}
    active = _active(factors)
    family = base_model_family(obj)
    v_pred = _prediction_type(obj, prediction_type) == "v_prediction"
    fills = _a1111_zero_fill(roots, active)
    # One alpha for the whole file (the most common rank, so most lora_up need no rescale); each
    # layer's loader scale alpha / r_i is undone by folding r_i / alpha into lora_up.
    alpha = float(Counter(f.rank for f in active).most_common(1)[0][0]) if active else 1.0
    header = dict(header, kohya_alpha=alpha, kohya_zero_filled=[f.name for f in fills])
    tensors = {}
    for f in active + fills:
        key = _kohya_key(obj, roots, f)
        tensors[f"{key}.lora_down.weight"] = f.a
        tensors[f"{key}.lora_up.weight"] = f.b * (f.rank / alpha)
        tensors[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    title = f"dashdiff {header.get('method', 'lora')} ({header.get('adapter_name', 'default')})"
    meta = kohya_metadata(family, v_pred, [f.rank for f in active] or [1], alpha, title)
    path = folder / KOHYA_WEIGHT_NAME
    safeio.save_safetensors(tensors, path, {"format": "pt", **meta, **header_metadata(header)})
    return path


def _write_peft(obj, folder: Path, factors, header, adapter: str) -> Path:
    pipeline = _is_pipeline(obj)
    for comp_name, comp in components(obj):
        mine = [f for f in _active(factors) if f.component == comp_name]
        if not mine:
            continue
        root = base_model(comp)
        src = find_config(comp, adapter)
        if src is not None and getattr(src, "modules_to_save", None):
            warnings.warn(f"dashdiff: modules_to_save {src.modules_to_save} are not part of the LoRA export", UserWarning)
        ranks = {f.module: f.rank for f in mine}
        r0 = Counter(ranks.values()).most_common(1)[0][0]
        # PEFT's scale is alpha_pattern.get(k, lora_alpha) / rank_pattern.get(k, r): equal patterns
        # and lora_alpha = r make it 1 everywhere, as the folded factors need.
        pattern = {m: r for m, r in ranks.items() if r != r0}
        cfg = LoraConfig(
            r=r0,
            lora_alpha=r0,
            target_modules=sorted(ranks),  # exact names: pruned / untouched layers stay out
            rank_pattern=dict(pattern),
            alpha_pattern=dict(pattern),
            lora_dropout=float(getattr(src, "lora_dropout", 0.0) or 0.0),
            bias="none",
            base_model_name_or_path=_base_name_or_path(root, src),
            task_type=getattr(src, "task_type", None),
            inference_mode=True,
        )
        cfg_dict = config_to_dict(cfg)["fields"]
        out = folder / comp_name if pipeline else folder
        tensors = {}
        for f in mine:
            tensors[f"base_model.model.{f.module}.lora_A.weight"] = f.a
            tensors[f"base_model.model.{f.module}.lora_B.weight"] = f.b
        safeio.save_safetensors(tensors, out / PEFT_WEIGHT_NAME, {"format": "pt", **header_metadata(header)})
        safeio.write_json(cfg_dict, out / PEFT_CONFIG_NAME)
    return folder


def merged_state_dict(root: nn.Module, factors: list[PlainFactor]) -> dict[str, torch.Tensor]:
    """``root``'s state dict as the plain base model: tuner layers' ``base_layer.`` keys renamed,
    adapter tensors dropped, ``W0 + B'A'`` for the exported layers. New tensors; ``root`` untouched."""
    by_module = {f.module: f for f in factors}
    tuners = {name for name, mod in root.named_modules() if isinstance(mod, BaseTunerLayer)}
    out: dict[str, torch.Tensor] = {}
    for key, value in root.state_dict(keep_vars=False).items():
        parts = key.split(".")
        owner = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in tuners), None)
        if owner is None:
            out[key] = value
            continue
        rest = key[len(owner) + 1:]
        if not rest.startswith("base_layer."):
            continue  # adapter tensors (lora_*, dash buffers)
        rest = rest.replace("base_layer.", "")
        f = by_module.get(owner)
        if rest == "weight" and f is not None and f.rank > 0:
            dt = torch.float64 if value.dtype == torch.float64 else torch.float32
            delta = f.b.to(value.device, dt) @ f.a.to(value.device, dt)
            value = (value.to(dt) + delta).to(value.dtype)
        out[f"{owner}.{rest}"] = value
    return out


def _save_merged_model(comp: nn.Module, folder: Path, factors: list[PlainFactor]) -> None:
    """Save one model with the update merged, the way its own ``save_pretrained`` would."""
    root = base_model(comp)
    sd = merged_state_dict(root, factors)
    try:
        from diffusers import ModelMixin
    except ImportError:  # pragma: no cover
        ModelMixin = ()
    from transformers import PreTrainedModel

    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(root, PreTrainedModel):
        cfg = root.config
        peft_flag = getattr(root, "_hf_peft_config_loaded", False)
        try:
            # save_pretrained writes dtype / architectures into the config it saves: give it a copy.
            root.config = copy.deepcopy(cfg)
            # With transformers' own PEFT integration it would save the adapter only.
            if peft_flag:
                root._hf_peft_config_loaded = False
            root.save_pretrained(folder, state_dict=sd)
        finally:
            root.config = cfg
            if peft_flag:
                root._hf_peft_config_loaded = True
    elif isinstance(root, ModelMixin):
        root.save_config(folder)
        safeio.save_safetensors(sd, folder / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    else:
        safeio.save_safetensors(sd, folder / "model.safetensors", {"format": "pt"})


def _write_merged(obj, folder: Path, factors, header) -> Path:
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Written to a sibling temp folder, then moved file by file (os.replace each): an interrupted
    # export leaves the previous files whole.
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        if _is_pipeline(obj) and hasattr(obj, "save_config"):
            obj.save_config(tmp)  # model_index.json
            for name, value in dict(obj.config).items():
                comp = getattr(obj, name, None)
                if name.startswith("_") or comp is None or not isinstance(value, (list, tuple)) or value[0] is None:
                    continue
                if isinstance(comp, nn.Module):
                    _save_merged_model(comp, tmp / name, [f for f in factors if f.component == name])
                elif hasattr(comp, "save_pretrained"):  # tokenizers, schedulers, feature extractors
                    comp.save_pretrained(tmp / name)
        elif _is_pipeline(obj):  # an object holding components (a training script's host): one folder each
            for name, comp in components(obj):
                _save_merged_model(comp, tmp / name, [f for f in factors if f.component == name])
        else:
            _save_merged_model(obj, tmp, factors)
        safeio.write_json(header, tmp / MERGED_RECORD_NAME)
        folder.mkdir(parents=True, exist_ok=True)
        safeio.move_tree(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# --------------------------------------------------------------------------- API


def export_lora(
    model_or_pipeline,
    folder: Union[str, "Path"],
    format: str = "diffusers",
    adapter_name: str = "default",
    threshold: Optional[float] = None,
    prediction_type: Optional[str] = None,
) -> str:
    """Write ``adapter_name`` of a model, ``PeftModel`` or diffusers pipeline as a plain LoRA.

    ``format``: ``"diffusers"`` (``pipe.load_lora_weights(folder)``), ``"peft"``
    (``PeftModel.from_pretrained(base, folder)``; a pipeline gets one sub-folder per component),
    ``"kohya"`` (A1111 / ComfyUI; ``load_lora_weights(folder, weight_name=KOHYA_WEIGHT_NAME)``) or
    ``"merged"`` (the base model(s) with ΔW merged, for ``from_pretrained``). ``threshold``: the
    AutoLoRA λ (default: the config's, else 1/k). ``prediction_type`` (kohya only): the base model's
    ``"epsilon"`` / ``"v_prediction"`` for the metadata that tells A1111 what the file is for
    (default: the pipeline scheduler's, else epsilon; see ``kohya_metadata``). LoRA-Dash before
    launch exports as rank r with a warning. Returns the path written (the weight file, or the
    folder for peft / merged).
    """
    if format not in FORMATS:
        raise ValueError(f"dashdiff: unknown export format {format!r}; use one of {FORMATS}")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"dashdiff: {folder} is a file; export_lora writes into a folder")
    factors = plain_lora_factors(model_or_pipeline, adapter_name, threshold)
    header = _header(model_or_pipeline, format, adapter_name, factors, threshold)
    if format == "diffusers":
        return str(_write_diffusers(model_or_pipeline, folder, factors, header))
    if format == "kohya":
        return str(_write_kohya(model_or_pipeline, folder, factors, header, prediction_type))
    if format == "peft":
        return str(_write_peft(model_or_pipeline, folder, factors, header, adapter_name))
    return str(_write_merged(model_or_pipeline, folder, factors, header))
