"""AutoLoRA on a synthetic problem with known answers.

A frozen random base MLP (``layers`` tanh layers, ``d x d``) and a teacher = the base plus, in
layer ``l``, an update of true rank ``r_l`` (different per layer). The student adapts a copy of
the base with AutoLoRA (k components per layer) and searches on a 70/30 train / validation split
of the teacher's input-output pairs. Reported per seed and mean:

- the ranks the search found (α_j >= 1/k) against the true ranks;
- test loss after a retrain from scratch (train + validation) of plain LoRA with the found ranks,
  against a uniform-rank LoRA with the same total rank (= same parameter count, every layer is
  ``d x d``), the true ranks (oracle) and the full k in every layer.

Usage: ``python bench/autolora_synthetic.py [--seeds 3] [--modes darts,first_order]
[--search_steps 500,2000] [--markdown]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from peft import inject_adapter_in_model
from torch import nn

from dashdiff import AutoLoraConfig, determine_ranks
from dashdiff.autolora import BilevelStep, retrain_config, split_train_val


class MLP(nn.Module):
    def __init__(self, d: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


def make_problem(seed: int, d: int, true_ranks: list[int], n_pool: int, n_test: int, scale: float):
    """(base, teacher, pool, test): the teacher's layer l is W0_l + U diag(scale) Vᵀ of rank r_l."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        base = MLP(d, len(true_ranks)).requires_grad_(False)
    teacher = copy.deepcopy(base)
    with torch.no_grad():
        for layer, r in zip(teacher.layers, true_ranks):
            u, _ = torch.linalg.qr(torch.randn(d, r, generator=g))
            v, _ = torch.linalg.qr(torch.randn(d, r, generator=g))
            layer.weight += scale * u @ v.t()
        x = torch.randn(n_pool + n_test, d, generator=g)
        y = teacher(x)
    pool = list(zip(x[:n_pool], y[:n_pool]))
    return base, pool, (x[n_pool:], y[n_pool:])


def batches(data: list, size: int, seed: int):
    """Endless shuffled mini-batches (x, y) from a list of pairs."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(data), generator=g).tolist()
        for i in range(0, len(perm) - size + 1, size):
            idx = perm[i : i + size]
            yield torch.stack([data[j][0] for j in idx]), torch.stack([data[j][1] for j in idx])


def mse(model, b) -> torch.Tensor:
    x, y = b
    return ((model(x) - y) ** 2).mean()


def search(base: nn.Module, train: list, val: list, k: int, steps: int, mode: str, args) -> tuple[dict[str, int], float]:
    """AutoLoRA search from the base; the ranks found (α_j >= 1/k) and the last validation loss."""
    torch.manual_seed(0)
    cfg = AutoLoraConfig(r=k, lora_alpha=k, target_modules=[f"layers.{i}" for i in range(len(base.layers))])
    student = inject_adapter_in_model(cfg, copy.deepcopy(base))
    s = BilevelStep(student, mode=mode, weight_lr=args.weight_lr, beta_lr=args.beta_lr)
    tr, va = batches(train, args.batch, 1), batches(val, args.batch, 2)
    for _ in range(steps):
        out = s.step(next(tr), next(va), mse)
    return determine_ranks(student), out["val_loss"]


def retrain(base: nn.Module, ranks: dict[str, int], data: list, test, args) -> float:
    """Plain LoRA with ``ranks`` from scratch on ``data``; test MSE."""
    torch.manual_seed(0)
    model = inject_adapter_in_model(retrain_config(ranks, lora_alpha=args.k), copy.deepcopy(base))
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    opt = torch.optim.Adam(params, lr=args.retrain_lr)
    it = batches(data, args.batch, 3)
    for _ in range(args.retrain_steps):
        mse(model, next(it)).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        return float(mse(model, test))


def uniform(names: list[str], total: int) -> dict[str, int]:
    """Total rank spread as evenly as possible (same parameter count: all layers are d x d)."""
    q, rem = divmod(total, len(names))
    return {n: q + (1 if i < rem else 0) for i, n in enumerate(names)}


def main(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    true = [int(r) for r in args.true_ranks.split(",")]
    names = [f"layers.{i}" for i in range(len(true))]
    rows = []
    for seed in range(args.seeds):
        base, pool, test = make_problem(seed, args.d, true, args.n_pool, args.n_test, args.scale)
        train, val = split_train_val(pool, 0.3, seed)
        fixed = {"true": retrain(base, dict(zip(names, true)), pool, test, args),
                 "full_k": retrain(base, {n: args.k for n in names}, pool, test, args)}
        with torch.no_grad():
            fixed["base"] = float(mse(base, test))
        for mode in args.modes.split(","):
            for steps in [int(x) for x in args.search_steps.split(",")]:
                t0 = time.perf_counter()
                found, _ = search(base, train, val, args.k, steps, mode, args)
                total = sum(found.values())
                even = uniform(names, total)
                row = {"seed": seed, "mode": mode, "steps": steps, "found": [found[n] for n in names],
                       "uniform": list(even.values()), "found_loss": retrain(base, found, pool, test, args),
                       "uniform_loss": retrain(base, even, pool, test, args), **fixed,
                       "seconds": time.perf_counter() - t0}
                rows.append(row)
                print(f"seed {seed} {mode} {steps} steps: found {row['found']} (true {true}), test MSE found "
                      f"{row['found_loss']:.2e} uniform {row['uniform_loss']:.2e} true {fixed['true']:.2e} full_k "
                      f"{fixed['full_k']:.2e} base {fixed['base']:.2e}", flush=True)
    if args.markdown:
        print(markdown(rows, true, args))
    return rows


def markdown(rows: list[dict], true: list[int], args) -> str:
    def ms(xs):
        return f"{statistics.mean(xs):.2e}" + (f" ± {statistics.stdev(xs):.1e}" if len(xs) > 1 else "")

    lines = [
        f"Setup: {len(true)} tanh layers {args.d}x{args.d}, true ranks {true}, k = {args.k}, update singular "
        f"values {args.scale}; {args.n_pool} pairs split 70/30; search batch {args.batch}, Adam lr w {args.weight_lr}, "
        f"β {args.beta_lr}; retrain {args.retrain_steps} steps from scratch on train + validation (Adam lr "
        f"{args.retrain_lr}, lora_alpha = k); test MSE on {args.n_test} fresh pairs; {args.seeds} seeds "
        "(base, teacher and data differ per seed).",
        "",
        "| search | seed | ranks found | rank error (L1) | test MSE: found ranks | uniform, same total rank | true ranks | k everywhere | no adapter |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        err = sum(abs(a - b) for a, b in zip(r["found"], true))
        lines.append(f"| {r['mode']} {r['steps']} | {r['seed']} | {r['found']} | {err} | {r['found_loss']:.2e} | "
                     f"{r['uniform_loss']:.2e} | {r['true']:.2e} | {r['full_k']:.2e} | {r['base']:.2e} |")
    groups = sorted({(r["mode"], r["steps"]) for r in rows}, key=lambda g: (g[0], g[1]))
    for mode, steps in groups:
        sel = [r for r in rows if (r["mode"], r["steps"]) == (mode, steps)]
        win = sum(r["found_loss"] < r["uniform_loss"] for r in sel)
        err = statistics.mean(sum(abs(a - b) for a, b in zip(r["found"], true)) for r in sel)
        lines.append(f"| **{mode} {steps}: mean** | | found < uniform in {win}/{len(sel)} | {err:.1f} | "
                     f"{ms([r['found_loss'] for r in sel])} | {ms([r['uniform_loss'] for r in sel])} | "
                     f"{ms([r['true'] for r in sel])} | {ms([r['full_k'] for r in sel])} | |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--d", type=int, default=32)
    p.add_argument("--true_ranks", default="1,2,4,6")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--n_pool", type=int, default=4096)
    p.add_argument("--n_test", type=int, default=2048)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--modes", default="darts,first_order", help="comma-separated search modes")
    p.add_argument("--search_steps", default="500,2000", help="comma-separated search lengths")
    p.add_argument("--weight_lr", type=float, default=3e-3)
    p.add_argument("--beta_lr", type=float, default=1e-2)
    p.add_argument("--retrain_steps", type=int, default=3000)
    p.add_argument("--retrain_lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--markdown", action="store_true")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
