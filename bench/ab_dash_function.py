"""In-process A/B of two versions of the LoRA-Dash autograd function on a real-size model.

Four models share one frozen base: stock PEFT LoRA rank r and r+s, and dashdiff LoRA-Dash run with
this checkout's ``FusedDashLinear`` and with the one in ``--old`` (a copy of an earlier
``dashdiff/dash/kernel.py``, e.g. ``git show <commit>:dashdiff/dash/kernel.py > /tmp/old.py``; before
issue 15 the function lived in ``dashdiff/functional.py``), loaded as a standalone module. Steps
are interleaved (rotating order) with each phase synchronised; prints forward / backward /
optimizer medians and the median paired step ratio to lora_r. Host-bound GPU steps spread ±10-20 %
step to step: use >= 100 steps to resolve a few percent.

    python bench/ab_dash_function.py --model sdxl --old /tmp/old.py --steps 120
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import step_time  # noqa: E402
from profile_step import phase_times  # noqa: E402
from step_time import build_base, make_method  # noqa: E402

import dashdiff.dash.variant as layer_module  # noqa: E402  (the module whose forward calls FusedDashLinear)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-unet", choices=["tiny-unet", "sdxl", "sd15", "tiny-llama", "llama7b"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--old", required=True, help="path of the earlier dash/kernel.py (or functional.py) to compare against")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=8)
    args = p.parse_args(argv)
    spec = importlib.util.spec_from_file_location("functional_old", args.old)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    new_fn = layer_module.FusedDashLinear
    step_time.OPTIMIZER = "fused"
    dtype, dev = getattr(torch, args.dtype), args.device.split(":")[0]
    base, make_batch, loss_fn, targets = build_base(args.model, args.device, dtype)
    base.requires_grad_(False)
    batch = make_batch(torch.Generator().manual_seed(0))
    r = 32 if "llama" in args.model else 4
    methods = ["lora_r", "lora_r+s", "dash", "dash_old"]
    built = {m: make_method(base, "dash" if m == "dash_old" else m, r, 8, targets, torch.float32) for m in methods}

    def step(meth: str) -> tuple[float, float, float]:
        layer_module.FusedDashLinear = old.FusedDashLinear if meth == "dash_old" else new_fn
        return phase_times(*built[meth], loss_fn, batch, dev, dtype)

    times: dict[str, list] = {m: [] for m in methods}
    try:
        for i in range(args.warmup + args.steps):
            for meth in methods[i % 4:] + methods[: i % 4]:
                phases = step(meth)
                if i >= args.warmup:
                    times[meth].append(phases)
    finally:
        layer_module.FusedDashLinear = new_fn
    base_total = [sum(ph) for ph in times["lora_r"]]
    print(f"## {args.model} {args.dtype}, fused AdamW, {args.steps} interleaved steps, {step_time.device_name(args.device)}")
    print("| method | forward ms | backward ms | optimizer ms | median paired step ratio to lora_r |")
    print("|---|---:|---:|---:|---:|")
    for meth in methods:
        med = [1e3 * statistics.median(ph[k] for ph in times[meth]) for k in range(3)]
        ratio = statistics.median(sum(ph) / b for ph, b in zip(times[meth], base_total))
        print(f"| {meth} | {med[0]:.1f} | {med[1]:.1f} | {med[2]:.1f} | {ratio:.3f}x |", flush=True)


if __name__ == "__main__":
    main()
