"""What both pretraining scripts share: chunked training that checkpoints and resumes exactly.

A run is a sequence of *chunks* (one command each, e.g. one short GPU session): each chunk
trains until ``--max_steps``, ``--max_minutes`` or ``--chunk_steps`` is reached, saves a
checkpoint and exits; the next command with ``--resume`` continues from the latest checkpoint.

Exactness: every random draw of step ``s`` (batch indices, noise, timesteps, caption dropout)
comes from generators seeded with ``(seed, s)``, never from a global RNG, and a checkpoint holds
the model, optimizer and scheduler states in full precision. So the losses after a stop +
``--resume`` are the losses of an uninterrupted run (bit for bit on CPU; on CUDA on the same card
and software, up to the nondeterminism of some kernels unless ``--deterministic``).

Portability: a checkpoint is a flat folder of ``state.json`` and safetensors shards of at most
:data:`SHARD_BYTES` each, so it can travel to and from a short-lived GPU machine whose file
transfers are limited in file size and count (see ``README.md``); ``--resume_from DIR`` resumes
from such a copied folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import _atomic
from _atomic import write_json_atomic  # noqa: F401  (the scripts call C.write_json_atomic)

CKPT_PREFIX = "checkpoint-"
SHARD_BYTES = 15 * 2**20  # under the device machine's 16 MiB per returned file


def step_seed(seed: int, step: int, salt: str) -> int:
    """A 63-bit seed for the draws of ``step`` (stable across runs and platforms)."""
    h = hashlib.sha256(f"{seed}:{step}:{salt}".encode()).digest()
    return int.from_bytes(h[:8], "big") >> 1


def step_rng(seed: int, step: int, salt: str) -> random.Random:
    return random.Random(step_seed(seed, step, salt))


def step_generator(seed: int, step: int, salt: str, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(step_seed(seed, step, salt))


def save_folder_atomic(final: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` and rename the folder to ``final`` (an old ``final`` is replaced
    only after the new one is complete): :func:`_atomic.save_folder_atomic` with ``replace=True``."""
    return _atomic.save_folder_atomic(final, write, replace=True)


def checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoint folders under ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(CKPT_PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """``tensors`` as safetensors shards of at most :data:`SHARD_BYTES`, ``meta`` as state.json."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous().clone()  # clone: no shared storage
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    names = [f"shard-{i:02d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, str(folder / name))
    # state.json last: its presence marks a complete checkpoint.
    write_json_atomic(folder / "state.json", {**meta, "shards": names})


def read_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    tensors: dict[str, torch.Tensor] = {}
    for name in meta["shards"]:
        tensors.update(load_file(str(folder / name)))
    return tensors, meta


def _optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optimizer/{idx}/{k}"] = v
            else:
                scalars[f"{idx}/{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optimizer/"):
            _, idx, k = key.split("/", 2)
            state.setdefault(int(idx), {})[k] = v
    for key, v in meta["scalars"].items():
        idx, k = key.split("/", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def world_version_tag(version: int) -> str:
    """A cache file's image-world prefix: none for version 1, so caches written before world versions
    existed stay valid; ``"v<version>-"`` otherwise, so two versions never share a file."""
    return "" if version == 1 else f"v{version}-"


def world_version_config(version: int) -> dict[str, int]:
    """A run config's image-world entry: none for version 1, so checkpoints written before world
    versions existed still resume; any other version is recorded, so no run resumes as another."""
    return {} if version == 1 else {"world_version": version}


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
    g.add_argument("--resume_from", type=Path, default=None,
                   help="continue from this checkpoint folder (e.g. one copied back from a GPU machine)")
    g.add_argument("--export_dir", type=Path, default=None,
                   help="at the end of the chunk, copy the latest checkpoint folder into this folder "
                        "(e.g. $OUT on the GPU machine, to bring it back)")
    g.add_argument("--log_every", type=int, default=50)
    g.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms (exact resume on CUDA too; slower)")


def check_chunk_args(p: Any, args: Any) -> None:
    """Refuse chunk options that cannot work, through the parser (exit status 2, message named)."""
    if args.checkpoint_every < 1 or args.keep_checkpoints < 1 or args.log_every < 1:
        p.error("--checkpoint_every, --keep_checkpoints and --log_every must be >= 1")
    if args.max_minutes is not None and args.max_minutes <= 0:
        p.error("--max_minutes must be > 0")
    if args.resume and args.resume_from is not None:
        p.error("pass either --resume (latest checkpoint of --output_dir) or --resume_from DIR, not both")


def check_positive(p: Any, args: Any, names: tuple[str, ...]) -> None:
    """Refuse any of the integer options ``names`` that is set and < 1, through the parser."""
    for name in names:
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name} must be >= 1")


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
    source = args.resume_from if args.resume_from is not None else (found[-1] if args.resume and found else None)
    if args.resume and args.resume_from is None and not found:
        raise FileNotFoundError(f"--resume: no {CKPT_PREFIX}<step> folder in {folder}; start without --resume")
    if source is not None:
        if not (Path(source) / "state.json").is_file():
            raise FileNotFoundError(f"--resume_from {source}: no state.json there (not a complete checkpoint)")
        tensors, meta = read_checkpoint(Path(source))
        diff = sorted(k for k in set(meta["config"]) | set(config) if meta["config"].get(k) != config.get(k))
        if diff:
            raise ValueError(
                f"resume: {source} was trained with other settings ({', '.join(diff)}); "
                "resume with the same arguments, or use a new --output_dir")
        for name, m in modules.items():
            prefix = f"module/{name}/"
            m.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        optimizer.load_state_dict(_optimizer_from_flat(tensors, meta["optimizer"]))
        scheduler.load_state_dict(meta["scheduler"])
        state = RunState(**meta["state"])
        print(f"resumed from {source} at step {state.step}")
    elif found:
        raise FileExistsError(
            f"{folder} already holds checkpoints (latest {found[-1].name}); pass --resume to continue, "
            "or use a new --output_dir")

    def save() -> None:
        tensors = {f"module/{n}/{k}": v for n, m in modules.items() for k, v in m.state_dict().items()}
        opt_tensors, opt_meta = _optimizer_to_flat(optimizer)
        meta = {"format": 1, "config": config, "state": state.__dict__, "optimizer": opt_meta,
                "scheduler": scheduler.state_dict()}
        final = folder / f"{CKPT_PREFIX}{state.step}"
        save_folder_atomic(final, lambda tmp: write_checkpoint(tmp, {**tensors, **opt_tensors}, meta))
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
            rate = done_here / max(1e-9, time.perf_counter() - start)
            print(f"step {state.step}/{max_steps} loss {sum(recent) / len(recent):.5f} "
                  f"lr {scheduler.get_last_lr()[0]:.2e} {rate:.2f} steps/s", flush=True)
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
    if args.export_dir is not None and checkpoints(folder):
        latest = checkpoints(folder)[-1]
        dest = Path(args.export_dir) / latest.name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(latest, dest)
        print(f"exported {latest} to {dest}")
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
