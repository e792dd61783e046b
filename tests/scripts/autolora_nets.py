"""The AutoLoRA test network (the two-process script's Net with an adapter) and its batches and losses,
shared by the AutoLoRA test files."""

from __future__ import annotations

import torch
from peft import inject_adapter_in_model
from torch import nn

from dashdiff import AutoLoraConfig
# The 6 -> 8 -> 8 -> 3 tanh MLP (every Linear gets an AutoLoRA adapter of k = 4), one definition
# shared with the two-process script.
from ddp_autolora_script import Net


F64 = torch.float64


def make_net(dtype=F64, dropout: float = 0.0, seed: int = 0, lora_alpha: int = 6) -> nn.Module:
    torch.manual_seed(seed)
    # init_lora_weights=False: A and B both random, so β already matters at step 1. lora_alpha = 6,
    # r = 4: scaling 1.5, so a missing alpha/r factor anywhere in β's gradient shows.
    cfg = AutoLoraConfig(r=4, lora_alpha=lora_alpha, target_modules=["fc1", "fc2", "fc3"], init_lora_weights=False,
                         lora_dropout=dropout)
    model = inject_adapter_in_model(cfg, Net()).to(dtype)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return model


def batch(seed: int, n: int = 16, dtype=F64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randn(n, 3, generator=g, dtype=dtype)


def mse(model, b) -> torch.Tensor:
    x, y = b
    return ((model(x) - y) ** 2).mean()
