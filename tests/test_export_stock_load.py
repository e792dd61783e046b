"""export_lora through *stock* loaders: the exported plain LoRA reproduces the dashdiff model, checked three
ways (per-layer ΔW, one UNet / Llama forward, one short pipeline render) in a subprocess that never imports
dashdiff (tests/scripts/stock_load.py). One subprocess does every stock load.

Split from test_export.py (which holds export.py's in-process tests) because its module fixture takes about a
minute: the mutation run (pyproject.toml ``[tool.mutmut]``) selects test_export.py only, so that each of
export.py's mutants costs seconds, and this file is what shows the files load in the real loaders.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model, inject_adapter_in_model
from safetensors.torch import load_file, save_file

import dashdiff
from dashdiff import safeio
from dashdiff.files import DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHT_NAME
from dashdiff.testing import tiny_llama, tiny_sd_pipeline, tiny_sdxl_pipeline

STOCK = Path(__file__).parent / "scripts" / "stock_load.py"
# The references are computed by the very functions the stock-load subprocess uses.
from export_refs import assert_layer_close, header, make_realistic, ref_deltas, unet_inputs  # noqa: E402
from stock_load import render, unet_forward  # noqa: E402
from te_adapters import add_te_adapter  # noqa: E402
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# The demo's layer set (train/demo.sh --lora_layers): the attention and the feed-forward layers.
UNET_TARGETS_FF = [*UNET_TARGETS, "ff.net.0.proj", "ff.net.2"]
# diffusers' own text-encoder targets; its kohya loader needs out_proj to recognise TE keys.
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------- the scenarios + one stock subprocess


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Build every scenario, export it, run all stock loads in ONE subprocess; return refs + results."""
    from transformers import LlamaForCausalLM

    d = tmp_path_factory.mktemp("export")
    g = torch.Generator().manual_seed(0)
    inputs = {**unet_inputs("sd", g), **unet_inputs("sdxl", g), "llama.input_ids": torch.randint(4, 460, (1, 12), generator=g)}
    save_file(inputs, d / "inputs.safetensors")
    tasks, refs, models, exports = [], {}, {}, {}

    def record_pipe(sid, pipe, kind):
        refs[sid] = {"unet": unet_forward(pipe, inputs, kind), "images": render(pipe), "delta": ref_deltas(pipe)}
        models[sid] = pipe

    # 1. SD, LoRA-Dash on UNet (attention + feed-forward) + text encoder: uniform rank r+s. diffusers, kohya, merged.
    sd = tiny_sd_pipeline(0)
    sd.save_pretrained(d / "sd_base")
    sd.unet.add_adapter(dashdiff.LoraDashConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS_FF, dash_directions=2,
                                                init_lora_weights="gaussian"))
    add_te_adapter(sd.text_encoder, dashdiff.LoraDashConfig(r=4, lora_alpha=8, target_modules=TE_TARGETS, dash_directions=2))
    make_realistic(sd)
    record_pipe("sd_dash", sd, "sd")
    for fmt in ("diffusers", "kohya", "merged"):
        exports[f"sd_dash/{fmt}"] = dashdiff.export_lora(sd, d / f"sd_dash_{fmt}", format=fmt)
    tasks += [
        {"id": "sd_dash/diffusers", "kind": "pipeline_lora", "pipeline": "sd", "base": str(d / "sd_base"),
         "lora": str(d / "sd_dash_diffusers")},
        {"id": "sd_dash/kohya", "kind": "pipeline_lora", "pipeline": "sd", "base": str(d / "sd_base"),
         "lora": str(d / "sd_dash_kohya"), "weight_name": KOHYA_WEIGHT_NAME},
        {"id": "sd_dash/merged", "kind": "pipeline", "pipeline": "sd", "path": str(d / "sd_dash_merged")},
    ]

    # 2. SDXL, AutoLoRA on UNet + both text encoders: mixed per-layer ranks. diffusers, kohya.
    xl = tiny_sdxl_pipeline(0)
    xl.save_pretrained(d / "sdxl_base")
    xl.unet.add_adapter(dashdiff.AutoLoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS))
    add_te_adapter(xl.text_encoder, dashdiff.AutoLoraConfig(r=4, lora_alpha=8, target_modules=TE_TARGETS))
    add_te_adapter(xl.text_encoder_2, dashdiff.AutoLoraConfig(r=4, lora_alpha=4, target_modules=TE_TARGETS))
    make_realistic(xl)
    record_pipe("sdxl_auto", xl, "sdxl")
    for fmt in ("diffusers", "kohya"):
        exports[f"sdxl_auto/{fmt}"] = dashdiff.export_lora(xl, d / f"sdxl_auto_{fmt}", format=fmt)
    tasks += [
        {"id": "sdxl_auto/diffusers", "kind": "pipeline_lora", "pipeline": "sdxl", "base": str(d / "sdxl_base"),
         "lora": str(d / "sdxl_auto_diffusers")},
        {"id": "sdxl_auto/kohya", "kind": "pipeline_lora", "pipeline": "sdxl", "base": str(d / "sdxl_base"),
         "lora": str(d / "sdxl_auto_kohya"), "weight_name": KOHYA_WEIGHT_NAME},
    ]

    # 3. SD, ordinary PEFT LoRA layers (no dashdiff layer), lora_alpha != r: diffusers.
    plain = tiny_sd_pipeline(0)
    plain.unet.add_adapter(LoraConfig(r=4, lora_alpha=16, target_modules=UNET_TARGETS))
    make_realistic(plain)
    record_pipe("sd_plain", plain, "sd")
    exports["sd_plain/diffusers"] = dashdiff.export_lora(plain, d / "sd_plain_diffusers")
    tasks.append({"id": "sd_plain/diffusers", "kind": "pipeline_lora", "pipeline": "sd", "base": str(d / "sd_base"),
                  "lora": str(d / "sd_plain_diffusers")})

    # 4. Llama, LoRA-Dash through get_peft_model (CAUSAL_LM): peft and merged.
    tiny_llama(0).save_pretrained(d / "llama_base")
    ids = inputs["llama.input_ids"]
    lm = get_peft_model(
        LlamaForCausalLM.from_pretrained(d / "llama_base"),
        dashdiff.LoraDashConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, dash_directions=3),
    )
    make_realistic(lm)
    with torch.no_grad():
        refs["llama_dash"] = {"logits": lm(input_ids=ids).logits, "delta": ref_deltas(lm)}
    models["llama_dash"] = lm
    for fmt in ("peft", "merged"):
        exports[f"llama_dash/{fmt}"] = dashdiff.export_lora(lm, d / f"llama_dash_{fmt}", format=fmt)
    tasks += [
        {"id": "llama_dash/peft", "kind": "peft", "base": str(d / "llama_base"), "adapter": str(d / "llama_dash_peft")},
        {"id": "llama_dash/merged", "kind": "causal_lm", "path": str(d / "llama_dash_merged")},
    ]

    # 5. Llama, AutoLoRA injected into the bare model (mixed ranks): peft.
    la = inject_adapter_in_model(dashdiff.AutoLoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS),
                                 LlamaForCausalLM.from_pretrained(d / "llama_base"))
    make_realistic(la)
    with torch.no_grad():
        refs["llama_auto"] = {"logits": la(input_ids=ids).logits, "delta": ref_deltas(la)}
    models["llama_auto"] = la
    exports["llama_auto/peft"] = dashdiff.export_lora(la, d / "llama_auto_peft", format="peft")
    tasks.append({"id": "llama_auto/peft", "kind": "peft", "base": str(d / "llama_base"),
                  "adapter": str(d / "llama_auto_peft")})

    job = d / "job.json"
    job.write_text(json.dumps({"out": str(d / "stock.safetensors"), "inputs": str(d / "inputs.safetensors"),
                               "tasks": tasks}))
    # One thread: on shared cores, torch's thread pool under contention is several times slower.
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore::FutureWarning", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(STOCK), str(job)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results, meta = safeio.read_safetensors(d / "stock.safetensors")
    return {"dir": d, "refs": refs, "models": models, "exports": exports, "results": results,
            "report": json.loads(meta["report"]), "base": {"llama": d / "llama_base", "sd": d / "sd_base"}}


_PROBLEMS = ("unexpected key", "missing key", "not been correctly renamed", "newly initialized", "were not used")


def _load_problems(world, task_id: str) -> list[str]:
    """Stock loader log lines that would mean part of the export was dropped or left untrained."""
    return [line for line in world["report"][task_id] if any(p in line.lower() for p in _PROBLEMS)]


def _stock(world, task_id: str) -> dict[str, torch.Tensor]:
    prefix = task_id + "/"
    return {k[len(prefix):]: v for k, v in world["results"].items() if k.startswith(prefix)}


PIPE_TASKS = ["sd_dash/diffusers", "sd_dash/kohya", "sdxl_auto/diffusers", "sdxl_auto/kohya", "sd_plain/diffusers"]
PEFT_TASKS = ["llama_dash/peft", "llama_auto/peft"]


@pytest.mark.parametrize("task_id", PIPE_TASKS + PEFT_TASKS)
def test_stock_load_per_layer_delta(world, task_id):
    """Each layer's ΔW as the stock loader scaled it equals ΔW written out from the layer's raw tensors."""
    stock = _stock(world, task_id)
    want = world["refs"][task_id.split("/")[0]]["delta"]
    got = {k[len("delta/"):]: v for k, v in stock.items() if k.startswith("delta/")}
    # AutoLoRA layers can only lose components, never vanish entirely with the default λ = 1/k.
    assert set(got) == set(want), (sorted(set(want) ^ set(got)))[:5]
    for name, w in want.items():
        assert_layer_close(got[name], w, f"{task_id} {name}")


@pytest.mark.parametrize("task_id", PIPE_TASKS + ["sd_dash/merged"])
def test_stock_pipeline_reproduces(world, task_id):
    stock, ref = _stock(world, task_id), world["refs"][task_id.split("/")[0]]
    torch.testing.assert_close(stock["unet"], ref["unet"], rtol=1e-5, atol=1e-6)
    assert (stock["images"] - ref["images"]).abs().max().item() <= 1e-5
    assert not _load_problems(world, task_id)


@pytest.mark.parametrize("task_id", PEFT_TASKS + ["llama_dash/merged"])
def test_stock_llama_reproduces(world, task_id):
    stock, ref = _stock(world, task_id), world["refs"][task_id.split("/")[0]]
    torch.testing.assert_close(stock["logits"], ref["logits"], rtol=1e-5, atol=1e-6)
    assert not _load_problems(world, task_id)


def test_adapter_effect_is_visible(world):
    """Guards the comparisons above: the adapters change the outputs far beyond the tolerances."""
    from diffusers import StableDiffusionPipeline
    from transformers import LlamaForCausalLM

    base = StableDiffusionPipeline.from_pretrained(world["base"]["sd"])
    assert (render(base) - world["refs"]["sd_dash"]["images"]).abs().max() > 1e-3
    llama = LlamaForCausalLM.from_pretrained(world["base"]["llama"]).eval()
    with torch.no_grad():
        logits = llama(input_ids=_inputs(world)["llama.input_ids"]).logits
    assert (logits - world["refs"]["llama_dash"]["logits"]).abs().max() > 1e-3


def test_merged_per_layer_delta(world):
    """merged: W_merged − W0 equals ΔW per layer (llama: transformers save_pretrained layout)."""
    d = world["dir"]
    merged = load_file(d / "llama_dash_merged" / "model.safetensors")
    base = load_file(world["base"]["llama"] / "model.safetensors")
    assert set(merged) == set(base)  # no lora / base_layer keys left
    for name, want in world["refs"]["llama_dash"]["delta"].items():
        key = f"{name}.weight"
        assert_layer_close(merged[key] - base[key], want, name)
    unet = load_file(d / "sd_dash_merged" / "unet" / "diffusion_pytorch_model.safetensors")
    unet0 = load_file(world["base"]["sd"] / "unet" / "diffusion_pytorch_model.safetensors")
    assert set(unet) == set(unet0)
    for name, want in world["refs"]["sd_dash"]["delta"].items():
        if name.startswith("unet."):
            key = name[len("unet."):] + ".weight"
            assert_layer_close(unet[key] - unet0[key], want, name)


def test_export_did_not_mutate_the_models(world, tmp_path):
    """Exports (merged included) leave the user's models as they were: same layers, same outputs,
    transformers' PEFT flag and config untouched (save_pretrained only saw a copy)."""
    inputs = _inputs(world)
    lm = world["models"]["llama_dash"]
    assert isinstance(lm.base_model.model.model.layers[0].self_attn.q_proj, dashdiff.DashdiffLinear)
    with torch.no_grad():
        assert torch.equal(lm(input_ids=inputs["llama.input_ids"]).logits, world["refs"]["llama_dash"]["logits"])
    sd = world["models"]["sd_dash"]
    assert torch.equal(unet_forward(sd, inputs, "sd"), world["refs"]["sd_dash"]["unet"])
    te_config, before = sd.text_encoder.config, sd.text_encoder.config.to_dict()
    flag = getattr(sd.text_encoder, "_hf_peft_config_loaded", False)  # True after transformers' add_adapter
    dashdiff.export_lora(sd, tmp_path, format="merged")
    assert sd.text_encoder.config is te_config and te_config.to_dict() == before
    assert getattr(sd.text_encoder, "_hf_peft_config_loaded", False) == flag  # restored after the save


def _inputs(world):
    # Cloned for aligned memory: see stock_load.py (CPU kernels round differently on unaligned input).
    return {k: v.clone() for k, v in load_file(world["dir"] / "inputs.safetensors").items()}


# --------------------------------------------------------------------------- file formats


def test_diffusers_file_layout(world):
    path = world["exports"]["sd_dash/diffusers"]
    assert Path(path).name == DIFFUSERS_WEIGHT_NAME
    meta = safeio.read_metadata(path)
    assert "lora_adapter_metadata" not in meta
    keys = load_file(path).keys()
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder"}
    h = header(path)
    assert h["kind"] == "export" and h["method"] == "dash" and h["export_format"] == "diffusers"
    assert h["configs"]["unet"]["class"] == "LoraDashConfig" and h["configs"]["unet"]["fields"]["dash_directions"] == 2
    layer = h["layers"]["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert layer == {"method": "dash", "r": 4, "s": 2, "launched": True}
    a = load_file(path)["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"]
    assert a.shape == (4 + 2, 64)  # rank r + s


def test_kohya_file_layout(world):
    path = world["exports"]["sdxl_auto/kohya"]
    t = load_file(path)
    alphas = {k: v for k, v in t.items() if k.endswith(".alpha")}
    assert len({float(v) for v in alphas.values()}) == 1  # one common alpha
    heads = {k.split("_")[1] for k in t}
    assert heads == {"unet", "te1", "te2"}
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.") for k in t)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.") for k in t)
    ranks = {v["rank"] for v in header(path)["layers"].values()}
    assert len(ranks) > 1, "the AutoLoRA scenario should give mixed ranks"
    assert "lora_adapter_metadata" not in safeio.read_metadata(path)
    sd_keys = load_file(world["exports"]["sd_dash/kohya"]).keys()
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_out_proj.") for k in sd_keys)


def test_peft_config_is_plain_lora(world):
    from peft import LoraConfig as StockLoraConfig

    folder = Path(world["exports"]["llama_auto/peft"])
    raw = json.loads((folder / PEFT_CONFIG_NAME).read_text())
    cfg = StockLoraConfig.from_pretrained(str(folder))
    assert type(cfg) is StockLoraConfig and raw["peft_type"] == "LORA"
    assert "autolora_threshold" not in raw and "dash_directions" not in raw
    assert cfg.lora_alpha == cfg.r
    assert raw["rank_pattern"] == raw["alpha_pattern"] and raw["rank_pattern"]
    assert raw["base_model_name_or_path"] == str(world["base"]["llama"])
    keys = load_file(folder / PEFT_WEIGHT_NAME).keys()
    assert all(k.startswith("base_model.model.model.layers.") for k in keys)
    assert set(cfg.target_modules) == {k[len("base_model.model."):-len(".lora_A.weight")] for k in keys if "lora_A" in k}
    dash = json.loads((Path(world["exports"]["llama_dash/peft"]) / PEFT_CONFIG_NAME).read_text())
    assert dash["task_type"] == "CAUSAL_LM" and dash["r"] == dash["lora_alpha"] == 4 + 3 and dash["rank_pattern"] == {}


def test_training_host_object(world, tmp_path):
    """The training scripts pass an object holding only the adapted components (no pipeline):
    SDXL is still recognised for kohya names, and merged writes one folder per component."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    xl = world["models"]["sdxl_auto"]
    host = SimpleNamespace(unet=xl.unet, text_encoder=xl.text_encoder)
    keys = load_file(dashdiff.export_lora(host, tmp_path / "k", format="kohya")).keys()
    assert {k.split("_")[1] for k in keys} == {"unet", "te1"}
    folder = Path(dashdiff.export_lora(host, tmp_path / "m", format="merged"))
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    inputs = _inputs(world)
    with torch.no_grad():
        out = unet(inputs["sdxl.sample"], inputs["sdxl.t"], inputs["sdxl.encoder_hidden_states"],
                   added_cond_kwargs={"text_embeds": inputs["sdxl.text_embeds"], "time_ids": inputs["sdxl.time_ids"]}).sample
    torch.testing.assert_close(out, world["refs"]["sdxl_auto"]["unet"], rtol=1e-5, atol=1e-6)
    assert (folder / "text_encoder" / "config.json").is_file()
