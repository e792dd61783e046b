#!/usr/bin/env python
"""DreamBooth settings side by side on the miniature, scored as the demo's validation images are seen.

Each line of ``--settings`` is ``NAME FLAG ...``: a name and ``train/dreambooth_dash.py`` flags (shell
quoting: ``--instance_prompt "a photo of sks toy indoors"`` overrides the instance prompt). Every setting is
trained on every ``--subjects`` (``toycat``: the demo's ``assets/subject``; others drawn by
``image_world.write_subject``) by the script itself, ``--workers`` at a time in subprocesses, then rendered
the way the script renders its validation images (DPM-Solver, ``--guidance``) over the protocol prompts
(``image_world.PROMPTS``) x ``--seeds`` at each adapter scale of ``--scales`` (``cross_attention_kwargs``,
the "LoRA weight" of A1111 / ComfyUI), and scored with the world encoder over the context prompts:
subject fidelity (DINO stand-in) and prompt fidelity (CLIP-T stand-in), and both on ``--validation_prompt``
alone. Row ``base``: the model without an adapter. Finished runs under ``--output_dir`` are reused.

Writes ``grid.md`` (one row per setting and subject), ``grid.json`` and ``montage_<subject>_s<scale>.png``
(one row per setting: seed ``--seeds[0]`` of each prompt, base first).

    python bench/dreambooth_grid.py --settings grid.txt --output_dir bench-out/grid --workers 8
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "assets" / "pretrain"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import image_world as W  # noqa: E402
import quality as Q  # noqa: E402  (its evaluation-script loader and finished-run check)
import world_encoders as WE  # noqa: E402

DEMO_SUBJECT = ROOT / "assets" / "subject"
WORLD_ENCODER = ROOT / "assets" / "models" / "world-encoder"


def read_settings(path: Path) -> list[tuple[str, list[str]]]:
    """``(name, flags)`` per non-empty, non-comment line; names must be unique and not ``base``."""
    out: list[tuple[str, list[str]]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        name, flags = words[0], words[1:]
        if name == "base" or any(name == n for n, _ in out):
            raise SystemExit(f"dreambooth_grid.py: error: {path}: setting name {name!r} is 'base' or repeated")
        out.append((name, flags))
    if not out:
        raise SystemExit(f"dreambooth_grid.py: error: {path}: no settings (lines of NAME FLAG ...)")
    return out


def instance_dir(subject: str, out: Path) -> Path:
    if subject == "toycat":
        return DEMO_SUBJECT
    folder = out / "instances" / subject
    if not folder.is_dir():
        W.write_subject(subject, folder, 5)
    return folder


def train(model: str, name: str, flags: list[str], subject: str, out: Path) -> Path:
    """One ``train/dreambooth_dash.py`` run in a subprocess (skipped if finished); returns its folder."""
    run_dir = out / "runs" / f"{name}__{subject}"
    if Q._done(run_dir):
        return run_dir
    defaults = {"--instance_prompt": W.INSTANCE_PROMPT, "--resolution": "64", "--train_batch_size": "2",
                "--seed": "0", "--checkpointing_steps": "1000000", "--report_to": "none"}
    extra = [w for k, v in defaults.items() if k not in flags for w in (k, v)]
    cmd = [sys.executable, str(ROOT / "train" / "dreambooth_dash.py"), "--pretrained_model_name_or_path", model,
           "--instance_data_dir", str(instance_dir(subject, out)), "--output_dir", str(run_dir),
           "--overwrite_output_dir", *extra, *flags]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out / "runs" / f"{name}__{subject}.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc:
        raise RuntimeError(f"setting {name} on {subject} failed (exit {rc}); see {out / 'runs'}/{name}__{subject}.log")
    return run_dir


def render_and_score(model: str, run_dir: Optional[Path], references: list, args, encoder) -> dict[str, Any]:
    """Per adapter scale (the base model: 1 only): the scores over the context prompts and on the
    validation prompt, and the seed-``seeds[0]`` image of each protocol prompt (uint8, for the montage)."""
    from diffusers import DPMSolverMultistepScheduler

    pipe = Q.DE().load_pipeline(model, lora_weights=str(run_dir) if run_dir else None,
                              device=args.device, dtype="float32")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # as the script validates
    texts = [p["prompt"] for p in W.PROMPTS]
    context = [p["prompt"] for p in W.PROMPTS if p["type"] == "context"]
    prompts = [t for t in texts for _ in args.seeds]
    out: dict[str, Any] = {}
    for scale in (args.scales if run_dir else [1.0]):
        gens = [torch.Generator("cpu").manual_seed(s) for _ in texts for s in args.seeds]
        images = pipe(prompts, num_inference_steps=args.inference_steps, guidance_scale=args.guidance,
                      generator=gens, height=64, width=64, cross_attention_kwargs={"scale": float(scale)}).images
        subj = WE.subject_fidelity(encoder, images, references).tolist()
        fit = WE.prompt_fidelity(encoder, images, prompts).tolist()
        ctx = [k for k, t in enumerate(prompts) if t in context]
        val = [k for k, t in enumerate(prompts) if t == args.validation_prompt]
        out[str(scale)] = {"subject": float(np.mean([subj[k] for k in ctx])),
                           "prompt": float(np.mean([fit[k] for k in ctx])),
                           "subject_validation": float(np.mean([subj[k] for k in val])) if val else None,
                           "prompt_validation": float(np.mean([fit[k] for k in val])) if val else None,
                           "images": [np.asarray(images[k]) for k in range(0, len(images), len(args.seeds))]}
    return out


def _cell(r: dict[str, Any]) -> str:
    v = "" if r["subject_validation"] is None else f" ({r['subject_validation']:.2f} / {r['prompt_validation']:.2f})"
    return f"{r['subject']:.3f} / {r['prompt']:.3f}{v}"


def markdown(rows: list[dict[str, Any]], args) -> str:
    head = ["setting", "subject", *(f"scale {s}" for s in args.scales)]
    lines = [f"# DreamBooth grid on `{args.sd_model}` (guidance {args.guidance}, seeds {args.seeds})", "",
             "Cells: subject fidelity / prompt fidelity over the context prompts (in brackets: on "
             f"\"{args.validation_prompt}\" alone). Base: no adapter.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [_cell(r["scores"].get(str(s), r["scores"]["1.0"])) for s in args.scales]
        lines.append(f"| {r['setting']} | {r['subject']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", type=Path, required=True, help="lines of NAME FLAG ... (train/dreambooth_dash.py flags)")
    p.add_argument("--sd_model", default="mini-sd", help="pipeline folder or reserved name (default mini-sd)")
    p.add_argument("--subjects", nargs="+", default=["toycat"], choices=["toycat", *W.SUBJECTS])
    p.add_argument("--scales", nargs="+", type=float, default=[1.0, 0.5], help="adapter scales to render at")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--guidance", type=float, default=7.5, help="the pipeline's default, as the script's validation")
    p.add_argument("--inference_steps", type=int, default=20)
    p.add_argument("--validation_prompt", default="a photo of sks toy on the beach")
    p.add_argument("--workers", type=int, default=1, help="training runs at a time")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--world_encoder", type=Path, default=WORLD_ENCODER,
                   help="world encoder folder for the scores (default: the shipped one, trained on world version 1)")
    p.add_argument("--output_dir", type=Path, required=True)
    args = p.parse_args(argv)
    if not args.settings.is_file():
        p.error(f"--settings {args.settings}: no such file")
    if args.workers < 1 or args.inference_steps < 1:
        p.error("--workers and --inference_steps must be >= 1")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    from PIL import Image

    from dashdiff.safeio import atomic_write
    from dashdiff.testing import resolve_model

    settings = read_settings(args.settings)
    model = resolve_model(args.sd_model)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(name, flags, subject) for name, flags in settings for subject in args.subjects]
    with ThreadPoolExecutor(args.workers) as pool:  # each job is a subprocess: threads only wait
        run_dirs = list(pool.map(lambda j: train(model, j[0], j[1], j[2], out), jobs))
    encoder = WE.load_world_encoder(args.world_encoder)
    de = Q.DE()
    rows: list[dict[str, Any]] = []
    for subject in args.subjects:
        refs = de.load_images(sorted(instance_dir(subject, out).glob("*.png")))
        rows.append({"setting": "base", "subject": subject, "scores": render_and_score(model, None, refs, args, encoder)})
        for (name, _, subj), run_dir in zip(jobs, run_dirs):
            if subj == subject:
                rows.append({"setting": name, "subject": subject,
                             "scores": render_and_score(model, run_dir, refs, args, encoder)})
        for scale in args.scales:
            strips = [np.concatenate(r["scores"].get(str(scale), r["scores"]["1.0"])["images"], axis=1)
                      for r in rows if r["subject"] == subject]
            atomic_write(out / f"montage_{subject}_s{scale}.png",
                         lambda t: Image.fromarray(np.concatenate(strips, axis=0)).save(t, format="PNG"))
    text = markdown(rows, args)
    payload = [{**r, "scores": {k: {m: v for m, v in sc.items() if m != "images"} for k, sc in r["scores"].items()}}
               for r in rows]
    atomic_write(out / "grid.json", lambda t: Path(t).write_text(json.dumps(payload, indent=2), encoding="utf-8"))
    atomic_write(out / "grid.md", lambda t: Path(t).write_text(text, encoding="utf-8"))
    print(text)
    return payload


if __name__ == "__main__":
    main(parse_args())
