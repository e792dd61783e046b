"""Overlap the launch's expensive half with pre-launch training.

The Gram eigendecomposition of each ``W0`` does not depend on training, so it can run while the
pre-launch steps train: background workers go through the layers and park each result
(k × k eigenvectors + σ, float64) in host memory; the launch then only does the cheap,
training-dependent part (the diagonal projection and the top-s selection). Memory: 8·k² bytes per
layer on the host (SDXL UNet ~5 GB, LLaMA-7B's 160 targets ~21 GB); nothing stays on the GPU.

Where the eigendecompositions run (``device``): ``"cpu"`` (default) copies each ``W0`` to the host
on a side stream and decomposes it with LAPACK, so the GPU that trains never waits for it;
``"cuda"`` decomposes on the weight's GPU on a side stream, faster alone but cuSOLVER's eigensolver
synchronises with the host and stalls the training stream (BENCHMARKS.md). Opt-in: call
``prefetch_spectra`` after injection.

The launch never waits on the slower path: when it comes before the prefetch is done
(``finish``), the launching thread takes the layers no worker has started, from the back of the
queue, and decomposes them in line on the weight's device, while the workers finish theirs from
the front; a layer a worker is still busy with when the queue is empty is decomposed in line too,
and whichever result comes first is used.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .lifecycle import _distributed
from .selection import GramEig, gram_eig
from ..walk import iter_layers


def default_workers() -> int:
    """Host decompositions side by side: 6, or all cores but four if fewer. On the H100 machine (16
    cores) 6 kept the SDXL training steps within noise of their speed alone and took 38 s for the 560
    layers; 12 took 25 s but slowed the steps by 20 % (BENCHMARKS.md)."""
    return max(1, min(6, (os.cpu_count() or 1) - 4))


@dataclass
class FinishReport:
    """What ``SpectrumPrefetcher.finish`` did: layers whose spectra the workers had finished before the
    launch, those the launch decomposed in line (not started, or still running on a worker), and
    the seconds it took."""

    prefetched: int
    in_line: int
    seconds: float


class SpectrumPrefetcher:
    """Handle of a running prefetch. ``finish()`` (what the launch calls) completes it as fast as the
    host and the weights' device together allow; ``wait()`` blocks until the workers did every layer."""

    _TODO, _RUNNING, _DONE = 0, 1, 2

    def __init__(self, jobs: list, device: str = "cpu", workers: Optional[int] = None) -> None:
        self._jobs = jobs
        self._device = device
        self._workers = workers or default_workers()
        self._lock = threading.Lock()
        self._state = [self._TODO] * len(jobs)
        self._front, self._back = 0, len(jobs)  # workers claim from the front, the launch from the back
        self._all_done = threading.Event()
        self._n_done = 0
        self._stream = None
        self.error: Optional[BaseException] = None
        self.report: Optional[FinishReport] = None
        if not jobs:
            self._all_done.set()
        w = jobs[0][0].get_base_layer().weight if jobs else None
        if w is not None and w.is_cuda:
            self._stream = torch.cuda.Stream(device=w.device)
        # On the GPU one side-stream worker; on the host one decomposition per worker thread, one
        # OpenMP thread each: side by side scales far better than one multi-threaded eigh (the
        # tridiagonal reduction is memory-bound).
        n = 1 if (w is not None and w.is_cuda and device == "cuda") else self._workers
        self._threads = [threading.Thread(target=self._work, name=f"dashdiff-prefetch-{i}", daemon=True)
                         for i in range(min(n, max(1, len(jobs))))]
        self._stopping = False
        for t in self._threads:
            t.start()
        # A worker may still be inside a LAPACK call when the script ends (the launch does not wait
        # for it); torn down mid-call at interpreter exit, it aborted a two-GPU LLaMA run
        # ("terminate called without an active exception"). At exit: take no new layer, finish
        # the one in hand.
        atexit.register(self.stop)

    # ------------------------------------------------------------------ bookkeeping
    def _claim_front(self) -> Optional[int]:
        with self._lock:
            while self._front < self._back:
                i = self._front
                self._front += 1
                if self._state[i] == self._TODO:
                    self._state[i] = self._RUNNING
                    return i
            return None

    def _claim_back(self) -> Optional[int]:
        with self._lock:
            while self._back > self._front:
                self._back -= 1
                i = self._back
                if self._state[i] == self._TODO:
                    self._state[i] = self._RUNNING
                    return i
            return None

    def _store(self, i: int, eig: Optional[GramEig]) -> bool:
        """Record job i's result unless another path stored it first; True if this one counted."""
        layer, adapter = self._jobs[i]
        with self._lock:
            if self._state[i] == self._DONE:
                return False
            if eig is not None and not layer.is_launched(adapter):
                layer.eig_cache.setdefault(adapter, eig)
            self._state[i] = self._DONE
            self._n_done += 1
            if self._n_done == len(self._jobs):
                self._all_done.set()
            return True

    # ------------------------------------------------------------------ the two paths
    def _host(self, i: int) -> Optional[GramEig]:
        layer, adapter = self._jobs[i]
        if layer.is_launched(adapter) or adapter in layer.eig_cache:
            return None
        w = layer.get_base_layer().weight
        if w.is_cuda and self._device == "cuda":
            # No pinned buffers: cudaHostAlloc synchronises the whole device and would stall the
            # training stream (measured: 0.55 s steps became 4.5 s).
            with torch.cuda.stream(self._stream):
                eig = gram_eig(w)
                return GramEig(evecs=eig.evecs.cpu(), sigma=eig.sigma.cpu(), wide=eig.wide)
        if w.is_cuda:
            with torch.cuda.stream(self._stream):  # a pageable copy: synchronises this stream only
                w = w.detach().to("cpu")
        return gram_eig(w)

    def _work(self) -> None:
        torch.set_num_threads(1)  # per calling thread: one LAPACK thread per worker
        try:
            while self.error is None and not self._stopping and (i := self._claim_front()) is not None:
                eig = self._host(i)
                self._store(i, eig)
        except BaseException as e:  # surfaced by wait()/finish(): a failed prefetch must not pass silently
            self.error = e
            self._all_done.set()

    def _in_line(self, i: int) -> bool:
        layer, adapter = self._jobs[i]
        if layer.is_launched(adapter) or self._state[i] == self._DONE:
            return False
        return self._store(i, gram_eig(layer.get_base_layer().weight))

    # ------------------------------------------------------------------ public
    def finish(self) -> FinishReport:
        """Complete every layer now: the not-yet-started ones in line (from the back of the queue)
        while the workers finish theirs; then any layer still on a worker, in line as well."""
        t0 = time.perf_counter()
        if self.error is not None:
            raise RuntimeError("dashdiff: spectrum prefetch failed") from self.error
        before = self._n_done
        in_line = 0
        while (i := self._claim_back()) is not None:
            in_line += self._in_line(i)
        with self._lock:
            running = [i for i, s in enumerate(self._state) if s == self._RUNNING]
        for i in running:  # a worker's layer: decompose here too, the first result counts
            in_line += self._in_line(i)
        self._all_done.wait()
        if self.error is not None:
            raise RuntimeError("dashdiff: spectrum prefetch failed") from self.error
        self.report = FinishReport(prefetched=before, in_line=in_line, seconds=time.perf_counter() - t0)
        return self.report

    def wait(self) -> None:
        """Block until the workers have done every layer (no in-line work)."""
        self._all_done.wait()
        if self.error is not None:
            raise RuntimeError("dashdiff: spectrum prefetch failed") from self.error

    def stop(self) -> None:
        """Workers take no new layer; returns once each has finished the one in hand."""
        self._stopping = True
        for t in self._threads:
            t.join()

    @property
    def done(self) -> bool:
        return self._all_done.is_set()


def prefetch_spectra(model, adapter_name: Optional[str] = None, device: str = "cpu",
                     workers: Optional[int] = None) -> SpectrumPrefetcher:
    """Start computing, in the background, the spectra the LoRA-Dash launch will need.

    ``device``: ``"cpu"`` (LAPACK on the host; the default) or ``"cuda"`` (the weight's GPU, side
    stream), see the module docstring; for weights already on the CPU both mean the CPU.
    ``workers``: host decompositions run side by side, one CPU thread each (default
    ``default_workers()``: 6, or all cores but four if fewer).

    Under torch.distributed each process prefetches only the layers whose launch it owns (the
    launch splits layers round-robin in this same order). A launch that comes before the prefetch
    is done completes it with ``finish()``: it never waits longer than the faster path.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"dashdiff: prefetch_spectra device must be 'cpu' or 'cuda', got {device!r}")
    rank, world = _distributed()
    layers = [(layer, a) for _, layer, a in iter_layers(model, "dash", adapter_name) if not layer.is_launched(a)]
    jobs = [job for i, job in enumerate(layers) if i % world == rank]
    handle = SpectrumPrefetcher(jobs, device, workers)
    for layer, a in layers:
        layer.dash_prefetch[a] = handle  # the launch collects the handle's results (finish)
    return handle
