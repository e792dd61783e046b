#!/usr/bin/env python
"""The papers' claims measured in the miniature (issue 14 item 4), with seeds and 95 % CIs.

Four sections (``--sections``, default all):

``subject``
    DreamBooth in miniature: for each subject of ``image_world.SUBJECTS`` (instance images from
    ``write_subject``, instance prompt "a photo of sks toy"), train plain LoRA r=4, LoRA r=12,
    LoRA-Dash r=4 s=8 and AutoLoRA (initial rank 12), all for the same number of optimizer steps,
    through ``train/dreambooth_dash.py``'s own ``main(parse_args(...))`` in this process; generate
    ``image_world.PROMPTS`` x eval seeds with ``train/dreambooth_eval.py``; score **subject
    fidelity** (mean cosine to the instance images in the world encoder's object embedding: the
    DINO stand-in) and **prompt fidelity** (the world encoder's probability of the asked background
    / colour: the CLIP-T stand-in). Two calibration rows: ``base`` (the model without an adapter:
    the subject not learned) and ``world`` (the subject drawn by the world itself in each asked
    context / colour: the subject perfectly learned). CIs are over the (prompt, eval seed, training
    seed) samples, as the DreamBooth protocol's are over (prompt, seed).
``tsd``
    Where LoRA-Dash's launch puts its directions, computed here independently of
    ``dashdiff.dash.selection`` (float64 ``torch.linalg.svd`` of each frozen weight, the launch's chosen
    ``u`` matched to the singular vectors): their relative position in the spectrum (0 = largest
    σ, 1 = smallest), and the overlap of the s chosen directions with the s directions whose
    change rate ``|u_iᵀ ΔW v_i| / σ_i`` is largest after a long plain-LoRA run (the paper's
    overlap claim), by layer type, against the chance overlap s / k.
``autolora``
    AutoLoRA's found ranks against a plain-LoRA rank sweep on the same subject: parameters,
    subject / prompt fidelity, seconds (AutoLoRA's search included).
``commonsense``
    ``train/commonsense_dash.py`` then ``train/commonsense_eval.py`` on the text world's eight tasks
    (``text_world.write_world``): LoRA r=4, LoRA-Dash r=4, LoRA r=32, several seeds; the mean
    accuracy over the eight tasks with a 95 % CI over seeds, and per task.

``--size cpu`` is a small run (a subject, few steps); ``--size full`` is the table for the GPU
machine; ``--size test`` is plumbing only (2 steps), for the test suite. Runs are kept under
``--output_dir`` and reused when complete, so a full run can go in chunks (rerun the same
command). Writes ``quality.md`` (the tables, with device and date) and ``quality.json``.

    python bench/quality.py --size cpu --output_dir bench-out/quality
    python bench/quality.py --size full --sd_model mini-sd --llama_model mini-llama --output_dir ...
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import math
import platform
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "assets" / "pretrain"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

import image_world as W  # noqa: E402
import world_encoders as WE  # noqa: E402

SECTIONS = ("subject", "tsd", "autolora", "commonsense")
INSTANCE_SHOTS = 5
WORLD_ENCODER = ROOT / "assets" / "models" / "world-encoder"

SIZES: dict[str, dict[str, Any]] = {
    "test": {"subjects": ("toydog",), "methods": ("dash-r4-s8",), "train_seeds": (0,), "eval_seeds": (0,),
             "prompts": 2, "steps": 2, "long_steps": 3, "dash_warmup": 1, "batch": 1, "lr": 1e-3,
             "inference_steps": 2, "rank_sweep": (2,), "prior": False,
             "cs_methods": ("dash-r4",), "cs_seeds": (0,), "cs_steps": 2, "cs_limit": 1, "cs_beams": 1,
             "cs_batch": 2, "cs_micro": 2, "cs_lr": 1e-3, "cs_train_on_inputs": False, "cs_eval_batch": 8,
             "cs_people": 8, "encoder_preset": "test"},
    "cpu": {"subjects": ("toydog",), "methods": ("lora-r4", "lora-r12", "dash-r4-s8", "autolora-k12"),
            "train_seeds": (0, 1), "eval_seeds": (0, 1), "prompts": None, "steps": 60, "long_steps": 240,
            "dash_warmup": 15, "batch": 2, "lr": 1e-3, "inference_steps": 10, "rank_sweep": (1, 2, 4, 8, 12),
            "prior": False, "cs_methods": ("lora-r4", "dash-r4", "lora-r32"), "cs_seeds": (0, 1), "cs_steps": 30,
            "cs_limit": 40, "cs_beams": 1, "cs_batch": 8, "cs_micro": 4, "cs_lr": 1e-3, "cs_train_on_inputs": False,
            "cs_eval_batch": 8, "cs_people": 24, "encoder_preset": "cpu"},
    "full": {"subjects": W.SUBJECTS, "methods": ("lora-r4", "lora-r12", "dash-r4-s8", "autolora-k12"),
             "train_seeds": (0, 1, 2), "eval_seeds": (0, 1, 2, 3), "prompts": None, "steps": 500, "long_steps": 2000,
             "dash_warmup": 100, "batch": 2, "lr": 5e-4, "inference_steps": 25, "rank_sweep": (1, 2, 4, 8, 12, 16),
             "prior": True, "cs_methods": ("lora-r4", "dash-r4", "lora-r32"), "cs_seeds": (0, 1, 2), "cs_steps": 600,
             "cs_limit": None, "cs_beams": 1, "cs_batch": 16, "cs_micro": 16, "cs_lr": 3e-3, "cs_train_on_inputs": False,
             "cs_eval_batch": 32, "cs_people": 24, "encoder_preset": "mini"},
}

# DreamBooth methods: train/dreambooth_dash.py flags. The warm-up of LoRA-Dash is filled per size.
METHODS: dict[str, list[str]] = {
    "lora-r4": ["--method", "lora", "--rank", "4"],
    "lora-r12": ["--method", "lora", "--rank", "12"],
    "dash-r4-s8": ["--method", "dash", "--rank", "4", "--dash_directions", "8"],
    "autolora-k12": ["--method", "autolora", "--rank", "12"],
}
# Commonsense methods: train/commonsense_dash.py flags (alpha = 2 r, LLM-Adapters' ratio).
CS_METHODS: dict[str, list[str]] = {
    "lora-r4": ["--adapter_name", "lora", "--lora_r", "4", "--lora_alpha", "8"],
    "dash-r4": ["--adapter_name", "dash", "--lora_r", "4", "--lora_alpha", "8"],
    "lora-r32": ["--adapter_name", "lora", "--lora_r", "32", "--lora_alpha", "64"],
}


def _script(rel: str):
    """A repository script (``train/x.py``) as a module, imported by its file stem (the tests'
    ``load_script`` registers the same names)."""
    folder = str((ROOT / rel).parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(Path(rel).stem)


def DE():  # noqa: N802 - the evaluation module
    return _script("train/dreambooth_eval.py")


def resolve(name: str, flag: str) -> str:
    """A model path: a reserved name (``tiny-*`` / ``mini-*`` through ``dashdiff.testing.resolve_model``)
    or a folder."""
    from dashdiff.testing import resolve_model

    try:
        path = resolve_model(name)
    except FileNotFoundError as err:  # a mini-* folder missing (not a checkout)
        raise SystemExit(f"quality.py: error: {flag} {err}") from None
    if Path(path).is_dir():
        return path
    raise SystemExit(f"quality.py: error: {flag} {name}: no such folder")


def _reset_accelerate() -> None:
    # The scripts run in this process one after another: accelerate's process-wide state must go.
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def _done(folder: Path) -> bool:
    rec = folder / "dashdiff_run.json"
    try:
        return json.loads(rec.read_text())["status"] == "done"
    except (OSError, ValueError, KeyError):
        return False


# =========================================================================== DreamBooth runs


def train_dreambooth(model: str, instance_dir: Path, method: str, seed: int, steps: int, out: Path, size: dict,
                     on_event: Optional[Callable[[str, dict], None]] = None, rank: Optional[int] = None) -> dict:
    """One ``train/dreambooth_dash.py`` run in this process (reused if ``out`` holds a finished one
    and no event is wanted); returns its run record."""
    if _done(out) and on_event is None:
        return json.loads((out / "dashdiff_run.json").read_text())
    db = _script("train/dreambooth_dash.py")
    flags = list(METHODS[method])
    if rank is not None:
        flags[flags.index("--rank") + 1] = str(rank)
    if method.startswith("dash"):
        flags += ["--dash_warmup_steps", str(min(size["dash_warmup"], steps))]
    argv = ["--pretrained_model_name_or_path", model, "--instance_data_dir", str(instance_dir),
            "--instance_prompt", W.INSTANCE_PROMPT, "--resolution", "64", "--train_batch_size", str(size["batch"]),
            "--learning_rate", str(size["lr"]), "--max_train_steps", str(steps), "--seed", str(seed),
            "--checkpointing_steps", str(10 * steps + 10), "--output_dir", str(out), "--report_to", "none",
            "--overwrite_output_dir", *flags]
    if size["prior"]:
        argv += ["--with_prior_preservation", "--class_prompt", W.CLASS_PROMPT, "--num_class_images", "50",
                 "--class_data_dir", str(size["class_dir"]), "--num_inference_steps",
                 str(size["inference_steps"])]
    # Images rendered from an earlier adapter in this folder would be scored as this one's.
    shutil.rmtree(out / "eval_images", ignore_errors=True)
    _reset_accelerate()
    torch.manual_seed(seed)
    try:
        return db.main(db.parse_args(argv), on_event=on_event)
    finally:
        _reset_accelerate()


def prompts_of(size: dict) -> list[dict[str, Any]]:
    return list(W.PROMPTS[: size["prompts"]] if size["prompts"] else W.PROMPTS)


def world_images(subject: str, prompts: Sequence[dict], seeds: Sequence[int]) -> list[Any]:
    """The subject drawn by the world in each prompt's context / colour: the 'perfectly learned' row."""
    out = []
    for k, p in enumerate(prompts):
        for s in seeds:
            shot = INSTANCE_SHOTS + 100 * s + k  # poses the instance images never used
            out.append(W.subject_image(subject, shot, background=p.get("background"), tint=p.get("colour")))
    return out


def score_images(encoder, images: Sequence[Any], texts: Sequence[str], references: Sequence[Any]) -> dict[str, list]:
    """Per-image subject fidelity and prompt fidelity in the world encoder."""
    return {"subject": WE.subject_fidelity(encoder, images, references).tolist(),
            "prompt": WE.prompt_fidelity(encoder, images, texts).tolist()}


def evaluate_run(model: str, run_dir: Optional[Path], prompts: Sequence[dict], seeds: Sequence[int], size: dict,
                 encoder, references: Sequence[Any], images_dir: Path) -> dict[str, list]:
    """Generate (or reuse) the prompts x seeds images of a run (``run_dir`` None: the base model)
    and score them."""
    de = DE()
    texts = [p["prompt"] for p in prompts]
    if images_dir.is_dir() and (images_dir / de.METADATA).is_file():
        samples = de.read_samples(images_dir)
    else:
        # On the GPU machine generation must run there too (load_pipeline's default is the CPU).
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # float32 on both: the GPU table then scores the same numerics as the CPU runs.
        pipe = de.load_pipeline(model, lora_weights=str(run_dir) if run_dir else None, device=device,
                                dtype="float32")
        samples = de.generate_images(pipe, texts, seeds, images_dir, steps=size["inference_steps"], resolution=64)
        del pipe
    images = de.load_images([s.file for s in samples])
    return score_images(encoder, images, [s.prompt for s in samples], references)


def summarise(per: dict[str, list]) -> dict[str, Any]:
    de = DE()
    out: dict[str, Any] = {}
    for k, v in per.items():
        vals = [x for x in v if not (isinstance(x, float) and math.isnan(x))]
        out[k] = de.mean_ci(vals) if vals else None
    return out


def section_subject(args, size: dict, sd_model: str, encoder, out: Path, log) -> dict[str, Any]:
    """Every subject x method x training seed; returns per-method pooled scores and run facts."""
    prompts = prompts_of(size)
    texts = [p["prompt"] for p in prompts]
    pooled: dict[str, dict[str, list]] = {}
    runs: dict[str, list[dict]] = {}

    def add(row: str, scores: dict[str, list]) -> None:
        for k, v in scores.items():
            pooled.setdefault(row, {}).setdefault(k, []).extend(v)

    for subject in size["subjects"]:
        inst = out / "instances" / subject
        if not inst.is_dir():
            W.write_subject(subject, inst, INSTANCE_SHOTS)
        references = DE().load_images(sorted(inst.glob("*.png")))
        add("base", evaluate_run(sd_model, None, prompts, size["eval_seeds"], size, encoder, references,
                                 out / "runs" / subject / "base" / "images"))
        ideal = world_images(subject, prompts, size["eval_seeds"])
        add("world", score_images(encoder, ideal, [t for t in texts for _ in size["eval_seeds"]], references))
        for method in size["methods"]:
            for seed in size["train_seeds"]:
                run_dir = out / "runs" / subject / method / f"seed{seed}"
                t0 = time.perf_counter()
                if method.startswith("dash") and seed == size["train_seeds"][0]:
                    rec = train_dash_captured(sd_model, inst, method, seed, size["steps"], run_dir, size)
                else:
                    rec = train_dreambooth(sd_model, inst, method, seed, size["steps"], run_dir, size)
                facts = {"subject": subject, "seed": seed, "seconds": rec.get("seconds", round(time.perf_counter() - t0, 2)),
                         "params": lora_parameters(run_dir), "ranks": rec.get("autolora_ranks")}
                add(method, evaluate_run(sd_model, run_dir, prompts, size["eval_seeds"], size, encoder, references,
                                         run_dir / "eval_images"))
                runs.setdefault(method, []).append(facts)
                log(f"subject {subject} {method} seed {seed}: trained and scored")
    return {"summary": {row: summarise(v) for row, v in pooled.items()}, "runs": runs,
            "n_prompts": len(prompts)}


def lora_parameters(run_dir: Path) -> int:
    """Numbers in the exported stock LoRA (for AutoLoRA: the retrained LoRA of the found ranks)."""
    from safetensors import safe_open

    f = run_dir / "pytorch_lora_weights.safetensors"
    n = 0
    with safe_open(str(f), "pt") as fh:
        for k in fh.keys():
            n += math.prod(fh.get_slice(k).get_shape())
    return n


# =========================================================================== TSD analysis


def _lora_deltas(host) -> dict[str, torch.Tensor]:
    """ΔW (float64, out x in) of every LoRA layer of an adapted host, by diffusers-style name."""
    from dashdiff.walk import base_model, components

    out = {}
    for prefix, comp in components(host):
        for name, mod in base_model(comp).named_modules():
            if hasattr(mod, "lora_A") and hasattr(mod, "get_delta_weight") and len(getattr(mod, "lora_A", {})):
                for adapter in mod.lora_A.keys():
                    out[f"{prefix}.{name}"] = mod.get_delta_weight(adapter).detach().to(torch.float64).cpu()
    return out


def _dash_choices(host) -> dict[str, dict[str, torch.Tensor]]:
    """The launch's result per LoRA-Dash layer: the frozen weight and the chosen left vectors U_s."""
    from dashdiff.walk import iter_layers

    out = {}
    for name, layer, adapter in iter_layers(host, kind="dash"):
        idx = layer.dash_record[adapter]["indices"]
        out[name] = {"w0": layer.get_base_layer().weight.detach().to(torch.float64).cpu(),
                     "u_s": layer.lora_dash_U[adapter].detach().to(torch.float64).cpu()[:, :idx.numel()],
                     "launch_indices": idx.tolist()}  # dashdiff's own record, to cross-check ours
    return out


def layer_type(name: str) -> str:
    """'attn1.to_q' (self-attention) / 'attn2.to_k' (cross-attention) / the module's last part."""
    m = re.search(r"(attn\d)\.(to_q|to_k|to_v|to_out)", name)
    return f"{m.group(1)}.{m.group(2)}" if m else name.rsplit(".", 1)[-1]


def tsd_layer(w0: torch.Tensor, u_s: torch.Tensor, delta: Optional[torch.Tensor]) -> dict[str, Any]:
    """For one layer: the spectrum positions of the chosen directions, and their overlap with the
    top-s change-rate directions of ``delta`` (a long run's ΔW), from an independent float64 SVD."""
    u, sigma, vh = torch.linalg.svd(w0, full_matrices=False)
    k = sigma.numel()
    eligible = sigma > max(w0.shape) * torch.finfo(torch.float32).eps * sigma[0]
    match = (u.t() @ u_s).abs()  # (k, s): a chosen direction is a singular vector up to sign
    idx = match.argmax(0)
    rel = idx.double() / max(1, k - 1)
    row: dict[str, Any] = {"k": k, "s": int(u_s.shape[1]), "eligible": int(eligible.sum()),
                           "positions": idx.tolist(), "relative": rel.tolist(),
                           "match_min": float(match.max(0).values.min()), "sigma_ratio": (sigma[idx] / sigma[0]).tolist()}
    if delta is not None:
        rate = (u.t() @ delta @ vh.t()).diagonal().abs() / torch.where(eligible, sigma, torch.ones_like(sigma))
        rate = torch.where(eligible, rate, torch.full_like(rate, -1.0))
        top = set(torch.argsort(rate, descending=True)[: row["s"]].tolist())
        row["overlap"] = len(top & set(idx.tolist())) / max(1, row["s"])
        row["chance"] = row["s"] / max(1, row["eligible"])
    return row


LAUNCH_CAPTURE = "launch_capture.pt"


def train_dash_captured(model: str, instance_dir: Path, method: str, seed: int, steps: int, run_dir: Path,
                        size: dict) -> dict:
    """A LoRA-Dash run that also keeps what its launch chose (``launch_capture.pt``: per layer the
    frozen weight, the chosen U_s and dashdiff's recorded indices), for the TSD section. Reused when
    both the run and the capture are complete."""
    capture = run_dir / LAUNCH_CAPTURE
    if _done(run_dir) and capture.is_file():
        return json.loads((run_dir / "dashdiff_run.json").read_text())
    from dashdiff.safeio import atomic_write

    chosen: dict[str, dict] = {}

    def on_event(event: str, info: dict) -> None:
        if event == "launch":
            chosen.update(_dash_choices(info["host"]))

    rec = train_dreambooth(model, instance_dir, method, seed, steps, run_dir, size, on_event)
    atomic_write(capture, lambda t: torch.save(chosen, t))
    return rec


def section_tsd(args, size: dict, sd_model: str, out: Path, log) -> dict[str, Any]:
    """Per subject: the LoRA-Dash run of seed 0 (its launch captured; shared with the subject
    section) and a long plain-LoRA run (its final ΔW)."""
    by_type: dict[str, list[dict]] = {}
    seed = size["train_seeds"][0]
    for subject in size["subjects"][:1] if args.size != "full" else size["subjects"]:
        inst = out / "instances" / subject
        if not inst.is_dir():
            W.write_subject(subject, inst, INSTANCE_SHOTS)
        dash_dir = out / "runs" / subject / "dash-r4-s8" / f"seed{seed}"
        train_dash_captured(sd_model, inst, "dash-r4-s8", seed, size["steps"], dash_dir, size)
        chosen = torch.load(dash_dir / LAUNCH_CAPTURE, weights_only=True)
        deltas: dict[str, torch.Tensor] = {}
        long_dir = out / "tsd" / subject / "lora-long"
        delta_file = long_dir / "deltas.pt"
        if delta_file.is_file() and _done(long_dir):
            deltas = torch.load(delta_file, weights_only=True)
        else:
            def on_lora(event: str, info: dict) -> None:
                if event == "end":
                    deltas.update(_lora_deltas(info["host"]))

            from dashdiff.safeio import atomic_write

            train_dreambooth(sd_model, inst, "lora-r4", seed, size["long_steps"], long_dir, size, on_lora)
            atomic_write(delta_file, lambda t: torch.save(deltas, t))
        for name, c in chosen.items():
            row = tsd_layer(c["w0"], c["u_s"], deltas.get(name))
            row["agrees_with_launch"] = row["positions"] == c["launch_indices"]
            by_type.setdefault(layer_type(name), []).append({"layer": name, "subject": subject, **row})
        log(f"tsd {subject}: {len(chosen)} layers")
    return {"by_type": by_type}


# =========================================================================== AutoLoRA vs a rank sweep


def section_autolora(args, size: dict, sd_model: str, encoder, out: Path, log) -> dict:
    """Plain LoRA at each rank of the sweep and AutoLoRA (seed 0, first subject); runs shared with the
    subject section where they coincide."""
    subject = size["subjects"][0]
    inst = out / "instances" / subject
    if not inst.is_dir():
        W.write_subject(subject, inst, INSTANCE_SHOTS)
    references = DE().load_images(sorted(inst.glob("*.png")))
    prompts = prompts_of(size)
    rows: dict[str, dict] = {}
    variants = [(f"lora-r{r}", "lora-r4", r) for r in size["rank_sweep"]]
    if "autolora-k12" in size["methods"]:
        variants.append(("autolora-k12", "autolora-k12", None))
    for label, method, rank in variants:
        run_dir = out / "runs" / subject / label / "seed0"
        rec = train_dreambooth(sd_model, inst, method, 0, size["steps"], run_dir, size, rank=rank)
        scores = evaluate_run(sd_model, run_dir, prompts, size["eval_seeds"], size, encoder, references,
                              run_dir / "eval_images")
        ranks = rec.get("autolora_ranks") or {}
        rows[label] = {"params": lora_parameters(run_dir), "seconds": rec.get("seconds"),
                       "rank_total": sum(ranks.values()) if ranks else None,
                       "rank_histogram": _histogram(ranks) if ranks else None, **summarise(scores)}
        log(f"autolora sweep {label}: done")
    return {"subject": subject, "rows": rows}


def _histogram(ranks: dict[str, int]) -> dict[str, int]:
    h: dict[str, int] = {}
    for r in ranks.values():
        h[str(r)] = h.get(str(r), 0) + 1
    return dict(sorted(h.items(), key=lambda kv: int(kv[0])))


# =========================================================================== commonsense


def section_commonsense(args, size: dict, llama: str, out: Path, log) -> dict[str, Any]:
    import text_world as TW

    cs = _script("train/commonsense_dash.py")
    ev = _script("train/commonsense_eval.py")
    data = out / "textworld"
    if not data.is_dir():
        TW.write_world(data, seed=0, n_people=size["cs_people"])
    results: dict[str, list[dict]] = {}
    for method in size["cs_methods"]:
        for seed in size["cs_seeds"]:
            run_dir = out / "commonsense" / method / f"seed{seed}"
            flags = list(CS_METHODS[method])
            if method.startswith("dash"):
                flags += ["--dash_warmup_steps", str(max(1, size["cs_steps"] // 5))]
            if not _done(run_dir):
                argv = ["--base_model", llama, "--data_path", str(data / "train.json"), "--output_dir", str(run_dir),
                        "--val_set_size", "0", "--batch_size", str(size["cs_batch"]),
                        "--micro_batch_size", str(size["cs_micro"]), "--max_train_steps", str(size["cs_steps"]),
                        "--learning_rate", str(size["cs_lr"]), "--warmup_steps", str(max(1, size["cs_steps"] // 10)),
                        "--eval_step", str(10 * size["cs_steps"]), "--save_step", str(10 * size["cs_steps"]),
                        "--logging_steps", str(max(1, size["cs_steps"])), "--seed", str(seed),
                        "--train_on_inputs", str(size["cs_train_on_inputs"]).lower(), "--overwrite_output_dir", *flags]
                _reset_accelerate()
                try:
                    cs.main(cs.parse_args(argv))
                finally:
                    _reset_accelerate()
            eval_dir = run_dir / "eval"
            res_file = eval_dir / "results.json"
            if res_file.is_file() and json.loads(res_file.read_text()).get("complete"):
                payload = json.loads(res_file.read_text())
            else:
                eargs = ["--dataset", "all", "--data_dir", str(data), "--base_model", llama, "--lora_weights",
                         str(run_dir), "--num_beams", str(size["cs_beams"]), "--batch_size", str(size["cs_eval_batch"]),
                         "--output_dir", str(eval_dir), "--no_progress", "--seed", str(seed)]
                if size["cs_limit"]:
                    eargs += ["--limit", str(size["cs_limit"])]
                payload = ev.main(ev.parse_args(eargs))
            results.setdefault(method, []).append({"seed": seed, "accuracy": payload["accuracy"], "mean": payload["mean"]})
            log(f"commonsense {method} seed {seed}: mean accuracy {payload['mean']:.3f}")
    de = DE()
    summary = {m: {"mean": de.mean_ci([r["mean"] for r in rs]),
                   "tasks": {t: sum(r["accuracy"][t] for r in rs) / len(rs) for t in rs[0]["accuracy"]}}
               for m, rs in results.items()}
    return {"summary": summary, "runs": results}


# =========================================================================== report


def _ci(ci: Optional[dict]) -> str:
    return "–" if not ci else DE().format_ci(ci)


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    extra = "".join(f" --{'learning_rate' if k == 'lr' else k} {' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                    for k, v in meta.get("overrides", {}).items())
    lines = [f"# Quality in the miniature (bench/quality.py --size {meta['size']}{extra})", "",
             f"{meta['date']} · {meta['device']} · sd_model `{meta['sd_model']}` · llama_model `{meta['llama_model']}` · "
             f"world encoder `{meta['world_encoder']}` · {meta['seconds']:.0f} s", ""]
    if "subject" in result:
        r = result["subject"]
        lines += ["## Subject-driven generation (DreamBooth in miniature)", "",
                  "Subject fidelity: mean cosine to the instance images in the world encoder's object embedding "
                  "(DINO stand-in). Prompt fidelity: the world encoder's probability of the asked background / "
                  f"colour (CLIP-T stand-in). Mean ± 95 % CI over (prompt, eval seed, training seed); "
                  f"{r['n_prompts']} prompts. `base`: no adapter (not learned); `world`: the subject drawn by the "
                  "world in the asked context (perfectly learned).", "",
                  "`numbers`: the exported stock LoRA's (LoRA-Dash exports exactly as rank r + s; AutoLoRA as its found ranks).",
                  "",
                  "| method | subject fidelity | prompt fidelity | n | numbers | s / run |", "| --- | --- | --- | --- | --- | --- |"]
        for row, s in r["summary"].items():
            facts = r["runs"].get(row, [])
            params = facts[0]["params"] if facts else "–"
            secs = f"{sum(f['seconds'] for f in facts) / len(facts):.1f}" if facts else "–"
            n = s["subject"]["n"] if s.get("subject") else 0
            lines.append(f"| {row} | {_ci(s.get('subject'))} | {_ci(s.get('prompt'))} | {n} | {params} | {secs} |")
        lines.append("")
    if "tsd" in result:
        lines += ["## TSD analysis: where LoRA-Dash's directions sit, and the overlap claim", "",
                  "Relative position 0 = largest σ, 1 = smallest. Overlap: share of the s chosen directions among "
                  "the s largest change rates |u_iᵀ ΔW v_i| / σ_i of a long plain-LoRA run; chance = s / k.", "",
                  "| layer type | layers | mean position | chosen in bottom 10 % | chosen in top 10 % | overlap | chance |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for t, rows in sorted(result["tsd"]["by_type"].items()):
            rel = [x for r in rows for x in r["relative"]]
            ov = [r["overlap"] for r in rows if "overlap" in r]
            ch = [r["chance"] for r in rows if "chance" in r]
            lines.append(f"| {t} | {len(rows)} | {sum(rel) / len(rel):.2f} | {sum(x >= 0.9 for x in rel) / len(rel):.2f} | "
                         f"{sum(x <= 0.1 for x in rel) / len(rel):.2f} | "
                         f"{(sum(ov) / len(ov)) if ov else float('nan'):.2f} | {(sum(ch) / len(ch)) if ch else float('nan'):.2f} |")
        lines.append("")
    if "autolora" in result:
        a = result["autolora"]
        lines += [f"## AutoLoRA's ranks against a plain-LoRA rank sweep (subject {a['subject']}, seed 0)", "",
                  "| adapter | numbers | ranks (rank: layers) | subject fidelity | prompt fidelity | s |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for label, row in a["rows"].items():
            hist = ", ".join(f"{k}: {v}" for k, v in row["rank_histogram"].items()) if row["rank_histogram"] else "–"
            lines.append(f"| {label} | {row['params']} | {hist} | {_ci(row.get('subject'))} | {_ci(row.get('prompt'))} | "
                         f"{row['seconds']} |")
        lines.append("")
    if "commonsense" in result:
        c = result["commonsense"]["summary"]
        tasks = list(next(iter(c.values()))["tasks"]) if c else []
        lines += ["## Commonsense in miniature (text world, eight tasks)", "",
                  "Mean accuracy over the eight tasks ± 95 % CI over training seeds; per task: mean over seeds.", "",
                  "| method | mean | " + " | ".join(tasks) + " |", "| --- | --- | " + " | ".join("---" for _ in tasks) + " |"]
        for m, s in c.items():
            lines.append(f"| {m} | {_ci(s['mean'])} | " + " | ".join(f"{s['tasks'][t]:.3f}" for t in tasks) + " |")
        lines.append("")
    return "\n".join(lines)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def world_encoder(args, size: dict, out: Path, log):
    """The world encoder: ``--world_encoder``, else the shipped one, else one trained now at the
    size's preset into ``<output_dir>/world-encoder`` (reused afterwards)."""
    if args.world_encoder:
        return WE.load_world_encoder(args.world_encoder), args.world_encoder
    if (WORLD_ENCODER / WE.CONFIG).is_file():
        return WE.load_world_encoder(WORLD_ENCODER), str(WORLD_ENCODER)
    folder = out / "world-encoder"
    if not (folder / "encoder" / WE.CONFIG).is_file():
        log(f"training the world encoder (preset {size['encoder_preset']}) into {folder}")
        WE.main(["--output_dir", str(folder), "--preset", size["encoder_preset"], "--workers", "1",
                 "--eval_scenes", "300" if args.size == "test" else "1000", "--log_every", "100"])
    return WE.load_world_encoder(folder / "encoder"), str(folder / "encoder")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="The quality benchmark in miniature (issue 14 item 4).")
    p.add_argument("--size", choices=sorted(SIZES), default="cpu")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    p.add_argument("--sd_model", default="mini-sd", help="pipeline folder or reserved name (default mini-sd)")
    p.add_argument("--llama_model", default="mini-llama", help="causal LM folder or reserved name (default mini-llama)")
    p.add_argument("--world_encoder", default=None, help="a world encoder folder (world_encoders.py); default: "
                   "assets/models/world-encoder, else trained now")
    p.add_argument("--output_dir", required=True)
    o = p.add_argument_group("overrides of the --size settings (tuning; runs go to another --output_dir)")
    o.add_argument("--steps", type=int, default=None, help="DreamBooth optimizer steps (the long TSD run: 4x)")
    o.add_argument("--learning_rate", type=float, default=None, help="DreamBooth learning rate")
    o.add_argument("--train_seeds", type=int, nargs="+", default=None)
    o.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=None)
    o.add_argument("--rank_sweep", type=int, nargs="+", default=None,
                   help="plain-LoRA ranks of the autolora section's sweep (one process per rank, merged like --subjects)")
    o.add_argument("--cs_methods", nargs="+", choices=sorted(CS_METHODS), default=None,
                   help="commonsense methods (one process per method, merged like --subjects)")
    o.add_argument("--cs_seeds", type=int, nargs="+", default=None, help="commonsense training seeds")
    o.add_argument("--cs_steps", type=int, default=None, help="commonsense optimizer steps")
    o.add_argument("--cs_learning_rate", type=float, default=None, help="commonsense learning rate")
    o.add_argument("--subjects", nargs="+", choices=W.SUBJECTS, default=None,
                   help="DreamBooth subjects (a full run can go as one process per subject, merged afterwards "
                        "by rerunning without this flag on a folder holding all their runs)")
    args = p.parse_args(argv)
    for flag in ("steps", "cs_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1")
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {', '.join(bad)}; valid: {', '.join(SECTIONS)}")
    return args


# Overrides that choose which runs are made, not how a run is made: folders of runs split along
# them (one process per subject, method, seed or sweep rank) merge into one.
RUN_CHOICES = ("subjects", "methods", "train_seeds", "rank_sweep", "cs_methods", "cs_seeds")


def run_setting(size_name: str, overrides: dict[str, Any]) -> str:
    """The line ``quality_size.txt`` records: the size and the overrides that change a run."""
    return " ".join([size_name, *(f"{k}={v}" for k, v in sorted(overrides.items()) if k not in RUN_CHOICES)])


def main(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    from dashdiff.safeio import atomic_write

    t0 = time.perf_counter()
    out = Path(args.output_dir)
    # Prior preservation's class images ("a photo of a toy" from the base model): one set for all runs.
    size = {**SIZES[args.size], "class_dir": out / "class_images"}
    overrides = {k: v for k, v in (("steps", args.steps), ("lr", args.learning_rate),
                                   ("train_seeds", args.train_seeds), ("methods", args.methods),
                                   ("subjects", args.subjects), ("rank_sweep", args.rank_sweep),
                                   ("cs_methods", args.cs_methods),
                                   ("cs_seeds", args.cs_seeds), ("cs_steps", args.cs_steps),
                                   ("cs_lr", args.cs_learning_rate)) if v is not None}
    size.update(overrides)
    if args.steps is not None:
        size["long_steps"] = 4 * args.steps
        size["dash_warmup"] = max(1, args.steps // 4)
    image_sections = {"subject", "tsd", "autolora"} & set(args.sections)
    sd_model = resolve(args.sd_model, "--sd_model") if image_sections else None
    llama = resolve(args.llama_model, "--llama_model") if "commonsense" in args.sections else None
    out.mkdir(parents=True, exist_ok=True)
    # Finished runs are reused by path: a folder holds the runs of one size only.
    marker = out / "quality_size.txt"
    setting = run_setting(args.size, overrides)
    if marker.is_file() and marker.read_text().strip() != setting:
        raise SystemExit(f"quality.py: error: {out} holds a --size {marker.read_text().strip()} run; "
                         "use another --output_dir for --size " + setting)
    marker.write_text(setting + "\n")
    result: dict[str, Any] = {}
    encoder, enc_path = (world_encoder(args, size, out, log) if {"subject", "autolora"} & set(args.sections)
                         else (None, None))
    if "subject" in args.sections:
        result["subject"] = section_subject(args, size, sd_model, encoder, out, log)
    if "tsd" in args.sections:
        result["tsd"] = section_tsd(args, size, sd_model, out, log)
    if "autolora" in args.sections:
        result["autolora"] = section_autolora(args, size, sd_model, encoder, out, log)
    if "commonsense" in args.sections:
        result["commonsense"] = section_commonsense(args, size, llama, out, log)
    result["meta"] = {"size": args.size, "overrides": overrides, "sections": args.sections, "sd_model": args.sd_model,
                      "llama_model": args.llama_model, "world_encoder": enc_path, "device": device_name(),
                      "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                      "seconds": time.perf_counter() - t0, "torch": torch.__version__}
    md = markdown(result)
    text = json.dumps(result, indent=2, default=float, allow_nan=True) + "\n"
    atomic_write(out / "quality.json", lambda t: Path(t).write_text(text, encoding="utf-8"))
    atomic_write(out / "quality.md", lambda t: Path(t).write_text(md, encoding="utf-8"))
    log(md)
    return result


if __name__ == "__main__":
    main(parse_args())
