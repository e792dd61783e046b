"""Tiny random-weight models for tests and the offline demo.

Everything is built from configs with a fixed seed, so no hub access is ever needed. The
tokenizers are built locally from a byte-level alphabet plus a few BPE merges learned from a
small built-in text: any string encodes, and the vocab size is known in advance.

``resolve_model("tiny-sd")`` (or ``tiny-sdxl``, ``tiny-llama``) saves such a model once with
``save_pretrained`` and returns the folder, so the calling code runs its ordinary
``from_pretrained(path)`` exactly as it would for a real checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the heavy libraries are imported lazily, inside the builders
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

__all__ = [
    "RESERVED_MODELS",
    "CACHE_VERSION",
    "CLIP_VOCAB_SIZE",
    "LLAMA_VOCAB_SIZE",
    "default_cache_root",
    "resolve_model",
    "tiny_clip_tokenizer",
    "tiny_llama",
    "tiny_llama_tokenizer",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
]

RESERVED_MODELS: tuple[str, ...] = ("tiny-sd", "tiny-sdxl", "tiny-llama")
# The pretrained miniature (issue 14): folders shipped in a checkout of the repository, not in the wheel.
PRETRAINED_MODELS: dict[str, Path] = {
    name: Path(__file__).resolve().parents[2] / "assets" / "models" / name for name in ("mini-sd", "mini-llama")
}
# Bump when a builder changes, so stale cached folders are not reused.
CACHE_VERSION = "v1"

# Words both tokenizers learn merges from: DreamBooth-style prompts and the commonsense
# (LLM-Adapters) prompt/answer vocabulary, so typical test strings get multi-char tokens.
_CORPUS = """
a photo of sks cat. a photo of a cat. a photo of sks dog. a photo of a dog.
a photo of sks toy. a photo of a toy. a sks toy on the table. a cat in the garden.
a dog on the beach. a painting of a cat in the style of van gogh. a close up photo.
a red toy cat with a blue hat. a high quality photo of the subject. a drawing of a person.
Below is an instruction that describes a task. Write a response that appropriately
completes the request. ### Instruction: ### Input: ### Response:
the correct answer is true. the correct answer is false. the correct answer is solution1.
the correct answer is answer1. the correct answer is ending1. the correct answer is option1.
Please choose the correct answer to the question. Please answer the following question with
true or false. Question: Answer format: true/false, solution1/solution2, answer1/answer2,
ending1/ending2, option1/option2. What is the best way to do this? Which one is correct?
"""

_CLIP_BOS, _CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
_CLIP_EOW = "</w>"  # CLIPTokenizer's BPE marks the last symbol of each word with this suffix.
_CLIP_MERGES = 160
_CLIP_MAX_LEN = 77

_LLAMA_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3
_LLAMA_MERGES = 200


# --------------------------------------------------------------------------- tokenizers


def _byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE maps bytes to, in a fixed order."""
    from tokenizers import pre_tokenizers

    # alphabet() returns an unordered collection: sort so ids are reproducible.
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _learn_merges(words: list[list[str]], num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE on pre-split words (lists of symbols); ties broken lexicographically.

    Written out instead of using ``tokenizers``' trainer so the result cannot depend on
    thread scheduling or hash order: the vocab size and ids are fixed by construction.
    """
    freqs = Counter(tuple(w) for w in words)
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, n in freqs.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, n in freqs.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        freqs = merged
    if len(merges) < num_merges:
        raise RuntimeError(f"built-in corpus yields only {len(merges)} merges, {num_merges} wanted")
    return merges


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-layout vocab: bytes, bytes + '</w>', merged symbols, then BOS/EOS."""
    from transformers import CLIPTokenizer

    # Pre-split the corpus with CLIPTokenizer's own normalizer and pre-tokenizer (taken from
    # a throwaway vocab-less instance), so the merges are learned on the words it will see.
    backend = CLIPTokenizer().backend_tokenizer
    norm, pre = backend.normalizer, backend.pre_tokenizer
    words = [list(w[:-1]) + [w[-1] + _CLIP_EOW] for w, _ in pre.pre_tokenize_str(norm.normalize_str(_CORPUS))]
    alphabet = _byte_alphabet()
    symbols = alphabet + [c + _CLIP_EOW for c in alphabet]
    merges = _learn_merges(words, _CLIP_MERGES)
    symbols += [a + b for a, b in merges]
    symbols += [_CLIP_BOS, _CLIP_EOS]
    vocab = {s: i for i, s in enumerate(symbols)}
    assert len(vocab) == len(symbols), "duplicate symbol in the CLIP vocab"
    return vocab, merges


CLIP_VOCAB_SIZE = 2 * 256 + _CLIP_MERGES + 2
LLAMA_VOCAB_SIZE = len(_LLAMA_SPECIALS) + 256 + _LLAMA_MERGES


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A CLIPTokenizer (``CLIP_VOCAB_SIZE`` = 674 tokens, max length 77) built locally.

    Byte-level alphabet + 160 merges, so any text encodes into real tokens, unlike the
    2-token tokenizer an offline ``from_pretrained(<hub id>)`` silently returns.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    # transformers 5 builds the fast tokenizer straight from the in-memory vocab/merges
    # (merges as (left, right) pairs: the `tokenizers` BPE model rejects "a b" strings here).
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=_CLIP_MAX_LEN)
    if len(tok) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"tiny CLIP tokenizer has {len(tok)} tokens, built {CLIP_VOCAB_SIZE}")
    return tok


def tiny_llama_tokenizer(padding_side: str = "left") -> PreTrainedTokenizerFast:
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ``LLAMA_VOCAB_SIZE`` = 460 tokens.

    Special tokens ``<unk>=0 <s>=1 </s>=2 <pad>=3``; BOS is prepended on encode. Left padding
    by default, as LLM-Adapters' training and batched generation use.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = [list(w) for w, _ in pre.pre_tokenize_str(_CORPUS)]
    merges = _learn_merges(words, _LLAMA_MERGES)
    symbols = list(_LLAMA_SPECIALS) + _byte_alphabet() + [a + b for a, b in merges]
    vocab = {s: i for i, s in enumerate(symbols)}
    assert len(vocab) == len(symbols), "duplicate symbol in the llama vocab"

    backend = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=False))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side=padding_side,
        model_max_length=2048,
    )
    if len(tok) != LLAMA_VOCAB_SIZE:
        raise RuntimeError(f"tiny llama tokenizer has {len(tok)} tokens, built {LLAMA_VOCAB_SIZE}")
    return tok


# --------------------------------------------------------------------------- models


def _clip_text_config(tok: CLIPTokenizer) -> CLIPTextConfig:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_CLIP_MAX_LEN,
        # Real ids: CLIP pools at the first EOS (eos_token_id == 2 would select the legacy argmax).
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _ddim_scheduler() -> DDIMScheduler:
    from diffusers import DDIMScheduler

    # SD's noise schedule; DDIM renders in a few steps, and the DreamBooth scripts' own
    # DDPMScheduler.from_pretrained(path, subfolder="scheduler") reads the same config.
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _tiny_vae() -> AutoencoderKL:
    from diffusers import AutoencoderKL

    # Two blocks: 2x spatial downsampling, so 64 px images become 4x32x32 latents.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )


# UNet settings shared by the SD and SDXL builders: two blocks, the second with cross-attention.
_UNET_COMMON = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
)


def tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A random-weight ``StableDiffusionPipeline`` (~2 M parameters, float32, CPU).

    UNet: latents 4xHxW with H = W = pixels / 2, block_out_channels (32, 64), a cross-attention
    block (``to_q to_k to_v to_out.0``), cross_attention_dim 32. Text encoder: CLIP, hidden 32,
    77 tokens. Same seed, same weights; the global RNG state is left untouched.
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tok = tiny_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            **_UNET_COMMON,
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = _tiny_vae()
        text_encoder = CLIPTextModel(_clip_text_config(tok))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tok,
        unet=unet,
        scheduler=_ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A random-weight ``StableDiffusionXLPipeline`` (float32, CPU).

    UNet: ``addition_embed_type="text_time"`` (6 time ids x 8 + pooled 32 = 80 inputs),
    block_out_channels (32, 64), cross_attention_dim 64 = hidden 32 of ``text_encoder``
    (CLIPTextModel) + hidden 32 of ``text_encoder_2`` (CLIPTextModelWithProjection, pooled 32).
    Both tokenizers are the tiny CLIP tokenizer. Latents 4xHxW with H = W = pixels / 2.
    """
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok, tok_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            **_UNET_COMMON,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * 8 + 32,
            cross_attention_dim=64,
            norm_num_groups=32,
        )
        vae = _tiny_vae()
        text_encoder = CLIPTextModel(_clip_text_config(tok))
        text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(tok_2))
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tok,
        tokenizer_2=tok_2,
        unet=unet,
        scheduler=_ddim_scheduler(),
        # invisible-watermark is not a dependency; keep renders deterministic and comparable.
        add_watermarker=False,
    )


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A random-weight ``LlamaForCausalLM``: 2 layers, hidden 64, 4 heads (2 KV heads).

    Has ``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj``; vocab = ``LLAMA_VOCAB_SIZE``
    (matches ``tiny_llama_tokenizer``), logits shape (batch, seq, 460).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=LLAMA_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        unk_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = 3
    return model.eval()


# --------------------------------------------------------------------------- cache


def default_cache_root() -> Path:
    """``$DASHDIFF_CACHE`` if set, else ``~/.cache/dashdiff``."""
    env = os.environ.get("DASHDIFF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dashdiff"


def _save_reserved(name: str, folder: Path) -> None:
    if name == "tiny-sd":
        tiny_sd_pipeline().save_pretrained(folder)
    elif name == "tiny-sdxl":
        tiny_sdxl_pipeline().save_pretrained(folder)
    elif name == "tiny-llama":
        tiny_llama().save_pretrained(folder)
        tiny_llama_tokenizer().save_pretrained(folder)
    else:  # pragma: no cover - guarded by the caller
        raise ValueError(name)


def resolve_model(name_or_path: str, cache_dir: str | None = None) -> str:
    """Map a reserved model name to a local folder; return anything else unchanged.

    ``mini-sd`` / ``mini-llama`` are the pretrained miniature's folders in the repository
    (``assets/models/``).

    ``tiny-sd`` / ``tiny-sdxl`` / ``tiny-llama`` are saved once (seed 0) to
    ``<cache_dir or default_cache_root()>/<name>-v1`` and that path is returned, for the
    caller's ordinary ``from_pretrained``. The folder is written to a temporary sibling and
    renamed into place, so a concurrent or interrupted build never leaves a partial model.
    """
    if name_or_path in PRETRAINED_MODELS:
        folder = PRETRAINED_MODELS[name_or_path]
        if not (folder / "config.json").is_file() and not (folder / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{name_or_path}: the pretrained miniature is not at {folder}. It ships in a checkout of the "
                "dashdiff repository (assets/models/), not in the installed package: run from a clone, or "
                "pass the model folder's path instead of its name.")
        return str(folder)
    if name_or_path not in RESERVED_MODELS:
        return name_or_path
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_root()
    final = root / f"{name_or_path}-{CACHE_VERSION}"
    if final.is_dir():
        return str(final)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name_or_path}-", dir=root))
    # mkdtemp creates mode 0700; the cache may be shared (CI, several users), so open it up.
    tmp.chmod(0o755)
    try:
        _save_reserved(name_or_path, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished first: its folder is complete, keep it.
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)
