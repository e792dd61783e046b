"""Small tensor helpers shared by the methods' forwards and autograd kernels."""

from __future__ import annotations

import torch

_HALF = (torch.bfloat16, torch.float16)


def mm_to(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` for a gradient of a ``dtype`` parameter. On CUDA, bf16 / fp16 operands of a float32
    parameter go through cuBLAS's float32 output (``out_dtype``): the float32 accumulator is kept
    instead of being rounded to bf16 and then cast back by the autograd engine (one kernel fewer)."""
    if dtype == torch.float32 and a.dtype in _HALF and a.is_cuda:
        return torch.mm(a, b, out_dtype=dtype)
    return a.mm(b)


def compute_dtype(x: torch.Tensor, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype an adapter computes in: autocast's for ``x``'s device when autocast is on, else the
    parameters'."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else param_dtype


def fused_adamw_ok(params: list[torch.Tensor]) -> bool:
    """PyTorch's fused AdamW takes floating-point parameters on one CPU or CUDA device type."""
    kinds = {p.device.type for p in params}
    return len(kinds) == 1 and kinds <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)
