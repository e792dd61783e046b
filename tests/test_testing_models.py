"""dashdiff/testing/models.py, the tiny offline models: tokenizers as built, pipelines render,
resolve_model round-trips."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dashdiff.testing import models as tiny
from dashdiff.testing import (
    CLIP_VOCAB_SIZE,
    LLAMA_VOCAB_SIZE,
    RESERVED_MODELS,
    resolve_model,
    tiny_clip_tokenizer,
    tiny_llama,
    tiny_llama_tokenizer,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
)

PROMPT = "a photo of sks cat"


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_pipeline()


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl_pipeline()


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ----------------------------------------------------------------- tokenizers


def test_clip_tokenizer_has_built_vocab_and_encodes_real_tokens():
    tok = tiny_clip_tokenizer()
    # Not the 2-token tokenizer an offline hub miss returns.
    assert len(tok) == CLIP_VOCAB_SIZE == 674
    assert tok.model_max_length == 77
    ids = tok(PROMPT).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    words = ids[1:-1]
    assert len(words) >= 5 and not set(words) & {tok.bos_token_id, tok.eos_token_id}
    # The corpus merges make whole-word tokens of the DreamBooth prompt.
    assert tok.convert_ids_to_tokens(words) == ["a</w>", "photo</w>", "of</w>", "sks</w>", "cat</w>"]
    assert tok.decode(ids, skip_special_tokens=True) == PROMPT
    # Byte-level alphabet: unseen and non-ASCII text still encodes without <unk>.
    odd = tok("Zebra 42 über ☃").input_ids[1:-1]
    assert len(odd) > 4 and tok.unk_token_id not in odd
    assert tok.decode(tok("zebra über").input_ids, skip_special_tokens=True) == "zebra über"
    padded = tok(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77


def test_llama_tokenizer_matches_model_and_pads_as_asked():
    tok = tiny_llama_tokenizer()
    assert len(tok) == LLAMA_VOCAB_SIZE == tiny_llama().config.vocab_size
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    text = "Below is an instruction. the correct answer is true"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and len(ids) > 5 and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.padding_side == "left"
    left = tok(["a", "a b c"], padding=True).input_ids
    right = tiny_llama_tokenizer(padding_side="right")(["a", "a b c"], padding=True).input_ids
    assert left[0][0] == tok.pad_token_id and left[0][-1] != tok.pad_token_id
    assert right[0][-1] == tok.pad_token_id and right[0][0] == tok.bos_token_id


# ----------------------------------------------------------------- models


def test_builders_are_seeded_and_leave_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = tiny_llama(0), tiny_llama(0), tiny_llama(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    _assert_same_state(a, b)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_llama_forward_logits_and_projections():
    model, tok = tiny_llama(), tiny_llama_tokenizer()
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    batch = tok(["the correct answer is true", "a"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, labels=batch.input_ids)
    assert out.logits.shape == (2, batch.input_ids.shape[1], LLAMA_VOCAB_SIZE)
    assert torch.isfinite(out.loss)


def test_sd_pipeline_components(sd):
    assert sd.safety_checker is None and not sd.config.requires_safety_checker
    leaves = {n.split("attn2.", 1)[-1] for n, _ in sd.unet.named_modules() if "attn2." in n}
    assert {"to_q", "to_k", "to_v", "to_out.0"} <= leaves
    assert tuple(sd.unet.config.block_out_channels) == (32, 64)
    assert sd.text_encoder.config.vocab_size == len(sd.tokenizer) == CLIP_VOCAB_SIZE


def _render(pipe, prompt: str) -> np.ndarray:
    gen = torch.Generator().manual_seed(0)
    out = pipe(prompt, num_inference_steps=2, height=64, width=64, output_type="np", generator=gen)
    return out.images


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_two_step_generation(which, request):
    pipe = request.getfixturevalue(which)
    img = _render(pipe, PROMPT)
    assert img.shape == (1, 64, 64, 3) and img.dtype == np.float32
    assert np.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
    np.testing.assert_array_equal(img, _render(pipe, PROMPT))  # seeded: reproducible
    # The prompt reaches the UNet through cross-attention: another prompt, another image.
    assert np.abs(img - _render(pipe, "a drawing of a dog")).max() > 1e-4


def test_sdxl_pipeline_components(sdxl):
    assert sdxl.unet.config.addition_embed_type == "text_time"
    assert sdxl.unet.config.cross_attention_dim == (
        sdxl.text_encoder.config.hidden_size + sdxl.text_encoder_2.config.hidden_size
    )
    assert len(sdxl.tokenizer) == len(sdxl.tokenizer_2) == CLIP_VOCAB_SIZE


# ----------------------------------------------------------------- resolve_model


@pytest.mark.parametrize("name", ["runwayml/stable-diffusion-v1-5", "/some/local/path", "tiny-SD", ""])
def test_resolve_model_passes_other_names_through(name, tmp_path):
    assert resolve_model(name, cache_dir=str(tmp_path)) == name
    assert list(tmp_path.iterdir()) == []


def test_resolve_model_sd_round_trip(tmp_path, sd, monkeypatch):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    path = resolve_model("tiny-sd", cache_dir=str(tmp_path))
    assert Path(path) == tmp_path / "tiny-sd-v1"
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-sd-v1"]  # no temp folder left
    # Built once: a second call must not rebuild.
    monkeypatch.setattr(tiny, "_save_reserved", lambda *a: pytest.fail("rebuilt a cached model"))
    assert resolve_model("tiny-sd", cache_dir=str(tmp_path)) == path

    loaded = StableDiffusionPipeline.from_pretrained(path)
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_state(getattr(loaded, name), getattr(sd, name))
    assert loaded.tokenizer.get_vocab() == sd.tokenizer.get_vocab()
    assert loaded.tokenizer(PROMPT).input_ids == sd.tokenizer(PROMPT).input_ids
    # What the DreamBooth training scripts load for the noise schedule.
    assert DDPMScheduler.from_pretrained(path, subfolder="scheduler").config.num_train_timesteps == 1000


def test_resolve_model_sdxl_round_trip(tmp_path, sdxl):
    from diffusers import StableDiffusionXLPipeline

    path = resolve_model("tiny-sdxl", cache_dir=str(tmp_path))
    loaded = StableDiffusionXLPipeline.from_pretrained(path)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _assert_same_state(getattr(loaded, name), getattr(sdxl, name))
    assert loaded.tokenizer_2(PROMPT).input_ids == sdxl.tokenizer_2(PROMPT).input_ids


def test_resolve_model_llama_round_trip_via_env_cache(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("DASHDIFF_CACHE", str(tmp_path))
    path = resolve_model("tiny-llama")
    assert Path(path) == tmp_path / "tiny-llama-v1"
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    _assert_same_state(model, tiny_llama())
    assert len(tok) == model.config.vocab_size
    text = "the correct answer is option1"
    assert tok(text).input_ids == tiny_llama_tokenizer()(text).input_ids
    assert tok.padding_side == "left" and tok.pad_token_id == model.config.pad_token_id


def test_resolve_model_keeps_the_folder_of_a_concurrent_winner(tmp_path, monkeypatch):
    final = tmp_path / "tiny-llama-v1"

    def other_process_wins(name: str, folder: Path) -> None:
        (folder / "mine").touch()
        final.mkdir()
        (final / "theirs").touch()

    monkeypatch.setattr(tiny, "_save_reserved", other_process_wins)
    assert resolve_model("tiny-llama", cache_dir=str(tmp_path)) == str(final)
    assert os.listdir(final) == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-llama-v1"]


def test_reserved_names():
    assert RESERVED_MODELS == ("tiny-sd", "tiny-sdxl", "tiny-llama")
