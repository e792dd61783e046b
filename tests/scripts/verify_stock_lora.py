"""Stock diffusers only (dashdiff is never imported): load each output folder's
pytorch_lora_weights.safetensors (and the kohya file when present) into a fresh base pipeline with
``load_lora_weights`` and recompute the UNet output that the training script saved from its own
(dashdiff) model in ``reference_output.safetensors``. Prints one JSON line per file checked.

Usage: verify_stock_lora.py BASE_MODEL_FOLDER OUTPUT_DIR...
"""

import json
import sys
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file


def check(base: str, out: Path, weight_name: str) -> dict:
    pipe = DiffusionPipeline.from_pretrained(base)
    pipe.load_lora_weights(str(out), weight_name=weight_name)
    ref = load_file(str(out / "reference_output.safetensors"))
    with safe_open(str(out / "reference_output.safetensors"), "pt") as fh:
        prompt = fh.metadata()["prompt"]
    sdxl = hasattr(pipe, "text_encoder_2")

    def unet_output() -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt embeddings, UNet output) of the pipeline as it is loaded now."""
        if sdxl:
            embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
            cond = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ref["time_ids"]}}
        else:
            embeds, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
            cond = {}
        return embeds, pipe.unet(ref["latents"], ref["timestep"], embeds, return_dict=False, **cond)[0]

    with torch.no_grad():
        embeds, out_t = unet_output()
        pipe.unload_lora_weights()
        _, base_out = unet_output()
    scale = ref["output"].abs().max().item()
    return {
        "dir": out.name,
        "file": weight_name,
        "output_err": (out_t - ref["output"]).abs().max().item() / scale,
        "embeds_err": (embeds - ref["prompt_embeds"]).abs().max().item() / ref["prompt_embeds"].abs().max().item(),
        # how far the trained model is from the base (so a dropped LoRA would be noticed)
        "lora_effect": (base_out - ref["output"]).abs().max().item() / scale,
    }


def main() -> None:
    base = sys.argv[1]
    for d in sys.argv[2:]:
        out = Path(d)
        names = ["pytorch_lora_weights.safetensors"]
        if (out / "pytorch_lora_weights_kohya.safetensors").exists():
            names.append("pytorch_lora_weights_kohya.safetensors")
        for name in names:
            print(json.dumps(check(base, out, name)), flush=True)
    assert not any(m == "dashdiff" or m.startswith("dashdiff.") for m in sys.modules), "dashdiff was imported"


if __name__ == "__main__":
    main()
