#!/usr/bin/env python
"""Pretrain ``mini-sd``: a small Stable-Diffusion-family pipeline on the image world, in chunks.

Two stages, each run as one or more chunks (``--resume`` continues exactly; see ``_common.py``):

1. ``--stage vae``: an ``AutoencoderKL`` (3 blocks: 64 px -> 4x16x16 latents) trained on world
   scenes (MSE + L1 + a small KL term; no perceptual or GAN loss: the scenes are flat-colour
   drawings). At the end its latents' std sets ``scaling_factor``; saved to ``OUT/vae/final``.
2. ``--stage unet``: a ``UNet2DConditionModel`` and a ``CLIPTextModel`` trained from scratch
   together, with the stage-1 VAE frozen: epsilon prediction on SD's noise schedule, 10% of
   captions dropped (classifier-free guidance works). At the end the whole
   ``StableDiffusionPipeline`` is saved in float16 to ``OUT/pipeline`` (ordinary
   ``StableDiffusionPipeline.from_pretrained``), with ``pretrain_info.json`` (device time and
   final losses of both stages, sizes, settings) and ``samples.png``.

The tokenizer is ``dashdiff.testing.tiny_clip_tokenizer()`` (byte-level BPE, 674 tokens): any
caption encodes, and the same tokenizer is used by the repository's tests.

Scenes are rendered once into ``OUT/data/scenes-<seed>-<n>.npz`` (uint8) with all CPU cores;
``--world_version 2`` (animal toys and a studio backdrop, ``WORLD_V2.md``) uses
``scenes-v2-<seed>-<n>.npz``, so the two worlds' caches never mix.

    python assets/pretrain/pretrain_sd.py --output_dir runs/mini-sd --stage vae --max_minutes 20
    python assets/pretrain/pretrain_sd.py --output_dir runs/mini-sd --stage vae --max_minutes 20 --resume
    python assets/pretrain/pretrain_sd.py --output_dir runs/mini-sd --stage unet --max_minutes 20 [--resume]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # imported lazily in the builders: --help and argument errors stay fast
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if str(HERE.parents[1]) not in sys.path:
    sys.path.insert(0, str(HERE.parents[1]))  # the repository's dashdiff, without installing it

import _common as C  # noqa: E402
import image_world as W  # noqa: E402

# Sizes. "mini" is the shipped model (fp16: VAE 1.9 MB, UNet 7.7 MB, text encoder 1.0 MB). The
# UNet stage is sized so that its exact checkpoint (fp32 weights + AdamW moments: 12 bytes a
# parameter, 4.3 M parameters = 52 MB) travels to and from the GPU machine within its 64 MiB limit.
# "test" is a few-second CPU configuration for the tests.
PRESETS: dict[str, dict[str, Any]] = {
    "mini": {
        "vae": {"block_out_channels": (32, 64, 64), "layers_per_block": 1, "norm_num_groups": 16},
        "unet": {"block_out_channels": (48, 96, 96), "layers_per_block": 1, "attention_head_dim": 8,
                 "norm_num_groups": 16},
        "clip": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4},
        "n_scenes": 60000, "batch_size": 128,
        "vae_steps": 20000, "vae_lr": 3e-4, "unet_steps": 60000, "unet_lr": 3e-4,
    },
    "test": {
        "vae": {"block_out_channels": (8, 8, 8), "layers_per_block": 1, "norm_num_groups": 4},
        "unet": {"block_out_channels": (16, 16, 16), "layers_per_block": 1, "attention_head_dim": 8,
                 "norm_num_groups": 8},
        "clip": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        "n_scenes": 16, "batch_size": 4,
        "vae_steps": 20, "vae_lr": 1e-3, "unet_steps": 20, "unet_lr": 1e-3,
    },
}
KL_WEIGHT = 1e-4  # larger than SD's 1e-6: a 4x-downsampling VAE with 4 channels needs little KL to stay tame
CAPTION_DROPOUT = 0.1
SAMPLE_PROMPTS = (
    "a photo of two red balls on the beach", "a photo of a big green tree in the snow",
    "a photo of three yellow cars on the street", "a photo of a blue house at night",
    "a photo of a pink flower indoors", "a photo of four small white boxes on the grass",
    "a photo of a purple toy on the beach, on the left", "a photo of an orange boat at night",
    # Properties left open (what --attribute_dropout teaches): some colour, some background.
    "a photo of a toy on the beach", "a photo of two cups",
)
# Added to the samples of a --world_version 2 run (appended: the first ten stay comparable).
SAMPLE_PROMPTS_V2 = ("a photo of a toy in a studio", "a photo of a big green toy bear in a studio",
                     "a photo of a big toy on the beach", "a photo of a blue toy rabbit in the snow")


# --------------------------------------------------------------------------- models


def build_vae(preset: dict[str, Any]) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    n = len(preset["vae"]["block_out_channels"])
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        **preset["vae"],
    )


def build_unet(preset: dict[str, Any]) -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=preset["clip"]["hidden_size"], **preset["unet"],
    )


def build_text_encoder(preset: dict[str, Any], tok: Any) -> CLIPTextModel:
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=len(tok), projection_dim=preset["clip"]["hidden_size"], max_position_embeddings=77,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        attention_dropout=0.0, dropout=0.0, **preset["clip"],
    )
    return CLIPTextModel(cfg)


def noise_scheduler() -> DDIMScheduler:
    from diffusers import DDIMScheduler

    # SD's schedule, as dashdiff.testing uses; DDPMScheduler.from_pretrained(..., "scheduler") reads it too.
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def count_parameters(preset: dict[str, Any]) -> dict[str, int]:
    """Parameters of each component of ``preset`` (built on the meta device: no memory, no time)."""
    from dashdiff.testing import tiny_clip_tokenizer

    with torch.device("meta"):
        parts = {"vae": build_vae(preset), "unet": build_unet(preset),
                 "text_encoder": build_text_encoder(preset, tiny_clip_tokenizer())}
    return {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}


# --------------------------------------------------------------------------- data


def _render(args: tuple[int, int, int, int]) -> tuple[np.ndarray, list[str]]:
    start, stop, seed, version = args
    imgs, caps = [], []
    for i in range(start, stop):
        img, cap, _ = W.scene(i, seed, version=version)
        imgs.append(np.asarray(img, dtype=np.uint8))
        caps.append(cap)
    return np.stack(imgs), caps


def scene_cache(folder: Path, n: int, seed: int, workers: int | None = None,
                version: int = 1) -> tuple[np.ndarray, list[str]]:
    """Scenes 0..n-1 of world ``seed`` (world ``version``) as a uint8 (n, 64, 64, 3) array and captions,
    cached on disk (version 1 under its original name, so existing caches stay valid)."""
    W._check("train", version)
    path = folder / f"scenes-{C.world_version_tag(version)}{seed}-{n}.npz"
    if path.is_file():
        with np.load(path) as z:
            return z["images"], json.loads(str(z["captions"]))
    workers = workers or min(16, os.cpu_count() or 1)
    chunks = [(s, min(n, s + 1000), seed, version) for s in range(0, n, 1000)]
    if workers > 1 and len(chunks) > 1:
        with ProcessPoolExecutor(workers) as ex:
            parts = list(ex.map(_render, chunks))
    else:
        parts = [_render(c) for c in chunks]
    images = np.concatenate([p[0] for p in parts])
    captions = [c for p in parts for c in p[1]]
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, images=images, captions=np.array(json.dumps(captions)))
    os.replace(tmp, path)
    return images, captions


def _batch_indices(seed: int, step: int, n: int, batch: int) -> list[int]:
    rng = C.step_rng(seed, step, "batch")
    return [rng.randrange(n) for _ in range(batch)]


def _pixels(images: np.ndarray, idx: list[int], device: torch.device) -> torch.Tensor:
    x = torch.from_numpy(images[idx]).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


# --------------------------------------------------------------------------- stages


def _autocast(args: argparse.Namespace, device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda" and args.mixed_precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _config(args: argparse.Namespace, stage: str, preset: dict[str, Any], steps: int, lr: float) -> dict[str, Any]:
    cfg = {"stage": stage, "preset": args.preset, "seed": args.seed, "world_seed": args.world_seed,
           "batch_size": args.batch_size or preset["batch_size"], "n_scenes": args.n_scenes or preset["n_scenes"],
           "max_steps": steps, "lr": lr, "fixed_batch": args.fixed_batch, "mixed_precision": args.mixed_precision,
           **C.world_version_config(args.world_version)}
    return cfg


def run_vae(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    preset = PRESETS[args.preset]
    steps = args.max_steps or preset["vae_steps"]
    lr = args.learning_rate or preset["vae_lr"]
    cfg = _config(args, "vae", preset, steps, lr)
    images, _ = scene_cache(args.output_dir / "data", cfg["n_scenes"], args.world_seed, version=args.world_version)
    if args.init_from is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.init_from / "vae", torch_dtype=torch.float32)
        cfg["init_from"] = args.init_from.name
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            vae = build_vae(preset)
    if args.decoder_only:
        # The encoder (and so every latent, the scaling factor and the UNet trained on them) stays
        # as it is: only how latents are drawn back into pixels is taught the new scenes.
        cfg["decoder_only"] = True
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    vae.to(device)
    opt = torch.optim.AdamW([q for q in vae.parameters() if q.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, C.lr_lambda(min(500, steps // 10 + 1), steps))

    def loss_fn(step: int) -> torch.Tensor:
        idx = _batch_indices(args.seed, 0 if args.fixed_batch else step, len(images), cfg["batch_size"])
        x = _pixels(images, idx, device)
        with _autocast(args, device):
            post = vae.encode(x).latent_dist
            z = post.sample(generator=C.step_generator(args.seed, step, "vae-z", device))
            rec = vae.decode(z).sample.float()
        kl = post.kl().mean() / (x[0].numel())
        return F.mse_loss(rec, x) + 0.1 * F.l1_loss(rec, x) + KL_WEIGHT * kl

    folder = args.output_dir / "vae"
    state, done = C.train_chunked(args=args, folder=folder, modules={"vae": vae}, optimizer=opt,
                                  scheduler=sched, loss_fn=loss_fn, config=cfg, max_steps=steps, device=device)
    info = {"steps": state.step, "seconds": round(state.seconds, 3), "chunks": state.chunks,
            "final_loss": C.mean_tail(state.losses), "device": C.device_info(device), "config": cfg}
    if args.init_from is not None:  # the stage this one continued, so the record adds up
        info["continued"] = _vae_record(args.init_from / "vae", args.init_from)
    if done:
        # Round to float16 now: the UNet stage then trains on exactly the VAE that ships (and the
        # folder it loads is small enough to travel with a checkpoint).
        vae.eval().half().float()
        if args.decoder_only:  # same encoder, same latents: the UNet's scaling factor stays
            scale = float(vae.config.scaling_factor)
        else:
            with torch.no_grad():  # SD's convention: scale latents to unit std for the UNet
                x = _pixels(images, list(range(min(len(images), 512))), device)
                std = float(vae.encode(x).latent_dist.sample(
                    generator=C.step_generator(args.seed, -1, "vae-std", device)).float().std())
            scale = 1.0 / std
        vae.register_to_config(scaling_factor=scale)
        info["scaling_factor"] = scale

        def write(tmp: Path) -> None:
            vae.half().save_pretrained(tmp)
            C.write_json_atomic(tmp / "pretrain_info.json", info)

        C.save_folder_atomic(folder / "final", write)
        print(f"VAE done: {folder / 'final'} (scaling_factor {scale:.4f})")
    return info


def caption_rows(rng: Any, idx: list[int], n: int, attribute_dropout: float) -> list[int]:
    """Rows of the caption-id table for scenes ``idx`` (of ``n``): ``4 * n`` (the empty caption) with
    probability CAPTION_DROPOUT, else ``v * n + i`` where bit 0 of ``v`` drops the colour word and bit 1
    the background phrase, each with probability ``attribute_dropout``."""
    rows = []
    for i in idx:
        if rng.random() < CAPTION_DROPOUT:
            rows.append(4 * n)
            continue
        # No draws at 0: the first mini-sd stage's trajectory is unchanged by this option.
        v = (rng.random() < attribute_dropout) + 2 * (rng.random() < attribute_dropout) if attribute_dropout else 0
        rows.append(v * n + i)
    return rows


def run_unet(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from diffusers import AutoencoderKL

    from dashdiff.testing import tiny_clip_tokenizer

    preset = PRESETS[args.preset]
    vae_dir = args.vae_dir or args.output_dir / "vae" / "final"
    if args.vae_dir is None and args.init_from is not None and not (vae_dir / "config.json").is_file():
        vae_dir = args.init_from / "vae"  # the VAE the pipeline was trained with (as shipped: fp16)
    if not (vae_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{vae_dir} holds no VAE: finish --stage vae first (same --output_dir), or pass --vae_dir")
    steps = args.max_steps or preset["unet_steps"]
    lr = args.learning_rate or preset["unet_lr"]
    cfg = _config(args, "unet", preset, steps, lr)
    vae_info = _vae_record(vae_dir, args.init_from)
    cfg["vae_scaling_factor"] = vae_info["scaling_factor"]
    cfg["attribute_dropout"] = args.attribute_dropout
    cfg["init_from"] = None if args.init_from is None else args.init_from.name
    images, captions = scene_cache(args.output_dir / "data", cfg["n_scenes"], args.world_seed,
                                   version=args.world_version)
    vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32).to(device).eval().requires_grad_(False)
    tok = tiny_clip_tokenizer()
    # Token ids of every caption in four forms: whole, without the colour word, without the
    # background phrase, without both (rows v * n + i); the last row is the empty caption.
    variants = [W.drop_attribute_words(c, colour=bool(v & 1), background=bool(v & 2))
                for v in range(4) for c in captions]
    ids = tok(variants + [""], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    n = len(captions)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        unet = build_unet(preset)
        text_encoder = build_text_encoder(preset, tok)
    if args.init_from is not None:  # continue from a finished pipeline (e.g. with --attribute_dropout)
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        unet = UNet2DConditionModel.from_pretrained(args.init_from, subfolder="unet", torch_dtype=torch.float32)
        text_encoder = CLIPTextModel.from_pretrained(args.init_from, subfolder="text_encoder",
                                                     torch_dtype=torch.float32)
    unet.to(device)
    text_encoder.to(device)
    sched_noise = noise_scheduler()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, C.lr_lambda(min(1000, steps // 10 + 1), steps))
    alphas = sched_noise.alphas_cumprod.to(device)
    sf = vae.config.scaling_factor

    def loss_fn(step: int) -> torch.Tensor:
        data_step = 0 if args.fixed_batch else step
        idx = _batch_indices(args.seed, data_step, len(images), cfg["batch_size"])
        rng = C.step_rng(args.seed, data_step, "drop")
        cap_idx = caption_rows(rng, idx, n, cfg["attribute_dropout"])
        g = C.step_generator(args.seed, data_step, "unet", device)
        x = _pixels(images, idx, device)
        with torch.no_grad():
            lat = vae.encode(x).latent_dist.sample(generator=g) * sf
        noise = torch.randn(lat.shape, generator=g, device=device)
        t = torch.randint(0, len(alphas), (lat.shape[0],), generator=g, device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * lat + (1 - a).sqrt() * noise
        with _autocast(args, device):
            enc = text_encoder(ids[cap_idx].to(device))[0]
            pred = unet(noisy, t, encoder_hidden_states=enc).sample.float()
        return F.mse_loss(pred, noise)

    folder = args.output_dir / "unet"
    state, done = C.train_chunked(args=args, folder=folder, modules={"unet": unet, "text_encoder": text_encoder},
                                  optimizer=opt, scheduler=sched, loss_fn=loss_fn, config=cfg,
                                  max_steps=steps, device=device)
    info = {"steps": state.step, "seconds": round(state.seconds, 3), "chunks": state.chunks,
            "final_loss": C.mean_tail(state.losses), "device": C.device_info(device), "config": cfg}
    stages = {"vae": vae_info, "unet": info}
    if args.init_from is not None:  # the stage this one continued, so the record adds up
        stages = {"vae": vae_info, **{f"unet_{k}": v for k, v in _first_unet_stages(args.init_from).items()},
                  "unet": info}
    if done:
        save_pipeline(args, preset, vae, unet, text_encoder, tok, stages, device)
    return info


def _vae_record(vae_dir: Path, init_from: Path | None) -> dict[str, Any]:
    """The VAE stage's record (with ``scaling_factor``): ``vae_dir/pretrain_info.json``, or for a
    pipeline's own ``vae/`` folder (which has none) the ``vae`` stage of the pipeline's record."""
    if (vae_dir / "pretrain_info.json").is_file():
        return json.loads((vae_dir / "pretrain_info.json").read_text())
    if init_from is not None and vae_dir.resolve() == (init_from / "vae").resolve():
        return json.loads((init_from / "pretrain_info.json").read_text())["stages"]["vae"]
    raise FileNotFoundError(f"{vae_dir} has no pretrain_info.json (the VAE stage's record, with its scaling_factor)")


def _first_unet_stages(pipeline: Path) -> dict[str, Any]:
    """The UNet stages recorded in ``pipeline``'s pretrain_info.json, numbered from 1."""
    stages = json.loads((pipeline / "pretrain_info.json").read_text())["stages"]
    unet = [v for k, v in stages.items() if k.startswith("unet")]
    return {str(k + 1): v for k, v in enumerate(unet)}


def _stage_seconds(stage: dict[str, Any]) -> float:
    """Seconds of a stage record and of the stages it continued (a decoder-only VAE nests its first VAE)."""
    return stage["seconds"] + (_stage_seconds(stage["continued"]) if "continued" in stage else 0.0)


def save_pipeline(args: argparse.Namespace, preset: dict[str, Any], vae: Any, unet: Any, text_encoder: Any,
                  tok: Any, stages: dict[str, Any], device: torch.device) -> Path:
    """Save the float16 pipeline to ``OUT/pipeline`` with ``pretrain_info.json`` and ``samples.png``."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tok, unet=unet.eval(),
                                   scheduler=noise_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    samples = None
    prompts = list(SAMPLE_PROMPTS) + (list(SAMPLE_PROMPTS_V2) if args.world_version == 2 else [])
    if args.samples:
        from PIL import Image

        gen = torch.Generator(device).manual_seed(args.seed)
        ims = pipe(prompts, height=64, width=64, num_inference_steps=25, guidance_scale=4.0,
                   generator=gen).images
        samples = Image.new("RGB", (64 * len(ims), 64))
        for k, im in enumerate(ims):
            samples.paste(im, (64 * k, 0))
    pipe.to(torch.float16)
    info = {"model": "mini-sd", "preset": args.preset, "seed": args.seed, "world_seed": args.world_seed,
            "world_version": args.world_version,
            "stages": stages, "device_seconds_total": round(sum(_stage_seconds(s) for s in stages.values()), 1),
            "parameters": count_parameters(preset), "versions": C.versions(),
            "sample_prompts": prompts if samples else []}

    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        info["safetensors_bytes"] = C.safetensors_bytes(tmp)
        C.write_json_atomic(tmp / "pretrain_info.json", info)
        if samples is not None:
            samples.save(tmp / "samples.png")

    final = C.save_folder_atomic(args.output_dir / "pipeline", write)
    print(f"pipeline saved: {final} ({info['safetensors_bytes'] / 1e6:.2f} MB of fp16 safetensors)")
    return final


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--stage", choices=("vae", "unet"), required=True)
    p.add_argument("--preset", choices=tuple(PRESETS), default="mini")
    p.add_argument("--vae_dir", type=Path, default=None,
                   help="unet stage: the trained VAE folder (default OUTPUT_DIR/vae/final, else INIT_FROM/vae)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and training draws")
    p.add_argument("--world_seed", type=int, default=0, help="which image world")
    p.add_argument("--world_version", type=int, choices=W.WORLD_VERSIONS, default=1,
                   help="1: the first world; 2: adds animal toys in many poses and a studio backdrop "
                        "(WORLD_V2.md; the shipped mini-sd ends with a version-2 continuation)")
    p.add_argument("--n_scenes", type=int, default=None, help="training scenes (default: the preset's)")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--learning_rate", type=float, default=None)
    p.add_argument("--mixed_precision", choices=("no", "bf16"), default="bf16", help="bf16 autocast on CUDA")
    p.add_argument("--device", default=None)
    p.add_argument("--attribute_dropout", type=float, default=0.0,
                   help="unet stage: probability of leaving the colour word out of a caption, and, "
                        "independently, the background phrase (0 = whole captions, as mini-sd's first stage)")
    p.add_argument("--init_from", type=Path, default=None,
                   help="start from this pipeline folder, not from scratch: the UNet and text encoder "
                        "(unet stage) or its VAE (vae stage)")
    p.add_argument("--decoder_only", action="store_true",
                   help="vae stage with --init_from: train the decoder only (latents, scaling factor and "
                        "the pipeline's UNet stay valid)")
    p.add_argument("--fixed_batch", action="store_true", help="train on one batch (a check that the loss falls)")
    p.add_argument("--samples", action=argparse.BooleanOptionalAction, default=True,
                   help="render samples.png at the end of the unet stage")
    C.add_chunk_args(p)
    args = p.parse_args(argv)
    C.check_chunk_args(p, args)
    C.check_positive(p, args, ("max_steps", "chunk_steps", "n_scenes", "batch_size"))
    if not 0.0 <= args.attribute_dropout < 1.0:
        p.error(f"--attribute_dropout must be in [0, 1), got {args.attribute_dropout}")
    if args.init_from is not None and not (args.init_from / "unet" / "config.json").is_file():
        p.error(f"--init_from {args.init_from} is not a pipeline folder (no unet/config.json): pass the "
                "folder a finished unet stage saved (OUTPUT_DIR/pipeline), e.g. assets/models/mini-sd")
    if args.decoder_only and (args.stage != "vae" or args.init_from is None):
        p.error("--decoder_only needs --stage vae and --init_from PIPELINE (the VAE whose decoder to train)")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = C.setup_device(args)
    return run_vae(args, device) if args.stage == "vae" else run_unet(args, device)


if __name__ == "__main__":
    main()
