"""Cost of one AutoLoRA search step relative to one plain LoRA step (tiny UNet, CPU).

Same UNet, same targets (``to_q to_k to_v to_out.0``), same rank (k = r = 8), same batch; the
plain step is PEFT's LoRA: forward, backward, Adam step. The search steps are
``BilevelStep.step`` in ``darts`` and ``first_order`` mode, roll-back off and on, and ``darts`` with
the two finite-difference passes batched into one (``fd_batched``). All variants run
interleaved, one step each per round in a rotating order, so load drift on a shared machine
hits them alike; reported: median step time with its interquartile range, and the median of the
per-round ratios to the plain step (with IQR). A forward+backward pass alone is timed too: a
``darts`` step needs four of them (inner, validation, two finite-difference passes), ``first_order``
two, roll-back one more.

Usage: ``python bench/autolora_cost.py [--rounds 30] [--batch 2] [--latent 32] [--threads 1] [--markdown]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable

import torch
from peft import LoraConfig

from dashdiff import AutoLoraConfig
from dashdiff.autolora import BilevelStep, default_adam
from dashdiff.autolora.search import _grads
from dashdiff.testing import tiny_sd_pipeline

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if args.model == "sdxl":  # real-size UNet with random weights (float32: BilevelStep's requirement)
        import json
        from pathlib import Path

        from diffusers import DDPMScheduler, UNet2DConditionModel

        root = Path(__file__).resolve().parents[1]
        cfg_file = next(p for p in (root.parent / "shared" / "configs" / "sdxl_unet.json",
                                    root / ".gpu" / "configs" / "sdxl_unet.json") if p.exists())
        base_unet = UNet2DConditionModel(**{k: v for k, v in json.loads(cfg_file.read_text()).items()
                                            if not k.startswith("_")}).to(dev)
        sched = DDPMScheduler()
        ctx_dim, text_dim = 2048, 1280
    else:
        pipe = tiny_sd_pipeline()
        base_unet, sched = pipe.unet.to(dev), pipe.scheduler
        ctx_dim, text_dim = 32, 0
    base_unet.requires_grad_(False)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16)

    def adapted(cfg) -> torch.nn.Module:
        # every variant shares the frozen base weights (a real-size UNet fits once)
        unet = copy.deepcopy(base_unet, memo={id(t): t for t in list(base_unet.parameters()) + list(base_unet.buffers())})
        unet.add_adapter(cfg)
        return unet.train()

    g = torch.Generator().manual_seed(0)

    def batch() -> dict:
        b, s = args.batch, args.latent
        out = {"lat": torch.randn(b, 4, s, s, generator=g), "noise": torch.randn(b, 4, s, s, generator=g),
               "t": torch.randint(0, 1000, (b,), generator=g), "ehs": torch.randn(b, 77, ctx_dim, generator=g)}
        if text_dim:
            out["text_embeds"] = torch.randn(b, text_dim, generator=g)
            out["time_ids"] = torch.tensor([[8 * s, 8 * s, 0, 0, 8 * s, 8 * s]] * b, dtype=torch.float32)
        return {k: v.to(dev) for k, v in out.items()}

    def loss_fn(unet, b) -> torch.Tensor:
        noisy = sched.add_noise(b["lat"], b["noise"], b["t"].cpu()).to(dev) if dev.type != "cpu" else \
            sched.add_noise(b["lat"], b["noise"], b["t"])
        extra = {"added_cond_kwargs": {"text_embeds": b["text_embeds"], "time_ids": b["time_ids"]}} if text_dim else {}
        pred = unet(noisy, b["t"], encoder_hidden_states=b["ehs"], **extra).sample
        return torch.nn.functional.mse_loss(pred.float(), b["noise"])

    train, val = batch(), batch()
    plain = adapted(LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS, init_lora_weights="gaussian"))
    plain_opt = default_adam([p for p in plain.parameters() if p.requires_grad], lr=3e-4)  # the search's default

    def plain_step() -> None:
        with autocast:
            loss = loss_fn(plain, train)
        loss.backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    variants: dict[str, Callable[[], object]] = {"plain LoRA step": plain_step}
    probe = None
    for mode, rollback, batched in (("darts", False, False), ("darts", False, True), ("darts", True, False),
                                    ("first_order", False, False), ("first_order", True, False)):
        if (batched and args.no_batched) or (rollback and args.no_rollback):
            continue
        unet = adapted(AutoLoraConfig(r=8, lora_alpha=8, target_modules=TARGETS, init_lora_weights="gaussian"))
        search = BilevelStep(unet, mode=mode, rollback=rollback, fd_batched=batched)
        probe = probe or search
        name = f"{mode}" + (" + roll-back" if rollback else "") + (", batched FD" if batched else "")
        variants[name] = lambda s=search: _autocast_step(s, train, val, loss_fn, autocast)

    def one_pass() -> None:  # forward + backward for the LoRA weights only, no optimizer, at the plain step's precision
        with autocast:
            loss = loss_fn(probe.model, train)
        _grads(loss, probe.weights)

    variants["one forward+backward pass"] = one_pass
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.warmup + args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
        for n in order:
            _sync(dev)
            t0 = time.perf_counter()
            variants[n]()
            _sync(dev)
            if r >= args.warmup:
                times[n].append(time.perf_counter() - t0)
    base = times["plain LoRA step"]
    result = {}
    for n in names:
        ratios = [t / b for t, b in zip(times[n], base)]
        result[n] = {"ms": [1e3 * x for x in quartiles(times[n])], "ratio": list(quartiles(ratios))}
        q1, med, q3 = result[n]["ms"]
        r1, rm, r3 = result[n]["ratio"]
        print(f"{n:28s} {med:8.1f} ms (IQR {q1:.1f}-{q3:.1f})  {rm:5.2f}x (IQR {r1:.2f}-{r3:.2f})", flush=True)
    if args.markdown:
        print(markdown(result, args))
    return result


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _autocast_step(search, train, val, loss_fn, autocast):
    # the inner step and the validation pass run under the caller's autocast; the finite-difference passes in float32
    with autocast:
        return search.step(train, val, loss_fn)


def markdown(result: dict, args: argparse.Namespace) -> str:
    model = ("SDXL UNet (random weights, float32 parameters, bf16 autocast where noted)" if args.model == "sdxl"
             else "Tiny SD UNet (`dashdiff.testing`, ~2 M parameters)")
    precision = ("plain step, inner step and validation pass under bf16 autocast, finite-difference passes float32"
                 if args.bf16 else "float32")
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"{args.threads} CPU thread(s)"
    lines = [
        f"{model}, AutoLoRA k = 8 / LoRA r = 8 on `to_q to_k to_v to_out.0`, batch {args.batch}, latents "
        f"4x{args.latent}x{args.latent}, {precision}, {device}; {args.rounds} interleaved rounds after {args.warmup} "
        "warm-up rounds.",
        "",
        "| variant | median step | IQR | median per-round ratio to plain | IQR |",
        "|---|---:|---:|---:|---:|",
    ]
    for n, r in result.items():
        q1, med, q3 = r["ms"]
        r1, rm, r3 = r["ratio"]
        lines.append(f"| {n} | {med:.1f} ms | {q1:.1f}-{q3:.1f} ms | {rm:.2f}x | {r1:.2f}-{r3:.2f}x |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--latent", type=int, default=32, help="latent side (pixels / 2 for the tiny VAE)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="tiny", choices=["tiny", "sdxl"])
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast for the plain step, the inner step and the validation pass")
    p.add_argument("--no_batched", action="store_true", help="skip the batched finite-difference variant")
    p.add_argument("--no_rollback", action="store_true", help="skip the roll-back variants")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
