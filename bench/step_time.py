"""Training-step time and peak memory: stock PEFT LoRA vs dashdiff LoRA-Dash.

Methods, each on its own copy of the same model, timed interleaved (one step of each in turn) so
that drifts in clock or load hit all of them alike:

- ``lora_r``      stock PEFT LoRA, rank r
- ``dash_pre``    dashdiff LoRA-Dash before launch
- ``dash``        dashdiff LoRA-Dash after launch (the fused rank r+s path)
- ``dense_dash``  the published formulation: ``U_s diag(δ) V_sᵀ`` materialised per forward (reference)
- ``lora_r+s``    stock PEFT LoRA, rank r+s

Models: ``tiny-unet`` (CPU development size), ``sdxl`` (the SDXL UNet from ../shared/configs with
random weights, 1024 px, batch 1), ``sd15``, ``llama7b`` (LLaMA-7B with random weights, published
LoRA-Dash targets, seq 256). Prints a Markdown table; ``--write`` appends it to BENCHMARKS.md.

    python bench/step_time.py --model tiny-unet --device cpu --steps 30
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import peft
import torch
from peft import LoraConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dashdiff  # noqa: E402
from dashdiff.layer import DashdiffLinear  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT.parent / "shared" / "configs"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# AdamW implementation for every method (set by --optimizer): "default" (PyTorch's choice: a Python
# loop over tensors on the CPU, foreach on CUDA), "foreach" or "fused" (one kernel for all parameters).
OPTIMIZER = "default"
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def _config_file(name: str) -> dict:
    for folder in (CONFIGS, ROOT / ".gpu" / "configs"):  # .gpu: a copy carried to the GPU machine
        if (folder / name).exists():
            cfg = json.loads((folder / name).read_text())
            return {k: v for k, v in cfg.items() if not k.startswith("_")}
    raise FileNotFoundError(f"{name} not found in {CONFIGS} or bench/configs")


def build_base(model: str, device: str, dtype: torch.dtype):
    """Returns (model, make_batch(generator) -> kwargs, loss_fn(model, batch) -> scalar, targets)."""
    if model in ("tiny-unet", "sdxl", "sd15"):
        from diffusers import UNet2DConditionModel

        if model == "tiny-unet":
            from dashdiff.testing import tiny_sd_pipeline

            unet = tiny_sd_pipeline().unet
            latent, ctx_len, batch = 32, 77, 2
        else:
            cfg = _config_file("sdxl_unet.json" if model == "sdxl" else "sd15_unet.json")
            unet = UNet2DConditionModel(**cfg)
            latent, ctx_len, batch = (128 if model == "sdxl" else 64), 77, 1
        unet.to(device, dtype)
        cfg = unet.config
        sdxl = cfg.addition_embed_type == "text_time"

        def make_batch(g):
            b = {
                "sample": torch.randn(batch, cfg.in_channels, latent, latent, generator=g).to(device, dtype),
                "timestep": torch.randint(0, 1000, (batch,), generator=g).to(device),
                "encoder_hidden_states": torch.randn(batch, ctx_len, cfg.cross_attention_dim, generator=g).to(
                    device, dtype),
            }
            if sdxl:
                text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
                b["added_cond_kwargs"] = {
                    "text_embeds": torch.randn(batch, text_dim, generator=g).to(device, dtype),
                    "time_ids": torch.tensor([[latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]] * batch,
                                             device=device, dtype=dtype),
                }
            b["target"] = torch.randn_like(b["sample"])
            return b

        def loss_fn(m, b):
            kw = {k: v for k, v in b.items() if k != "target"}
            return torch.nn.functional.mse_loss(m(**kw).sample.float(), b["target"].float())

        return unet, make_batch, loss_fn, UNET_TARGETS
    if model in ("llama7b", "tiny-llama"):
        from transformers import LlamaConfig, LlamaForCausalLM

        if model == "tiny-llama":
            from dashdiff.testing import tiny_llama

            lm, seq, batch = tiny_llama(), 64, 2
        else:
            with torch.device("meta"):
                lm = LlamaForCausalLM(LlamaConfig(**_config_file("llama_7b.json")))
            lm = lm.to_empty(device=device)
            with torch.no_grad():
                for p in lm.parameters():
                    p.normal_(0, 0.02)
            seq, batch = 256, 4
        lm.to(device, dtype)
        vocab = lm.config.vocab_size

        def make_batch(g):
            ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
            return {"input_ids": ids, "labels": ids}

        def loss_fn(m, b):
            return m(**b).loss

        return lm, make_batch, loss_fn, LLAMA_TARGETS
    raise ValueError(f"unknown model {model!r}")


def dense_dash_forward(self: DashdiffLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The published LoRA-Dash forward: the dash term as a dense out × in matrix, every call."""
    result = self.base_layer(x, *args, **kwargs)
    ad = self.active_adapters[0]
    a, b = self.lora_A[ad].weight, self.lora_B[ad].weight
    u, v, d = self.lora_dash_U[ad], self.lora_dash_V[ad], self.lora_dash_delta[ad]
    xd = self.lora_dropout[ad](x).to(a.dtype)
    lora = (xd @ a.t()) @ b.t() * self.scaling[ad]
    dense = (u * d) @ v  # (out, in), materialised per forward as in the published code
    return result + (lora + xd @ dense.t()).to(result.dtype)


def make_method(base, method: str, r: int, s: int, targets: list[str], train_dtype: torch.dtype):
    # Every method gets its own module tree but shares the frozen base weights (a 7B model fits once).
    m = copy.deepcopy(base, memo={id(t): t for t in list(base.parameters()) + list(base.buffers())})
    common = dict(target_modules=targets, init_lora_weights="gaussian", lora_alpha=r)
    if method == "lora_r":
        m = peft.get_peft_model(m, LoraConfig(r=r, **common))
    elif method == "lora_r+s":
        m = peft.get_peft_model(m, LoraConfig(r=r + s, **{**common, "lora_alpha": r + s}))
    else:
        m = peft.get_peft_model(m, dashdiff.LoraDashConfig(r=r, dash_warmup_steps=10**9, dash_directions=s,
                                                          **common))
        if method in ("dash", "dense_dash"):
            dashdiff.launch_dash(m)
            with torch.no_grad():
                for _, layer, ad in dashdiff.walk.iter_layers(m, "dash"):
                    layer.lora_dash_delta[ad].normal_(0, 1e-3)
        if method == "dense_dash":
            for _, layer, _ in dashdiff.walk.iter_layers(m, "dash"):
                layer.forward = dense_dash_forward.__get__(layer)
    for p in m.parameters():  # trainable parameters in float32, as the training scripts keep them
        if p.requires_grad:
            p.data = p.data.to(train_dtype)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4,
                            **({"fused": True} if OPTIMIZER == "fused" else
                               {"foreach": True} if OPTIMIZER == "foreach" else {}))
    return m, opt


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def resident_bytes(m, opt) -> int:
    n = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    for st in opt.state.values():
        n += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    return n


def run(model: str, device: str, dtype: torch.dtype, r: int, s: int, steps: int, warmup: int,
        methods: list[str], autocast: bool) -> dict[str, dict]:
    torch.manual_seed(0)
    base, make_batch, loss_fn, targets = build_base(model, device, dtype)
    base.requires_grad_(False)
    built = {meth: make_method(base, meth, r, s, targets, torch.float32) for meth in methods}
    del base
    g = torch.Generator().manual_seed(0)
    batch = make_batch(g)
    times = {meth: [] for meth in methods}
    peaks = {meth: 0 for meth in methods}
    dev_type = device.split(":")[0]
    for i in range(warmup + steps):
        for meth in methods[i % len(methods):] + methods[: i % len(methods)]:  # rotate who goes first
            m, opt = built[meth]
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            _sync(device)
            t0 = time.perf_counter()
            with torch.autocast(dev_type, dtype=dtype, enabled=autocast):
                loss = loss_fn(m, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            if i >= warmup:
                times[meth].append(time.perf_counter() - t0)
            if device.startswith("cuda"):
                transient = torch.cuda.max_memory_allocated() - before
                peaks[meth] = max(peaks[meth], transient + resident_bytes(m, opt))
    out = {}
    for meth in methods:
        ts = sorted(times[meth])
        # Paired ratios: each step against the baseline's step of the same round, so drift in clock
        # or load between rounds cancels (the spread of raw step times is ±15 % on the GPU machine).
        ratios = sorted(t / b for t, b in zip(times[meth], times[methods[0]]))
        out[meth] = {
            "median_s": statistics.median(ts),
            "p10_s": ts[len(ts) // 10],
            "p90_s": ts[(9 * len(ts)) // 10],
            "ratio": statistics.median(ratios),
            "ratio_iqr": (ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]),
            "peak_gib": peaks[meth] / 2**30 if peaks[meth] else None,
        }
    return out


def table(res: dict[str, dict], baseline: str = "lora_r") -> str:
    base = res[baseline]
    lines = ["| method | median step (s) | p10-p90 (s) | vs lora_r (median of paired ratios) | IQR | peak (GiB) | "
             "vs lora_r |", "|---|---|---|---|---|---|---|"]
    for meth, v in res.items():
        mem = f"{v['peak_gib']:.2f}" if v["peak_gib"] else "n/a"
        mem_ratio = f"{v['peak_gib'] / base['peak_gib']:.3f}x" if v["peak_gib"] and base["peak_gib"] else "n/a"
        lines.append(f"| {meth} | {v['median_s']:.4f} | {v['p10_s']:.4f}-{v['p90_s']:.4f} | {v['ratio']:.3f}x | "
                     f"{v['ratio_iqr'][0]:.3f}-{v['ratio_iqr'][1]:.3f} | {mem} | {mem_ratio} |")
    return "\n".join(lines)


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that produced a table, for BENCHMARKS.md."""
    return f"`python bench/{script} {' '.join(argv if argv is not None else sys.argv[1:])}`"


def emit(text: str, write: bool, echo: bool = True) -> str:
    """Print a table section (unless already printed) and, with ``write``, append it to BENCHMARKS.md."""
    if echo:
        print(text, flush=True)
    if write:
        with open(ROOT / "BENCHMARKS.md", "a") as f:
            f.write("\n" + text)
    return text


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    import os

    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-unet", choices=["tiny-unet", "sd15", "sdxl", "tiny-llama", "llama7b"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--directions", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--methods", default="lora_r,dash_pre,dash,dense_dash,lora_r+s")
    p.add_argument("--optimizer", default="default", choices=["default", "foreach", "fused"],
                   help="AdamW implementation for every method (PyTorch's default, foreach=True or fused=True)")
    p.add_argument("--write", action="store_true", help="append the table to BENCHMARKS.md")
    args = p.parse_args(argv)
    global OPTIMIZER
    OPTIMIZER = args.optimizer
    dtype = getattr(torch, args.dtype)
    autocast = dtype != torch.float32
    res = run(args.model, args.device, dtype, args.rank, args.directions, args.steps, args.warmup,
              args.methods.split(","), autocast)
    import diffusers
    import transformers

    head = (f"### Training step, {args.model}, r={args.rank}, s={args.directions}, {args.dtype}\n\n"
            f"{device_name(args.device)}; torch {torch.__version__}, peft {peft.__version__}, diffusers "
            f"{diffusers.__version__}, transformers {transformers.__version__}; {date.today()}; median of "
            f"{args.steps} interleaved steps after {args.warmup} warm-up.\n{command_line('step_time.py', argv)}\n\n")
    return emit(head + table(res) + "\n", args.write)


if __name__ == "__main__":
    main()
