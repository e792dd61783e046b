"""Two-process AutoLoRA search (launched by tests/test_autolora_search.py): each rank sees different
batches. Rank 0 writes, as JSON: every rank's β and w after the steps, and the largest difference
from one process running the same steps on the two ranks' batches concatenated."""

from __future__ import annotations

import argparse
import copy
import gc
import json

import torch
import torch.distributed as dist
from accelerate import Accelerator
from peft import inject_adapter_in_model
from torch import nn

from dashdiff import AutoLoraConfig
from dashdiff.autolora import BilevelStep


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def batch(seed: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)


def mse(model, b) -> torch.Tensor:
    x, y = b
    return ((model(x) - y) ** 2).mean()


def flat(ts) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in ts])


def main(args: argparse.Namespace) -> None:
    acc = Accelerator(cpu=True)
    assert acc.num_processes == 2, acc.num_processes
    world, rank = acc.num_processes, acc.process_index
    torch.manual_seed(0)
    cfg = AutoLoraConfig(r=4, lora_alpha=4, target_modules=["fc1", "fc2", "fc3"], init_lora_weights=False)
    model = inject_adapter_in_model(cfg, Net()).double()
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    reference = copy.deepcopy(model)
    beta_init = flat(p for n, p in model.named_parameters() if "lora_autolora_beta" in n)
    kw = dict(mode=args.mode, weight_lr=1e-2, beta_lr=0.1)
    search = BilevelStep(acc.prepare(model), accelerator=acc, **kw)
    assert search._distributed()

    def pair(step: int, r: int):
        return batch(1000 * step + 10 * r), batch(1000 * step + 10 * r + 5)

    local_losses = []
    for step in range(args.steps):
        tb, vb = pair(step, rank)
        local_losses.append(float(mse(search.root, tb)))
        search.step(tb, vb, mse)
    # read before any further DDP forward (broadcast_buffers would copy rank 0's buffers)
    mine = {"beta": flat(search.betas).tolist(), "w": flat(search.weights).tolist(), "local_train_loss": local_losses,
            "outer_steps": [int(layer.lora_autolora_outer_steps[a]) for _, layer, a in search.layers]}
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        single = BilevelStep(reference, **kw)
        for step in range(args.steps):
            pairs = [pair(step, r) for r in range(world)]
            tb = tuple(torch.cat([p[0][i] for p in pairs]) for i in range(2))
            vb = tuple(torch.cat([p[1][i] for p in pairs]) for i in range(2))
            single.step(tb, vb, mse)
        diff = max(float((flat(single.betas) - torch.tensor(gathered[0]["beta"], dtype=torch.float64)).abs().max()),
                   float((flat(single.weights) - torch.tensor(gathered[0]["w"], dtype=torch.float64)).abs().max()))
        change = float(((flat(single.betas) - beta_init).abs() / beta_init.abs()).max())
        record = {"num_processes": world, "ranks": gathered, "max_abs_diff_vs_single_process": diff,
                  "max_rel_beta_change_vs_init": change}
        with open(args.out, "w") as f:
            json.dump(record, f)
    acc.wait_for_everyone()
    # The DDP wrapper (its reducer holds the process group) goes first, then the process group:
    # destroyed the other way round, at exit, a rank hung now and then in the gloo teardown.
    del search
    acc.free_memory()
    gc.collect()
    acc.end_training()  # destroys the process group: exiting with it alive can abort a rank (SIGABRT)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mode", default="darts")
    main(parser.parse_args())
