"""Inference cost of an exported LoRA-Dash adapter (a plain LoRA of rank r+s) against a plain
rank-r LoRA, unfused and fused, on a UNet forward (no grad). Stock PEFT layers only: this is what
users run after ``export_lora``.

    python bench/infer_time.py --model sdxl --device cuda --dtype bfloat16 --write
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import peft
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from step_time import build_base, command_line, device_name, emit  # noqa: E402


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="tiny-unet", choices=["tiny-unet", "sd15", "sdxl", "tiny-llama", "llama7b"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--directions", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--write", action="store_true")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    base, make_batch, _, targets = build_base(args.model, args.device, dtype)
    base.requires_grad_(False)
    variants = {}
    for name, r in (("lora r", args.rank), ("export r+s", args.rank + args.directions)):
        m = copy.deepcopy(base, memo={id(t): t for t in list(base.parameters()) + list(base.buffers())})
        m = peft.get_peft_model(m, peft.LoraConfig(r=r, lora_alpha=r, target_modules=targets,
                                                   init_lora_weights="gaussian"))
        m.to(dtype)
        variants[f"{name}, unfused"] = m
    for name in ("lora r", "export r+s"):  # fused: merge into a private copy of the base weights
        m = copy.deepcopy(variants[f"{name}, unfused"])
        m.merge_adapter()
        variants[f"{name}, fused"] = m
    batch = make_batch(torch.Generator().manual_seed(0))
    kw = {k: v for k, v in batch.items() if k not in ("target", "labels")}
    times = {k: [] for k in variants}
    with torch.no_grad():
        for i in range(args.warmup + args.steps):
            for k, m in variants.items():
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                m(**kw)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                if i >= args.warmup:
                    times[k].append(time.perf_counter() - t0)
    base_unf = statistics.median(times["lora r, unfused"])
    base_fus = statistics.median(times["lora r, fused"])
    rows = ["| variant | median forward (s) | p10-p90 (s) | vs lora r (same fusing) |", "|---|---|---|---|"]
    for k, ts in times.items():
        ts = sorted(ts)
        ref = base_fus if "fused" in k and "unfused" not in k else base_unf
        rows.append(f"| {k} | {statistics.median(ts):.4f} | {ts[len(ts) // 10]:.4f}-{ts[9 * len(ts) // 10]:.4f} | "
                    f"{statistics.median(ts) / ref:.3f}x |")
    text = (f"### Inference, {args.model}, r={args.rank} vs r+s={args.rank + args.directions}, {args.dtype}\n\n"
            f"{device_name(args.device)}; torch {torch.__version__}, peft {peft.__version__}; median of {args.steps} "
            f"interleaved forwards.\n{command_line('infer_time.py', argv)}\n\n" + "\n".join(rows) + "\n")
    return emit(text, args.write)


if __name__ == "__main__":
    main()
