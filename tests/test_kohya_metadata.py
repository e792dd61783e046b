"""The kohya export tells other tools what it is (issue 12): the metadata A1111 / Forge / sd-scripts
read, per base-model family, and text-encoder attention layers complete enough for A1111's open_clip
path, while every stock loader still loads the file exactly.

Expected strings are written out from the published sources, not taken from dashdiff:
A1111 ``extensions-builtin/Lora/network.py`` (``NetworkOnDisk.detect_version``), kohya sd-scripts
``library/model_util.py`` (``get_model_version_str_for_sd1_sd2``), ``library/sdxl_model_util.py``
(``MODEL_VERSION_SDXL_BASE_V1_0``), ``library/sai_model_spec.py`` (architecture ids) and
``networks/resize_lora.py`` ("Dynamic" dim / alpha for per-layer ranks)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file, save_file

import dashdiff
from dashdiff import safeio
from dashdiff.files import HEADER_KEY, KOHYA_WEIGHT_NAME
from dashdiff.testing import tiny_sd_pipeline, tiny_sdxl_pipeline
from dashdiff.walk import iter_lora_layers

STOCK = Path(__file__).parent / "scripts" / "stock_load.py"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def a1111_detect_version(metadata: dict[str, str]) -> str:
    """A1111's NetworkOnDisk.detect_version, from its published rules."""
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True":
        return "SD2"
    if len(metadata):
        return "SD1"
    return "Unknown"


def a1111_skipped_mha_layers(keys, prefix: str) -> list[str]:
    """Layers of an open_clip text encoder (one nn.MultiheadAttention each in A1111) that A1111's
    network_apply_weights skips: it patches one only when q, k, v AND out_proj modules are present."""
    present: dict[str, set[str]] = {}
    for k in keys:
        m = re.match(rf"{prefix}(.*self_attn)_(q_proj|k_proj|v_proj|out_proj)\.lora_down\.weight$", k)
        if m:
            present.setdefault(m.group(1), set()).add(m.group(2))
    return sorted(layer for layer, got in present.items() if got != {"q_proj", "k_proj", "v_proj", "out_proj"})


def _randomize(obj, seed: int) -> None:
    """Non-zero B (and β) so every adapted layer changes the model; AutoLoRA components the export
    prunes are masked in A too (so the export equals the model, as after a search: METHODS.md)."""
    from dashdiff.autolora.ranks import keep_mask

    g = torch.Generator().manual_seed(seed)
    for _, _, _, layer in iter_lora_layers(obj):
        for a in layer.lora_B.keys():
            b = layer.lora_B[a].weight
            with torch.no_grad():
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)
                beta = getattr(layer, "lora_autolora_beta", {})
                if a in beta:
                    beta[a].copy_(torch.randn(beta[a].shape, generator=g))
                    layer.lora_autolora_outer_steps[a].fill_(1)
                    layer.lora_A[a].weight[~keep_mask(layer, a)] = 0


def _meta(path) -> dict[str, str]:
    meta = safeio.read_metadata(path)
    return {k: v for k, v in meta.items() if k not in (HEADER_KEY, "format")}


def _sd2_like(tmp_path) -> SimpleNamespace:
    """An SD 2.x-shaped pipeline: a tiny UNet with SD 2's 1024-wide cross-attention (OpenCLIP ViT-H)
    and v-prediction scheduler (the 768-v model), held like a pipeline's components."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=1024,
                                attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS))
    return SimpleNamespace(unet=unet, scheduler=DDIMScheduler(prediction_type="v_prediction"))


def test_metadata_says_which_base_model_each_file_is_for(tmp_path):
    sd = tiny_sd_pipeline(0)
    sd.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS))
    m = _meta(dashdiff.export_lora(sd, tmp_path / "sd", format="kohya"))
    assert {k: m[k] for k in ("ss_base_model_version", "ss_v2", "modelspec.architecture", "modelspec.prediction_type",
                              "modelspec.resolution", "ss_network_module", "ss_network_dim", "ss_network_alpha")} == {
        "ss_base_model_version": "sd_v1", "ss_v2": "False", "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.prediction_type": "epsilon", "modelspec.resolution": "512x512",
        "ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "4.0"}
    assert m["modelspec.sai_model_spec"] and m["modelspec.title"] and m["modelspec.implementation"] == "diffusers"
    assert all(isinstance(v, str) for v in m.values())

    xl = tiny_sdxl_pipeline(0)
    xl.unet.add_adapter(dashdiff.AutoLoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS))
    _randomize(xl, 1)
    path = dashdiff.export_lora(xl, tmp_path / "xl", format="kohya")
    m = _meta(path)
    assert m["ss_base_model_version"] == "sdxl_base_v1-0" and m["ss_v2"] == "False"
    assert m["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert m["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert m["modelspec.resolution"] == "1024x1024"
    ranks = {t.shape[0] for k, t in load_file(path).items() if k.endswith("lora_down.weight")}
    assert len(ranks) > 1 and m["ss_network_dim"] == "Dynamic" and m["ss_network_alpha"] == "Dynamic"
    # The training script's host: only the adapted components, no second text encoder, no scheduler.
    host = SimpleNamespace(unet=xl.unet, text_encoder=xl.text_encoder)
    assert _meta(dashdiff.export_lora(host, tmp_path / "host", format="kohya"))["ss_base_model_version"] == "sdxl_base_v1-0"

    sd2 = _sd2_like(tmp_path)
    m = _meta(dashdiff.export_lora(sd2, tmp_path / "sd2v", format="kohya"))  # prediction type from the scheduler
    assert (m["ss_base_model_version"], m["ss_v2"], m["modelspec.architecture"], m["modelspec.prediction_type"],
            m["modelspec.resolution"]) == ("sd_v2_v", "True", "stable-diffusion-v2-768-v/lora", "v", "768x768")
    m = _meta(dashdiff.export_lora(SimpleNamespace(unet=sd2.unet), tmp_path / "sd2", format="kohya",
                                   prediction_type="epsilon"))
    assert (m["ss_base_model_version"], m["ss_v2"], m["modelspec.architecture"]) == (
        "sd_v2", "True", "stable-diffusion-v2-512/lora")
    with pytest.raises(ValueError, match="prediction_type"):
        dashdiff.export_lora(sd2, tmp_path / "bad", format="kohya", prediction_type="sample")


def test_a1111_labels_each_family_as_its_own(tmp_path):
    """A1111's Lora tab hides a file whose detected version differs from the loaded checkpoint's."""
    xl = tiny_sdxl_pipeline(0)
    xl.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=UNET_TARGETS))
    sd = tiny_sd_pipeline(0)
    sd.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=UNET_TARGETS))
    sd2 = _sd2_like(tmp_path)
    got = {name: a1111_detect_version(safeio.read_metadata(dashdiff.export_lora(obj, tmp_path / name, format="kohya")))
           for name, obj in (("xl", xl), ("sd", sd), ("sd2", sd2))}
    assert got == {"xl": "SDXL", "sd": "SD1", "sd2": "SD2"}


def test_text_encoder_attention_complete_for_a1111_and_exact_in_diffusers(tmp_path):
    """Text-encoder LoRA on q/v (CLIP-L) and q/k/v (bigG), no out_proj: the export adds zero factors
    for the missing projections, so A1111 patches every bigG layer and diffusers recognises the
    text-encoder keys; the stock diffusers load equals the model layer by layer (filled layers: 0)
    and renders the same images."""
    from stock_load import render, unet_forward

    xl = tiny_sdxl_pipeline(0)
    xl.save_pretrained(tmp_path / "base")
    xl.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS))
    inject_adapter_in_model(dashdiff.LoraDashConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                    dash_directions=2), xl.text_encoder)
    inject_adapter_in_model(dashdiff.AutoLoraConfig(r=3, lora_alpha=3, target_modules=["q_proj", "k_proj", "v_proj"]),
                            xl.text_encoder_2)
    _randomize(xl, 2)
    dashdiff.launch_dash(xl.text_encoder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "cannot be loaded" warning any more
        path = dashdiff.export_lora(xl, tmp_path / "lora", format="kohya")
    t = load_file(path)
    assert a1111_skipped_mha_layers(t, "lora_te2_") == []
    assert any(k.startswith("lora_te2_") and "_out_proj." in k for k in t)
    filled = json.loads(safeio.read_metadata(path)[HEADER_KEY])["kohya_zero_filled"]
    assert filled and all(n.split(".", 1)[0] in ("text_encoder", "text_encoder_2") for n in filled)
    assert any(n.endswith("k_proj") for n in filled if n.startswith("text_encoder.")) is True  # CLIP-L had q, v only
    for k, v in t.items():
        if "_out_proj." in k and k.endswith("lora_up.weight"):
            assert not v.any(), k  # a filler: ΔW = 0

    g = torch.Generator().manual_seed(0)
    inputs = {"sdxl.sample": torch.randn(1, 4, 32, 32, generator=g), "sdxl.t": torch.tensor([10]),
              "sdxl.encoder_hidden_states": torch.randn(1, 77, 64, generator=g),
              "sdxl.text_embeds": torch.randn(1, 32, generator=g),
              "sdxl.time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    save_file(inputs, tmp_path / "inputs.safetensors")
    want = {"unet": unet_forward(xl, inputs, "sdxl"), "images": render(xl)}
    deltas = {f"{c}.{n}": layer.get_delta_weight(a).float() for c, _, n, layer in iter_lora_layers(xl)
              for a in layer.lora_A.keys()}
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"out": str(tmp_path / "stock.safetensors"), "inputs": str(tmp_path / "inputs.safetensors"),
                               "tasks": [{"id": "xl", "kind": "pipeline_lora", "pipeline": "sdxl",
                                          "base": str(tmp_path / "base"), "lora": str(tmp_path / "lora"),
                                          "weight_name": KOHYA_WEIGHT_NAME}]}))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore::FutureWarning", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(STOCK), str(job)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results, _ = safeio.read_safetensors(tmp_path / "stock.safetensors")
    got = {k[len("xl/delta/"):]: v for k, v in results.items() if k.startswith("xl/delta/")}
    assert set(got) == set(deltas) | set(filled)
    for name, w in deltas.items():
        err = (got[name] - w).abs().max().item()
        assert err <= 1e-6 * max(1.0, w.abs().max().item()), f"{name}: {err:.3g}"
    for name in filled:
        assert not got[name].any(), name
    torch.testing.assert_close(results["xl/unet"], want["unet"], rtol=1e-5, atol=1e-6)
    assert (results["xl/images"] - want["images"]).abs().max().item() <= 1e-5
    assert (render(tiny_sdxl_pipeline(0)) - want["images"]).abs().max().item() > 1e-3  # the text-encoder LoRA acts
