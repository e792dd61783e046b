"""Reload dashdiff exports with stock diffusers / PEFT only, on the GPU when there is one: this
file must NEVER import dashdiff (exports must work where dashdiff is not installed).

Usage: ``python bench/stock_reload.py JOB.json`` with ``{"tasks": [...], "resolution": px}``; a task is
``{"id", "kind": "pipeline_lora", "base", "lora", "weight_name"?}`` (``DiffusionPipeline.from_pretrained``
+ ``load_lora_weights`` + a 2-step render) or ``{"id", "kind": "peft", "base", "adapter"}``
(``AutoModelForCausalLM`` + ``PeftModel.from_pretrained`` + one forward). Each task must load at least
one LoRA layer and give finite outputs; prints one line per task, exits 1 on any failure.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def lora_layers(module: torch.nn.Module) -> int:
    from peft.tuners.lora.layer import LoraLayer

    return sum(isinstance(m, LoraLayer) for m in module.modules())


def run_task(task: dict, resolution: int, device: str) -> str:
    dtype = torch.float16 if device == "cuda" else torch.float32
    if task["kind"] == "pipeline_lora":
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(task["base"], torch_dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        kwargs = {"weight_name": task["weight_name"]} if task.get("weight_name") else {}
        pipe.load_lora_weights(task["lora"], **kwargs)
        n = sum(lora_layers(getattr(pipe, c)) for c in ("unet", "text_encoder", "text_encoder_2")
                if getattr(pipe, c, None) is not None)
        gen = torch.Generator(device).manual_seed(0)
        img = pipe("a photo of sks toy", num_inference_steps=2, height=resolution, width=resolution,
                   output_type="pt", generator=gen).images
        ok = n > 0 and bool(torch.isfinite(img).all())
        return f"{'ok' if ok else 'FAIL'}: {n} LoRA layers, image {tuple(img.shape)} finite={bool(torch.isfinite(img).all())}"
    if task["kind"] == "peft":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(task["base"], dtype=torch.bfloat16 if device == "cuda"
                                                     else torch.float32).to(device)
        model = PeftModel.from_pretrained(model, task["adapter"]).eval()
        n = lora_layers(model)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[1, 5, 6, 7]], device=device)).logits
        ok = n > 0 and bool(torch.isfinite(logits).all())
        return f"{'ok' if ok else 'FAIL'}: {n} LoRA layers, logits finite={bool(torch.isfinite(logits).all())}"
    raise ValueError(f"unknown task kind {task['kind']!r}")


def main(job_path: str) -> int:
    with open(job_path) as fh:
        job = json.load(fh)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    failed = 0
    for task in job["tasks"]:
        try:
            line = run_task(task, job.get("resolution", 512), device)
        except Exception as e:  # one line per task: the suite's log shows every export's fate
            line = f"FAIL: {type(e).__name__}: {e}"
        failed += not line.startswith("ok")
        print(f"{task['id']}: {line}", flush=True)
    leaked = sorted(m for m in sys.modules if m == "dashdiff" or m.startswith("dashdiff."))
    if leaked:
        print(f"FAIL: stock loading imported {leaked}")
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
