"""Small LoRA-Dash models and an independent float64 selection, shared by the dash test files."""

import peft
import torch
from torch import nn

import dashdiff
from dashdiff import LoraDashConfig


def decaying_weight(out_f: int, in_f: int, seed: int = 0, decades: float = 4.0) -> torch.Tensor:
    """A weight with singular values decaying over ``decades`` orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    k = min(out_f, in_f)
    u, _ = torch.linalg.qr(torch.randn(out_f, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_f, k, generator=g, dtype=torch.float64))
    sigma = torch.logspace(0, -decades, k, dtype=torch.float64)
    return (u * sigma) @ v.t()


class Tiny(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        self.q_proj = nn.Linear(32, 48)
        self.o_proj = nn.Linear(48, 32)
        with torch.no_grad():
            self.q_proj.weight.copy_(decaying_weight(48, 32, seed).float())
            self.o_proj.weight.copy_(decaying_weight(32, 48, seed + 1).float())

    def forward(self, x):
        return self.o_proj(torch.tanh(self.q_proj(x)))


def dash_model(r=4, alpha=8, s=3, t=2, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = LoraDashConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "o_proj"], dash_warmup_steps=t,
                         dash_directions=s, init_lora_weights="gaussian", **kw)
    model = peft.get_peft_model(Tiny(seed), cfg)
    with torch.no_grad():  # B != 0 so that ΔW carries information at launch
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def layers(model):
    return {n: layer for n, layer, _ in dashdiff.walk.iter_layers(model, "dash")}


def reference_selection(w0, a, b, scaling, s):
    """Independent float64 SVD computation of the top-s change-rate directions."""
    u, sig, vh = torch.linalg.svd(w0.double(), full_matrices=False)
    dw = scaling * b.double() @ a.double()
    dsig = torch.diagonal(u.t() @ dw @ vh.t())
    rate = dsig.abs() / sig
    # METHODS.md: σ <= max(out, in)·eps32·σ_max is numerically zero and never selected
    rate[sig <= max(w0.shape) * torch.finfo(torch.float32).eps * sig[0]] = -1
    return torch.argsort(rate, descending=True)[:s], u, vh
