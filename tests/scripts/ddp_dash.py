"""Two-process LoRA-Dash run (launched by tests/test_dash_lifecycle.py): each rank sees different data;
dumps the launched directions (read right after launch, before the next forward) and δ."""

import gc
import sys
from typing import Callable

import peft
import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch import nn

import dashdiff


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(24, 40)
        self.o_proj = nn.Linear(40, 24)

    def forward(self, x):
        return self.o_proj(torch.tanh(self.q_proj(x)))


def build() -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model and optimizer, the same in every process (and in the test's one-process reference)."""
    torch.manual_seed(0)  # same init everywhere; DDP also broadcasts rank 0's parameters
    cfg = dashdiff.LoraDashConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], dash_warmup_steps=2,
                                  dash_directions=3, init_lora_weights="gaussian")
    model = peft.get_peft_model(Net(), cfg)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def train_and_dump(model, opt, next_batch: Callable[[], torch.Tensor],
                   backward: Callable[[torch.Tensor], None]) -> dict[str, torch.Tensor]:
    """Five optimizer steps with ``dash_step``; the launched directions (read right after the launch,
    before the next forward), then δ and A."""
    dumps = {}
    for step in range(1, 6):
        backward(model(next_batch()).pow(2).mean())
        opt.step()
        opt.zero_grad()
        if dashdiff.dash_step(model):
            for name, layer, ad in dashdiff.walk.iter_layers(model, "dash"):
                dumps[f"{name}.U"] = layer.lora_dash_U[ad].clone()
                dumps[f"{name}.V"] = layer.lora_dash_V[ad].clone()
                dumps[f"{name}.idx"] = layer.dash_record[ad]["indices"].clone()
            dumps["launch_step"] = torch.tensor(step)
    for name, layer, ad in dashdiff.walk.iter_layers(model, "dash"):
        dumps[f"{name}.delta"] = layer.lora_dash_delta[ad].detach().clone()
        dumps[f"{name}.A"] = layer.lora_A[ad].weight.detach().clone()
    return dumps


def main(out_prefix: str) -> None:
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, accelerator.num_processes
    model, opt = accelerator.prepare(*build())
    g = torch.Generator().manual_seed(100 + accelerator.process_index)  # different data per rank
    dumps = train_and_dump(model, opt, lambda: torch.randn(8, 24, generator=g), accelerator.backward)
    dumps["world"] = torch.tensor(accelerator.num_processes)
    save_file({k: v.contiguous() for k, v in dumps.items()}, f"{out_prefix}{accelerator.process_index}.safetensors")
    accelerator.wait_for_everyone()
    # the DDP wrapper (its reducer holds the process group) first, then the group (see ddp_autolora_script.py)
    del model, opt
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()  # destroys the process group: exiting with it alive can abort a rank (SIGABRT)


if __name__ == "__main__":
    main(sys.argv[1])
