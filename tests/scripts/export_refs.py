"""References for the export tests (test_export.py in-process, test_export_stock_load.py through the stock
loaders): a trained-looking adapter, and each layer's ΔW written out from the layer's raw tensors in
float64, independently of the ``plain_factors`` / ``get_delta_weight`` that the exporter itself uses."""

from __future__ import annotations

import json

import torch

import dashdiff
from dashdiff import safeio
from dashdiff.autolora.ranks import keep_mask
from dashdiff.files import HEADER_KEY
from dashdiff.walk import iter_layers, iter_lora_layers


def make_realistic(obj, adapter: str = "default", seed: int = 1) -> None:
    """Trained-looking adapter: ``scaling·B A`` at 1e-2 of W0 (RMS), AutoLoRA β ~ N(0, 1) with the
    pruned components masked (rows of A zeroed: the export equals the searched model with them
    masked, METHODS.md), and for LoRA-Dash a launch followed by δ_j = 1e-2·σ_j·N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    for _, _, _, layer in iter_lora_layers(obj, adapter):
        w0 = layer.get_base_layer().weight
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        scale = layer.lora_alpha[adapter] / layer.r[adapter]
        with torch.no_grad():
            b.copy_(torch.randn(b.shape, generator=g))
            rms = (scale * b @ a).pow(2).mean().sqrt()
            b.mul_(1e-2 * w0.pow(2).mean().sqrt() / rms)
            beta = getattr(layer, "lora_autolora_beta", {})
            if adapter in beta:
                beta[adapter].copy_(torch.randn(layer.r[adapter], generator=g))
                layer.lora_autolora_outer_steps[adapter].fill_(1)  # as after a search
                a[~keep_mask(layer, adapter)] = 0
    if any(True for _ in iter_layers(obj, "dash", adapter)):
        dashdiff.launch_dash(obj, adapter)
        for _, layer, a in iter_layers(obj, "dash", adapter):
            rec = layer.dash_record[a]
            sig = torch.zeros(layer.dash_directions[a], dtype=torch.float64)
            sig[: rec["indices"].numel()] = rec["sigma"][rec["indices"]]
            with torch.no_grad():
                layer.lora_dash_delta[a].copy_(1e-2 * sig * torch.randn(sig.shape, generator=g, dtype=torch.float64))


def ref_deltas(obj, adapter: str = "default") -> dict[str, torch.Tensor]:
    """Each layer's ΔW written out from its raw tensors in float64 (METHODS.md), not through the layer's
    ``plain_factors`` / ``get_delta_weight`` that the exporter itself uses: ``(α/r)·B A`` for LoRA,
    ``+ U_s diag(δ) V_sᵀ`` for LoRA-Dash, ``(α/r)·B diag(softmax β) A`` for AutoLoRA (pruned rows of A
    are zero, see ``make_realistic``)."""
    out = {}
    for comp, _, name, layer in iter_lora_layers(obj, adapter):
        a = layer.lora_A[adapter].weight.detach().double()
        b = layer.lora_B[adapter].weight.detach().double()
        scaling = layer.lora_alpha[adapter] / layer.r[adapter]  # from the config: no rsLoRA here
        beta = getattr(layer, "lora_autolora_beta", {})
        if adapter in beta:
            b = b * torch.softmax(beta[adapter].detach().double(), 0)
        dw = scaling * b @ a
        delta = getattr(layer, "lora_dash_delta", {})
        if adapter in delta:
            # (U_s = V_s = 0 before the launch: no dash term)
            u, v = layer.lora_dash_U[adapter].double(), layer.lora_dash_V[adapter].double()
            dw = dw + u @ torch.diag(delta[adapter].detach().double()) @ v
        out[f"{comp}.{name}" if comp else name] = dw.float()
    return out


def assert_layer_close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    err = (got - want).abs().max().item()
    bound = 1e-6 * max(1.0, want.abs().max().item())
    assert err <= bound, f"{name}: ‖ΔW_export − ΔW‖∞ = {err:.3g} > {bound:.3g}"


def unet_inputs(kind: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    ehs = 32 if kind == "sd" else 64
    out = {
        f"{kind}.sample": torch.randn(1, 4, 32, 32, generator=g),
        f"{kind}.t": torch.tensor([10]),
        f"{kind}.encoder_hidden_states": torch.randn(1, 77, ehs, generator=g),
    }
    if kind == "sdxl":
        out[f"{kind}.text_embeds"] = torch.randn(1, 32, generator=g)
        out[f"{kind}.time_ids"] = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    return out


def header(path) -> dict:
    return json.loads(safeio.read_metadata(path)[HEADER_KEY])


