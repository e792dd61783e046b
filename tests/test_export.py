"""export.py in process: each layer's factors, the key names, the files' tensors, headers and metadata, the
PEFT config, merged weights and the refusals, on small models built in each test (seconds in all).

References are computed independently of export.py: ΔW from each layer's own parameters with its
``lora_alpha / r`` (or ``/ √r``) written in the test (``export_refs.ref_deltas``), key names written out by
hand from diffusers' (``<component>.<module path>.lora_A.weight``), PEFT's (``base_model.model.<module
path>``) and kohya sd-scripts' (``lora_unet_`` / ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` + the path with
underscores) conventions, files read back with ``safetensors.torch.load_file``. Whether the stock loaders
load the files is test_export_stock_load.py's (a one-minute subprocess fixture, kept out of the mutation
run so that export.py's mutants run against this file in seconds each).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model, inject_adapter_in_model
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

# The model classes the tests build, imported here rather than where they are used: importing them is most of
# a test's cost (seconds, on first use in a process), and mutmut's fork server pre-imports this module's
# imports once, so that each mutant's process starts with them loaded (see pyproject.toml [tool.mutmut]).
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
from diffusers.configuration_utils import FrozenDict  # noqa: F401
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,  # noqa: F401
                          LlamaForCausalLM)

import dashdiff
from dashdiff import export as E
from dashdiff import safeio
from dashdiff.files import DIFFUSERS_WEIGHT_NAME
from dashdiff.testing import tiny_llama, tiny_sd_pipeline

from export_refs import assert_layer_close, header, make_realistic, ref_deltas  # noqa: E402

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


# --------------------------------------------------------------------------- small models, built in milliseconds


def _clip(with_projection: bool = False, seed: int = 0):
    """A one-layer CLIP text encoder (hidden 16). transformers 5's CLIPTextModel has no ``text_model``
    level (its modules are ``encoder.layers.0...``); CLIPTextModelWithProjection keeps it."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, projection_dim=16, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval()


def _unet(kind: str = "sd", seed: int = 0):
    """A one-attention-block UNet: SD 1.x (cross-attention 32), SD 2.x (1024) or SDXL (text_time)."""
    from diffusers import UNet2DConditionModel

    extra = {"sd": dict(cross_attention_dim=32), "sd2": dict(cross_attention_dim=1024),
             "sdxl": dict(cross_attention_dim=32, addition_embed_type="text_time", addition_time_embed_dim=8,
                          projection_class_embeddings_input_dim=6 * 8 + 16)}[kind]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                    block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4,
                                    norm_num_groups=4, **extra)


# The UNet's attention layers (written out from diffusers' UNet2DConditionModel layout for the blocks above).
UNET_ATTN = [f"{block}.transformer_blocks.0.{attn}" for block in (
    "down_blocks.1.attentions.0", "up_blocks.0.attentions.0", "up_blocks.0.attentions.1", "mid_block.attentions.0")
    for attn in ("attn1", "attn2")]


def _llama(seed: int = 0):
    return tiny_llama(seed)


class Mlp(nn.Module):
    """Not a diffusers or transformers model: what format='peft' / 'merged' take on their own."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.q_proj = nn.Linear(12, 10, dtype=dtype)
            self.v_proj = nn.Linear(10, 8, dtype=dtype)
            self.norm = nn.LayerNorm(8, dtype=dtype)

    def forward(self, x):
        return self.norm(self.v_proj(self.q_proj(x)))


def _randomize(obj, adapter: str = "default", seed: int = 3) -> None:
    """Non-zero B on every layer (and β for AutoLoRA), without launching LoRA-Dash (make_realistic launches)."""
    g = torch.Generator().manual_seed(seed)
    for _, _, _, layer in E.iter_lora_layers(obj, adapter):
        with torch.no_grad():
            b = layer.lora_B[adapter].weight
            b.copy_(torch.randn(b.shape, generator=g, dtype=torch.float64).to(b.dtype))
            beta = getattr(layer, "lora_autolora_beta", {})
            if adapter in beta:
                beta[adapter].copy_(torch.randn(beta[adapter].shape, generator=g))


def _product(tensors: dict, key_a: str, key_b: str) -> torch.Tensor:
    return tensors[key_b].double() @ tensors[key_a].double()


def _from_caller(w) -> bool:
    """The warning points at the caller of export_lora (its ``stacklevel``). Under mutmut every mutated function
    is entered through mutmut's trampoline, one frame deeper, so there it points into the trampoline: the check
    is exact in the normal suite only (the stacklevel mutants are counted in BENCHMARKS.md accordingly)."""
    return w.filename == __file__ or "mutmut" in w.filename


def _meta(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as fh:
        return fh.metadata()


# --------------------------------------------------------------------------- per-layer factors


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_lora_layers_fold_their_config_scale(rslora):
    """Ordinary PEFT LoRA layers: B' A' = (α/r)·B A, or (α/√r)·B A with rsLoRA, whatever runtime scale is set."""
    model = get_peft_model(Mlp(), LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj"], use_rslora=rslora))
    _randomize(model)
    for _, _, _, layer in E.iter_lora_layers(model):
        layer.set_scale("default", 0.25)  # a runtime scale: not part of the export
    factors = {f.module: f for f in E.plain_lora_factors(model)}
    assert list(factors) == ["q_proj", "v_proj"]
    scale = 6 / math.sqrt(4) if rslora else 6 / 4
    for name, f in factors.items():
        layer = model.base_model.model.get_submodule(name)
        a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        assert f.a.dtype == f.b.dtype == torch.float32 and f.a.is_contiguous() and f.b.is_contiguous()
        assert f.rank == 4 and f.name == name and f.component == ""
        assert_layer_close((f.b.double() @ f.a.double()).float(), (scale * b @ a).float(), name)
        torch.testing.assert_close(f.a.double(), a, rtol=0, atol=0)  # the scale goes into B
        assert f.record == {"method": "lora", "r": 4}


def test_peft_lora_factors_keep_float64_and_raise_half_precision_to_float32():
    for dtype, want in ((torch.float64, torch.float64), (torch.bfloat16, torch.float32), (torch.float16, torch.float32)):
        model = get_peft_model(Mlp(dtype), LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
        model.to(dtype)
        _randomize(model)
        (f,) = E.plain_lora_factors(model)
        layer = model.base_model.model.q_proj
        assert f.a.dtype == f.b.dtype == want, dtype
        torch.testing.assert_close(f.b.double() @ f.a.double(),
                                   layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double(),
                                   rtol=1e-12, atol=0)


def test_lora_dash_and_autolora_factors_equal_their_delta_from_raw_tensors():
    lm = get_peft_model(_llama(), dashdiff.LoraDashConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          dash_directions=2))
    make_realistic(lm)
    got = {f.name: f for f in E.plain_lora_factors(lm)}
    want = ref_deltas(lm)
    assert sorted(got) == sorted(want) and len(want) == 4
    for name, f in got.items():
        assert f.rank == 4 + 2 and f.record == {"method": "dash", "r": 4, "s": 2, "launched": True}
        assert_layer_close(f.b @ f.a, want[name], name)

    la = get_peft_model(_llama(), dashdiff.AutoLoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "v_proj"]))
    make_realistic(la)
    want = ref_deltas(la)
    for f in E.plain_lora_factors(la):
        assert f.record["method"] == "autolora" and f.rank == f.record["rank"] == len(f.record["kept"])
        assert_layer_close(f.b @ f.a, want[f.name], f.name)


def test_a_plain_adapter_on_dashdiff_layers_and_a_runtime_scale_warning(tmp_path):
    """A plain LoraConfig adapter beside a LoRA-Dash one lives on dashdiff layers: (α/r)·B A, record
    ``lora``. A runtime scale set on them is named in one warning (count, first layer), pointing at the
    caller's line; the export stays at scale 1."""
    lm = get_peft_model(_llama(), dashdiff.LoraDashConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          dash_directions=2), adapter_name="dash")
    lm.add_adapter("plain", LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"]))
    layer = lm.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, dashdiff.DashdiffLinear) and layer.adapter_kind["plain"] == "lora"
    make_realistic(lm, "plain")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no runtime scale set: no warning
        factors = E.plain_lora_factors(lm, "plain")
    want = ref_deltas(lm, "plain")
    assert len(factors) == 4
    for f in factors:
        assert f.record == {"method": "lora", "r": 2} and f.rank == 2
        assert_layer_close(f.b @ f.a, want[f.name], f.name)
    layer.set_scale("plain", 0.5)
    lm.base_model.model.model.layers[1].self_attn.v_proj.set_scale("plain", 1.0 + 1e-9)
    with pytest.warns(UserWarning) as caught:
        folder = Path(dashdiff.export_lora(lm, tmp_path, format="peft", adapter_name="plain"))
    (w,) = [w for w in caught if "runtime LoRA scale" in str(w.message)]
    assert str(w.message) == ("dashdiff: a runtime LoRA scale is set on 2 layer(s) (e.g. model.layers.0.self_attn.q_proj); "
                              "the export is at scale 1, as trained: set the scale again in the loader.")
    assert _from_caller(w)
    t = load_file(folder / "adapter_model.safetensors")
    name = "model.layers.0.self_attn.q_proj"
    assert_layer_close(_product(t, f"base_model.model.{name}.lora_A.weight", f"base_model.model.{name}.lora_B.weight").float(),
                       want[name], name)
    layer.set_scale("plain", 1.0)
    lm.base_model.model.model.layers[1].self_attn.v_proj.set_scale("plain", 1.0 + 1e-13)  # within rounding of 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        E.plain_lora_factors(lm, "plain")


def test_unlaunched_dash_and_unsearched_autolora_warn_once_per_method(tmp_path):
    """Each method's caveat once, in registry order (LoRA-Dash, then AutoLoRA), counting its layers and naming the
    first, at the caller's line; the LoRA-Dash layers export at rank r."""
    pipe = SimpleNamespace(unet=_unet(), text_encoder=_clip())
    pipe.unet.add_adapter(dashdiff.AutoLoraConfig(r=2, lora_alpha=2, target_modules=["to_q"]))
    inject_adapter_in_model(dashdiff.LoraDashConfig(r=3, lora_alpha=3, target_modules=["q_proj", "v_proj"],
                                                    dash_directions=2), pipe.text_encoder)
    _randomize(pipe)
    with pytest.warns(UserWarning) as caught:
        path = dashdiff.export_lora(pipe, tmp_path)
    msgs = [str(w.message) for w in caught]
    assert msgs == [
        "dashdiff: LoRA-Dash adapter 'default' has not launched yet in 2 layer(s) (e.g. "
        "text_encoder.encoder.layers.0.self_attn.v_proj): exporting them as plain rank-r LoRA with no dash term.",
        "dashdiff: AutoLoRA adapter 'default' has taken no outer (β) step in 8 layer(s) (e.g. "
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q): α is still its initial value, so the "
        "ranks are not searched ones."]
    assert all(_from_caller(w) for w in caught)
    t = load_file(path)
    assert t["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"].shape == (3, 16)
    h = header(path)
    assert h["method"] == "mixed" and h["layers"]["text_encoder.encoder.layers.0.self_attn.q_proj"] == {
        "method": "dash", "r": 3, "s": 0, "launched": False}


def test_a_layer_with_every_autolora_component_pruned_is_recorded_and_left_out(tmp_path):
    la = get_peft_model(_llama(), dashdiff.AutoLoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    make_realistic(la)
    q = la.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.lora_autolora_beta["default"].fill_(0.0)  # α = 1/4 each: every ratio 1/4 < λ = 0.3
    factors = {f.name: f for f in E.plain_lora_factors(la, threshold=0.3)}
    dropped = factors["model.layers.0.self_attn.q_proj"]
    assert dropped.rank == 0 and dropped.record["dropped"] is True and dropped.record["kept"] == []
    assert all("dropped" not in f.record for n, f in factors.items() if f.rank > 0)
    folder = Path(dashdiff.export_lora(la, tmp_path, format="peft", threshold=0.3))
    t = load_file(folder / "adapter_model.safetensors")
    assert not any("layers.0.self_attn.q_proj" in k for k in t)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert "model.layers.0.self_attn.q_proj" not in cfg["target_modules"]
    assert header(folder / "adapter_model.safetensors")["threshold"] == 0.3
    for name, rec in header(folder / "adapter_model.safetensors")["layers"].items():
        alpha = torch.softmax(la.base_model.model.get_submodule(name).lora_autolora_beta["default"].double(), 0)
        assert rec["kept"] == torch.nonzero(alpha >= 0.3).flatten().tolist()
        assert (f"base_model.model.{name}.lora_A.weight" in t) == (rec["rank"] > 0)


def test_refused_layers_name_themselves():
    """DoRA, lora_bias, Conv1D (fan_in_fan_out) and non-Linear LoRA layers cannot be a plain Linear LoRA."""
    model = get_peft_model(Mlp(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(NotImplementedError) as e:
        E.plain_lora_factors(model)
    assert str(e.value) == "dashdiff: q_proj: DoRA / lora_bias adapters cannot be exported as a plain LoRA"
    model = get_peft_model(Mlp(), LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True))
    with pytest.raises(NotImplementedError) as e:
        E.plain_lora_factors(model)
    assert str(e.value) == "dashdiff: q_proj: DoRA / lora_bias adapters cannot be exported as a plain LoRA"
    model = get_peft_model(Mlp(), LoraConfig(r=2, target_modules=["q_proj"]))
    model.base_model.model.q_proj.fan_in_fan_out = True
    with pytest.raises(NotImplementedError) as e:
        E.plain_lora_factors(model)
    assert str(e.value) == "dashdiff: q_proj: fan_in_fan_out (Conv1D) layers are not supported"

    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

    model = get_peft_model(Conv(), LoraConfig(r=2, target_modules=["conv"]))
    with pytest.raises(NotImplementedError) as e:
        E.plain_lora_factors(model)
    assert str(e.value) == "dashdiff: conv is a PEFT Conv2d; only Linear LoRA layers can be exported"
    with pytest.raises(ValueError) as e:
        E.plain_lora_factors(get_peft_model(Mlp(), LoraConfig(r=2, target_modules=["q_proj"])), "other")
    assert str(e.value) == "dashdiff: no layer holds an adapter named 'other' (found: ['default'])"
    with pytest.raises(ValueError) as e:
        E.plain_lora_factors(Mlp())
    assert str(e.value) == "dashdiff: no layer holds an adapter named 'default' (found: none)"


def test_bad_arguments(tmp_path):
    lm = get_peft_model(Mlp(), dashdiff.LoraDashConfig(r=2, lora_alpha=2, target_modules=["q_proj"], dash_directions=1))
    with pytest.raises(ValueError) as e:
        dashdiff.export_lora(lm, tmp_path, format="ckpt")
    assert str(e.value) == ("dashdiff: unknown export format 'ckpt'; use one of "
                            "('diffusers', 'peft', 'kohya', 'merged')")
    for fmt in ("diffusers", "kohya"):
        with pytest.raises(ValueError) as e:
            dashdiff.export_lora(lm, tmp_path, format=fmt)
        assert str(e.value) == (f"dashdiff: format='{fmt}' is for diffusers pipelines and models (UNet / transformer); "
                                "Mlp is not one: use format='peft' (or 'merged').")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError) as e:
        dashdiff.export_lora(lm, tmp_path / "file", format="peft")
    assert str(e.value) == f"dashdiff: {tmp_path / 'file'} is a file; export_lora writes into a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing written before a refusal


# --------------------------------------------------------------------------- diffusers format


def _sd_like(unet_method="dash", te_targets=("q_proj", "v_proj")):
    pipe = SimpleNamespace(unet=_unet(), text_encoder=_clip())
    if unet_method == "dash":
        pipe.unet.add_adapter(dashdiff.LoraDashConfig(r=2, lora_alpha=4, target_modules=UNET_TARGETS, dash_directions=1))
    else:
        pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=UNET_TARGETS))
    if te_targets:
        inject_adapter_in_model(LoraConfig(r=3, lora_alpha=6, target_modules=list(te_targets)), pipe.text_encoder)
    make_realistic(pipe)
    return pipe


def test_diffusers_file_keys_tensors_and_header(tmp_path):
    pipe = _sd_like()
    path = Path(dashdiff.export_lora(pipe, tmp_path / "out"))
    assert path == tmp_path / "out" / "pytorch_lora_weights.safetensors"
    t = load_file(path)
    unet = {f"unet.{attn}.{p}" for attn in UNET_ATTN for p in ("to_q", "to_k", "to_v", "to_out.0")}
    # transformers 5's CLIPTextModel has no text_model level; the published name has it
    te = {f"text_encoder.text_model.encoder.layers.0.self_attn.{p}" for p in ("q_proj", "v_proj")}
    assert set(t) == {f"{m}.lora_{x}.weight" for m in unet | te for x in "AB"}
    want = ref_deltas(pipe)
    for m in unet:
        assert t[f"{m}.lora_A.weight"].shape[0] == 2 + 1 and t[f"{m}.lora_A.weight"].dtype == torch.float32
        assert_layer_close(_product(t, f"{m}.lora_A.weight", f"{m}.lora_B.weight").float(), want[m], m)
    for m in te:
        assert_layer_close(_product(t, f"{m}.lora_A.weight", f"{m}.lora_B.weight").float(),
                           want[m.replace("text_model.", "")], m)
    meta = _meta(path)
    assert meta["format"] == "pt" and "lora_adapter_metadata" not in meta
    h = json.loads(meta["dashdiff"])
    assert h == {
        "format_version": 1, "dashdiff_version": dashdiff.__version__, "kind": "export", "export_format": "diffusers",
        "adapter_name": "default", "method": "mixed", "threshold": None,
        "configs": {"unet": E.config_to_dict(pipe.unet.peft_config["default"]),
                    "text_encoder": E.config_to_dict(pipe.text_encoder.peft_config["default"])},
        "layers": {**{f"unet.{attn}.{p}": {"method": "dash", "r": 2, "s": 1, "launched": True}
                      for attn in UNET_ATTN for p in ("to_q", "to_k", "to_v", "to_out.0")},
                   **{f"text_encoder.encoder.layers.0.self_attn.{p}": {"method": "lora", "r": 3}
                      for p in ("q_proj", "v_proj")}}}
    assert h["configs"]["unet"]["class"] == "LoraDashConfig" and h["configs"]["text_encoder"]["class"] == "LoraConfig"
    assert list(h["layers"])[0].startswith("unet.")  # the order of the model's own walk


def test_diffusers_keys_of_lone_models_and_a_projection(tmp_path):
    """A lone UNet is ``unet.``; another diffusers model ``transformer.``; SDXL's second text encoder keeps its
    ``text_model.`` and its ``text_projection`` is not put under it."""
    from diffusers import AutoencoderKL

    unet = _unet()
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["attn1.to_q"]))
    _randomize(unet)
    t = load_file(dashdiff.export_lora(unet, tmp_path / "u"))
    assert set(t) == {f"unet.{attn}.to_q.lora_{x}.weight" for attn in UNET_ATTN if attn.endswith("attn1") for x in "AB"}
    h = header(tmp_path / "u" / DIFFUSERS_WEIGHT_NAME)
    assert list(h["configs"]) == [""] and h["configs"][""]["class"] == "LoraConfig"

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, layers_per_block=1, latent_channels=4)
    vae.add_adapter(LoraConfig(r=1, lora_alpha=1, target_modules=["to_q"]))
    t = load_file(dashdiff.export_lora(vae, tmp_path / "v"))
    assert set(t) == {f"transformer.{part}.mid_block.attentions.0.to_q.lora_{x}.weight"
                      for part in ("encoder", "decoder") for x in "AB"}

    host = SimpleNamespace(text_encoder_2=_clip(with_projection=True))
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "text_projection"]), host.text_encoder_2)
    t = load_file(dashdiff.export_lora(host, tmp_path / "te2"))
    assert set(t) == {f"text_encoder_2.{m}.lora_{x}.weight" for m in
                      ("text_model.encoder.layers.0.self_attn.q_proj", "text_projection") for x in "AB"}
    t = load_file(dashdiff.export_lora(host, tmp_path / "te2k", format="kohya"))
    assert {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in t} >= {
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_projection"}


# --------------------------------------------------------------------------- kohya format


def _kohya_split(t: dict) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in t.items():
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            if k.endswith(suffix):
                out.setdefault(k[: -len(suffix)], {})[suffix.split(".")[1]] = v
    assert sum(len(v) for v in out.values()) == len(t)  # no other keys
    return out


def test_kohya_names_one_alpha_and_rank_over_alpha_in_lora_up(tmp_path):
    """SD 1.x: ``lora_unet_`` / ``lora_te_``; one ``.alpha`` (a float32 scalar: the most common rank, here the
    UNet's 2 on 32 layers against the text encoder's 3 on 4) in every layer, and each ``lora_up`` times
    r_i / alpha so that the loader's alpha / r_i gives back ΔW."""
    pipe = SimpleNamespace(unet=_unet(), text_encoder=_clip())
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=3, target_modules=UNET_TARGETS))
    inject_adapter_in_model(LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]),
                            pipe.text_encoder)
    pipe.unet.peft_config["default"].base_model_name_or_path = None
    make_realistic(pipe)
    common = 2
    assert sorted(f.rank for f in E.plain_lora_factors(pipe)) == [2] * 32 + [3] * 4
    path = Path(dashdiff.export_lora(pipe, tmp_path, format="kohya"))
    assert path.name == "pytorch_lora_weights_kohya.safetensors"
    layers = _kohya_split(load_file(path))
    want = ref_deltas(pipe)
    expected = {}
    for name, w in want.items():
        comp, module = name.split(".", 1)
        if comp == "unet":
            expected["lora_unet_" + module.replace(".", "_")] = w
        else:
            expected["lora_te_text_model_" + module.replace(".", "_")] = w
    kept = {n for n, w in expected.items()}
    assert set(layers) == kept
    for key, w in expected.items():
        parts = layers[key]
        assert parts["alpha"].dtype == torch.float32 and parts["alpha"].shape == () and float(parts["alpha"]) == common
        r = parts["lora_down"].shape[0]
        loaded = (float(parts["alpha"]) / r) * parts["lora_up"].double() @ parts["lora_down"].double()  # a loader's scale
        assert_layer_close(loaded.float(), w, key)
    h = header(path)
    assert h["kohya_alpha"] == float(common) and h["kohya_zero_filled"] == [] and h["export_format"] == "kohya"
    meta = _meta(path)
    assert meta["format"] == "pt" and meta["ss_network_dim"] == "Dynamic" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.title"] == "dashdiff lora (default)"


def test_kohya_zero_fills_partial_text_encoder_attention(tmp_path):
    """q and v adapted in a text-encoder layer: rank-1 zero factors for k_proj and out_proj (A1111's open_clip
    path patches an attention only with all four; diffusers needs out_proj), with the file's common alpha, named
    in the header; the UNet's attention is not filled."""
    pipe = SimpleNamespace(unet=_unet(), text_encoder=_clip(), text_encoder_2=_clip(with_projection=True, seed=1))
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["attn1.to_q"]))
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]), pipe.text_encoder)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["k_proj", "fc1"]), pipe.text_encoder_2)
    _randomize(pipe)
    path = dashdiff.export_lora(pipe, tmp_path, format="kohya")
    layers = _kohya_split(load_file(path))
    te1 = "lora_te1_text_model_encoder_layers_0_self_attn_"  # SDXL: a second text encoder
    te2 = "lora_te2_text_model_encoder_layers_0_self_attn_"
    for filled in (te1 + "k_proj", te1 + "out_proj", te2 + "q_proj", te2 + "v_proj", te2 + "out_proj"):
        parts = layers[filled]
        assert parts["lora_down"].shape == (1, 16) and parts["lora_up"].shape == (16, 1), filled
        assert not parts["lora_down"].any() and not parts["lora_up"].any()
        assert parts["lora_down"].dtype == torch.float32 and float(parts["alpha"]) == 2.0
    assert {k for k in layers if k.startswith("lora_unet_")} == {
        "lora_unet_" + attn.replace(".", "_") + "_to_q" for attn in UNET_ATTN if attn.endswith("attn1")}
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc1" in layers  # not an attention projection: no fill around it
    assert header(path)["kohya_zero_filled"] == [
        "text_encoder.encoder.layers.0.self_attn.k_proj", "text_encoder.encoder.layers.0.self_attn.out_proj",
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj",
        "text_encoder_2.text_model.encoder.layers.0.self_attn.v_proj",
        "text_encoder_2.text_model.encoder.layers.0.self_attn.out_proj"]
    assert _meta(path)["ss_base_model_version"] == "sdxl_base_v1-0"


def test_zero_fill_skips_what_no_loader_could_patch():
    """Direct: a projection the layer does not have, or one that is not a Linear, gets no filler, and the
    projections after it in the order q, k, v, out still do; a complete layer gets none; the fillers take the first
    factor's dtype."""
    a = torch.zeros(2, 16, dtype=torch.float64)
    f = E.PlainFactor("text_encoder", "encoder.layers.0.self_attn.q_proj", a, torch.zeros(16, 2, dtype=torch.float64))
    for missing, not_linear in (("k_proj", "out_proj"), ("out_proj", "k_proj")):
        te = _clip()
        attn = te.encoder.layers[0].self_attn
        delattr(attn, missing)
        setattr(attn, not_linear, nn.Identity())
        (fill,) = E._a1111_zero_fill({"text_encoder": te}, [f])
        assert fill.module == "encoder.layers.0.self_attn.v_proj" and fill.component == "text_encoder"
        assert fill.a.dtype == torch.float64 and fill.a.shape == (1, 16) and fill.b.shape == (16, 1)
        assert fill.record == {"zero_fill": True}
    te = _clip()
    full = [E.PlainFactor("text_encoder", f"encoder.layers.0.self_attn.{p}", a, a.T) for p in E._ATTN_PROJ]
    assert E._a1111_zero_fill({"text_encoder": te}, full) == []
    unet_only = [E.PlainFactor("unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_q", a, a.T)]
    assert E._a1111_zero_fill({"unet": _unet()}, unet_only) == []


def test_kohya_file_of_an_adapter_with_every_component_pruned(tmp_path):
    """Every AutoLoRA component under the threshold: no layer is written (no fillers either), alpha 1 and rank 1
    stand in the metadata; the title names the method and the adapter."""
    unet = _unet()
    unet.add_adapter(dashdiff.AutoLoraConfig(r=2, lora_alpha=2, target_modules=["attn1.to_q"]), adapter_name="searched")
    _randomize(unet, "searched")
    for _, _, _, layer in E.iter_lora_layers(unet, "searched"):
        layer.lora_autolora_outer_steps["searched"].fill_(1)
    path = dashdiff.export_lora(unet, tmp_path, format="kohya", adapter_name="searched", threshold=0.99)
    assert load_file(path) == {}
    h = header(path)
    assert h["kohya_alpha"] == 1.0 and h["kohya_zero_filled"] == [] and all(r["dropped"] for r in h["layers"].values())
    meta = _meta(path)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["modelspec.title"]) == (
        "1", "1.0", "dashdiff autolora (searched)")


def test_kohya_refuses_other_components_and_names_lone_unets(tmp_path):
    unet = _unet("sdxl")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["attn2.to_k"]))
    _randomize(unet)
    path = dashdiff.export_lora(unet, tmp_path / "u", format="kohya")
    assert set(_kohya_split(load_file(path))) == {
        "lora_unet_" + attn.replace(".", "_") + "_to_k" for attn in UNET_ATTN if attn.endswith("attn2")}
    assert _meta(path)["ss_base_model_version"] == "sdxl_base_v1-0"  # a lone SDXL UNet
    host = SimpleNamespace(transformer=_clip())
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"]), host.transformer)
    with pytest.raises(ValueError) as e:
        dashdiff.export_lora(host, tmp_path / "t", format="kohya")
    assert str(e.value) == "dashdiff: format='kohya' covers SD / SDXL UNets and text encoders, not 'transformer'"


def test_base_model_family_and_prediction_type():
    sd, sd2, xl = _unet("sd"), _unet("sd2"), _unet("sdxl")
    assert [E.base_model_family(m) for m in (sd, sd2, xl)] == ["sd1", "sd2", "sdxl"]
    assert [E.base_model_family(SimpleNamespace(unet=m)) for m in (sd, sd2, xl)] == ["sd1", "sd2", "sdxl"]
    assert E.base_model_family(SimpleNamespace(unet=sd, text_encoder_2=_clip(True))) == "sdxl"
    assert E.base_model_family(SimpleNamespace(text_encoder=_clip())) == "sd1"
    assert E.base_model_family(get_peft_model(Mlp(), LoraConfig(r=1, target_modules=["q_proj"]))) == "sd1"
    assert E._is_sdxl(SimpleNamespace(unet=xl)) and not E._is_sdxl(xl) and not E._is_sdxl(SimpleNamespace(unet=sd))
    assert not E._is_sdxl(SimpleNamespace(text_encoder_2=None, unet=sd))
    peft_xl = get_peft_model(_unet("sdxl"), LoraConfig(r=1, target_modules=["to_q"]))
    assert E.base_model_family(SimpleNamespace(unet=peft_xl)) == "sdxl"  # through the PEFT wrapper

    assert E._prediction_type(SimpleNamespace(), None) == "epsilon"
    assert E._prediction_type(SimpleNamespace(scheduler=SimpleNamespace(config=SimpleNamespace(
        prediction_type="v_prediction"))), None) == "v_prediction"
    assert E._prediction_type(SimpleNamespace(scheduler=SimpleNamespace(config=SimpleNamespace(
        prediction_type="v_prediction"))), "epsilon") == "epsilon"  # the caller's word wins
    assert E._prediction_type(SimpleNamespace(scheduler=SimpleNamespace(config=SimpleNamespace(
        prediction_type=None))), None) == "epsilon"
    with pytest.raises(ValueError) as e:
        E._prediction_type(SimpleNamespace(), "sample")
    assert str(e.value) == "dashdiff: prediction_type must be 'epsilon' or 'v_prediction', got 'sample'"


def test_kohya_metadata_as_sd_scripts_writes_it():
    """Every key, written out from sd-scripts (model_util / sdxl_model_util / sai_model_spec / resize_lora)."""
    common = {"ss_network_module": "networks.lora", "modelspec.sai_model_spec": "1.0.0", "modelspec.title": "T"}
    assert E.kohya_metadata("sd1", False, [4, 4], 4, "T") == {
        **common, "ss_network_dim": "4", "ss_network_alpha": "4.0", "ss_base_model_version": "sd_v1", "ss_v2": "False",
        "modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.implementation": "diffusers",
        "modelspec.resolution": "512x512", "modelspec.prediction_type": "epsilon"}
    assert E.kohya_metadata("sd1", True, [8], 2.5, "T") == {
        **common, "ss_network_dim": "8", "ss_network_alpha": "2.5", "ss_base_model_version": "sd_v1_v", "ss_v2": "False",
        "modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.implementation": "diffusers",
        "modelspec.resolution": "512x512", "modelspec.prediction_type": "v"}
    assert E.kohya_metadata("sd2", True, [2], 2, "T") == {
        **common, "ss_network_dim": "2", "ss_network_alpha": "2.0", "ss_base_model_version": "sd_v2_v", "ss_v2": "True",
        "modelspec.architecture": "stable-diffusion-v2-768-v/lora", "modelspec.implementation": "diffusers",
        "modelspec.resolution": "768x768", "modelspec.prediction_type": "v"}
    assert E.kohya_metadata("sd2", False, [2], 2, "T") == {
        **common, "ss_network_dim": "2", "ss_network_alpha": "2.0", "ss_base_model_version": "sd_v2", "ss_v2": "True",
        "modelspec.architecture": "stable-diffusion-v2-512/lora", "modelspec.implementation": "diffusers",
        "modelspec.resolution": "512x512", "modelspec.prediction_type": "epsilon"}
    assert E.kohya_metadata("sdxl", False, [3, 1, 3], 3, "T") == {
        **common, "ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic", "ss_base_model_version": "sdxl_base_v1-0",
        "ss_v2": "False", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.resolution": "1024x1024", "modelspec.prediction_type": "epsilon",
        "ss_training_comment": "dashdiff export with per-layer ranks 1..3; each layer's lora_up carries r_i / alpha "
                               "(alpha 3), so every layer loads at scale 1"}
    assert E.kohya_metadata("sdxl", True, [3], 1.5, "T")["modelspec.prediction_type"] == "v"


def test_kohya_v_prediction_from_the_scheduler_or_the_caller(tmp_path):
    host = SimpleNamespace(unet=_unet("sd2"), scheduler=SimpleNamespace(config=SimpleNamespace(prediction_type="v_prediction")))
    host.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["attn1.to_q"]))
    _randomize(host)
    meta = _meta(dashdiff.export_lora(host, tmp_path / "a", format="kohya"))
    assert (meta["ss_base_model_version"], meta["modelspec.resolution"]) == ("sd_v2_v", "768x768")
    meta = _meta(dashdiff.export_lora(host, tmp_path / "b", format="kohya", prediction_type="epsilon"))
    assert (meta["ss_base_model_version"], meta["ss_network_dim"], meta["ss_network_alpha"]) == ("sd_v2", "2", "2.0")
    assert meta["modelspec.title"] == "dashdiff lora (default)"


# --------------------------------------------------------------------------- PEFT format


def _set_beta(layer, beta) -> None:
    """β as given (α = softmax β), as after a search; the components the export prunes masked in A too, so that
    the export equals the model (ref_deltas takes every component)."""
    from dashdiff.autolora.ranks import keep_mask

    with torch.no_grad():
        layer.lora_autolora_beta["default"].copy_(torch.tensor(beta))
        layer.lora_autolora_outer_steps["default"].fill_(1)
        layer.lora_A["default"].weight[~keep_mask(layer, "default")] = 0


def test_peft_config_and_weights(tmp_path):
    """A plain LoraConfig: lora_alpha = r (the most common rank), equal rank / alpha patterns for the others,
    exact target names, the source's dropout and task type, inference mode; keys under base_model.model."""
    la = get_peft_model(_llama(), dashdiff.AutoLoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=4, lora_dropout=0.1,
                                                          target_modules=["q_proj", "v_proj", "up_proj"]))
    la.base_model.model.config._name_or_path = "my/llama"
    la.peft_config["default"].base_model_name_or_path = None
    _randomize(la)
    # λ = 1/4: β = 0 keeps all 4 (α = 1/4 exactly), three equal large β keep 3, one large β keeps 1
    betas = {"model.layers.0.self_attn.q_proj": [3.0, 3.0, 3.0, -3.0], "model.layers.0.self_attn.v_proj": [3.0, 3.0, -3.0, 3.0],
             "model.layers.1.self_attn.q_proj": [-3.0, 3.0, 3.0, 3.0], "model.layers.1.self_attn.v_proj": [5.0, 0.0, 0.0, 0.0],
             "model.layers.0.mlp.up_proj": [0.0, 0.0, 0.0, 0.0], "model.layers.1.mlp.up_proj": [3.0, -3.0, 3.0, 3.0]}
    for name, beta in betas.items():
        _set_beta(la.base_model.model.get_submodule(name), beta)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # searched, no modules_to_save, no runtime scale: nothing to warn about
        folder = Path(dashdiff.export_lora(la, tmp_path / "p", format="peft"))
    assert folder == tmp_path / "p" and sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    raw = json.loads((folder / "adapter_config.json").read_text())
    ranks = {m: 3 for m in betas} | {"model.layers.1.self_attn.v_proj": 1, "model.layers.0.mlp.up_proj": 4}
    r0 = 3
    pattern = {"model.layers.1.self_attn.v_proj": 1, "model.layers.0.mlp.up_proj": 4}
    assert raw["peft_type"] == "LORA" and raw["r"] == raw["lora_alpha"] == r0
    assert raw["rank_pattern"] == pattern and raw["alpha_pattern"] == pattern
    assert raw["target_modules"] == sorted(ranks) and raw["lora_dropout"] == 0.1 and raw["bias"] == "none"
    assert raw["task_type"] == "CAUSAL_LM" and raw["inference_mode"] is True
    assert raw["base_model_name_or_path"] == "my/llama"
    assert "autolora_threshold" not in raw and "dash_directions" not in raw
    t = load_file(folder / "adapter_model.safetensors")
    assert set(t) == {f"base_model.model.{m}.lora_{x}.weight" for m in ranks for x in "AB"}
    want = ref_deltas(la)
    for m in ranks:
        assert_layer_close(_product(t, f"base_model.model.{m}.lora_A.weight", f"base_model.model.{m}.lora_B.weight").float(),
                           want[m], m)
    assert _meta(folder / "adapter_model.safetensors")["format"] == "pt"
    h = header(folder / "adapter_model.safetensors")
    assert h["export_format"] == "peft" and h["method"] == "autolora" and h["configs"][""]["class"] == "AutoLoraConfig"

    la.peft_config["default"].base_model_name_or_path = "from/config"  # the adapter config's name wins
    folder = Path(dashdiff.export_lora(la, tmp_path / "q", format="peft"))
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "from/config"


def test_peft_export_of_a_pipeline_one_folder_per_component(tmp_path):
    pipe = _sd_like(unet_method="lora")
    pipe.unet.peft_config["default"].modules_to_save = ["conv_in"]
    with pytest.warns(UserWarning, match=r"modules_to_save \['conv_in'\] are not part of the LoRA export"):
        folder = Path(dashdiff.export_lora(pipe, tmp_path, format="peft"))
    assert sorted(p.name for p in folder.iterdir()) == ["text_encoder", "unet"]
    unet_cfg = json.loads((folder / "unet" / "adapter_config.json").read_text())
    assert unet_cfg["r"] == unet_cfg["lora_alpha"] == 2 and unet_cfg["rank_pattern"] == {} == unet_cfg["alpha_pattern"]
    assert unet_cfg["target_modules"] == sorted(f"{attn}.{p}" for attn in UNET_ATTN for p in UNET_TARGETS)
    assert unet_cfg["task_type"] is None and unet_cfg["lora_dropout"] == 0.0
    te_cfg = json.loads((folder / "text_encoder" / "adapter_config.json").read_text())
    assert te_cfg["r"] == te_cfg["lora_alpha"] == 3
    # the text encoder's keys are its own module names (a PeftModel over it has no text_model level either)
    t = load_file(folder / "text_encoder" / "adapter_model.safetensors")
    assert set(t) == {f"base_model.model.encoder.layers.0.self_attn.{p}.lora_{x}.weight" for p in ("q_proj", "v_proj")
                      for x in "AB"}


def test_peft_export_without_a_stored_config_and_of_a_partly_adapted_pipeline(tmp_path):
    """No PEFT config to be found (a model whose ``peft_config`` was dropped): the exported config takes
    LoraConfig's plain defaults (no dropout, no task type, no base name), nothing is warned, and the header says
    None. A pipeline whose first component has no adapter still gets the next component's folder."""
    model = Mlp()
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, lora_dropout=0.3, target_modules=["q_proj"]), model)
    del model.peft_config
    assert E.find_config(model, "default") is None
    _randomize(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folder = Path(dashdiff.export_lora(model, tmp_path / "m", format="peft"))
    raw = json.loads((folder / "adapter_config.json").read_text())
    assert (raw["lora_dropout"], raw["task_type"], raw["base_model_name_or_path"], raw["r"], raw["lora_alpha"]) == (
        0.0, None, None, 2, 2)
    assert header(folder / "adapter_model.safetensors")["configs"] == {"": None}

    host = SimpleNamespace(unet=_unet(), text_encoder=_clip())  # the UNet is not adapted
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]), host.text_encoder)
    _randomize(host)
    folder = Path(dashdiff.export_lora(host, tmp_path / "p", format="peft"))
    assert sorted(p.name for p in folder.iterdir()) == ["text_encoder"]
    assert set(load_file(folder / "text_encoder" / "adapter_model.safetensors")) == {
        f"base_model.model.encoder.layers.0.self_attn.q_proj.lora_{x}.weight" for x in "AB"}


# --------------------------------------------------------------------------- merged


def test_merged_state_dict_is_the_base_model_plus_delta():
    model = get_peft_model(Mlp(), dashdiff.LoraDashConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                          dash_directions=1))
    make_realistic(model)
    base = Mlp().state_dict()
    root = model.base_model.model
    before = {k: v.clone() for k, v in root.state_dict().items()}
    factors = E.plain_lora_factors(model)
    sd = E.merged_state_dict(root, factors)
    assert set(sd) == set(base)  # no lora_* / dash / base_layer keys left
    assert all(type(v) is torch.Tensor for v in sd.values())  # tensors, not the model's Parameters
    want = ref_deltas(model)
    for name in ("q_proj", "v_proj"):
        assert_layer_close(sd[f"{name}.weight"] - base[f"{name}.weight"], want[name], name)
        assert torch.equal(sd[f"{name}.bias"], base[f"{name}.bias"])
    assert torch.equal(sd["norm.weight"], base["norm.weight"])
    assert all(torch.equal(v, before[k]) for k, v in root.state_dict().items())  # the model is untouched
    # a layer whose factors are rank 0 (all AutoLoRA components pruned) keeps W0; one with no factor too
    zero = [E.PlainFactor("", "q_proj", torch.zeros(0, 12), torch.zeros(10, 0))]
    sd = E.merged_state_dict(root, zero)
    assert torch.equal(sd["q_proj.weight"], base["q_proj.weight"]) and torch.equal(sd["v_proj.weight"], base["v_proj.weight"])


def test_merged_state_dict_in_half_and_double_precision():
    for dtype, tol, r in ((torch.float64, 1e-14, 1), (torch.bfloat16, None, 2)):  # rank 1 merges too
        model = get_peft_model(Mlp(dtype), LoraConfig(r=r, lora_alpha=r, target_modules=["q_proj"]))
        _randomize(model)
        root = model.base_model.model
        factors = E.plain_lora_factors(model)
        sd = E.merged_state_dict(root, factors)
        w0 = root.q_proj.base_layer.weight
        layer = root.q_proj
        want = w0.double() + layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
        assert sd["q_proj.weight"].dtype == dtype
        if tol is None:  # the sum in float32, rounded once to bf16
            assert torch.equal(sd["q_proj.weight"], want.float().to(dtype))
        else:
            torch.testing.assert_close(sd["q_proj.weight"], want, rtol=tol, atol=tol)


def test_merged_lone_models_and_the_record(tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import LlamaForCausalLM

    lm = get_peft_model(_llama(), dashdiff.LoraDashConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4,
                                                          target_modules=["q_proj"], dash_directions=1))
    make_realistic(lm)
    cfg = lm.base_model.model.config
    before = cfg.to_dict()
    folder = Path(dashdiff.export_lora(lm, tmp_path / "lm", format="merged"))
    assert folder == tmp_path / "lm"
    assert lm.base_model.model.config is cfg and cfg.to_dict() == before
    merged = LlamaForCausalLM.from_pretrained(folder)
    base = _llama().state_dict()
    want = ref_deltas(lm)
    for name, w in want.items():
        assert_layer_close(merged.state_dict()[f"{name}.weight"] - base[f"{name}.weight"], w, name)
    record = json.loads((folder / "dashdiff_export.json").read_text())
    assert record["export_format"] == "merged" and record["method"] == "dash" and record["kind"] == "export"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary folder is gone

    # transformers' own PEFT integration (add_adapter) sets _hf_peft_config_loaded: the merged save is the
    # full model all the same, and the flag is back afterwards
    te = _clip()
    te.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    _randomize(te)
    assert te._hf_peft_config_loaded is True
    folder = Path(dashdiff.export_lora(te, tmp_path / "te", format="merged"))
    assert te._hf_peft_config_loaded is True
    saved = load_file(folder / "model.safetensors")
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in saved or "encoder.layers.0.self_attn.q_proj.weight" in saved
    assert not any("lora" in k or "base_layer" in k for k in saved)

    unet = _unet()
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["attn1.to_q"]))
    _randomize(unet)
    folder = Path(dashdiff.export_lora(unet, tmp_path / "unet", format="merged"))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "dashdiff_export.json",
                                                        "diffusion_pytorch_model.safetensors"]
    assert UNet2DConditionModel.from_pretrained(folder).config.cross_attention_dim == 32
    assert _meta(folder / "diffusion_pytorch_model.safetensors")["format"] == "pt"

    mlp = get_peft_model(Mlp(), LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    _randomize(mlp)
    # into a folder whose parents do not exist yet; the files are written in a hidden ".<name>.*.tmp" folder
    # beside it (same file system: moved in by renames), then moved in
    seen = []
    real_move = safeio.move_tree

    def move(src, dst):
        seen.append(Path(src))
        return real_move(src, dst)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(safeio, "move_tree", move)
        folder = Path(dashdiff.export_lora(mlp, tmp_path / "new" / "deeper" / "mlp", format="merged"))
    (tmp,) = seen
    assert tmp.parent == folder.parent and tmp.name.startswith(".mlp.") and tmp.name.endswith(".tmp")
    assert not tmp.exists() and sorted(p.name for p in folder.parent.iterdir()) == ["mlp"]
    assert sorted(p.name for p in folder.iterdir()) == ["dashdiff_export.json", "model.safetensors"]
    assert set(load_file(folder / "model.safetensors")) == set(Mlp().state_dict())
    assert _meta(folder / "model.safetensors")["format"] == "pt"


def test_merged_pipeline_and_training_host(tmp_path):
    """A pipeline: model_index.json, every component in its folder (tokenizer and scheduler saved as they are);
    a training host (no save_config): one folder per adapted model."""
    from diffusers import StableDiffusionPipeline

    pipe = tiny_sd_pipeline(0)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"]))
    _randomize(pipe)
    folder = Path(dashdiff.export_lora(pipe, tmp_path / "pipe", format="merged"))
    assert sorted(p.name for p in folder.iterdir()) == ["dashdiff_export.json", "model_index.json", "scheduler",
                                                        "text_encoder", "tokenizer", "unet", "vae"]
    loaded = StableDiffusionPipeline.from_pretrained(folder)
    base = tiny_sd_pipeline(0).unet.state_dict()
    want = ref_deltas(pipe)
    for name, w in want.items():
        key = name[len("unet."):] + ".weight"
        assert_layer_close(loaded.unet.state_dict()[key] - base[key], w, name)
    assert set(loaded.unet.state_dict()) == set(base)
    # a pipeline with an empty slot (no tokenizer) before its UNet: the slot is skipped, the UNet still saved
    partial = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=None, unet=pipe.unet,
                                      scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False)
    folder = Path(dashdiff.export_lora(partial, tmp_path / "partial", format="merged"))
    assert sorted(p.name for p in folder.iterdir()) == ["dashdiff_export.json", "model_index.json", "scheduler",
                                                        "text_encoder", "unet", "vae"]
    host = SimpleNamespace(unet=pipe.unet, text_encoder=pipe.text_encoder)
    for _ in range(2):  # the second export replaces the first in the same folder
        folder = Path(dashdiff.export_lora(host, tmp_path / "host", format="merged"))
    assert sorted(p.name for p in folder.iterdir()) == ["dashdiff_export.json", "text_encoder", "unet"]
    assert (folder / "text_encoder" / "config.json").is_file()
    merged = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert set(merged) == set(base)
    for name, w in want.items():  # each component merged with its own layers' factors
        key = name[len("unet."):] + ".weight"
        assert_layer_close(merged[key] - base[key], w, name)


# --------------------------------------------------------------------------- configs in the header


def test_config_dict_round_trip_and_lookup():
    cfg = dashdiff.LoraDashConfig(task_type="CAUSAL_LM", r=3, lora_alpha=5, target_modules={"v_proj", "q_proj"},
                                  dash_directions=2)
    entry = E.config_to_dict(cfg)
    assert entry["class"] == "LoraDashConfig" and entry["fields"]["target_modules"] == ["q_proj", "v_proj"]
    assert entry["fields"]["task_type"] == "CAUSAL_LM" and json.loads(json.dumps(entry)) == entry
    back = E.config_from_dict(entry)
    assert type(back) is dashdiff.LoraDashConfig and back.r == 3 and back.lora_alpha == 5 and back.dash_directions == 2
    assert set(back.target_modules) == {"q_proj", "v_proj"}
    auto = E.config_from_dict(E.config_to_dict(dashdiff.AutoLoraConfig(r=4, autolora_threshold=0.2)))
    assert type(auto) is dashdiff.AutoLoraConfig and auto.autolora_threshold == 0.2
    other = E.config_from_dict({"class": "SomethingNew", "fields": {"r": 7, "not_a_field": 1}})
    assert type(other) is LoraConfig and other.r == 7
    assert type(E.config_from_dict({})) is LoraConfig

    model = get_peft_model(Mlp(), cfg.__class__(r=2, target_modules=["q_proj"], dash_directions=1))
    assert E.find_config(model, "default") is model.peft_config["default"]
    assert E.find_config(Mlp(), "default") is None  # no adapter at all
    assert E.find_config(model, "other") is None
    unet = _unet()
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]), adapter_name="mine")
    assert E.find_config(unet, "mine") is unet.peft_config["mine"]
    holder = nn.Module()
    holder._orig_mod = unet  # how torch.compile wraps a model
    assert E.find_config(holder, "mine") is unet.peft_config["mine"]
    # a (Distributed)DataParallel wrapper forwards no attributes: the config is found on the model under it
    assert E.find_config(nn.DataParallel(unet), "mine") is unet.peft_config["mine"]


def test_base_name_or_path_sources():
    from diffusers.configuration_utils import FrozenDict

    assert E._base_name_or_path(nn.Linear(2, 2), None) is None
    assert E._base_name_or_path(nn.Linear(2, 2), SimpleNamespace(base_model_name_or_path="cfg/name")) == "cfg/name"
    unet = _unet()
    unet._internal_dict = FrozenDict({**unet.config, "_name_or_path": "unet/path"})
    assert E._base_name_or_path(unet, SimpleNamespace(base_model_name_or_path=None)) == "unet/path"
    lm = _llama()
    assert E._base_name_or_path(lm, None) is None  # a model built in memory has an empty name
    lm.config._name_or_path = "llama/path"
    assert E._base_name_or_path(lm, None) == "llama/path"
    assert E._base_name_or_path(SimpleNamespace(config=SimpleNamespace(name_or_path="other/path")), None) == "other/path"
    assert E._base_name_or_path(SimpleNamespace(config={"name_or_path": 3}), None) == "3"


# --------------------------------------------------------------------------- interrupted writes


def test_interrupted_export_leaves_old_file(tmp_path, monkeypatch):
    pipe = tiny_sd_pipeline(0)
    pipe.unet.add_adapter(dashdiff.LoraDashConfig(r=2, lora_alpha=2, target_modules=["to_q"], dash_directions=1))
    path = Path(dashdiff.export_lora(pipe, tmp_path))
    old = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safeio, "_save_file", broken)
    make_realistic(pipe)
    with pytest.raises(OSError, match="disk full"):
        dashdiff.export_lora(pipe, tmp_path)
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == [DIFFUSERS_WEIGHT_NAME]  # no temp file left
    # merged: the failure comes mid-folder; the previous folder's files stay whole.
    monkeypatch.undo()
    merged = Path(dashdiff.export_lora(pipe, tmp_path / "merged", format="merged"))
    before = {p: p.read_bytes() for p in merged.rglob("*") if p.is_file()}
    monkeypatch.setattr(safeio, "_save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        dashdiff.export_lora(pipe, tmp_path / "merged", format="merged")
    assert {p: p.read_bytes() for p in merged.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([DIFFUSERS_WEIGHT_NAME, "merged"])
