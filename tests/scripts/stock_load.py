"""Load dashdiff exports with the stock libraries only, in a fresh process: this file must NEVER
import dashdiff (the point is that exports work where dashdiff is not installed).

Usage: ``python tests/stock_load.py JOB.json``. ``JOB.json``: ``{"out": path, "tasks": [...]}``;
each task runs one stock load and records, under ``<task id>/...`` in the ``out`` safetensors:

- ``pipeline_lora``  ``{"pipeline": "sd"|"sdxl", "base", "lora", "weight_name"?}``:
  ``DiffusionPipeline.from_pretrained(base)`` + ``pipe.load_lora_weights(lora)``;
- ``pipeline``       ``{"pipeline", "path"}``: ``from_pretrained`` of a merged pipeline;
- ``peft``           ``{"base", "adapter"}``: ``AutoModelForCausalLM.from_pretrained(base)`` +
  ``PeftModel.from_pretrained(model, adapter)``;
- ``causal_lm``      ``{"path"}``: ``AutoModelForCausalLM.from_pretrained`` of a merged model.

Recorded: ``unet`` (one UNet forward on the inputs in ``job["inputs"]``), ``images`` (a 2-step
``output_type="np"`` render), ``logits``, and ``delta/<module>`` (each loaded LoRA layer's
``get_delta_weight``: the per-layer ΔW as the stock loader scaled it). The header's
``report`` key (JSON) lists warnings/log lines seen per task and whether dashdiff was imported.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

PROMPT = "a photo of sks cat"


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")


def _lora_deltas(root: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    from peft.tuners.lora.layer import LoraLayer

    out = {}
    for name, mod in root.named_modules():
        if isinstance(mod, LoraLayer):
            for adapter in mod.lora_A.keys():
                out[f"delta/{prefix}{name}"] = mod.get_delta_weight(adapter).detach().float()
    return out


def unet_forward(pipe, inputs: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    kwargs = {}
    if kind == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": inputs[f"{kind}.text_embeds"], "time_ids": inputs[f"{kind}.time_ids"]}
    with torch.no_grad():
        return pipe.unet(inputs[f"{kind}.sample"], inputs[f"{kind}.t"], inputs[f"{kind}.encoder_hidden_states"],
                         **kwargs).sample


def render(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    images = pipe(PROMPT, num_inference_steps=2, output_type="np", generator=gen).images
    return torch.from_numpy(images).float()


def run_task(task: dict, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    kind = task["kind"]
    out: dict[str, torch.Tensor] = {}
    if kind in ("pipeline_lora", "pipeline"):
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(task["base"] if kind == "pipeline_lora" else task["path"])
        pipe.set_progress_bar_config(disable=True)
        if kind == "pipeline_lora":
            kwargs = {"weight_name": task["weight_name"]} if task.get("weight_name") else {}
            pipe.load_lora_weights(task["lora"], **kwargs)
            for comp in ("unet", "text_encoder", "text_encoder_2"):
                if getattr(pipe, comp, None) is not None:
                    out.update(_lora_deltas(getattr(pipe, comp), f"{comp}."))
        out["unet"] = unet_forward(pipe, inputs, task["pipeline"])
        out["images"] = render(pipe)
    elif kind in ("peft", "causal_lm"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(task["base"] if kind == "peft" else task["path"])
        if kind == "peft":
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, task["adapter"])
            out.update(_lora_deltas(model.base_model.model, ""))
        model.eval()
        with torch.no_grad():
            out["logits"] = model(input_ids=inputs["llama.input_ids"]).logits
    else:
        raise ValueError(f"unknown task kind {kind!r}")
    return out


def main(job_path: str) -> None:
    with open(job_path) as fh:
        job = json.load(fh)
    # Cloned: tensors read from a safetensors file can sit at unaligned addresses, and CPU conv
    # kernels then round differently (~1e-6) than on the aligned copies the parent computed with.
    inputs = {k: v.clone() for k, v in load_file(job["inputs"]).items()}
    collect = _Collect()
    for name in ("diffusers", "peft", "transformers"):
        logging.getLogger(name).addHandler(collect)
    results: dict[str, torch.Tensor] = {}
    report: dict[str, list[str]] = {}
    for task in job["tasks"]:
        collect.lines = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for key, value in run_task(task, inputs).items():
                results[f"{task['id']}/{key}"] = value.contiguous()
        report[task["id"]] = collect.lines + [f"warning: {w.message}" for w in caught]
    # The whole point: none of the stock loaders pulled dashdiff in.
    leaked = sorted(m for m in sys.modules if m == "dashdiff" or m.startswith("dashdiff."))
    assert not leaked, f"stock loading imported {leaked}"
    save_file(results, job["out"], metadata={"report": json.dumps(report)})


if __name__ == "__main__":
    main(sys.argv[1])
