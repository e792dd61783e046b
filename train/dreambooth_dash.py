#!/usr/bin/env python
"""DreamBooth LoRA / LoRA-Dash / AutoLoRA training for Stable Diffusion 1.x/2.x and SDXL.

A drop-in for diffusers' ``train_dreambooth_lora.py`` and ``train_dreambooth_lora_sdxl.py``: every
flag of both scripts parses, and the model family is read from the model's own UNet config (SDXL
when ``addition_embed_type == "text_time"``), so one script serves both. Defaults that differ
between the two reference scripts are resolved after that detection: SD gets learning rate 5e-4,
resolution 512 and ``--adam_weight_decay`` 1e-2; SDXL gets 1e-4, 1024 and 1e-4.

    accelerate launch train/dreambooth_dash.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --instance_data_dir ./my_subject --instance_prompt "a photo of sks cat" \\
        --method dash --rank 4 --gradient_accumulation_steps 4 --max_train_steps 500 \\
        --mixed_precision fp16 --output_dir ./sdxl-dash

``tiny-sd`` / ``tiny-sdxl`` are reserved model names: small random-weight pipelines built locally
(``dashdiff.testing``), for trying the script with no download.

Methods (``--method``)
----------------------
- ``lora``: plain PEFT LoRA on ``--lora_layers`` (Gaussian init, as diffusers).
- ``dash``: LoRA-Dash. Plain LoRA for ``--dash_warmup_steps`` optimizer steps (default
  ``ceil(100 / gradient_accumulation_steps)``, i.e. the published 100 training micro-batches), then
  each layer launches: the ``--dash_directions`` task-specific directions of the frozen weight are
  chosen and a coefficient δ per direction trains alongside A and B. Validation never advances the
  warm-up; a step the fp16 grad scaler skipped does not count.
- ``autolora``: AutoLoRA. A bi-level search of ``--autolora_search_steps`` steps (or
  ``--autolora_search_epochs`` epochs over its images; default ``--max_train_steps``) learns per-layer selection weights α = softmax(β) of an initial rank
  ``--rank``, the per-layer ranks are read off α (``--autolora_threshold``, default 1/k), then a
  fresh plain LoRA with those ranks retrains for ``--max_train_steps`` on all the data. In the
  search, A and B use ``--learning_rate`` and the AdamW flags (the published recipe used 3e-4);
  β uses Adam at ``--autolora_meta_lr`` (3e-4) with betas (0.5, 0.999), as published.

The AutoLoRA validation split for DreamBooth
--------------------------------------------
The search needs held-out data. Here it is *held-out instance images*: a seeded random
``--autolora_val_fraction`` of the instance images (at least one; the rest, at least one, train).
Each search step pairs a training batch (with the class images under prior preservation) with a
validation batch of held-out instance images and their prompts, and no prior term. The validation
batch carries its own noise and timestep draws, independent of the training batch's and derived
from ``--seed`` and the step, so all hypergradient passes see the same noisy inputs and a resumed
search draws the same ones. The retrain phase then trains on all instance images.

Outputs in ``--output_dir``
---------------------------
``pytorch_lora_weights.safetensors`` (a plain LoRA that stock ``pipe.load_lora_weights`` loads;
LoRA-Dash is exported exactly as rank r+s), ``dashdiff_adapter.safetensors`` (the full training
state, ``dashdiff.load_adapter``), ``pytorch_lora_weights_kohya.safetensors`` with
``--output_kohya_format`` (A1111 / ComfyUI), ``validation_<i>.png`` rendered at the end from a fresh
base pipeline with the stock LoRA load (and ``validation/epoch-<e>-<i>.png`` during training),
``README.md`` (model card), ``dashdiff_run.json`` (run record: arguments, their hash, family,
method, processes, launch / rank results), ``dashdiff_steps.jsonl`` (one line per optimizer step:
phase, loss, lr), ``autolora_ranks.json`` for AutoLoRA, ``checkpoint-<n>`` /
``checkpoint-search-<n>`` folders.

Resume and reproducibility
--------------------------
Checkpoints hold the full dashdiff state (``dashdiff_adapter.safetensors``: LoRA factors, δ, the
chosen directions, warm-up counters, β), the optimizer, scheduler, sampler and RNG states. The data
order comes from accelerate's seedable sampler and a resume skips the batches already seen; noise,
timesteps, VAE sampling, augmentation and dropout are drawn from generators derived from
``--seed`` and the position in training. So a resumed run's per-step losses equal an uninterrupted
run's, from any checkpoint (mid-epoch, before or after the LoRA-Dash launch, in either AutoLoRA
phase). ``--resume_from_checkpoint latest`` picks the most advanced checkpoint (a retrain
checkpoint is later than any search checkpoint).

Differences from the diffusers scripts
--------------------------------------
- ``--report_to`` defaults to ``tensorboard`` only when tensorboard is installed, else ``none``;
  naming a tracker that is not installed is an error (diffusers only warns and logs nothing).
- Refused with a message naming the alternative: ``--push_to_hub`` / ``--hub_token`` /
  ``--hub_model_id`` (no hub here: use the output folder), ``--enable_xformers_memory_efficient_attention``
  (PyTorch SDPA is used by default), ``--optimizer prodigy`` and ``--prodigy_*``, ``--use_dora``,
  ``--do_edm_style_training``, ``--class_labels_conditioning`` and ``--validation_images``
  (DeepFloyd IF only), ``--dataset_config_name``, a hub ``--dataset_name``.
- ``--dataset_name`` takes a local folder: images plus an optional ``metadata.jsonl``
  (``{"file_name": ..., "<caption_column>": ...}`` per line, the imagefolder layout).
- A non-empty ``--output_dir`` holding another run's files is refused unless
  ``--resume_from_checkpoint`` or ``--overwrite_output_dir`` (which removes that run's checkpoints,
  step log and run record; other files are overwritten by name).
- Extra flags: ``--method``, ``--lora_alpha`` (default = rank), ``--lora_layers``, ``--dash_*``,
  ``--autolora_*`` (spelled as in the commonsense script: ``train/run_flags.py``; booleans take
  ``--x``, ``--x true|false`` or ``--no-x``), ``--num_inference_steps`` (validation and class-image sampling, default 25),
  ``--save_reference_output`` (writes the trained UNet's output on fixed inputs, to check that a
  stock load reproduces the trained model), ``--overwrite_output_dir``.
- A NaN / inf loss stops training before that step changes any weight, keeping the last checkpoint;
  no final weights are written.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: no hub here

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn
from torch.utils.data import DataLoader, Dataset

if __package__ in (None, ""):
    # Run as a script: make the repository's dashdiff and this folder's modules (input rules and
    # flags shared with the commonsense scripts) importable without installing anything.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import dashdiff  # noqa: E402
from dashdiff import training as T  # noqa: E402
from dashdiff.training import Run as RunBase  # noqa: E402
from dashdiff.files import DIFFUSERS_WEIGHT_NAME  # noqa: E402
from dashdiff.training import TrainingError  # noqa: E402

import input_rules as V  # noqa: E402  (train/: the input rules and flags both scripts share)
import run_flags  # noqa: E402
from run_flags import BoolFlag, add_method_flags, add_run_flags, parse_bool  # noqa: E402

logger = logging.getLogger("dreambooth_dash")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_LORA_LAYERS = "to_k,to_q,to_v,to_out.0"
TEXT_ENCODER_LAYERS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# Defaults the two reference scripts disagree on, resolved once the family is known.
FAMILY_DEFAULTS = {
    "sd": {"learning_rate": 5e-4, "resolution": 512, "adam_weight_decay": 1e-2},
    "sdxl": {"learning_rate": 1e-4, "resolution": 1024, "adam_weight_decay": 1e-4},
}
INTERPOLATION = {
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "nearest_exact": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# Tags that keep the derived random streams apart (training.step_seed(seed, TAG, ...)).
_AUG, _NOISE, _DROPOUT, _VAL_PICK, _VAL_NOISE, _CLASS_GEN = range(1, 7)


# =========================================================================== flags


# Flags of the reference scripts this script does not offer: flag -> (value meaning "off", why + alternative).
UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "push_to_hub": (False, "there is no model hub here: the results are in --output_dir; upload them yourself"),
    "hub_token": (None, "there is no model hub here (see --push_to_hub)"),
    "hub_model_id": (None, "there is no model hub here (see --push_to_hub)"),
    "enable_xformers_memory_efficient_attention": (
        False, "xformers is not used: PyTorch scaled-dot-product attention (the default) is as memory-efficient"),
    "use_dora": (False, "DoRA is not combined with LoRA-Dash / AutoLoRA here; use --method lora|dash|autolora"),
    "do_edm_style_training": (False, "EDM-style training (e.g. Playground v2.5) is not supported; train an "
                                     "epsilon / v-prediction SD or SDXL model"),
    "class_labels_conditioning": (None, "class-label conditioning is for DeepFloyd IF, which is not supported"),
    "validation_images": (None, "--validation_images feeds DeepFloyd IF's upscaler, which is not supported; "
                                "use --validation_prompt"),
    "dataset_config_name": (None, "--dataset_name takes a local folder here (no hub datasets), which has no "
                                  "configurations"),
    "prodigy_beta3": (None, "only --optimizer AdamW is offered (prodigy is not)"),
    "prodigy_decouple": (None, "only --optimizer AdamW is offered (prodigy is not)"),
    "prodigy_use_bias_correction": (None, "only --optimizer AdamW is offered (prodigy is not)"),
    "prodigy_safeguard_warmup": (None, "only --optimizer AdamW is offered (prodigy is not)"),
}
# Flags that belong to one method (None = not given): refused with another method (input_rules).
METHOD_OPTIONS: dict[str, str] = run_flags.METHOD_OPTIONS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dreambooth_dash.py",
        description="DreamBooth LoRA / LoRA-Dash / AutoLoRA for SD 1.x/2.x and SDXL (see the module docstring).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", required=True,
                   help="Local diffusers folder (or tiny-sd / tiny-sdxl). SD vs SDXL is read from its UNet config.")
    g.add_argument("--pretrained_vae_model_name_or_path", default=None, help="A VAE to use instead of the model's (e.g. the fp16-fix SDXL VAE).")
    g.add_argument("--revision", default=None)
    g.add_argument("--variant", default=None, help="Weight variant, e.g. fp16.")
    g.add_argument("--tokenizer_name", default=None, help="Tokenizer folder if not the model's own (SD).")
    g.add_argument("--cache_dir", default=None, help="Where downloaded/cached models are kept.")

    g = p.add_argument_group("data")
    g.add_argument("--instance_data_dir", default=None, help="Folder of instance images (every file must be an image).")
    g.add_argument("--dataset_name", default=None,
                   help="Local folder of images with an optional metadata.jsonl (imagefolder layout) for captions.")
    g.add_argument("--dataset_config_name", default=None, help=argparse.SUPPRESS)
    g.add_argument("--image_column", default="image", help="metadata.jsonl key of the image file (else 'file_name').")
    g.add_argument("--caption_column", default=None, help="metadata.jsonl key of the caption (else --instance_prompt).")
    g.add_argument("--repeats", type=int, default=1, help="Repeat the instance images this many times per epoch.")
    g.add_argument("--instance_prompt", default=None, required=True, help="Prompt with the identifier, e.g. 'a photo of sks cat'.")
    g.add_argument("--class_data_dir", default=None, help="Folder of class images (filled up by generation if short).")
    g.add_argument("--class_prompt", default=None, help="Prompt of the class images.")
    g.add_argument("--with_prior_preservation", action=BoolFlag, default=False, help="Add the prior-preservation loss.")
    g.add_argument("--prior_loss_weight", type=float, default=1.0)
    g.add_argument("--num_class_images", type=int, default=100, help="Class images wanted; missing ones are generated.")
    g.add_argument("--sample_batch_size", type=int, default=4, help="Batch size for generating class images.")
    g.add_argument("--prior_generation_precision", default=None, choices=["no", "fp32", "fp16", "bf16"])
    g.add_argument("--resolution", type=int, default=None, help="Training resolution (default: 512 SD, 1024 SDXL).")
    g.add_argument("--center_crop", action=BoolFlag, default=False, help="Center crop instead of random crop.")
    g.add_argument("--random_flip", action=BoolFlag, default=False, help="Random horizontal flip.")
    g.add_argument("--image_interpolation_mode", default="lanczos", choices=sorted(INTERPOLATION))
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument("--cache_latents", action=BoolFlag, default=False,
                   help="Encode the images with the VAE once (one crop/flip per image, as diffusers).")

    g = p.add_argument_group("text encoder")
    g.add_argument("--train_text_encoder", action=BoolFlag, default=False,
                   help="Also adapt the text encoder(s) (q_proj, k_proj, v_proj, out_proj) with the same method.")
    g.add_argument("--text_encoder_lr", type=float, default=None, help="Learning rate of the text encoder adapters (default: --learning_rate).")
    g.add_argument("--adam_weight_decay_text_encoder", type=float, default=None)
    g.add_argument("--pre_compute_text_embeddings", action=BoolFlag, default=False,
                   help="Encode every prompt once before training (frozen text encoders are otherwise run once per "
                        "new prompt and cached; not with --train_text_encoder).")
    g.add_argument("--tokenizer_max_length", type=int, default=None)
    g.add_argument("--text_encoder_use_attention_mask", action=BoolFlag, default=False)

    add_method_flags(p, method="lora", rank=4, lora_alpha=None, lora_dropout=0.0, dash_prefetch_spectra=True,
                     prefetch_help=", ~5 GB for the SDXL UNet")
    g = p.add_argument_group("adapter (this script)")
    g.add_argument("--lora_layers", default=DEFAULT_LORA_LAYERS, help="Comma-separated UNet nn.Linear module names.")

    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=4)
    g.add_argument("--num_train_epochs", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--learning_rate", type=float, default=None, help="Default: 5e-4 SD, 1e-4 SDXL.")
    g.add_argument("--scale_lr", action=BoolFlag, default=False, help="Multiply the lr by processes x batch x accumulation.")
    g.add_argument("--lr_scheduler", default="constant",
                   choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"])
    g.add_argument("--lr_warmup_steps", type=int, default=500)
    g.add_argument("--lr_num_cycles", type=int, default=1)
    g.add_argument("--lr_power", type=float, default=1.0)
    g.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR weighting gamma (5.0 recommended).")
    g.add_argument("--optimizer", default="AdamW", help="AdamW (prodigy is not offered).")
    g.add_argument("--use_8bit_adam", action=BoolFlag, default=False, help="bitsandbytes' 8-bit AdamW (needs bitsandbytes).")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=None, help="Default: 1e-2 SD, 1e-4 SDXL.")
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--allow_tf32", action=BoolFlag, default=False)
    for name in ("prodigy_beta3",):
        g.add_argument(f"--{name}", type=float, default=None, help=argparse.SUPPRESS)
    for name in ("prodigy_decouple", "prodigy_use_bias_correction", "prodigy_safeguard_warmup"):
        g.add_argument(f"--{name}", type=parse_bool, default=None, help=argparse.SUPPRESS)

    g = p.add_argument_group("validation")
    g.add_argument("--validation_prompt", default=None)
    g.add_argument("--num_validation_images", type=int, default=4)
    g.add_argument("--validation_epochs", type=int, default=50, help="Render validation images every N epochs.")
    g.add_argument("--num_inference_steps", type=int, default=25, help="Sampling steps for validation / class images.")
    g.add_argument("--validation_images", nargs="+", default=None, help=argparse.SUPPRESS)

    add_run_flags(p, output_dir="lora-dreambooth-model", seed=None, checkpointing_steps=500,
                  checkpoints_total_limit=None)
    g = p.add_argument_group("outputs (this script)")
    g.add_argument("--output_kohya_format", action=BoolFlag, default=False, help="Also write pytorch_lora_weights_kohya.safetensors.")
    g.add_argument("--save_reference_output", action=BoolFlag, default=False,
                   help="Write reference_output.safetensors: the trained UNet's output on fixed inputs.")

    g = p.add_argument_group("logging")
    default_report = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
    g.add_argument("--report_to", default=default_report,
                   help=f"tensorboard, wandb, comet_ml, all or none (default here: {default_report}, "
                        "tensorboard only when installed).")
    g.add_argument("--logging_dir", default="logs")
    g.add_argument("--local_rank", type=int, default=-1, help="Set by launchers; accelerate reads the environment.")

    g = p.add_argument_group("unsupported (parse, then refused with the alternative)")
    g.add_argument("--push_to_hub", action=BoolFlag, default=False, help=argparse.SUPPRESS)
    g.add_argument("--hub_token", default=None, help=argparse.SUPPRESS)
    g.add_argument("--hub_model_id", default=None, help=argparse.SUPPRESS)
    g.add_argument("--enable_xformers_memory_efficient_attention", action=BoolFlag, default=False, help=argparse.SUPPRESS)
    g.add_argument("--use_dora", action=BoolFlag, default=False, help=argparse.SUPPRESS)
    g.add_argument("--do_edm_style_training", action=BoolFlag, default=False, help=argparse.SUPPRESS)
    g.add_argument("--class_labels_conditioning", default=None, help=argparse.SUPPRESS)
    return p


def check_args(args: argparse.Namespace) -> list[str]:
    """Every problem that can be seen without loading a model, as messages (empty: fine)."""
    errors: list[str] = []
    for name, (off, why) in UNSUPPORTED.items():
        if getattr(args, name) not in (off, None, False):
            errors.append(f"--{name} is not supported: {why}")
    if args.optimizer.lower() != "adamw":
        errors.append(f"--optimizer {args.optimizer} is not supported: only AdamW (use --optimizer AdamW)")
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        errors.append("--use_8bit_adam needs bitsandbytes, which is not installed: `pip install bitsandbytes` "
                      "or drop the flag")
    trackers = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml"}
    wanted = list(trackers) if args.report_to == "all" else [t for t in args.report_to.split(",") if t]
    for t in wanted:
        if t == "none":
            continue
        if t not in trackers:
            errors.append(f"--report_to {t}: unknown tracker (use tensorboard, wandb, comet_ml, all or none)")
        elif args.report_to != "all" and importlib.util.find_spec(trackers[t]) is None:
            errors.append(f"--report_to {t}: {trackers[t]} is not installed (pip install {trackers[t]}, or "
                          "--report_to none)")

    if (args.instance_data_dir is None) == (args.dataset_name is None):
        errors.append("give exactly one of --instance_data_dir (a folder of images) or --dataset_name (a local folder "
                      "with metadata.jsonl)")
    if args.dataset_name is not None and not Path(args.dataset_name).is_dir():
        errors.append(f"--dataset_name {args.dataset_name}: not a local folder (no hub datasets here; pass a folder of "
                      "images with an optional metadata.jsonl, or use --instance_data_dir)")
    if args.caption_column is not None and args.dataset_name is None:
        errors.append("--caption_column needs --dataset_name (a folder with metadata.jsonl)")
    if args.with_prior_preservation:
        if not args.class_prompt:
            errors.append("--with_prior_preservation needs --class_prompt (the prompt of the class images, e.g. "
                          "'a photo of a cat')")
        if not args.class_data_dir:
            errors.append("--with_prior_preservation needs --class_data_dir (missing class images are generated there)")
    if args.resolution is not None and (args.resolution <= 0 or args.resolution % 8):
        errors.append(f"--resolution {args.resolution} must be a positive multiple of 8 (the VAE downsamples by 8)")
    positive = ["rank", "train_batch_size", "num_train_epochs", "gradient_accumulation_steps", "repeats",
                "sample_batch_size", "num_validation_images", "validation_epochs", "checkpointing_steps",
                "num_inference_steps"]
    for name in positive:
        if getattr(args, name) < 1:
            errors.append(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("max_train_steps", "autolora_search_steps", "checkpoints_total_limit", "dash_directions"):
        v = getattr(args, name)
        if v is not None and v < 1:
            errors.append(f"--{name} must be >= 1, got {v}")
    if args.dash_warmup_steps is not None and args.dash_warmup_steps < 0:
        errors.append(f"--dash_warmup_steps must be >= 0, got {args.dash_warmup_steps}")
    if not 0.0 <= args.lora_dropout < 1.0:
        errors.append(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if args.lora_alpha is not None and args.lora_alpha <= 0:
        errors.append(f"--lora_alpha must be > 0, got {args.lora_alpha}")
    layers = [s.strip() for s in args.lora_layers.split(",")]
    if not all(layers):
        errors.append(f"--lora_layers {args.lora_layers!r}: empty name in the comma-separated list")
    if args.autolora_val_fraction is not None and not 0 < args.autolora_val_fraction < 1:
        errors.append(f"--autolora_val_fraction must be in (0, 1), got {args.autolora_val_fraction}")
    if args.autolora_threshold is not None and not 0 < args.autolora_threshold <= 1:
        errors.append(f"--autolora_threshold must be in (0, 1], got {args.autolora_threshold}")
    # Method-specific flags with another method would be silently ignored: say so instead.
    errors += V.method_option_errors(args, args.method, METHOD_OPTIONS, "--method")
    errors += [e for e in (V.seed_error(args.seed), run_flags.search_length_error(args),
                           V.positive_finite_error("--learning_rate", args.learning_rate),
                           V.positive_finite_error("--text_encoder_lr", args.text_encoder_lr),
                           V.positive_finite_error("--autolora_meta_lr", args.autolora_meta_lr)) if e]
    if args.method == "dash" and args.max_train_steps is not None and args.gradient_accumulation_steps >= 1:
        warmup = args.dash_warmup_steps
        if warmup is None:
            warmup = T.default_dash_warmup_steps(args.gradient_accumulation_steps)
        error = V.dash_warmup_error(warmup, args.max_train_steps, "--max_train_steps")
        if error:
            errors.append(error)
    if args.with_prior_preservation and args.class_data_dir:
        try:
            V.check_class_dir(args.class_data_dir, [args.instance_data_dir, args.dataset_name])
        except TrainingError as err:
            errors.append(str(err))
    if args.method == "autolora" and args.train_text_encoder:
        errors.append("--train_text_encoder with --method autolora is not supported: the rank search runs on the "
                      "UNet; use --method lora or dash to adapt the text encoder too")
    if args.train_text_encoder and args.pre_compute_text_embeddings:
        errors.append("--pre_compute_text_embeddings frees the text encoders, so it cannot go with --train_text_encoder")
    if args.resume_from_checkpoint and args.overwrite_output_dir:
        errors.append("--resume_from_checkpoint and --overwrite_output_dir contradict each other: pick one")
    return errors


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the flags (no model is loaded). Errors exit with a message, like argparse."""
    parser = build_parser()
    args = parser.parse_args(argv)
    env_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_rank != -1:
        args.local_rank = env_rank
    errors = check_args(args)
    if errors:
        parser.error("\n  ".join(errors))
    args.lora_layers = [s.strip() for s in args.lora_layers.split(",")]
    return args


# =========================================================================== model family


def resolve_model_path(args: argparse.Namespace) -> str:
    from dashdiff.testing import resolve_model

    return resolve_model(args.pretrained_model_name_or_path)


def detect_family(model_path: str, revision: Optional[str] = None) -> str:
    """'sd' or 'sdxl', from the UNet's config: SDXL conditions on pooled text + size ids ('text_time')."""
    from diffusers import UNet2DConditionModel

    try:
        cfg = UNet2DConditionModel.load_config(model_path, subfolder="unet", revision=revision)
    except (OSError, ValueError, EnvironmentError) as err:
        raise TrainingError(
            f"--pretrained_model_name_or_path {model_path}: no UNet config found ({err.__class__.__name__}). This "
            "script trains SD 1.x/2.x and SDXL diffusers folders (with unet/config.json); no hub downloads here."
        ) from None
    if cfg.get("_class_name") != "UNet2DConditionModel":
        raise TrainingError(f"{model_path}: unet is a {cfg.get('_class_name')}, not an SD / SDXL UNet2DConditionModel")
    return "sdxl" if cfg.get("addition_embed_type") == "text_time" else "sd"


def resolve_defaults(args: argparse.Namespace, family: str) -> None:
    """Fill in the defaults that depend on the family or on other flags (in place)."""
    for key, value in FAMILY_DEFAULTS[family].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.resolution % 8:
        raise TrainingError(f"--resolution {args.resolution} must be a multiple of 8")
    run_flags.fill_method_defaults(args)
    if args.dash_warmup_steps is None:
        args.dash_warmup_steps = T.default_dash_warmup_steps(args.gradient_accumulation_steps)
    if args.text_encoder_lr is None:
        args.text_encoder_lr = args.learning_rate
    if args.adam_weight_decay_text_encoder is None:
        args.adam_weight_decay_text_encoder = args.adam_weight_decay
    if args.seed is None:
        # Every random draw derives from the seed (exact resume): fix one and record it.
        args.seed = 0


# =========================================================================== data


@dataclass
class Item:
    path: Path
    prompt: str


def load_image(path: Path) -> Image.Image:
    """Open, EXIF-rotate and convert to 8-bit RGB (16-bit and transparent images as a user means them,
    see ``input_rules.to_rgb``); a bad or oversized file raises naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return V.to_rgb(img, path)
    except TrainingError:  # to_rgb's own refusal, already one line naming the file
        raise
    except V.image_exceptions() as err:
        raise TrainingError(V.image_error(path, err)) from None


def image_files(folder: Path, what: str) -> list[Path]:
    """Every regular, non-hidden file of ``folder`` (sorted): all must be images."""
    if not folder.exists():
        raise TrainingError(f"{what} {folder} does not exist")
    if not folder.is_dir():
        raise TrainingError(f"{what} {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return files


def check_images(files: Sequence[Path]) -> None:
    """Open every image once before training starts: a bad file stops the run here, not mid-way."""
    for path in files:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise TrainingError(
                f"{path}: not an image file (suffix {path.suffix or 'none'}; expected one of "
                f"{', '.join(IMAGE_SUFFIXES)}). Move it out of the image folder."
            )
        try:
            with Image.open(path) as img:
                img.verify()
                mode = img.mode
        except V.image_exceptions() as err:
            raise TrainingError(V.image_error(path, err)) from None
        if mode == "F":
            V.to_rgb(Image.new("F", (1, 1)), path)  # refused: no defined 0-255 range


def instance_items(args: argparse.Namespace) -> list[Item]:
    """The instance images with their prompts (caption or --instance_prompt), checked; without
    --repeats (applied after the AutoLoRA split, so no image lands on both sides)."""
    if args.instance_data_dir is not None:
        folder = Path(args.instance_data_dir)
        files = image_files(folder, "--instance_data_dir")
        if not files:
            raise TrainingError(f"--instance_data_dir {folder} is empty: put the subject's images in it")
        check_images(files)
        items = [Item(f, args.instance_prompt) for f in files]
    else:
        folder = Path(args.dataset_name)
        meta = folder / "metadata.jsonl"
        if meta.exists():
            items = []
            for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise TrainingError(f"{meta} line {n}: not valid JSON ({err})") from None
                name = row.get(args.image_column) or row.get("file_name")
                if not isinstance(name, str):
                    raise TrainingError(f"{meta} line {n}: no image file name under {args.image_column!r} or 'file_name'")
                prompt = args.instance_prompt
                if args.caption_column is not None:
                    if args.caption_column not in row:
                        raise TrainingError(f"{meta} line {n}: no caption column {args.caption_column!r} "
                                            f"(keys: {', '.join(sorted(row))})")
                    prompt = str(row[args.caption_column])
                items.append(Item(folder / name, prompt))
            missing = [str(i.path) for i in items if not i.path.is_file()]
            if missing:
                raise TrainingError(f"{meta} names files that do not exist: {', '.join(missing[:5])}")
        else:
            if args.caption_column is not None:
                raise TrainingError(f"--caption_column {args.caption_column}: {folder} has no metadata.jsonl")
            items = [Item(f, args.instance_prompt) for f in image_files(folder, "--dataset_name")]
        if not items:
            raise TrainingError(f"--dataset_name {folder} holds no images")
        check_images([i.path for i in items])
    return items


class DreamBoothDataset(Dataset):
    """Instance (and class) images, resized, flipped and cropped with a generator derived from
    (seed, epoch, index): augmentation is reproducible and a resumed run gets the same crops."""

    def __init__(self, items: Sequence[Item], class_items: Sequence[Item], size: int, center_crop: bool,
                 random_flip: bool, interpolation: str, seed: int) -> None:
        self.items, self.class_items = list(items), list(class_items)
        self.size, self.center_crop, self.random_flip = size, center_crop, random_flip
        self.resample = INTERPOLATION[interpolation]
        self.seed = seed
        self.epoch = 0
        self.cached: Optional[list[dict]] = None  # with --cache_latents: per index, the VAE's latent distribution

    def set_epoch(self, epoch: int) -> None:  # called by accelerate's DataLoaderShard.set_epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return max(len(self.items), len(self.class_items))

    def _transform(self, path: Path, gen: torch.Generator) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        img = load_image(path)
        original = (img.height, img.width)
        scale = self.size / min(img.width, img.height)
        img = img.resize((max(self.size, round(img.width * scale)), max(self.size, round(img.height * scale))),
                         self.resample)
        if self.random_flip and torch.rand((), generator=gen) < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.center_crop:
            top, left = (img.height - self.size) // 2, (img.width - self.size) // 2
        else:
            top = int(torch.randint(0, img.height - self.size + 1, (), generator=gen))
            left = int(torch.randint(0, img.width - self.size + 1, (), generator=gen))
        img = img.crop((left, top, left + self.size, top + self.size))
        pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(self.size, self.size, 3)
        pixels = pixels.permute(2, 0, 1).float().div(127.5).sub(1.0)
        return pixels, original, (top, left)

    def example(self, index: int, epoch: int) -> dict[str, Any]:
        gen = T.step_generator(self.seed, _AUG, epoch, index)
        item = self.items[index % len(self.items)]
        out: dict[str, Any] = {"index": index, "prompt": item.prompt}
        if self.cached is not None:
            out.update(self.cached[index])
        else:
            out["pixel_values"], out["original_size"], out["crop_top_left"] = self._transform(item.path, gen)
        if self.class_items:
            c = self.class_items[index % len(self.class_items)]
            out["class_prompt"] = c.prompt
            if self.cached is None:
                out["class_pixel_values"], out["class_original_size"], out["class_crop_top_left"] = self._transform(
                    c.path, gen)
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.example(index, self.epoch)


def collate(examples: list[dict]) -> dict[str, Any]:
    """Instance examples first, class examples after (one forward for both, as diffusers)."""
    batch: dict[str, Any] = {"index": torch.tensor([e["index"] for e in examples])}
    prior = "class_prompt" in examples[0]
    batch["prompts"] = [e["prompt"] for e in examples] + ([e["class_prompt"] for e in examples] if prior else [])
    if "latent_params" in examples[0]:
        params = [e["latent_params"] for e in examples] + ([e["class_latent_params"] for e in examples] if prior else [])
        batch["latent_params"] = torch.stack(params)
        keys = ("original_size", "crop_top_left")
    else:
        pix = [e["pixel_values"] for e in examples] + ([e["class_pixel_values"] for e in examples] if prior else [])
        batch["pixel_values"] = torch.stack(pix).contiguous()
        keys = ("original_size", "crop_top_left")
    for key in keys:
        vals = [e[key] for e in examples] + ([e[f"class_{key}"] for e in examples] if prior else [])
        batch[key] = torch.tensor(vals, dtype=torch.long)
    return batch


def class_items(args: argparse.Namespace) -> list[Item]:
    if not args.with_prior_preservation:
        return []
    files = image_files(Path(args.class_data_dir), "--class_data_dir")
    check_images(files)
    return [Item(f, args.class_prompt) for f in files[: args.num_class_images]]


# =========================================================================== models


@dataclass
class Models:
    family: str
    path: str
    tokenizers: list
    text_encoders: list[nn.Module]
    vae: nn.Module
    unet: nn.Module
    noise_scheduler: Any
    weight_dtype: torch.dtype


class AdapterHost:
    """What dashdiff's export / state / dash functions walk: the adapted components by their
    diffusers names (unwrapped), so the saved keys are ``unet.…`` / ``text_encoder.…``."""

    def __init__(self, unet: nn.Module, text_encoders: Sequence[nn.Module] = ()) -> None:
        self.unet = unet
        names = ("text_encoder", "text_encoder_2")
        for name, te in zip(names, text_encoders):
            setattr(self, name, te)


def load_models(args: argparse.Namespace, family: str, path: str, weight_dtype: torch.dtype) -> Models:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    kw = dict(revision=args.revision)
    tok_path = args.tokenizer_name or path
    tok_sub = None if args.tokenizer_name else "tokenizer"
    tokenizers = [AutoTokenizer.from_pretrained(tok_path, subfolder=tok_sub, **kw)]
    encoders: list[nn.Module] = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=args.variant, **kw)]
    if family == "sdxl":
        tokenizers.append(AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw))
        encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2",
                                                                    variant=args.variant, **kw))
    if args.pretrained_vae_model_name_or_path:
        vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, **kw)
    else:
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=args.variant, **kw)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=args.variant, **kw)
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
    for m in [vae, unet, *encoders]:
        m.requires_grad_(False)
    return Models(family, path, tokenizers, encoders, vae, unet, noise_scheduler, weight_dtype)


def linear_module_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.Linear]


def check_lora_layers(unet: nn.Module, wanted: Sequence[str]) -> None:
    """Each --lora_layers name must match nn.Linear modules (PEFT matches dotted suffixes)."""
    names = linear_module_names(unet)
    bad = [w for w in wanted if not any(n == w or n.endswith("." + w) for n in names)]
    if not bad:
        return
    valid = set()
    for n in names:
        parts = n.split(".")
        # 'to_out.0' style names: the index alone would be meaningless.
        valid.add(".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1])
    raise TrainingError(
        f"--lora_layers: {', '.join(bad)} match no nn.Linear module of this UNet. Valid names: "
        f"{', '.join(sorted(valid))}"
    )


def adapter_config(args: argparse.Namespace, targets: list[str]):
    """The PEFT config of --method for ``targets`` (AutoLoRA: the search adapter)."""
    from peft import LoraConfig

    common = dict(r=args.rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                  init_lora_weights="gaussian", target_modules=targets)
    if args.method == "dash":
        return dashdiff.LoraDashConfig(**common, dash_warmup_steps=args.dash_warmup_steps,
                                       dash_directions=args.dash_directions)
    if args.method == "autolora":
        return dashdiff.AutoLoraConfig(**common, autolora_threshold=args.autolora_threshold,
                                       autolora_rank_rule=args.autolora_rank_rule)
    return LoraConfig(**common)


def add_text_encoder_adapter(text_encoder: nn.Module, config) -> None:
    """Attach ``config`` to a transformers text encoder with PEFT's ``inject_adapter_in_model``.

    Not transformers' ``PreTrainedModel.add_adapter``: that wrapper refuses PEFT releases older than
    a minimum each transformers release sets (5.24.0 wants PEFT >= 0.22, which does not exist), and
    it adds nothing training needs. The layers, their initialisation (same RNG draws) and the
    recorded ``base_model_name_or_path`` are what ``add_adapter`` gives."""
    from peft import inject_adapter_in_model

    config.base_model_name_or_path = text_encoder.__dict__.get("name_or_path", None)  # as add_adapter records it
    inject_adapter_in_model(config, text_encoder)


def retrain_adapter_config(args: argparse.Namespace, ranks: dict[str, int]):
    from dashdiff.autolora import retrain_config

    return retrain_config(ranks, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                          init_lora_weights="gaussian")


def trainable(modules: Sequence[nn.Module]) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters() if p.requires_grad]


# =========================================================================== text and noise


def tokenize(tokenizer, prompts: Sequence[str], max_length: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    out = tokenizer(list(prompts), padding="max_length", truncation=True,
                    max_length=max_length or tokenizer.model_max_length, return_tensors="pt")
    return out.input_ids, out.attention_mask


def encode_prompts(models: Models, encoders: Sequence[nn.Module], prompts: Sequence[str], args: argparse.Namespace,
                   device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(prompt_embeds, pooled) as the pipelines compute them: SD the last hidden state; SDXL the
    penultimate hidden states of both encoders concatenated, pooled from the second."""
    if models.family == "sd":
        ids, mask = tokenize(models.tokenizers[0], prompts, args.tokenizer_max_length)
        am = mask.to(device) if args.text_encoder_use_attention_mask else None
        return encoders[0](ids.to(device), attention_mask=am)[0], None
    embeds, pooled = [], None
    for tok, enc in zip(models.tokenizers, encoders):
        ids, _ = tokenize(tok, prompts, args.tokenizer_max_length)
        out = enc(ids.to(device), output_hidden_states=True)
        pooled = out[0]
        embeds.append(out.hidden_states[-2])
    return torch.cat(embeds, dim=-1), pooled


class PromptCache:
    """Frozen text encoders give each prompt one embedding: compute it once, keep it on CPU."""

    def __init__(self) -> None:
        self.store: dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]] = {}

    def get(self, models: Models, prompts: Sequence[str], args, device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        new = [p for p in dict.fromkeys(prompts) if p not in self.store]
        if new:
            with torch.no_grad():
                e, pooled = encode_prompts(models, models.text_encoders, new, args, device)
            for i, p in enumerate(new):
                self.store[p] = (e[i].float().cpu(), None if pooled is None else pooled[i].float().cpu())
        embeds = torch.stack([self.store[p][0] for p in prompts]).to(device)
        pooled = None if models.family == "sd" else torch.stack([self.store[p][1] for p in prompts]).to(device)
        return embeds, pooled


def draw_inputs(batch: dict[str, Any], models: Models, gen: torch.Generator, device: torch.device,
                args: argparse.Namespace, vae_dtype: torch.dtype) -> dict[str, Any]:
    """Everything random about one micro-batch, drawn from ``gen``: VAE sample, noise, timesteps.
    The result is what ``compute_loss`` needs besides the text conditioning."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    with torch.no_grad():
        if "latent_params" in batch:
            dist = DiagonalGaussianDistribution(batch["latent_params"].to(device))
        else:
            dist = models.vae.encode(batch["pixel_values"].to(device, vae_dtype)).latent_dist
        latents = dist.sample(generator=gen).float()
        shift = getattr(models.vae.config, "shift_factor", None) or 0.0
        latents = (latents - shift) * models.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=gen).to(device)
    bsz = latents.shape[0]
    sched = models.noise_scheduler
    timesteps = torch.randint(0, sched.config.num_train_timesteps, (bsz,), generator=gen).to(device)
    noisy = sched.add_noise(latents, noise, timesteps)
    if sched.config.prediction_type == "epsilon":
        target = noise
    elif sched.config.prediction_type == "v_prediction":
        target = sched.get_velocity(latents, noise, timesteps)
    else:
        raise TrainingError(f"unsupported prediction_type {sched.config.prediction_type!r} in the model's scheduler")
    out = {"noisy": noisy, "timesteps": timesteps, "target": target, "prompts": batch["prompts"]}
    if models.family == "sdxl":
        # The target size is made where the batch's sizes are (accelerate's loader has moved them to
        # the GPU): a CPU tensor here broke every SDXL step on a GPU (issue 12).
        size = batch["original_size"]
        target = size.new_full((size.shape[0], 2), args.resolution)
        ids = torch.cat([size, batch["crop_top_left"].to(size.device), target], dim=1)
        out["time_ids"] = ids.to(device)
    return out


class LossFn:
    """The DreamBooth loss of one prepared micro-batch; deterministic given its inputs (the
    AutoLoRA hypergradient passes call it several times on one batch)."""

    def __init__(self, models: Models, args: argparse.Namespace, cache: PromptCache, train_encoders: Sequence[nn.Module],
                 prior: bool) -> None:
        self.models, self.args, self.cache = models, args, cache
        self.train_encoders = list(train_encoders)
        self.prior = prior

    def conditioning(self, prompts: Sequence[str], device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.train_encoders:
            return encode_prompts(self.models, self.train_encoders, prompts, self.args, device)
        return self.cache.get(self.models, prompts, self.args, device)

    def __call__(self, unet: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        noisy = inputs["noisy"]
        embeds, pooled = self.conditioning(inputs["prompts"], noisy.device)
        unet_dtype = next(p for p in unet.parameters()).dtype
        kwargs = {}
        if self.models.family == "sdxl":
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(unet_dtype), "time_ids": inputs["time_ids"].to(unet_dtype)}
        pred = unet(noisy.to(unet_dtype), inputs["timesteps"], embeds.to(unet_dtype), return_dict=False, **kwargs)[0]
        mask = None
        if self.prior and inputs.get("prior", True):  # a doubled batch carries its own mask
            mask = inputs.get("prior_mask")
            if mask is None:
                mask = prior_half_mask(pred.shape[0], pred.device)
        return compute_loss(pred.float(), inputs["target"].float(), inputs["timesteps"], self.models.noise_scheduler,
                            self.args, mask)


def prior_half_mask(n: int, device) -> torch.Tensor:
    """(n,) bool, true for the class images, which fill the second half of a micro-batch under prior
    preservation (``collate``)."""
    return torch.arange(n, device=device) >= n // 2


def double_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """A micro-batch twice over (the AutoLoRA search's batched finite-difference pass): tensors and
    prompts repeated along the batch, the prior mask with them, so ``compute_loss`` of the result
    is the mean of the two copies' losses."""
    from dashdiff.autolora import double_batch

    out = double_batch({k: v for k, v in inputs.items() if k != "prompts"})
    out["prompts"] = list(inputs["prompts"]) * 2
    if inputs.get("prior", True) and "prior_mask" not in inputs:
        mask = prior_half_mask(inputs["noisy"].shape[0], inputs["noisy"].device)
        out["prior_mask"] = torch.cat([mask, mask])
    return out


def compute_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, scheduler, args,
                 prior_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MSE (Min-SNR weighted with --snr_gamma) over the instance samples, plus ``--prior_loss_weight``
    times the MSE over the class samples where ``prior_mask`` (batch,) is true (prior preservation).

    Means of per-sample means (the samples have equal sizes, so this is diffusers' element mean),
    selected by multiplying with the mask rather than by indexing, which would sync a GPU."""
    mse = F.mse_loss(pred, target, reduction="none").mean(dim=list(range(1, pred.ndim)))  # (batch,)
    per_sample = mse
    if args.snr_gamma is not None:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(scheduler, timesteps)
        weights = torch.stack([snr, args.snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
        weights = weights / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else weights / snr
        per_sample = per_sample * weights
    if prior_mask is None:
        return per_sample.mean()
    cls = prior_mask.to(per_sample.dtype)
    inst = 1 - cls
    loss = (per_sample * inst).sum() / inst.sum()
    return loss + args.prior_loss_weight * (mse * cls).sum() / cls.sum()  # no SNR weight on the prior


# =========================================================================== pipelines


def build_pipeline(models: Models, unet: nn.Module, encoders: Sequence[nn.Module], dtype: torch.dtype):
    """A pipeline over the training modules (no reload) with DPM-Solver, for validation renders."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    sched = DPMSolverMultistepScheduler.from_config(models.noise_scheduler.config)
    if models.family == "sd":
        pipe = StableDiffusionPipeline(vae=models.vae, text_encoder=encoders[0], tokenizer=models.tokenizers[0],
                                       unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLPipeline(vae=models.vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                         tokenizer=models.tokenizers[0], tokenizer_2=models.tokenizers[1], unet=unet,
                                         scheduler=sched, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, prompt: str, n: int, args: argparse.Namespace, device: torch.device) -> list[Image.Image]:
    """``n`` images, each from its own seeded generator (the global RNG is not touched)."""
    images = []
    for i in range(n):
        gen = torch.Generator(device="cpu").manual_seed(args.seed + i)
        with torch.no_grad():
            images.append(pipe(prompt, num_inference_steps=args.num_inference_steps, generator=gen,
                               height=args.resolution, width=args.resolution).images[0])
    return images


def generate_class_images(args: argparse.Namespace, models: Models, accelerator) -> None:
    """Fill --class_data_dir up to --num_class_images with the base model's renders of --class_prompt."""
    folder = Path(args.class_data_dir)
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        have = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
        missing = args.num_class_images - len(have)
        if missing > 0:
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "no": torch.float32}.get(
                args.prior_generation_precision or "fp32", torch.float32)
            if accelerator.device.type == "cpu" and dtype == torch.float16:
                dtype = torch.float32  # fp16 matmuls on CPU are slow or unsupported
            for m in [models.unet, models.vae, *models.text_encoders]:
                m.to(accelerator.device, dtype)
            pipe = build_pipeline(models, models.unet, models.text_encoders, dtype)
            logger.info("generating %d class images for %r into %s", missing, args.class_prompt, folder)
            start = len(have)
            for first in range(0, missing, args.sample_batch_size):
                count = min(args.sample_batch_size, missing - first)
                gens = [T.step_generator(args.seed, _CLASS_GEN, start + first + i) for i in range(count)]
                with torch.no_grad():
                    images = pipe([args.class_prompt] * count, num_inference_steps=args.num_inference_steps,
                                  generator=gens, height=args.resolution, width=args.resolution).images
                for i, img in enumerate(images):
                    img.save(folder / f"class-{start + first + i:05d}.png")
            for m in [models.unet, models.vae, *models.text_encoders]:
                m.to(dtype=torch.float32)
    accelerator.wait_for_everyone()


# =========================================================================== training state


@dataclass
class Phase:
    """One optimisation phase: 'train' (LoRA / LoRA-Dash / AutoLoRA retrain) or 'search'."""

    name: str
    max_steps: int
    dataloader: Any
    optimizer: Any
    scheduler: Any
    updates_per_epoch: int


def make_optimizer(args, groups: list[dict]):
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    extra = {}
    if cls is torch.optim.AdamW and T.fused_adamw_ok([p for g in groups for p in g["params"]]):
        # one kernel for all parameters: LoRA-Dash adds a third tensor (δ) per layer, which the
        # default AdamW pays for per tensor on the host (BENCHMARKS.md)
        extra["fused"] = True
    return cls(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
               weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, **extra)


def param_groups(args, unet: nn.Module, encoders: Sequence[nn.Module]) -> list[dict]:
    groups = [{"params": trainable([unet]), "lr": args.learning_rate, "weight_decay": args.adam_weight_decay}]
    te = trainable(encoders)
    if te:
        groups.append({"params": te, "lr": args.text_encoder_lr, "weight_decay": args.adam_weight_decay_text_encoder})
    return groups


def make_scheduler(args, optimizer, steps: int, num_processes: int):
    from diffusers.optimization import get_scheduler

    # accelerate steps a prepared scheduler once per process per optimizer step: scale, as diffusers.
    return get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps * num_processes,
                         num_training_steps=steps * num_processes, num_cycles=args.lr_num_cycles, power=args.lr_power)


def make_dataloader(dataset: Dataset, args) -> DataLoader:
    return DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True, collate_fn=collate,
                      num_workers=args.dataloader_num_workers)


def cache_latents(dataset: DreamBoothDataset, models: Models, device, vae_dtype) -> None:
    """--cache_latents: encode every example once (the epoch-0 crops and flips, as diffusers
    caches one augmentation) and keep the latent distributions; sampling stays per step."""
    cached = []
    with torch.no_grad():
        for i in range(len(dataset)):
            ex = dataset.example(i, 0)
            entry: dict[str, Any] = {"original_size": ex["original_size"], "crop_top_left": ex["crop_top_left"]}
            entry["latent_params"] = models.vae.encode(ex["pixel_values"][None].to(device, vae_dtype)).latent_dist.parameters[0].float().cpu()
            if "class_pixel_values" in ex:
                entry["class_original_size"] = ex["class_original_size"]
                entry["class_crop_top_left"] = ex["class_crop_top_left"]
                entry["class_latent_params"] = models.vae.encode(
                    ex["class_pixel_values"][None].to(device, vae_dtype)).latent_dist.parameters[0].float().cpu()
            cached.append(entry)
    dataset.cached = cached


# =========================================================================== outputs


def model_card(args, family: str, record: dict, images: list[str]) -> str:
    base = args.pretrained_model_name_or_path
    method = {"lora": "LoRA", "dash": "LoRA-Dash", "autolora": "AutoLoRA"}[args.method]
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: diffusers",
        "tags: [text-to-image, diffusers, lora, dreambooth, dashdiff, " + args.method + "]",
        f"instance_prompt: {json.dumps(args.instance_prompt)}",
        "---",
        "",
        f"# {method} DreamBooth weights for {base}",
        "",
        f"Trained with dashdiff's `train/dreambooth_dash.py` ({family.upper()} family detected), "
        f"{record.get('global_step')} optimizer steps, {record.get('num_processes')} process(es).",
        "",
        f"- Method: **{method}**; rank {args.rank}, lora_alpha {args.lora_alpha}, dropout {args.lora_dropout}; "
        f"layers `{', '.join(args.lora_layers)}`" + ("; text encoder(s) adapted too" if args.train_text_encoder else ""),
    ]
    if args.method == "dash":
        launch = record.get("dash_launch") or {}
        # Only a launched adapter exports the s directions; before the launch the export is rank r.
        exported = f"{args.rank}+{args.dash_directions}" if launch.get("step") is not None else f"{args.rank}"
        lines.append(
            f"- LoRA-Dash: {args.dash_directions} directions per layer, launched after optimizer step "
            f"{launch.get('step', 'never (training ended before the warm-up)')} (warm-up {args.dash_warmup_steps}). "
            f"The exported LoRA has rank {exported} per layer and scale 1."
        )
    if args.method == "autolora":
        ranks = record.get("autolora_ranks") or {}
        hist = {}
        for r in ranks.values():
            hist[r] = hist.get(r, 0) + 1
        lines.append(f"- AutoLoRA: initial rank {args.rank}, {args.autolora_search_steps} search steps "
                     f"({args.autolora_hypergradient}), then retrained for {args.max_train_steps} steps with per-layer "
                     f"ranks (rank: layers) {dict(sorted(hist.items()))}; details in `autolora_ranks.json`.")
    lines += [
        f"- Trigger prompt: `{args.instance_prompt}`",
        f"- Resolution {args.resolution}, batch {args.train_batch_size} x accumulation {args.gradient_accumulation_steps}, "
        f"learning rate {args.learning_rate}, seed {args.seed}.",
        "",
        "## Use with diffusers (no dashdiff needed)",
        "",
        "```python",
        "import torch",
        f"from diffusers import {'StableDiffusionXLPipeline' if family == 'sdxl' else 'StableDiffusionPipeline'} as Pipeline",
        *(["from dashdiff.testing import resolve_model  # tiny-sd / tiny-sdxl are dashdiff's local test models",
            f"pipe = Pipeline.from_pretrained(resolve_model({base!r}))"]
          if base in ("tiny-sd", "tiny-sdxl") else
          [f"pipe = Pipeline.from_pretrained({base!r}, torch_dtype=torch.float16).to('cuda')"]),
        "pipe.load_lora_weights('path/to/this/folder')  # pytorch_lora_weights.safetensors",
        f"image = pipe({args.instance_prompt!r}, cross_attention_kwargs={{'scale': 1.0}}).images[0]",
        "```",
        "",
        "## A1111 / ComfyUI",
        "",
        ("Use `pytorch_lora_weights_kohya.safetensors` (kohya key layout) like any LoRA file."
         if args.output_kohya_format else
         "Retrain with `--output_kohya_format`, or run `dashdiff.export_lora(pipe, folder, format='kohya')` on the "
         "loaded adapter, to get a kohya-format file."),
        "",
        "## Resume or inspect with dashdiff",
        "",
        "`dashdiff_adapter.safetensors` holds the full training state (`dashdiff.load_adapter(pipe, path)`).",
    ]
    if images:
        lines += ["", "## Validation images", "", f"Prompt: `{args.validation_prompt}`", ""]
        lines += [f"![validation {i}]({name})" for i, name in enumerate(images)]
    return "\n".join(lines) + "\n"


def save_reference_output(host: AdapterHost, models: Models, args, device, folder: Path) -> None:
    """The trained UNet's output on fixed, seeded inputs, conditioned on the instance prompt through
    the (possibly adapted) text encoder(s): a stock load of the exported LoRA must reproduce it."""
    gen = torch.Generator().manual_seed(1234)
    lat = args.resolution // (2 ** (len(models.vae.config.block_out_channels) - 1))
    latents = torch.randn(1, models.unet.config.in_channels, lat, lat, generator=gen)
    timestep = torch.tensor([500])
    encoders = [getattr(host, n) if hasattr(host, n) else models.text_encoders[i]
                for i, n in enumerate(["text_encoder", "text_encoder_2"][: len(models.text_encoders)])]
    with torch.no_grad():
        embeds, pooled = encode_prompts(models, encoders, [args.instance_prompt], args, device)
        kwargs = {}
        tensors = {"latents": latents, "timestep": timestep}
        if models.family == "sdxl":
            time_ids = torch.tensor([[args.resolution, args.resolution, 0, 0, args.resolution, args.resolution]],
                                    dtype=torch.float32)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.float(), "time_ids": time_ids.to(device)}
            tensors["time_ids"] = time_ids
        dtype = next(host.unet.parameters()).dtype
        out = host.unet(latents.to(device, dtype), timestep.to(device), embeds.to(dtype), return_dict=False,
                        **{k: {kk: vv.to(dtype) for kk, vv in v.items()} for k, v in kwargs.items()})[0]
    tensors["output"] = out.float().cpu()
    tensors["prompt_embeds"] = embeds.float().cpu()
    from dashdiff.safeio import save_safetensors

    save_safetensors(tensors, folder / "reference_output.safetensors", {"prompt": args.instance_prompt})


# =========================================================================== the run


@dataclass
class Run(RunBase):
    """One DreamBooth run: the shared lifecycle (``dashdiff.training.Run``: step log, run record,
    checkpoints, loss guard, LoRA-Dash hook) plus what this script's phases share."""

    args: argparse.Namespace = None
    family: str = ""
    model_path: str = ""
    models: Optional[Models] = None
    weight_dtype: torch.dtype = torch.float32  # frozen weights (mixed precision); trainable ones are float32
    vae_dtype: torch.dtype = torch.float32
    unet: Optional[nn.Module] = None  # as prepared (DDP under several processes)
    encoders: list = field(default_factory=list)  # the text encoders being trained, as prepared
    loss_fn: Optional[LossFn] = None
    classes: list = field(default_factory=list)  # class images (prior preservation)
    val_dataset: Optional[DreamBoothDataset] = None  # AutoLoRA: the held-out instance images
    bar: Any = None  # the open progress bar
    on_event: Optional[Callable[[str, dict], None]] = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def host(self) -> AdapterHost:
        """The adapted components, unwrapped: what export, state and LoRA-Dash walk."""
        unwrap = self.accelerator.unwrap_model
        return AdapterHost(unwrap(self.unet), [unwrap(t) for t in self.encoders])

    def event(self, name: str, **info: Any) -> None:
        if self.on_event:
            self.on_event(name, {"host": self.host(), **info})


def _progress(total: int, initial: int, disable: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=disable, desc=desc, dynamic_ncols=True)


def make_accelerator(args: argparse.Namespace, output_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
        # Seedable sampler: the data order is a function of (seed, epoch), so a resume can skip into it.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        # broadcast_buffers=False under DDP (dashdiff's buffers are equal on every process by construction)
        kwargs_handlers=T.ddp_kwargs_handlers(),
    )


def check_inputs(args: argparse.Namespace, resume: Optional[T.Checkpoint]) -> tuple[list[Item], Optional[tuple]]:
    """Everything about the data, folders and checkpoint that can refuse the run, before anything is
    written: (instance items, AutoLoRA's (search-train, search-validation) index split or None)."""
    output_dir = Path(args.output_dir)
    unique_items = instance_items(args)
    split = None
    if args.method == "autolora":
        from dashdiff.autolora import split_indices

        try:
            split = split_indices(len(unique_items), args.autolora_val_fraction, args.seed)
        except ValueError as err:
            raise TrainingError(f"AutoLoRA validation split of the instance images: {err}") from None
    if args.with_prior_preservation and Path(args.class_data_dir).is_dir():
        check_images(image_files(Path(args.class_data_dir), "--class_data_dir"))
    V.check_output_dir_writable(output_dir)
    if args.with_prior_preservation:
        V.check_output_dir_writable(args.class_data_dir, "--class_data_dir")
    if resume is not None:
        if args.method != "autolora" and resume.phase == "search":
            raise TrainingError(f"{resume.path} is an AutoLoRA search checkpoint; this run is --method {args.method}")
        info = T.validate_checkpoint(resume.path)  # complete, and no pickle that is more than data
        if info.get("method") != args.method:
            raise TrainingError(f"{resume.path} was written by a --method {info.get('method')} run; this run is "
                                f"--method {args.method}")
    return unique_items, split


def run_record(run: Run, unique_items: list[Item], split: Optional[tuple]) -> dict[str, Any]:
    """The run record as the run starts (dashdiff_run.json)."""
    args, resume = run.args, run.resume
    record: dict[str, Any] = {
        "fingerprint": run.fingerprint, "args": T.run_arguments(args), "family": run.family, "method": args.method,
        "model_path": run.model_path, "num_processes": run.world, "status": "running",
        "pid": os.getpid(),  # lets the command line mark this record "failed" (input_rules.mark_failed)
        "dashdiff_version": dashdiff.__version__, "resumed_from": str(resume.path) if resume else None,
    }
    if split is not None:
        record["autolora_split"] = {part: [str(unique_items[i].path) for i in idx]
                                    for part, idx in zip(("train", "validation"), split)}
    previous = T.read_run_record(run.out)
    if resume is not None and previous and previous.get("fingerprint") != run.fingerprint:
        logger.warning("resuming a run started with other arguments (hash %s, now %s)", previous.get("fingerprint"),
                       run.fingerprint)
        record["previous_fingerprint"] = previous.get("fingerprint")
    return record


def prepare_models(run: Run) -> None:
    """Devices and precisions (frozen weights in the mixed-precision dtype, trainable ones in fp32;
    the AutoLoRA search keeps the UNet in fp32: its finite-difference hypergradient needs it) and
    the adapters of the phase the run starts in (a resumed retrain: the recorded ranks)."""
    args, models, device, resume = run.args, run.models, run.device, run.resume
    run.vae_dtype = torch.float32 if (run.family == "sdxl" and not args.pretrained_vae_model_name_or_path) \
        else run.weight_dtype
    models.vae.to(device, run.vae_dtype)
    models.unet.to(device, torch.float32 if args.method == "autolora" else run.weight_dtype)
    for te in models.text_encoders:
        te.to(device, run.weight_dtype)
    if args.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            for te in models.text_encoders:
                te.gradient_checkpointing_enable()

    train_encoders: list[nn.Module] = models.text_encoders if args.train_text_encoder else []
    if args.method == "autolora" and resume is not None and resume.phase == "train":
        run.ranks = run.recorded_ranks()
        models.unet.add_adapter(retrain_adapter_config(args, run.ranks))
    else:
        models.unet.add_adapter(adapter_config(args, args.lora_layers))
    for te in train_encoders:
        add_text_encoder_adapter(te, adapter_config(args, TEXT_ENCODER_LAYERS))
    if run.weight_dtype != torch.float32:
        from diffusers.training_utils import cast_training_params

        cast_training_params([models.unet, *train_encoders], dtype=torch.float32)
    run.unet, run.encoders = models.unet, list(train_encoders)


def dataset_for(run: Run, part: Sequence[Item], with_classes: bool = True) -> DreamBoothDataset:
    args = run.args
    ds = DreamBoothDataset(part, run.classes if with_classes else [], args.resolution, args.center_crop,
                           args.random_flip, args.image_interpolation_mode, args.seed)
    if args.cache_latents:
        cache_latents(ds, run.models, run.device, run.vae_dtype)
    return ds


def betas_of(run: Run) -> list[nn.Parameter]:
    """AutoLoRA's β: the outer variable, stepped by its own optimizer, never by the weights'."""
    return [p for n, p in run.accelerator.unwrap_model(run.unet).named_parameters() if "lora_autolora_beta" in n]


def setup_phase(run: Run, name: str, part: Sequence[Item], steps: Optional[int],
                epochs: Optional[float] = None) -> Phase:
    """Prepare model, optimizer, scheduler and data loader for one phase ('search' or 'train')."""
    args, accelerator = run.args, run.accelerator
    dataloader = accelerator.prepare(make_dataloader(dataset_for(run, part), args))
    updates = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    if steps is None:
        steps = run_flags.search_steps(args, updates, args.num_train_epochs * updates) if epochs \
            else args.num_train_epochs * updates
    lr_scale = accelerator.num_processes * args.train_batch_size * args.gradient_accumulation_steps if args.scale_lr else 1
    groups = param_groups(args, accelerator.unwrap_model(run.unet), [accelerator.unwrap_model(t) for t in run.encoders])
    betas = betas_of(run)
    for g in groups:
        g["lr"] *= lr_scale
        g["params"] = [p for p in g["params"] if not any(p is b for b in betas)]
    optimizer = make_optimizer(args, groups)
    scheduler = make_scheduler(args, optimizer, steps, accelerator.num_processes)
    run.unet, optimizer, scheduler, *run.encoders = accelerator.prepare(run.unet, optimizer, scheduler, *run.encoders)
    run.loss_fn.train_encoders = list(run.encoders)  # the prepared (DDP) modules, so their gradients are reduced
    return Phase(name, steps, dataloader, optimizer, scheduler, updates)


# =========================================================================== steps


def draw(run: Run, batch: dict[str, Any], stream: int, phase_tag: int, step: int, micro: int) -> dict[str, Any]:
    """The micro-batch's random inputs, from generators derived from the position in training (so a
    resume draws what an uninterrupted run draws); dropout, which uses the global RNG, reseeded too."""
    rank = run.accelerator.process_index
    gen = T.step_generator(run.args.seed, stream, phase_tag, step, micro, rank)
    torch.manual_seed(T.step_seed(run.args.seed, _DROPOUT, phase_tag, step, micro, rank))
    return draw_inputs(batch, run.models, gen, run.device, run.args, run.vae_dtype)


def train_step(run: Run, phase: Phase, batch: dict[str, Any], step: int, micro: int) -> dict[str, Any]:
    """One micro-batch of the training phase; the optimizer steps when accelerate's accumulation
    window ends. The loss is checked on every process before ``backward``."""
    accelerator, args = run.accelerator, run.args
    inputs = draw(run, batch, _NOISE, 1, step, micro)
    with accelerator.accumulate(run.unet, *run.encoders):
        loss = run.loss_fn(run.unet, inputs)
        mean = run.check_loss(loss, step, phase.name)  # NaN anywhere stops every process together
        accelerator.backward(loss)
        if accelerator.sync_gradients and args.max_grad_norm:
            accelerator.clip_grad_norm_(trainable([run.unet, *run.encoders]), args.max_grad_norm)
        skipped = T.optimizer_step(phase.optimizer)
        phase.scheduler.step()
        phase.optimizer.zero_grad(set_to_none=True)
    return {"train_loss": float(mean), "skipped": skipped}


def val_batch(run: Run, step: int, micro: int) -> dict[str, Any]:
    """AutoLoRA: a batch of held-out instance images with its own noise and timesteps (no prior term)."""
    args, rank = run.args, run.accelerator.process_index
    gen = T.step_generator(args.seed, _VAL_PICK, step, micro, rank)
    idx = torch.randint(0, len(run.val_dataset), (args.train_batch_size,), generator=gen).tolist()
    batch = collate([run.val_dataset.example(i, step) for i in idx])
    vgen = T.step_generator(args.seed, _VAL_NOISE, step, micro, rank)
    inputs = draw_inputs(batch, run.models, vgen, run.device, args, run.vae_dtype)
    inputs["prior"] = False
    return inputs


def search_loss(run: Run, step: int, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """Every loss pass of the search (inner, validation, finite differences), checked on every
    process; BilevelStep puts w, β and the optimizers back when this raises."""
    loss = run.loss_fn(model, inputs)
    run.check_loss(loss, step, "search")
    return loss


def search_step(run: Run, bilevel: Any, batch: dict[str, Any], step: int, micro: int) -> dict[str, Any]:
    inputs = draw(run, batch, _NOISE, 0, step, micro)
    return bilevel.step(inputs, val_batch(run, step, micro), partial(search_loss, run, step))


def run_loop(run: Run, phase: Phase, start: int, step_fn: Callable[..., dict], bilevel_mode: bool = False) -> None:
    """Epochs over the phase's data from optimizer step ``start``: skip what a resume has seen."""
    args, accelerator = run.args, run.accelerator
    label = {"search": "search", "train": "retrain" if args.method == "autolora" else "train"}[phase.name]
    if start >= phase.max_steps:  # resumed from the phase's last checkpoint: nothing left to train
        logger.info("%s: all %d steps were done before the checkpoint; nothing left to train", label, phase.max_steps)
        return
    bar = run.bar = _progress(phase.max_steps, start, not accelerator.is_local_main_process, label)
    step = start
    num_epochs = math.ceil(phase.max_steps / phase.updates_per_epoch)
    first_epoch = start // phase.updates_per_epoch
    skip = (start % phase.updates_per_epoch) * args.gradient_accumulation_steps
    accum = args.gradient_accumulation_steps
    for epoch in range(first_epoch, num_epochs):
        run.unet.train()
        for t in run.encoders:
            t.train()
        phase.dataloader.set_epoch(epoch)
        loader = phase.dataloader
        if epoch == first_epoch and skip:
            loader = accelerator.skip_first_batches(phase.dataloader, skip)
            loader.set_epoch(epoch)
        micro = 0
        losses: list[float] = []
        n_batches = len(phase.dataloader) - (skip if epoch == first_epoch else 0)
        for i, batch in enumerate(loader):
            out = step_fn(batch, step, micro)
            losses.append(out["train_loss"])
            micro += 1
            # An optimizer step ends after `accum` micro-batches or at the end of the epoch
            # (accelerate syncs at the end of the data loader too).
            if micro < accum and i + 1 < n_batches:
                continue
            micro = 0
            skipped = bool(out.get("skipped"))
            if bilevel_mode:
                phase.scheduler.step()
            step += 1
            # The phase the step's loss was computed in (a launch happens after its step).
            if args.method == "dash":
                label = "dash" if run.launch is not None else "pre-launch"
            row = {"step": step, "phase": label, "phase_kind": phase.name, "loss": sum(losses) / len(losses),
                   "lr": phase.scheduler.get_last_lr()[0], "epoch": epoch}
            if bilevel_mode and out.get("val_loss") is not None:
                row["val_loss"] = out["val_loss"]
            losses = []
            if run.after_optimizer_step(run.host(), step, skipped):  # LoRA-Dash launched after this step
                run.launch["directions"] = args.dash_directions
                logger.info("LoRA-Dash launched after optimizer step %d: %d directions in each of %d layers, chosen in "
                            "%.2f s", step, args.dash_directions, run.launch["layers"], run.launch["seconds"])
                run.event("launch", step=step)
            run.log.write(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", phase=row["phase"])
            if args.report_to != "none":
                accelerator.log({"loss": row["loss"], "lr": row["lr"]}, step=step)
            if step % args.checkpointing_steps == 0:
                run.save_checkpoint(phase.name, step)  # with AutoLoRA's ranks in the retrain
            if step >= phase.max_steps:
                break
        if (args.validation_prompt and phase.name == "train" and (epoch + 1) % args.validation_epochs == 0
                and step < phase.max_steps):
            validate(run, f"epoch-{epoch + 1}")
        if step >= phase.max_steps:
            break
    bar.close()


def validate(run: Run, tag: str) -> None:
    """Render the validation prompt with the modules being trained (main process)."""
    if not run.accelerator.is_main_process:
        return
    unwrap = run.accelerator.unwrap_model
    was_training = run.unet.training
    # --train_text_encoder adapts every text encoder, so the list is all or nothing.
    texts = [unwrap(t) for t in run.encoders] if run.encoders else run.models.text_encoders
    pipe = build_pipeline(run.models, unwrap(run.unet), texts, run.weight_dtype)
    images = render(pipe, run.args.validation_prompt, run.args.num_validation_images, run.args, run.device)
    folder = run.out / "validation"
    folder.mkdir(exist_ok=True)
    for i, img in enumerate(images):
        img.save(folder / f"{tag}-{i}.png")
    run.unet.train(was_training)


# =========================================================================== phases


def search(run: Run, search_items: Sequence[Item]) -> dict[str, int]:
    """AutoLoRA's bi-level search; returns the per-layer ranks (α at the end in ``run.alphas``)."""
    from dashdiff.autolora import BilevelStep

    args, accelerator, resume = run.args, run.accelerator, run.resume
    phase = setup_phase(run, "search", search_items, args.autolora_search_steps, args.autolora_search_epochs)
    args.autolora_search_steps = phase.max_steps
    beta_opt = T.prepared_beta_optimizer(accelerator, betas_of(run), args.autolora_meta_lr)  # checkpointed with it
    bilevel = BilevelStep(run.unet, weight_optimizer=phase.optimizer, beta_optimizer=beta_opt,
                          mode=args.autolora_hypergradient, rollback=args.autolora_rollback, accelerator=accelerator,
                          max_grad_norm=args.max_grad_norm, fd_batched=args.autolora_fd_batched, double=double_inputs)
    start = 0
    if resume is not None and resume.phase == "search":
        run.load_checkpoint(resume)
        start = resume.step
    run_loop(run, phase, start, partial(search_step, run, bilevel), bilevel_mode=True)
    root = accelerator.unwrap_model(run.unet)
    run.alphas.update({n: a.tolist() for n, a in dashdiff.selection_weights(root).items()})
    return dashdiff.determine_ranks(root)


def switch_to_retrain(run: Run, ranks: dict[str, int]) -> None:
    """AutoLoRA's retrain: a fresh plain LoRA with the found ranks on the UNet, on all instance images;
    the search's checkpoint is used up."""
    run.start_retrain(ranks)
    run.event("search_end", ranks=ranks)
    logger.info("AutoLoRA search done: per-layer ranks %s", _rank_histogram(ranks))
    root = run.accelerator.unwrap_model(run.unet)
    run.accelerator.free_memory()
    run.unet = root
    root.delete_adapters("default")
    torch.manual_seed(T.step_seed(run.args.seed, 99))  # the fresh LoRA's init does not depend on how the search ran
    root.add_adapter(retrain_adapter_config(run.args, ranks))
    if run.weight_dtype != torch.float32:
        from diffusers.training_utils import cast_training_params

        root.to(dtype=run.weight_dtype)
        cast_training_params([root], dtype=torch.float32)


def train(run: Run, items: Sequence[Item]) -> dict[str, Any]:
    """The training phase (LoRA, LoRA-Dash, AutoLoRA's retrain) from ``run.resume`` on; returns its timing."""
    args, accelerator, resume = run.args, run.accelerator, run.resume
    phase = setup_phase(run, "train", items, args.max_train_steps)
    if args.method == "dash":  # the number of steps from epochs is known only now
        V.raise_errors([V.dash_warmup_error(args.dash_warmup_steps, phase.max_steps, "--num_train_epochs "
                                            f"{args.num_train_epochs} x {phase.updates_per_epoch} per epoch")])
    args.max_train_steps = phase.max_steps
    start = 0
    if resume is not None and resume.phase == "train":
        run.load_checkpoint(resume)
        start = resume.step
        if args.method == "dash":
            launched = [l.lora_dash_launch_step[a] for _, l, a in dashdiff.walk.iter_layers(run.host(), "dash")]
            if launched and int(launched[0]) >= 0:
                run.launch = {"step": int(launched[0]), "seconds": None, "directions": args.dash_directions,
                              "layers": len(launched), "restored": True}
    if args.method == "dash" and args.dash_prefetch_spectra:
        # the launch's W0 spectra on the host, beside the pre-launch steps (BENCHMARKS.md: ~3 s of
        # an SDXL run instead of ~9 s at launch); layers already launched (resume) are skipped
        dashdiff.prefetch_spectra(run.host())
    loop_started = time.time()
    run_loop(run, phase, start, partial(train_step, run, phase))
    accelerator.wait_for_everyone()
    timing = {"steps": phase.max_steps - start, "seconds": round(time.time() - loop_started, 2)}
    run.event("end", step=phase.max_steps)
    return timing


def write_outputs(run: Run, started: float, train_timing: dict[str, Any]) -> None:
    """The stock-loadable LoRA (and kohya file), dashdiff's full state, the rank report, validation
    images from a stock load, the model card and the final run record (main process)."""
    args, output_dir, record = run.args, run.out, run.record
    final_host = run.host()
    if not run.accelerator.is_main_process:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "not launched yet" is reported in the record instead
        dashdiff.export_lora(final_host, output_dir, format="diffusers")
        if args.output_kohya_format:
            # the host has no scheduler: the metadata's SD 2.x 512 / 768-v label needs the prediction type
            dashdiff.export_lora(final_host, output_dir, format="kohya",
                                 prediction_type=run.models.noise_scheduler.config.prediction_type)
    dashdiff.save_adapter(final_host, output_dir / T.ADAPTER_STATE)
    if args.save_reference_output:
        save_reference_output(final_host, run.models, args, run.device, output_dir)
    if run.ranks is not None:
        _write_ranks(output_dir, run.ranks, run.alphas, args)
    record.update(status="done", global_step=args.max_train_steps, seconds=round(time.time() - started, 2),
                  train_loop=train_timing, dash_launch=run.launch, autolora_ranks=run.ranks,
                  lora_weights=str(output_dir / DIFFUSERS_WEIGHT_NAME))
    images = []
    if args.validation_prompt:
        images = final_validation(args, run.models, run.model_path, output_dir, run.weight_dtype, run.device)
    record["validation_images"] = images
    T.write_model_card(output_dir, model_card(args, run.family, record, images))  # spares a user's README.md
    T.write_run_record(output_dir, record)
    logger.info("done: %s (stock-loadable LoRA), %s (full dashdiff state)", output_dir / DIFFUSERS_WEIGHT_NAME,
                output_dir / T.ADAPTER_STATE)


# =========================================================================== main


def main(args: argparse.Namespace, on_event: Optional[Callable[[str, dict], None]] = None) -> dict:
    """Train as the flags say; returns the run record. ``on_event(name, info)`` is called on every
    process at 'launch' (LoRA-Dash, right after the launch), 'search_end' (AutoLoRA, ranks chosen)
    and 'end' (after training, before export), with ``info["host"]`` the adapted components.
    The output folder is locked for the run (released at the end, also on error)."""
    with T.RunGuard(run_flags.CLI_FLAGS) as guard:
        return _main(args, on_event, guard)


def _main(args: argparse.Namespace, on_event: Optional[Callable[[str, dict], None]], guard: T.RunGuard) -> dict:
    from accelerate.utils import set_seed

    started = time.time()
    model_path = resolve_model_path(args)
    family = detect_family(model_path, args.revision)
    resolve_defaults(args, family)
    if (args.method == "autolora" and args.autolora_search_steps is None and args.autolora_search_epochs is None
            and args.max_train_steps is not None):
        args.autolora_search_steps = args.max_train_steps
    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(args, output_dir)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(args.seed)

    # ---- everything that can refuse the run, before anything is written (but the lock)
    guard.acquire(accelerator, output_dir)
    fingerprint = T.args_fingerprint(args)
    resume = T.resolve_resume(output_dir, args.resume_from_checkpoint, run_flags.CLI_FLAGS)
    if args.resume_from_checkpoint == "latest" and resume is None:
        logger.info("--resume_from_checkpoint latest: no checkpoint in %s, starting a new run", output_dir)
    restart = T.restarts_in_place(output_dir, args.resume_from_checkpoint, resume, fingerprint)
    T.check_output_dir(output_dir, fingerprint, args.resume_from_checkpoint if resume or restart else None,
                       args.overwrite_output_dir, run_flags.CLI_FLAGS)
    unique_items, split = check_inputs(args, resume)
    models = load_models(args, family, model_path, torch.float32)
    check_lora_layers(models.unet, args.lora_layers)
    accelerator.wait_for_everyone()  # every process has checked the folder before rank 0 writes to it

    if accelerator.is_main_process:
        if args.overwrite_output_dir:
            T.clear_for_overwrite(output_dir, run_flags.CLI_FLAGS)
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    run = Run(accelerator=accelerator, out=output_dir, fingerprint=fingerprint, method=args.method,
              log=T.StepLog(output_dir / T.STEP_LOG, enabled=accelerator.is_main_process), resume=resume,
              restart=restart, total_limit=args.checkpoints_total_limit, advice=run_flags.nan_advice,
              flags=run_flags.CLI_FLAGS, log_events=False,  # this script's step log holds optimizer steps only
              last_checkpoint=resume.path if resume else None, args=args, family=family, model_path=model_path,
              models=models, weight_dtype=T.mixed_precision_dtype(accelerator), on_event=on_event)
    run.record = run_record(run, unique_items, split)
    if resume is None:
        run.commit()  # else once the checkpoint has been loaded: a failed resume changes nothing
    try:
        if args.with_prior_preservation:
            generate_class_images(args, models, accelerator)
        run.classes = class_items(args)
        prepare_models(run)
        T.register_state_hooks(accelerator, run.host, dashdiff.save_adapter, dashdiff.load_adapter)

        # ---- data: AutoLoRA searches on part of the instance images, validated on the rest
        items = unique_items * args.repeats
        search_items, val_items = items, []
        if split is not None:
            search_items = [unique_items[i] for i in split[0]] * args.repeats
            val_items = [unique_items[i] for i in split[1]]
        cache = PromptCache()
        if args.pre_compute_text_embeddings:
            cache.get(models, [i.prompt for i in items] + [c.prompt for c in run.classes] + [args.instance_prompt],
                      args, run.device)
        run.loss_fn = LossFn(models, args, cache, run.encoders, bool(run.classes))
        run.val_dataset = dataset_for(run, val_items, with_classes=False) if val_items else None
        if accelerator.is_main_process and args.report_to != "none":
            accelerator.init_trackers("dreambooth-dash", config={k: v for k, v in T.run_arguments(args).items()
                                                                  if isinstance(v, (int, float, str, bool))})

        if args.method == "autolora" and (resume is None or resume.phase == "search"):
            switch_to_retrain(run, search(run, search_items))
        train_timing = train(run, items)
        write_outputs(run, started, train_timing)
        accelerator.wait_for_everyone()
    except (T.NonFiniteLossError, T.CheckpointWriteError) as err:
        if run.bar is not None:
            run.bar.close()  # end the progress line, so the error is a line of its own
        run.stop(err)  # the record says why there are no final weights; the last good checkpoint is kept
        accelerator.end_training()
        raise
    accelerator.end_training()
    return run.record


def _rank_histogram(ranks: dict[str, int]) -> str:
    hist: dict[int, int] = {}
    for r in ranks.values():
        hist[r] = hist.get(r, 0) + 1
    return ", ".join(f"rank {r}: {n} layers" for r, n in sorted(hist.items()))


def _write_ranks(output_dir: Path, ranks: dict[str, int], alphas: dict[str, list[float]], args) -> None:
    """autolora_ranks.md / .json (+ .png with matplotlib): per layer the rank found and α."""
    from dashdiff.autolora.report import write_rank_report

    plot = importlib.util.find_spec("matplotlib") is not None
    write_rank_report((ranks, alphas), output_dir, threshold=args.autolora_threshold, plot=plot)


def final_validation(args, models: Models, model_path: str, output_dir: Path, dtype, device) -> list[str]:
    """Reload the base pipeline, load the exported LoRA the stock way, render: what users will see."""
    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

    kw = {"vae": models.vae} if args.pretrained_vae_model_name_or_path else {}
    pipe = DiffusionPipeline.from_pretrained(model_path, revision=args.revision, variant=args.variant,
                                             torch_dtype=dtype, **kw)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(output_dir), weight_name=DIFFUSERS_WEIGHT_NAME)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    names = []
    for i, img in enumerate(render(pipe, args.validation_prompt, args.num_validation_images, args, device)):
        name = f"validation_{i}.png"
        img.save(output_dir / name)
        names.append(name)
    return names


def cli(argv: Optional[Sequence[str]] = None) -> int:
    return V.run_command_line(main, parse_args(argv), "dreambooth_dash.py")


if __name__ == "__main__":
    sys.exit(cli())
