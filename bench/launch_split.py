"""LoRA-Dash launch split across processes: wall-clock of ``dashdiff.launch_dash`` when the layers'
decompositions are shared round-robin over the processes and each result is broadcast
(``dashdiff.dash.lifecycle._launch``), against the same launch in one process.

    torchrun --nproc_per_node 1 bench/launch_split.py --model llama7b
    torchrun --nproc_per_node 2 bench/launch_split.py --model llama7b

Each process builds the same random-weight model on its own GPU (one seed), launches, and rank 0
prints the slowest process's time (every process must have installed every layer's directions).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import peft
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dashdiff  # noqa: E402
from dashdiff.dash.selection import gram_eig  # noqa: E402
from step_time import build_base, device_name  # noqa: E402


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-llama", choices=["tiny-llama", "llama7b", "tiny-unet", "sdxl"])
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--directions", type=int, default=8)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local)
    torch.manual_seed(0)  # the same base and LoRA weights on every process
    base, _, _, targets = build_base(args.model, device, torch.bfloat16 if cuda else torch.float32)
    base.requires_grad_(False)
    model = peft.get_peft_model(base, dashdiff.LoraDashConfig(
        r=args.rank, lora_alpha=args.rank, dash_directions=args.directions, dash_warmup_steps=10**9,
        target_modules=targets, init_lora_weights="gaussian"))
    with torch.no_grad():  # B = 0 at init would tie every change rate at zero
        for n, prm in model.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 1e-3)
    gram_eig(torch.randn(64, 64, device=device))  # solver start-up outside the timing
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dist.barrier()
    sync()
    t0 = time.perf_counter()
    selection = dashdiff.launch_dash(model)
    sync()
    mine = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    n = len(selection)
    if rank == 0:
        print(f"| {args.model} | {n} targets | {world} process(es) on {device_name(device)} | {float(mine):.2f} s |",
              flush=True)
    dist.destroy_process_group()
    return float(mine)


if __name__ == "__main__":
    main()
