#!/usr/bin/env python
"""The DreamBooth evaluation protocol with real encoders: DINO, CLIP-I and CLIP-T.

Generates one image per (prompt, seed) from a diffusers pipeline (ordinary ``from_pretrained``;
optionally with a stock LoRA folder or a dashdiff adapter file), or scores a folder of images
generated earlier, and reports, each as a mean with a 95 % Student-t confidence interval over the
(prompt, seed) samples:

- **DINO**: cosine between the CLS embedding (``last_hidden_state[:, 0]``, after the final layer
  norm) of a ViT-S/16 DINO model for the generated image and for each reference image, averaged
  over the references. DINO's official evaluation transform is applied, not the model folder's
  processor config (the hub's ``facebook/dino-vits16`` one resizes straight to 224x224): resize the
  shorter side to 256 (PIL bicubic), centre crop 224, ImageNet mean / std.
- **CLIP-I**: the same with CLIP's projected image embeddings (the model folder's own processor).
- **CLIP-T**: cosine between CLIP's projected text embedding of the prompt *with the identifier
  removed* ("a photo of sks toy on the beach" -> "a photo of toy on the beach") and the image.

    python train/dreambooth_eval.py --pretrained_model_name_or_path <sd> --lora_weights <run dir> \\
        --reference_dir assets/subject --prompts "a photo of sks toy on the beach" "a sks toy in the snow" \\
        --seeds 0 1 2 3 --dino_model facebook/dino-vits16 --clip_model openai/clip-vit-base-patch32 \\
        --output_dir eval/

    python train/dreambooth_eval.py --images_dir eval/images --reference_dir assets/subject \\
        --dino_model <path> --output_dir eval2/        # score only

Encoders load through transformers' own ``AutoModel`` / ``CLIPModel`` ``from_pretrained`` from a
local folder or a hub id. Writes ``<output_dir>/images/`` (PNGs + ``metadata.jsonl``: file_name,
prompt, seed; the layout ``--images_dir`` reads), ``dreambooth_eval.json`` (per-sample scores and
the summary) and ``dreambooth_eval.md``, each written to a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

if __package__ in (None, ""):
    # Run as a script: make the repository's dashdiff importable without installing it.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

PROG = "dreambooth_eval.py"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA = "metadata.jsonl"
RESULT_JSON = "dreambooth_eval.json"
RESULT_MD = "dreambooth_eval.md"
# DINO's evaluation transform (the official repository's eval_linear / eval_knn): Resize(256,
# bicubic) of the shorter side, CenterCrop(224), ImageNet normalisation.
DINO_RESIZE, DINO_CROP = 256, 224


class EvalInputError(ValueError):
    """A bad input the user can fix; the command line prints it as one line."""


# =========================================================================== statistics


def _t_cdf(t: float, df: int) -> float:
    """Student-t CDF by Simpson integration of the density from 0 to ``t`` (exact to ~1e-10 here)."""
    if t < 0:
        return 1.0 - _t_cdf(-t, df)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    # Substituting x = atan(u) keeps the integrand smooth for the heavy tails of small df.
    hi = math.atan(t)
    n = 400  # even; the error against table values is < 1e-6 (test_dreambooth_eval)
    h = hi / n

    def f(x: float) -> float:
        u = math.tan(x)
        return math.exp(log_c - (df + 1) / 2 * math.log1p(u * u / df)) * (1 + u * u)

    s = f(0.0) + f(hi) + sum((4 if k % 2 else 2) * f(k * h) for k in range(1, n))
    return 0.5 + s * h / 3


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t with ``df`` degrees of freedom (bisection)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(48):  # the bracket [0, 2^m] halves 48 times: below 1e-12
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Mean and the two-sided Student-t confidence interval of the mean of independent samples.

    Returns ``mean``, ``low``, ``high``, ``half_width``, ``sd`` (n-1 denominator) and ``n``; with
    one sample the interval is unknown (NaN bounds, reported as such)."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        raise ValueError("mean_ci of no samples")
    mean = sum(xs) / n
    if n == 1:
        return {"mean": mean, "low": math.nan, "high": math.nan, "half_width": math.nan, "sd": math.nan, "n": 1}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "half_width": half, "sd": sd, "n": n}


def format_ci(ci: dict[str, float], digits: int = 3) -> str:
    """``0.712 ± 0.031`` (the 95 % half-width), or the mean alone for one sample."""
    if math.isnan(ci["half_width"]):
        return f"{ci['mean']:.{digits}f} (n=1)"
    return f"{ci['mean']:.{digits}f} ± {ci['half_width']:.{digits}f}"


# =========================================================================== prompts and folders


def strip_identifier(prompt: str, identifier: str) -> str:
    """The prompt with every whole-word ``identifier`` removed (case-insensitive), spaces collapsed:
    CLIP-T measures the prompt's content, which the rare identifier token is not part of."""
    if not identifier:
        return prompt
    out = re.sub(rf"(?<![\w]){re.escape(identifier)}(?![\w])", " ", prompt, flags=re.IGNORECASE)
    return re.sub(r"\s+", " ", out).strip()


def image_files(folder: str | Path, what: str) -> list[Path]:
    """The image files of ``folder`` (sorted by name), with one-line errors for a missing folder
    or one without images."""
    path = Path(folder)
    if not path.is_dir():
        raise EvalInputError(f"{what} {path}: no such folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise EvalInputError(f"{what} {path}: no images there ({', '.join(IMAGE_SUFFIXES)})")
    return files


def load_images(files: Sequence[Path]):
    """The files as RGB PIL images; an unreadable file is a one-line error naming it."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                out.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as err:
            raise EvalInputError(f"{f}: not a readable image ({type(err).__name__}: {err})") from None
    return out


@dataclass
class Sample:
    """One generated image: its file, the prompt it was generated from (None if unknown), its seed."""

    file: Path
    prompt: Optional[str]
    seed: Optional[int]


def read_samples(folder: str | Path, prompts: Sequence[str] = ()) -> list[Sample]:
    """The samples of an images folder: from its ``metadata.jsonl`` (file_name, prompt, seed) when
    present, else every image, with the prompt ``prompts[0]`` if exactly one prompt is given."""
    path = Path(folder)
    files = image_files(path, "--images_dir")
    meta = path / METADATA
    if not meta.is_file():
        if len(prompts) > 1:
            raise EvalInputError(f"--images_dir {path}: several --prompts but no {METADATA} saying which image "
                                 "belongs to which prompt")
        return [Sample(f, prompts[0] if prompts else None, None) for f in files]
    samples = []
    for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            file = path / row["file_name"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise EvalInputError(f"{meta}:{n}: not a JSON object with a 'file_name'") from None
        if not file.is_file():
            raise EvalInputError(f"{meta}:{n}: {file.name} does not exist")
        samples.append(Sample(file, row.get("prompt"), row.get("seed")))
    if not samples:
        raise EvalInputError(f"{meta}: no rows")
    return samples


# =========================================================================== encoders


def _load_error(flag: str, name: str, err: Exception) -> EvalInputError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return EvalInputError(f"{flag} {name}: not a loadable model ({first[:240]})")


def _check_model_path(flag: str, name: str) -> None:
    """A local folder must hold a model's config.json (a hub id is left to from_pretrained)."""
    p = Path(name).expanduser()
    if not p.exists() and (p.is_absolute() or name.startswith((".", "~"))):  # a path, not a hub id
        raise EvalInputError(f"{flag} {name}: no such folder")
    if p.exists() and not (p / "config.json").is_file():
        raise EvalInputError(f"{flag} {name}: not a model folder (no config.json)")


def dino_processor():
    """The rescale + ImageNet normalisation half of DINO's transform as a transformers image
    processor (PIL backend); :func:`dino_resize_crop` does the geometric half first."""
    import transformers
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    # transformers >= 5 splits processors by backend; the PIL one needs no torchvision.
    cls = getattr(transformers, "BitImageProcessorPil", None) or transformers.BitImageProcessor
    return cls(do_resize=False, do_center_crop=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
               image_mean=list(IMAGENET_DEFAULT_MEAN), image_std=list(IMAGENET_DEFAULT_STD), do_convert_rgb=True)


def dino_resize_crop(img):
    """Resize the shorter side to 256 (PIL bicubic; the longer side truncated) and centre crop 224,
    as torchvision's Resize / CenterCrop do on PIL images in DINO's evaluation. Done here, not by the
    processor: transformers' centre crop floors an odd margin where torchvision rounds it half to
    even (a one-pixel shift, measured: up to 4.4 in normalised units on a 301x257 image)."""
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    nw, nh = (DINO_RESIZE, int(DINO_RESIZE * h / w)) if w <= h else (int(DINO_RESIZE * w / h), DINO_RESIZE)
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    top, left = int(round((nh - DINO_CROP) / 2.0)), int(round((nw - DINO_CROP) / 2.0))
    return img.crop((left, top, left + DINO_CROP, top + DINO_CROP))


def dino_pixels(processor, images: Sequence[Any]) -> torch.Tensor:
    """DINO's evaluation transform of PIL images: (n, 3, 224, 224) float32."""
    return processor(images=[dino_resize_crop(im) for im in images], return_tensors="pt")["pixel_values"]


@dataclass
class Encoders:
    """The loaded encoders (either may be None) and the device they run on."""

    dino: Any = None
    dino_processor: Any = None
    clip: Any = None
    clip_processor: Any = None
    clip_tokenizer: Any = None
    device: str = "cpu"


def load_encoders(dino_model: Optional[str], clip_model: Optional[str], device: str = "cpu") -> Encoders:
    """Load DINO (``AutoModel``: a ViT whose CLS token is the embedding) and / or CLIP
    (``CLIPModel``, its own image processor and tokenizer) from folders or hub ids."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel

    def config(flag: str, name: str):
        _check_model_path(flag, name)
        try:
            return AutoConfig.from_pretrained(name)
        except (OSError, ValueError, KeyError) as err:
            raise _load_error(flag, name, err) from None

    enc = Encoders(device=device)
    if dino_model:
        cfg = config("--dino_model", dino_model)
        if not hasattr(cfg, "patch_size") or not hasattr(cfg, "hidden_size"):
            raise EvalInputError(f"--dino_model {dino_model}: a {cfg.model_type} model, not a ViT "
                                 "(DINO's CLS-token embedding needs a vision transformer)")
        try:
            enc.dino = AutoModel.from_pretrained(dino_model).to(device).eval()
        except (OSError, ValueError, KeyError) as err:
            raise _load_error("--dino_model", dino_model, err) from None
        enc.dino_processor = dino_processor()
    if clip_model:
        cfg = config("--clip_model", clip_model)
        if cfg.model_type != "clip":  # CLIPModel would load another type's folder as random weights
            raise EvalInputError(f"--clip_model {clip_model}: a {cfg.model_type} model, not CLIP")
        try:
            enc.clip = CLIPModel.from_pretrained(clip_model).to(device).eval()
            enc.clip_processor = AutoImageProcessor.from_pretrained(clip_model, backend="pil")
            enc.clip_tokenizer = AutoTokenizer.from_pretrained(clip_model)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise _load_error("--clip_model", clip_model, err) from None
    return enc


def _features(out: Any) -> torch.Tensor:
    # transformers 5 returns model outputs (projected features in pooler_output); 4.x a tensor.
    return out if torch.is_tensor(out) else out.pooler_output


@torch.no_grad()
def dino_embed(enc: Encoders, images: Sequence[Any], batch_size: int = 16) -> torch.Tensor:
    """Unit-norm DINO CLS embeddings, (n, hidden), float32."""
    outs = []
    size = getattr(enc.dino.config, "image_size", DINO_CROP)
    for i in range(0, len(images), batch_size):
        px = dino_pixels(enc.dino_processor, images[i:i + batch_size])
        kw = {"interpolate_pos_encoding": True} if size != DINO_CROP else {}  # a ViT trained at another size
        h = enc.dino(pixel_values=px.to(enc.device), **kw).last_hidden_state[:, 0]
        outs.append(torch.nn.functional.normalize(h.float(), dim=-1).cpu())
    return torch.cat(outs)


@torch.no_grad()
def clip_image_embed(enc: Encoders, images: Sequence[Any], batch_size: int = 16) -> torch.Tensor:
    """Unit-norm CLIP image embeddings, (n, projection_dim), float32."""
    outs = []
    for i in range(0, len(images), batch_size):
        px = enc.clip_processor(images=list(images[i:i + batch_size]), return_tensors="pt")["pixel_values"]
        f = _features(enc.clip.get_image_features(pixel_values=px.to(enc.device)))
        outs.append(torch.nn.functional.normalize(f.float(), dim=-1).cpu())
    return torch.cat(outs)


@torch.no_grad()
def clip_text_embed(enc: Encoders, texts: Sequence[str]) -> torch.Tensor:
    """Unit-norm CLIP text embeddings, (n, projection_dim), float32."""
    tok = enc.clip_tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
    f = _features(enc.clip.get_text_features(input_ids=tok["input_ids"].to(enc.device),
                                             attention_mask=tok["attention_mask"].to(enc.device)))
    return torch.nn.functional.normalize(f.float(), dim=-1).cpu()


def mean_cosine_to_references(gen: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(n,) mean over the m references of the cosine of each of n generated embeddings; inputs
    (n, d) and (m, d), unit norm."""
    return (gen @ ref.t()).mean(dim=1)


# =========================================================================== generation


def pipeline_dtype(device: str, dtype: Optional[str] = None) -> torch.dtype:
    """The one dtype every component is loaded in: ``dtype`` (a torch dtype name) if given, else
    float16 on a GPU and float32 on the CPU (the app's rule)."""
    if dtype:
        return getattr(torch, dtype)
    return torch.float32 if str(device).startswith("cpu") else torch.float16


def load_pipeline(model: str, lora_weights: Optional[str] = None, dashdiff_adapter: Optional[str] = None,
                  device: str = "cpu", dtype: Optional[str] = None):
    """A diffusers pipeline through its ordinary ``from_pretrained`` (reserved ``tiny-*`` names
    resolve to local folders), with a stock LoRA (``load_lora_weights``) or a dashdiff adapter, every
    component in :func:`pipeline_dtype`."""
    from diffusers import DiffusionPipeline

    from dashdiff.testing import resolve_model

    path = resolve_model(model)
    if Path(path).exists() and not (Path(path) / "model_index.json").is_file():
        raise EvalInputError(f"--pretrained_model_name_or_path {model}: not a diffusers pipeline folder "
                             "(no model_index.json)")
    # One explicit dtype: without it diffusers upcasts its models to float32 while transformers keeps a
    # text encoder saved in fp16 as fp16, and the UNet then receives half embeddings (an error on the GPU).
    try:
        pipe = DiffusionPipeline.from_pretrained(path, dtype=pipeline_dtype(device, dtype))
    except (OSError, ValueError) as err:
        raise _load_error("--pretrained_model_name_or_path", model, err) from None
    if lora_weights:
        lw = Path(lora_weights)
        if lw.is_dir():
            if not (lw / "pytorch_lora_weights.safetensors").is_file():
                raise EvalInputError(f"--lora_weights {lw}: no pytorch_lora_weights.safetensors there")
            pipe.load_lora_weights(str(lw))
        elif lw.is_file():
            pipe.load_lora_weights(str(lw.parent), weight_name=lw.name)
        else:
            raise EvalInputError(f"--lora_weights {lw}: no such file or folder")
    if dashdiff_adapter:
        from dashdiff.state import load_adapter

        f = Path(dashdiff_adapter)
        if f.is_dir():
            f = f / "dashdiff_adapter.safetensors"
        if not f.is_file():
            raise EvalInputError(f"--dashdiff_adapter {dashdiff_adapter}: no such file")
        load_adapter(pipe, f)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generate_images(pipe, prompts: Sequence[str], seeds: Sequence[int], out: Path, *, steps: int = 25,
                    guidance_scale: float = 7.5, resolution: Optional[int] = None) -> list[Sample]:
    """One image per (prompt, seed), seeded by a CPU ``torch.Generator(seed)`` (the same image for
    the same pipeline on every run), saved as ``out/<k>.png`` with ``out/metadata.jsonl``; the
    folder is written under a temporary name and renamed, so it is complete or absent."""
    from dashdiff.safeio import atomic_write

    if out.exists():
        raise EvalInputError(f"{out} exists; pass a new --output_dir, or score it with --images_dir")
    tmp = out.with_name(f".{out.name}.tmp")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rows, samples = [], []
    size = {"height": resolution, "width": resolution} if resolution else {}
    try:
        for pi, prompt in enumerate(prompts):
            for seed in seeds:
                gen = torch.Generator("cpu").manual_seed(int(seed))
                image = pipe(prompt, generator=gen, num_inference_steps=steps, guidance_scale=guidance_scale,
                             **size).images[0]
                name = f"p{pi:02d}_s{seed}.png"
                image.save(tmp / name)
                rows.append({"file_name": name, "prompt": prompt, "seed": int(seed)})
                samples.append(Sample(out / name, prompt, int(seed)))
        text = "".join(json.dumps(r) + "\n" for r in rows)
        atomic_write(tmp / METADATA, lambda t: Path(t).write_text(text, encoding="utf-8"))
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return samples


# =========================================================================== scoring


def score(samples: Sequence[Sample], references: Sequence[Path], enc: Encoders, identifier: str = "sks",
          batch_size: int = 16) -> dict[str, Any]:
    """Per-sample DINO / CLIP-I / CLIP-T and their means with 95 % CIs over the samples."""
    gen_images = load_images([s.file for s in samples])
    ref_images = load_images(references)
    per: dict[str, list[float]] = {}
    if enc.dino is not None:
        per["dino"] = mean_cosine_to_references(dino_embed(enc, gen_images, batch_size),
                                                dino_embed(enc, ref_images, batch_size)).tolist()
    if enc.clip is not None:
        gen_clip = clip_image_embed(enc, gen_images, batch_size)
        per["clip_i"] = mean_cosine_to_references(gen_clip, clip_image_embed(enc, ref_images, batch_size)).tolist()
        if any(s.prompt is None for s in samples):
            raise EvalInputError("CLIP-T needs each image's prompt: give --prompts (one prompt for a folder "
                                 f"without {METADATA}) or an images folder with {METADATA}")
        texts = [strip_identifier(s.prompt, identifier) for s in samples]  # type: ignore[arg-type]
        per["clip_t"] = (gen_clip * clip_text_embed(enc, texts)).sum(-1).tolist()
    rows = []
    for k, s in enumerate(samples):
        row = {"file": s.file.name, "prompt": s.prompt, "seed": s.seed}
        row.update({m: v[k] for m, v in per.items()})
        rows.append(row)
    return {"summary": {m: mean_ci(v) for m, v in per.items()}, "samples": rows}


LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}


def markdown_table(summary: dict[str, dict[str, float]], title: str = "DreamBooth evaluation") -> str:
    lines = [f"## {title}", "", "| metric | mean ± 95 % CI | n |", "| --- | --- | --- |"]
    for m, ci in summary.items():
        lines.append(f"| {LABELS.get(m, m)} | {format_ci(ci)} | {ci['n']} |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, payload: dict[str, Any]) -> None:
    """``dreambooth_eval.json`` and ``dreambooth_eval.md``, each written atomically."""
    from dashdiff.safeio import atomic_write

    def clean(x: Any) -> Any:  # strict JSON: NaN (an unknown interval) becomes null
        if isinstance(x, float) and math.isnan(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    text = json.dumps(clean(payload), indent=2, allow_nan=False) + "\n"
    atomic_write(out / RESULT_JSON, lambda t: Path(t).write_text(text, encoding="utf-8"))
    md = markdown_table(payload["summary"]) + "\n" + "".join(f"- {k}: {v}\n" for k, v in payload["setup"].items())
    atomic_write(out / RESULT_MD, lambda t: Path(t).write_text(md, encoding="utf-8"))


# =========================================================================== command line


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description="DreamBooth protocol: DINO, CLIP-I and CLIP-T with 95 % CIs.")
    src = p.add_argument_group("images to score (generate them, or give a folder)")
    src.add_argument("--pretrained_model_name_or_path", default=None, help="diffusers pipeline folder or id")
    src.add_argument("--lora_weights", default=None, help="a stock LoRA: folder with pytorch_lora_weights.safetensors, or the file")
    src.add_argument("--dashdiff_adapter", default=None, help="a dashdiff_adapter.safetensors (or its folder)")
    src.add_argument("--images_dir", default=None, help="score these images instead of generating (metadata.jsonl optional)")
    src.add_argument("--prompts", nargs="+", default=[], help="identifier-bearing prompts, e.g. 'a photo of sks toy on the beach'")
    src.add_argument("--prompts_file", default=None, help="prompts, one per line (added to --prompts)")
    src.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    src.add_argument("--num_inference_steps", type=int, default=25)
    src.add_argument("--guidance_scale", type=float, default=7.5)
    src.add_argument("--resolution", type=int, default=None, help="default: the pipeline's")
    ev = p.add_argument_group("evaluation")
    ev.add_argument("--reference_dir", required=True, help="the subject's reference images")
    ev.add_argument("--dino_model", default=None, help="DINO ViT-S/16 folder or id (e.g. facebook/dino-vits16)")
    ev.add_argument("--clip_model", default=None, help="CLIP folder or id (e.g. openai/clip-vit-base-patch32)")
    ev.add_argument("--identifier", default="sks", help="the rare token, left out of the prompt for CLIP-T")
    ev.add_argument("--batch_size", type=int, default=16)
    ev.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ev.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                    help="generation dtype; default float16 on a GPU, float32 on the CPU")
    p.add_argument("--output_dir", required=True)
    args = p.parse_args(argv)
    if args.prompts_file:
        f = Path(args.prompts_file)
        if not f.is_file():
            p.error(f"--prompts_file {f}: no such file")
        args.prompts += [line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    if (args.images_dir is None) == (args.pretrained_model_name_or_path is None):
        p.error("give either --pretrained_model_name_or_path (generate, then score) or --images_dir (score only)")
    if args.images_dir is None and not args.prompts:
        p.error("generating needs --prompts (or --prompts_file)")
    if args.images_dir is not None and (args.lora_weights or args.dashdiff_adapter):
        p.error("--lora_weights / --dashdiff_adapter apply to generation, not to --images_dir")
    if args.lora_weights and args.dashdiff_adapter:
        p.error("give --lora_weights or --dashdiff_adapter, not both")
    if not (args.dino_model or args.clip_model):
        p.error("nothing to compute: give --dino_model and / or --clip_model")
    if args.num_inference_steps < 1 or args.batch_size < 1 or not args.seeds:
        p.error("--num_inference_steps and --batch_size must be >= 1, and --seeds non-empty")
    return args


def main(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Generate (unless ``--images_dir``), score and write the results; returns the payload."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    references = image_files(args.reference_dir, "--reference_dir")
    out = Path(args.output_dir)
    if args.images_dir is not None:
        samples = read_samples(args.images_dir, args.prompts)
    # Encoders before generating: a bad encoder path fails in seconds, not after the images.
    enc = load_encoders(args.dino_model, args.clip_model, device)
    if args.images_dir is None:
        pipe = load_pipeline(args.pretrained_model_name_or_path, args.lora_weights, args.dashdiff_adapter, device,
                             args.dtype)
        samples = generate_images(pipe, args.prompts, args.seeds, out / "images", steps=args.num_inference_steps,
                                  guidance_scale=args.guidance_scale, resolution=args.resolution)
        log(f"generated {len(samples)} images into {out / 'images'}")
    result = score(samples, references, enc, args.identifier, args.batch_size)
    setup = {k: getattr(args, k) for k in ("pretrained_model_name_or_path", "lora_weights", "dashdiff_adapter",
                                           "images_dir", "reference_dir", "dino_model", "clip_model", "identifier",
                                           "num_inference_steps", "guidance_scale", "seeds")}
    setup["device"] = device
    payload = {"setup": setup, **result}
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, payload)
    log(markdown_table(result["summary"]))
    return payload


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """Bad input (missing folder, no images, an encoder path that is not a model) is one line on
    stderr and exit status 1."""
    args = parse_args(argv)
    try:
        main(args)
    except EvalInputError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
