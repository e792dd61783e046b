"""Overlap the launch's expensive half with pre-launch training.

The Gram eigendecomposition of each ``W0`` does not depend on training, so it can run while the
pre-launch steps train: a background thread works through the layers and parks each result
(k × k eigenvectors + σ, float64) in host memory; the launch then only does the cheap,
training-dependent part (the diagonal projection and the top-s selection). Memory: 8·k² bytes per
layer on the host (SDXL UNet ~5 GB, LLaMA-7B's 160 targets ~21 GB); nothing stays on the GPU.

Where the eigendecompositions run (``device``): ``"cpu"`` (default) copies each ``W0`` to the host
on a side stream and decomposes it with LAPACK, so the GPU that trains never waits for it;
``"cuda"`` decomposes on the weight's GPU on a side stream, faster alone but cuSOLVER's eigensolver
synchronises with the host and stalls the training stream (BENCHMARKS.md). Opt-in: call
``prefetch_spectra`` after injection.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch

from .dash import _distributed
from .launch import GramEig, gram_eig
from .walk import iter_layers


class SpectrumPrefetcher:
    """Handle of a running prefetch; ``wait()`` blocks until every layer is done (launch calls it)."""

    def __init__(self, jobs: list, device: str = "cpu", threads: Optional[int] = None) -> None:
        self._jobs = jobs
        self._device = device
        self._threads = threads
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="dashdiff-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            w = self._jobs[0][0].get_base_layer().weight if self._jobs else None
            cuda = w is not None and w.is_cuda
            stream = torch.cuda.Stream(device=w.device) if cuda else None
            if self._threads is not None:
                # this thread's OpenMP team only (the intra-op setting is per calling thread)
                torch.set_num_threads(self._threads)
            for layer, adapter in self._jobs:
                if layer.is_launched(adapter) or adapter in layer.eig_cache:
                    continue
                if cuda and self._device == "cpu":
                    with torch.cuda.stream(stream):  # a pageable copy: synchronises this stream only
                        w0 = layer.get_base_layer().weight.detach().to("cpu")
                    eig = gram_eig(w0)
                elif cuda:
                    # No pinned buffers: cudaHostAlloc synchronises the whole device and would stall
                    # the training stream (measured: 0.55 s steps became 4.5 s).
                    with torch.cuda.stream(stream):
                        eig = gram_eig(layer.get_base_layer().weight)
                        eig = GramEig(evecs=eig.evecs.cpu(), sigma=eig.sigma.cpu(), wide=eig.wide)
                else:
                    eig = gram_eig(layer.get_base_layer().weight)
                layer.eig_cache[adapter] = eig
        except BaseException as e:  # surfaced by wait(): a failed prefetch must not pass silently
            self.error = e

    def wait(self) -> None:
        self._thread.join()
        if self.error is not None:
            raise RuntimeError("dashdiff: spectrum prefetch failed") from self.error

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()


def prefetch_spectra(model, adapter_name: Optional[str] = None, device: str = "cpu",
                     threads: Optional[int] = None) -> SpectrumPrefetcher:
    """Start computing, in the background, the spectra the LoRA-Dash launch will need.

    ``device``: ``"cpu"`` (LAPACK on the host; the default) or ``"cuda"`` (the weight's GPU, side
    stream), see the module docstring; for weights already on the CPU both mean the CPU.
    ``threads``: CPU threads of the background decompositions (default: PyTorch's setting).

    Under torch.distributed each process prefetches only the layers whose launch it owns (the
    launch splits layers round-robin in this same order). The launch waits for the prefetch to
    finish; layers without a cached spectrum are computed at launch as usual.
    """
    rank, world = _distributed()
    layers = [(layer, a) for _, layer, a in iter_layers(model, "dash", adapter_name) if not layer.is_launched(a)]
    jobs = [job for i, job in enumerate(layers) if i % world == rank]
    if device not in ("cpu", "cuda"):
        raise ValueError(f"dashdiff: prefetch_spectra device must be 'cpu' or 'cuda', got {device!r}")
    handle = SpectrumPrefetcher(jobs, device, threads)
    for layer, _ in layers:
        layer._prefetcher = handle
    return handle
