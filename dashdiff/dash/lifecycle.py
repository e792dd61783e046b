"""LoRA-Dash lifecycle from user code: count optimizer steps, launch, read the selection.

``dash_step`` is called once per *optimizer* step (in accelerate: when
``accelerator.sync_gradients`` is true and the fp16 scaler did not skip the step); evaluation,
validation and generation never call it, so they never advance the warm-up (METHODS.md). It
returns a ``LaunchReport`` (true on the call that launched) for the caller's log line.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch
import torch.distributed as dist

from ..walk import AdapterLayer, iter_layers, resolve_adapter
from .selection import Selection

if TYPE_CHECKING:
    from .prefetch import FinishReport


class LaunchReport(NamedTuple):
    """What one ``dash_step`` / launch did: the module names launched (in launch order), its
    wall-clock seconds and what a spectrum prefetch contributed (None without one). True when it
    launched anything, so ``if dash_step(model):`` reads as before."""

    layers: tuple[str, ...] = ()
    seconds: float = 0.0
    prefetch: Optional["FinishReport"] = None

    def __bool__(self) -> bool:
        return bool(self.layers)


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _pack(sel: Selection, s: int) -> torch.Tensor:
    idx = torch.full((s,), -1.0, dtype=torch.float64, device=sel.u_s.device)
    idx[: sel.indices.numel()] = sel.indices.to(torch.float64)
    return torch.cat([sel.u_s.flatten(), sel.v_s_t.flatten(), sel.sigma, sel.change_rate, idx])


def _unpack(buf: torch.Tensor, out_f: int, in_f: int, s: int) -> Selection:
    k = min(out_f, in_f)
    sizes = [out_f * s, s * in_f, k, k, s]
    u, v, sigma, rate, idx = torch.split(buf, sizes)
    idx = idx[idx >= 0].long()
    return Selection(indices=idx, u_s=u.view(out_f, s), v_s_t=v.view(s, in_f), sigma=sigma, change_rate=rate)


def _launch(targets: list[AdapterLayer]) -> LaunchReport:
    """Launch the given layers. Under torch.distributed the SVD work is split round-robin over
    the processes and each result is broadcast from its owner, so every process installs the
    same directions before the next forward (METHODS.md, distributed)."""
    t0 = time.perf_counter()
    prefetch = None
    handles = (layer.dash_prefetch.get(adapter) for _, layer, adapter in targets)
    for handle in {id(h): h for h in handles if h is not None}.values():
        prefetch = handle.finish()  # never waits on the slower path (dashdiff.dash.prefetch)
    rank, world = _distributed()
    if world == 1:
        for _, layer, adapter in targets:
            layer.apply_launch(adapter, layer.compute_launch(adapter))
    else:
        # Every process first computes all the layers it owns, then the results are broadcast in
        # order: broadcasting after each layer would make the processes take turns (measured on two
        # H200s: no faster than one process).
        packed = {}
        for i, (_, layer, adapter) in enumerate(targets):
            if i % world == rank:
                dev = layer.lora_A[adapter].weight.device
                packed[i] = _pack(layer.compute_launch(adapter), layer.dash_directions[adapter]).to(dev)
        for i, (_, layer, adapter) in enumerate(targets):
            s = layer.dash_directions[adapter]
            if i in packed:
                buf = packed.pop(i)
            else:
                k = min(layer.in_features, layer.out_features)
                n = layer.out_features * s + s * layer.in_features + 2 * k + s
                buf = torch.empty(n, dtype=torch.float64, device=layer.lora_A[adapter].weight.device)
            dist.broadcast(buf, src=i % world)
            layer.apply_launch(adapter, _unpack(buf, layer.out_features, layer.in_features, s))
    return LaunchReport(tuple(name for name, _, _ in targets), time.perf_counter() - t0, prefetch)


def dash_step(model, adapter_name: Optional[str] = None) -> LaunchReport:
    """Advance every LoRA-Dash adapter (or only ``adapter_name``) by one optimizer step and launch
    the layers that reach their ``dash_warmup_steps``. Returns the ``LaunchReport`` (false when
    nothing launched)."""
    due = [t for t in iter_layers(model, "dash", adapter_name) if t.layer.advance(t.adapter)]
    return _launch(due) if due else LaunchReport()


def launch_dash(model, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Launch now every not-yet-launched layer of the LoRA-Dash adapter; returns the selection
    (see ``selected_directions``)."""
    adapter = resolve_adapter(model, "dash", adapter_name)
    _launch([t for t in iter_layers(model, "dash", adapter) if not t.layer.is_launched(t.adapter)])
    return selected_directions(model, adapter)


def selected_directions(model, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
    """``{module_name: LongTensor}``: per launched layer the chosen indices into the descending
    singular values of ``W0``, ordered by descending change rate. Empty before launch."""
    adapter = resolve_adapter(model, "dash", adapter_name)
    return {
        n: layer.dash_record[a]["indices"].clone()
        for n, layer, a in iter_layers(model, "dash", adapter)
        if layer.is_launched(a) and a in layer.dash_record
    }
