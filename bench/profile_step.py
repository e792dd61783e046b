"""Profile one training step per method (torch.profiler): where the dash phase spends its time.

    python bench/profile_step.py --model sdxl --device cuda --methods lora_r+s,dash
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import build_base, make_method  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny-unet")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--methods", default="lora_r+s,dash")
    p.add_argument("--rows", type=int, default=18, help="profiler table rows; 0 = per-phase times only")
    p.add_argument("--phase_steps", type=int, default=20)
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    base, make_batch, loss_fn, targets = build_base(args.model, args.device, dtype)
    base.requires_grad_(False)
    batch = make_batch(torch.Generator().manual_seed(0))
    dev = args.device.split(":")[0]
    for meth in args.methods.split(","):
        m, opt = make_method(base, meth, args.rank, 8, targets, torch.float32)

        def step():
            with torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32):
                loss = loss_fn(m, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def sync():
            if dev == "cuda":
                torch.cuda.synchronize()

        phases = {"forward": [], "backward": [], "optimizer": []}
        for i in range(5 + args.phase_steps):  # per-phase wall time, synchronised at each boundary
            sync()
            t0 = time.perf_counter()
            with torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32):
                loss = loss_fn(m, batch)
            sync()
            t1 = time.perf_counter()
            loss.backward()
            sync()
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            t3 = time.perf_counter()
            if i >= 5:
                for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
                    phases[k].append(dt)
        med = {k: sorted(v)[len(v) // 2] for k, v in phases.items()}
        print(f"== {meth}: forward {med['forward']:.4f} s, backward {med['backward']:.4f} s, "
              f"optimizer {med['optimizer']:.4f} s (medians of {args.phase_steps} synchronised steps)", flush=True)
        if args.rows == 0:
            del m, opt
            continue
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(3):
                step()
            if dev == "cuda":
                torch.cuda.synchronize()
        key = "cuda_time_total" if dev == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
        del m, opt


if __name__ == "__main__":
    main()
