"""LoRA-Dash launch cost at real sizes, and whether each launch path selects what float64 SVD does.

Sections (each prints a Markdown table; ``--write`` appends them to BENCHMARKS.md):

1. ``selection``: on real-size matrices with decaying spectra, does the top-s set of the
   published float32 ``torch.linalg.svd`` and of dashdiff's float64 Gram route equal a float64
   SVD's?
2. ``launch``: seconds to launch every target of the model: the published per-layer float32 SVD
   loop (timed on ``--published_sample`` matrices per distinct shape, scaled by the count), the
   dashdiff launch computed at launch time, and the dashdiff launch after ``prefetch_spectra``
   (what is left at launch time once the spectra were computed during pre-launch).
3. ``overlap``: what the prefetch costs the pre-launch training steps it runs beside: median step
   time with and without the prefetch thread, on the real model (bf16), so the launch's total
   added wall-clock = extra step time while prefetching + what is left at launch.
4. ``warmups``: the launch's cost to a run after a warm-up of W training steps beside the prefetch,
   for each W in ``--warmups``: seconds the launch took (finishing the prefetch in line where it was
   not done), against the in-line launch (no prefetch) and the rest of the prefetch alone. The
   target: never more than min(in-line, rest of the prefetch) + 1 s.

    python bench/launch_time.py --model sdxl --device cuda --write
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dashdiff  # noqa: E402
from dashdiff.dash.lifecycle import _launch  # noqa: E402
from dashdiff.dash.selection import gram_eig, select_directions  # noqa: E402
from step_time import build_base, command_line, device_name, emit  # noqa: E402


PREFETCH: tuple = ("cpu", None)  # (device, workers) of prefetch_spectra, set by the command line


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decaying(out_f: int, in_f: int, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    k = min(out_f, in_f)
    u, _ = torch.linalg.qr(torch.randn(out_f, k, generator=g, device=device, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_f, k, generator=g, device=device, dtype=torch.float64))
    sigma = torch.logspace(0, -3, k, dtype=torch.float64, device=device)  # three decades
    return ((u * sigma) @ v.t()).float()


def published_select(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, s: int) -> torch.Tensor:
    """The published launch: float32 SVD, float32 projection."""
    u, sig, vh = torch.linalg.svd(w.float(), full_matrices=False)
    dsig = ((u.t() @ (scaling * b.float())) * (a.float() @ vh.t()).t()).sum(1)
    return torch.topk(dsig.abs() / sig, s).indices


def reference_select(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, s: int) -> torch.Tensor:
    u, sig, vh = torch.linalg.svd(w.double(), full_matrices=False)
    dsig = ((u.t() @ (scaling * b.double())) * (a.double() @ vh.t()).t()).sum(1)
    rate = dsig.abs() / sig
    rate[sig <= max(w.shape) * torch.finfo(torch.float32).eps * sig[0]] = -1
    return torch.topk(rate, s).indices


def selection_section(shapes: list[tuple[int, int]], device: str, trials: int, s: int) -> str:
    rows = ["| shape (out x in) | float32 SVD (published) = float64 SVD | dashdiff Gram float64 = float64 SVD |",
            "|---|---|---|"]
    for out_f, in_f in shapes:
        ok32 = ok_dd = 0
        for t in range(trials):
            w = decaying(out_f, in_f, device, seed=t)
            g = torch.Generator(device=device).manual_seed(1000 + t)
            a = torch.randn(4, in_f, generator=g, device=device) * 0.02
            b = torch.randn(out_f, 4, generator=g, device=device) * 0.02
            ref = set(reference_select(w, a, b, 1.0, s).tolist())
            ok32 += set(published_select(w, a, b, 1.0, s).tolist()) == ref
            ok_dd += set(select_directions(w, a, b, 1.0, s).indices.tolist()) == ref
            del w
        rows.append(f"| {out_f} x {in_f} | {ok32}/{trials} | {ok_dd}/{trials} |")
    return "\n".join(rows)


def launch_section(model, device: str, s: int, sample: int) -> tuple[str, dict]:
    layers = [(n, layer, a) for n, layer, a in dashdiff.walk.iter_layers(model, "dash")]
    shapes = Counter(tuple(layer.get_base_layer().weight.shape) for _, layer, _ in layers)
    # published loop, timed on a sample per shape
    published = 0.0
    for shape, count in shapes.items():
        ws = [layer for _, layer, _ in layers if tuple(layer.get_base_layer().weight.shape) == shape][:sample]
        _sync(device)
        t0 = time.perf_counter()
        for layer in ws:
            published_select(layer.get_base_layer().weight, layer.lora_A["default"].weight,
                             layer.lora_B["default"].weight, 1.0, s)
        _sync(device)
        published += (time.perf_counter() - t0) / len(ws) * count
    def launch_all() -> float:
        _sync(device)
        t0 = time.perf_counter()
        for _, layer, a in layers:
            layer.compute_launch(a)
        _sync(device)
        return time.perf_counter() - t0

    at_launch = launch_all()  # dashdiff, everything at launch time
    handle = dashdiff.prefetch_spectra(model, device=PREFETCH[0], workers=PREFETCH[1])
    t0 = time.perf_counter()
    handle.wait()
    prefetch_alone = time.perf_counter() - t0
    after_prefetch = launch_all()  # after prefetch: only the training-dependent part is left
    res = {"layers": len(layers), "published_s": published, "at_launch_s": at_launch,
           "prefetch_alone_s": prefetch_alone, "after_prefetch_s": after_prefetch}
    text = ("| targets | published fp32 SVD loop (s, est.) | dashdiff at launch (s) | prefetch alone (s) | "
            "dashdiff left at launch after prefetch (s) |\n|---|---|---|---|---|\n"
            f"| {len(layers)} ({', '.join(f'{c}x {o}x{i}' for (o, i), c in shapes.items())}) | {published:.1f} | "
            f"{at_launch:.2f} | {prefetch_alone:.2f} | {after_prefetch:.2f} |")
    return text, res


def overlap_section(model, make_batch, loss_fn, device: str, dtype, steps: int) -> str:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batch = make_batch(torch.Generator().manual_seed(0))
    dev_type = device.split(":")[0]

    def step() -> float:
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(dev_type, dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - t0

    for _ in range(5):
        step()
    plain = [step() for _ in range(steps)]
    handle = dashdiff.prefetch_spectra(model, device=PREFETCH[0], workers=PREFETCH[1])
    beside, t0 = [], time.perf_counter()
    while not handle.done:
        beside.append(step())
    handle.wait()
    wall = time.perf_counter() - t0
    med = statistics.median(plain)
    extra = sum(beside) - med * len(beside)
    return ("| median step (s) | steps while prefetching | prefetch wall (s) | median step beside prefetch (s) | "
            "extra training time from the prefetch (s) |\n|---|---|---|---|---|\n"
            f"| {med:.3f} | {len(beside)} | {wall:.1f} | {statistics.median(beside):.3f} | {extra:.2f} |")


def warmups_section(model, make_batch, loss_fn, device: str, dtype, warmups: list[int]) -> str:
    layers = [(n, layer, a) for n, layer, a in dashdiff.walk.iter_layers(model, "dash")]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batch = make_batch(torch.Generator().manual_seed(0))
    dev_type = device.split(":")[0]

    def step() -> None:
        with torch.autocast(dev_type, dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def reset() -> None:
        for _, layer, a in layers:
            layer._dash_launched[a] = False
            layer.eig_cache.clear()
            layer.dash_prefetch.clear()

    def launch() -> float:
        _sync(device)
        t0 = time.perf_counter()
        _launch(layers)
        _sync(device)
        return time.perf_counter() - t0

    for _ in range(3):
        step()
    reset()
    in_line = launch()
    reset()
    handle = dashdiff.prefetch_spectra(model, device=PREFETCH[0], workers=PREFETCH[1])
    t0 = time.perf_counter()
    handle.wait()
    alone = time.perf_counter() - t0
    rows = ["| warm-up steps | warm-up wall (s) | prefetch left after warm-up, alone (s) | in-line launch (s) | "
            "launch took (s) | layers prefetched / in line | within min(in-line, rest) + 1 s |",
            "|---|---|---|---|---|---|---|"]
    for w in warmups:
        reset()
        _sync(device)
        handle = dashdiff.prefetch_spectra(model, device=PREFETCH[0], workers=PREFETCH[1])
        t0 = time.perf_counter()
        for _ in range(w):
            step()
        _sync(device)
        warm = time.perf_counter() - t0
        took = launch()
        rep = handle.report
        rest = max(0.0, alone - warm)
        ok = took <= min(in_line, rest) + 1.0
        rows.append(f"| {w} | {warm:.1f} | {rest:.1f} | {in_line:.2f} | {took:.2f} | {rep.prefetched} / {rep.in_line} | "
                    f"{'yes' if ok else 'NO'} |")
        print(rows[-1], flush=True)
    return f"prefetch alone (no training): {alone:.1f} s for {len(layers)} layers\n\n" + "\n".join(rows)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-unet", choices=["tiny-unet", "sd15", "sdxl", "tiny-llama", "llama7b"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--directions", type=int, default=8)
    p.add_argument("--sections", default="selection,launch,overlap")
    p.add_argument("--selection_shapes", default="1280x1280,4096x4096,4096x11008")
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--published_sample", type=int, default=3)
    p.add_argument("--overlap_steps", type=int, default=10)
    p.add_argument("--warmups", default="5,15,25,100", help="warm-up lengths for the warmups section")
    p.add_argument("--prefetch_device", default="cpu", choices=["cpu", "cuda"],
                   help="where prefetch_spectra decomposes (dashdiff.dash.prefetch)")
    p.add_argument("--prefetch_workers", type=int, default=None, help="host decompositions side by side")
    p.add_argument("--write", action="store_true")
    args = p.parse_args(argv)
    global PREFETCH
    PREFETCH = (args.prefetch_device, args.prefetch_workers)
    sections = args.sections.split(",")
    dtype = getattr(torch, args.dtype) if args.device != "cpu" else torch.float32
    out = [f"### Launch, {args.model}, s={args.directions}\n\n{device_name(args.device)}; torch {torch.__version__}; "
           f"{command_line('launch_time.py', argv)}\n"]
    if "selection" in sections:
        shapes = [tuple(int(v) for v in sh.split("x")) for sh in args.selection_shapes.split(",")]
        out.append("Selection equality over trials (decaying spectra, 3 decades):\n\n"
                   + selection_section(shapes, args.device, args.trials, args.directions))
        print(out[-1], flush=True)
    if "launch" in sections or "overlap" in sections or "warmups" in sections:
        import peft

        torch.manual_seed(0)
        base, make_batch, loss_fn, targets = build_base(args.model, args.device, dtype)
        base.requires_grad_(False)
        model = peft.get_peft_model(base, dashdiff.LoraDashConfig(
            r=args.rank, lora_alpha=args.rank, target_modules=targets, dash_warmup_steps=10**9,
            dash_directions=args.directions, init_lora_weights="gaussian"))
        for prm in model.parameters():
            if prm.requires_grad:
                prm.data = prm.data.float()
        if "launch" in sections:
            text, _ = launch_section(model, args.device, args.directions, args.published_sample)
            out.append("Launch time for all targets:\n\n" + text)
            print(out[-1], flush=True)
        if "warmups" in sections:
            out.append("Launch after a warm-up beside the prefetch:\n\n" + warmups_section(
                model, make_batch, loss_fn, args.device, dtype, [int(w) for w in args.warmups.split(",")]))
            print(out[-1], flush=True)
        if "overlap" in sections:
            for _, layer, a in dashdiff.walk.iter_layers(model, "dash"):
                layer.eig_cache.clear()
            out.append("Prefetch beside training (pre-launch steps):\n\n"
                       + overlap_section(model, make_batch, loss_fn, args.device, dtype, args.overlap_steps))
            print(out[-1], flush=True)
    return emit("\n\n".join(out) + "\n", args.write, echo=False)  # sections were printed as they came


if __name__ == "__main__":
    main()
