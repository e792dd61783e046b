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

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

from .dash import _distributed
from .launch import GramEig, gram_eig
from .walk import iter_layers


def default_workers() -> int:
    """Host decompositions side by side: 6, or all cores but four if fewer. On the H100 machine (16
    cores) 6 kept the SDXL training steps within noise of their speed alone and took 38 s for the 560
    layers; 12 took 25 s but slowed the steps by 20 % (BENCHMARKS.md)."""
    return max(1, min(6, (os.cpu_count() or 1) - 4))


class SpectrumPrefetcher:
    """Handle of a running prefetch; ``wait()`` blocks until every layer is done (launch calls it)."""

    def __init__(self, jobs: list, device: str = "cpu", workers: Optional[int] = None) -> None:
        self._jobs = jobs
        self._device = device
        self._workers = workers or default_workers()
        self._stream = None
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="dashdiff-prefetch", daemon=True)
        self._thread.start()

    def _one(self, layer, adapter: str) -> None:
        if layer.is_launched(adapter) or adapter in layer.eig_cache:
            return
        w = layer.get_base_layer().weight
        if w.is_cuda and self._device == "cuda":
            # No pinned buffers: cudaHostAlloc synchronises the whole device and would stall the
            # training stream (measured: 0.55 s steps became 4.5 s).
            with torch.cuda.stream(self._stream):
                eig = gram_eig(w)
                eig = GramEig(evecs=eig.evecs.cpu(), sigma=eig.sigma.cpu(), wide=eig.wide)
        else:
            if w.is_cuda:
                with torch.cuda.stream(self._stream):  # a pageable copy: synchronises this stream only
                    w = w.detach().to("cpu")
            eig = gram_eig(w)
        layer.eig_cache[adapter] = eig

    def _run(self) -> None:
        try:
            w = self._jobs[0][0].get_base_layer().weight if self._jobs else None
            if w is not None and w.is_cuda:
                self._stream = torch.cuda.Stream(device=w.device)
            if w is not None and w.is_cuda and self._device == "cuda":
                for job in self._jobs:
                    self._one(*job)
                return
            # Host LAPACK: one decomposition per worker thread, one OpenMP thread each (the setting is
            # per calling thread). Side by side scales far better than one multi-threaded eigh: the
            # tridiagonal reduction is memory-bound.
            with ThreadPoolExecutor(self._workers, thread_name_prefix="dashdiff-prefetch",
                                    initializer=torch.set_num_threads, initargs=(1,)) as pool:
                for future in [pool.submit(self._one, *job) for job in self._jobs]:
                    future.result()
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
                     workers: Optional[int] = None) -> SpectrumPrefetcher:
    """Start computing, in the background, the spectra the LoRA-Dash launch will need.

    ``device``: ``"cpu"`` (LAPACK on the host; the default) or ``"cuda"`` (the weight's GPU, side
    stream), see the module docstring; for weights already on the CPU both mean the CPU.
    ``workers``: host decompositions run side by side, one CPU thread each (default
    ``default_workers()``: 6, or all cores but four if fewer).

    Under torch.distributed each process prefetches only the layers whose launch it owns (the
    launch splits layers round-robin in this same order). The launch waits for the prefetch to
    finish; layers without a cached spectrum are computed at launch as usual.
    """
    rank, world = _distributed()
    layers = [(layer, a) for _, layer, a in iter_layers(model, "dash", adapter_name) if not layer.is_launched(a)]
    jobs = [job for i, job in enumerate(layers) if i % world == rank]
    if device not in ("cpu", "cuda"):
        raise ValueError(f"dashdiff: prefetch_spectra device must be 'cpu' or 'cuda', got {device!r}")
    handle = SpectrumPrefetcher(jobs, device, workers)
    for layer, _ in layers:
        layer._prefetcher = handle
    return handle
