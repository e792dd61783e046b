"""What both pretraining scripts share: chunked training that checkpoints and resumes exactly.

A run is a sequence of *chunks* (one command each, e.g. one short GPU session): each chunk
trains until ``--max_steps``, ``--max_minutes`` or ``--chunk_steps`` is reached, saves a
checkpoint and exits; the next command with ``--resume`` continues from the latest checkpoint.

Exactness: every random draw of step ``s`` (batch indices, noise, timesteps, caption dropout)
comes from generators seeded with ``(seed, s)``, never from a global RNG, and a checkpoint holds
the model, optimizer and scheduler states. So the losses after a stop + ``--resume`` are the
losses of an uninterrupted run (bit for bit on CPU; on CUDA up to the nondeterminism of some
kernels unless ``--deterministic``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

CKPT_PREFIX = "checkpoint-"


def step_seed(seed: int, step: int, salt: str) -> int:
    """A 63-bit seed for the draws of ``step`` (stable across runs and platforms)."""
    h = hashlib.sha256(f"{seed}:{step}:{salt}".encode()).digest()
    return int.from_bytes(h[:8], "big") >> 1


def step_rng(seed: int, step: int, salt: str) -> random.Random:
    return random.Random(step_seed(seed, step, salt))


def step_generator(seed: int, step: int, salt: str, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(step_seed(seed, step, salt))


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary sibling and rename it into place (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def save_folder_atomic(final: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` and rename the folder to ``final`` (an old ``final`` is replaced
    only after the new one is complete)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        write(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def checkpoints(folder: Path) -> list[Path]:
    """The checkpoint folders under ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(CKPT_PREFIX) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def lr_lambda(warmup: int, total: int, floor: float = 0.1) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to ``floor`` x the peak learning rate at ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return f


@dataclass
class RunState:
    step: int = 0
    seconds: float = 0.0  # training time summed over chunks (device time on a GPU)
    chunks: int = 0
    losses: list[float] = field(default_factory=list)  # one per optimizer step


def add_chunk_args(p: Any) -> None:
    """The chunking options both scripts take."""
    g = p.add_argument_group("chunks")
    g.add_argument("--max_steps", type=int, default=None, help="total optimizer steps of the stage")
    g.add_argument("--max_minutes", type=float, default=None,
                   help="stop this chunk (after a checkpoint) once it has trained this long")
    g.add_argument("--chunk_steps", type=int, default=None, help="stop this chunk after this many steps")
    g.add_argument("--checkpoint_every", type=int, default=500, help="checkpoint every N steps")
    g.add_argument("--keep_checkpoints", type=int, default=2)
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of the stage")
    g.add_argument("--log_every", type=int, default=50)
    g.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms (exact resume on CUDA too; slower)")


def train_chunked(
    *,
    args: Any,
    folder: Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: Callable[[int], torch.Tensor],
    config: dict[str, Any],
    max_steps: int,
    max_grad_norm: float = 1.0,
    device: torch.device | str = "cpu",
) -> tuple[RunState, bool]:
    """Train ``modules`` with ``loss_fn(step)`` from the latest checkpoint (``--resume``) or from
    scratch; return the state and whether ``max_steps`` was reached.

    ``config`` (everything the trajectory depends on) is stored in each checkpoint; resuming
    with another config is refused with the differing keys named.
    """
    folder.mkdir(parents=True, exist_ok=True)
    found = checkpoints(folder)
    state = RunState()
    if args.resume:
        if not found:
            raise FileNotFoundError(f"--resume: no {CKPT_PREFIX}<step> folder in {folder}; start without --resume")
        ck = torch.load(found[-1] / "state.pt", map_location="cpu", weights_only=False)
        diff = sorted(k for k in set(ck["config"]) | set(config) if ck["config"].get(k) != config.get(k))
        if diff:
            raise ValueError(
                f"--resume: {found[-1]} was trained with other settings ({', '.join(diff)}); "
                "resume with the same arguments, or use a new --output_dir")
        for name, m in modules.items():
            m.load_state_dict(ck["modules"][name])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        state = RunState(**ck["state"])
        print(f"resumed from {found[-1]} at step {state.step}")
    elif found:
        raise FileExistsError(
            f"{folder} already holds checkpoints (latest {found[-1].name}); pass --resume to continue, "
            "or use a new --output_dir")

    def save() -> None:
        payload = {
            "config": config,
            "modules": {n: m.state_dict() for n, m in modules.items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "state": state.__dict__,
        }
        final = folder / f"{CKPT_PREFIX}{state.step}"

        def write(tmp: Path) -> None:
            torch.save(payload, tmp / "state.pt")

        save_folder_atomic(final, write)
        write_json_atomic(folder / "losses.json", {"step_losses": state.losses})
        for old in checkpoints(folder)[: -args.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    for m in modules.values():
        m.train()
    cuda = str(device).startswith("cuda")
    start = last = time.perf_counter()
    done_here = 0
    state.chunks += 1
    while state.step < max_steps:
        loss = loss_fn(state.step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.losses.append(float(loss.detach()))
        state.step += 1
        done_here += 1
        if state.step % args.log_every == 0 or state.step == max_steps:
            recent = state.losses[-args.log_every:]
            print(f"step {state.step}/{max_steps} loss {sum(recent) / len(recent):.5f} "
                  f"lr {scheduler.get_last_lr()[0]:.2e}", flush=True)
        out_of_time = args.max_minutes is not None and time.perf_counter() - start >= 60 * args.max_minutes
        out_of_steps = args.chunk_steps is not None and done_here >= args.chunk_steps
        if state.step % args.checkpoint_every == 0 or out_of_time or out_of_steps or state.step == max_steps:
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            state.seconds += now - last
            last = now
            save()
            if out_of_time or out_of_steps:
                break
    return state, state.step >= max_steps


def mean_tail(losses: list[float], n: int = 100) -> float | None:
    tail = losses[-n:]
    return sum(tail) / len(tail) if tail else None


def device_info(device: torch.device | str) -> str:
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def safetensors_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def setup_device(args: Any) -> torch.device:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    return device
