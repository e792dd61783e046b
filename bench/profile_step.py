"""Where a training step spends its time, per method: forward / backward / optimizer wall time
(interleaved rounds, synchronised at each phase boundary), then optionally a torch.profiler table.

    python bench/profile_step.py --model sdxl --device cuda --dtype bfloat16 --methods lora_r+s,dash --rows 0
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_time  # noqa: E402
from step_time import build_base, make_method  # noqa: E402

PHASES = ("forward", "backward", "optimizer")


def phase_times(model, opt, loss_fn, batch, dev: str, dtype: torch.dtype) -> tuple[float, float, float]:
    """One training step's forward, backward and optimizer wall times (s), synchronised at each
    boundary; autocast to ``dtype`` unless it is float32."""

    def sync() -> None:
        if dev == "cuda":
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    with torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32):
        loss = loss_fn(model, batch)
    sync()
    t1 = time.perf_counter()
    loss.backward()
    sync()
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    return t1 - t0, t2 - t1, time.perf_counter() - t2


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny-unet")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--methods", default="lora_r+s,dash")
    p.add_argument("--optimizer", default="default", choices=["default", "fused", "foreach"])
    p.add_argument("--rows", type=int, default=18, help="profiler table rows; 0 = per-phase times only")
    p.add_argument("--phase_steps", type=int, default=20)
    args = p.parse_args(argv)
    step_time.OPTIMIZER = args.optimizer
    dtype = getattr(torch, args.dtype)
    dev = args.device.split(":")[0]
    torch.manual_seed(0)
    base, make_batch, loss_fn, targets = build_base(args.model, args.device, dtype)
    base.requires_grad_(False)
    batch = make_batch(torch.Generator().manual_seed(0))
    methods = args.methods.split(",")
    built = {meth: make_method(base, meth, args.rank, 8, targets, torch.float32) for meth in methods}

    def step(m, opt) -> tuple[float, float, float]:
        return phase_times(m, opt, loss_fn, batch, dev, dtype)

    times = {meth: {k: [] for k in PHASES} for meth in methods}
    for i in range(5 + args.phase_steps):
        for meth in methods[i % len(methods):] + methods[: i % len(methods)]:  # rotate who goes first
            phases = step(*built[meth])
            if i >= 5:
                for k, dt in zip(PHASES, phases):
                    times[meth][k].append(dt)
    for meth in methods:
        med = {k: statistics.median(v) for k, v in times[meth].items()}
        print(f"== {meth}: forward {med['forward']:.4f} s, backward {med['backward']:.4f} s, optimizer "
              f"{med['optimizer']:.4f} s, total {sum(med.values()):.4f} s (medians of {args.phase_steps} "
              "interleaved synchronised steps)", flush=True)
    if args.rows == 0:
        return
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
    key = "cuda_time_total" if dev == "cuda" else "cpu_time_total"
    for meth in methods:
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(3):
                step(*built[meth])
        print(f"== {meth}")
        print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
