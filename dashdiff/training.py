"""Training-loop helpers shared by dashdiff's training scripts (DreamBooth, commonsense).

What lives here is the part of a script that must behave the same everywhere and that is easy to
get subtly wrong: the LoRA-Dash warm-up default, the output-folder guard and the run record that
tells one run's folder from another's, phase-named checkpoints with pruning and ``latest``
resolution, accelerate save/load hooks that carry the full dashdiff state, per-step random
generators that make a resumed run draw the same noise as an uninterrupted one, the NaN-loss
guard and the per-step log a resume truncates.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch

from .safeio import atomic_write, write_json

PathLike = Union[str, os.PathLike]

RUN_RECORD = "dashdiff_run.json"
ADAPTER_STATE = "dashdiff_adapter.safetensors"
CHECKPOINT_STATE = "dashdiff_checkpoint.json"
STEP_LOG = "dashdiff_steps.jsonl"

# Arguments that do not change what a run computes: they are left out of the run's fingerprint,
# so resuming or re-pointing the logs does not make a folder look like "another run".
FINGERPRINT_IGNORES: frozenset[str] = frozenset(
    {
        "output_dir",
        "resume_from_checkpoint",
        "overwrite_output_dir",
        "local_rank",
        "report_to",
        "logging_dir",
        "dataloader_num_workers",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "validation_epochs",
        "num_validation_images",
        "validation_prompt",
        "num_validation_inference_steps",
    }
)


class TrainingError(ValueError):
    """A problem with the user's input or folders, reported as one clear message (no traceback)."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped before the bad step changed any weight."""


# --------------------------------------------------------------------------- defaults


def default_dash_warmup_steps(gradient_accumulation_steps: int) -> int:
    """LoRA-Dash's pre-launch length in optimizer steps: the published 100 *training
    micro-batches*, i.e. ``ceil(100 / gradient_accumulation_steps)`` (METHODS.md)."""
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
    return math.ceil(100 / gradient_accumulation_steps)


# --------------------------------------------------------------------------- run record


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def run_arguments(args: Union[Namespace, Mapping[str, Any]]) -> dict[str, Any]:
    """The arguments as a JSON-able dict (paths and other objects as strings)."""
    items = vars(args) if isinstance(args, Namespace) else dict(args)
    return {k: _jsonable(v) for k, v in sorted(items.items()) if not k.startswith("_")}


def args_fingerprint(args: Union[Namespace, Mapping[str, Any]], ignore: Iterable[str] = FINGERPRINT_IGNORES) -> str:
    """SHA-256 (hex, first 16 chars) of the canonical JSON of the arguments that define a run."""
    skip = set(ignore)
    items = {k: v for k, v in run_arguments(args).items() if k not in skip}
    blob = json.dumps(items, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def read_run_record(output_dir: PathLike) -> Optional[dict[str, Any]]:
    """The run record in ``output_dir`` or None (also None for an unreadable record)."""
    path = Path(output_dir) / RUN_RECORD
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_run_record(output_dir: PathLike, record: Mapping[str, Any]) -> None:
    write_json(_jsonable(dict(record)), Path(output_dir) / RUN_RECORD)


# --------------------------------------------------------------------------- checkpoints


_CHECKPOINT_RE = re.compile(r"^checkpoint-(?:(?P<phase>search)-)?(?P<step>\d+)$")
# Order of phases within one run: a search checkpoint is older than any train checkpoint.
_PHASE_ORDER = {"search": 0, "train": 1}


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    phase: str  # "search" (AutoLoRA search) or "train" (LoRA / LoRA-Dash / AutoLoRA retrain)
    step: int  # optimizer steps completed in that phase

    @property
    def order(self) -> tuple[int, int]:
        return _PHASE_ORDER[self.phase], self.step


def checkpoint_name(phase: str, step: int) -> str:
    """``checkpoint-search-<n>`` for the AutoLoRA search, ``checkpoint-<n>`` otherwise."""
    if phase not in _PHASE_ORDER:
        raise ValueError(f"unknown phase {phase!r}")
    return f"checkpoint-search-{step}" if phase == "search" else f"checkpoint-{step}"


def parse_checkpoint(path: PathLike) -> Optional[Checkpoint]:
    path = Path(path)
    m = _CHECKPOINT_RE.match(path.name)
    if m is None:
        return None
    return Checkpoint(path=path, phase=m.group("phase") or "train", step=int(m.group("step")))


def list_checkpoints(output_dir: PathLike) -> list[Checkpoint]:
    """Checkpoint folders in ``output_dir``, oldest first (search phase before train phase)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [c for c in (parse_checkpoint(p) for p in root.iterdir() if p.is_dir()) if c is not None]
    return sorted(found, key=lambda c: c.order)


def resolve_resume(output_dir: PathLike, value: Optional[str]) -> Optional[Checkpoint]:
    """The checkpoint ``--resume_from_checkpoint`` names: ``latest`` (None if the folder has
    none, as in diffusers: training starts fresh), a path, or a folder name inside ``output_dir``."""
    if not value:
        return None
    if value == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    for candidate in (Path(value), Path(output_dir) / Path(value).name):
        if candidate.is_dir():
            ckpt = parse_checkpoint(candidate)
            if ckpt is None:
                raise TrainingError(
                    f"--resume_from_checkpoint {value}: {candidate} is not named checkpoint-<step> or "
                    "checkpoint-search-<step>; pass a folder the script wrote, or 'latest'"
                )
            return Checkpoint(path=candidate.resolve(), phase=ckpt.phase, step=ckpt.step)
    names = ", ".join(c.path.name for c in list_checkpoints(output_dir)) or "none"
    raise TrainingError(
        f"--resume_from_checkpoint {value}: no such checkpoint (checkpoints in {output_dir}: {names}); "
        "pass one of them or 'latest'"
    )


def prune_checkpoints(output_dir: PathLike, total_limit: Optional[int], keep_free: int = 1) -> list[Path]:
    """Remove the oldest checkpoints so that ``keep_free`` more fit under ``total_limit``
    (diffusers' rule: called right before saving one). Returns the removed folders."""
    if total_limit is None:
        return []
    found = list_checkpoints(output_dir)
    excess = len(found) + keep_free - total_limit
    removed = []
    for ckpt in found[: max(excess, 0)]:
        shutil.rmtree(ckpt.path, ignore_errors=True)
        removed.append(ckpt.path)
    return removed


# --------------------------------------------------------------------------- output folder guard


def _is_own_file(name: str) -> bool:
    return name == RUN_RECORD


def check_output_dir(output_dir: PathLike, fingerprint: str, resume: Optional[str], overwrite: bool) -> None:
    """Refuse to start in a folder that already holds a run, unless asked to resume or overwrite.

    Allowed: a missing or empty folder; any folder with ``resume`` set (continuing is explicit);
    any folder with ``overwrite``. Otherwise the message says whose files are there and what to
    pass. Nothing is written or removed here.
    """
    root = Path(output_dir)
    if resume or overwrite or not root.exists():
        return
    if not root.is_dir():
        raise TrainingError(f"--output_dir {root} exists and is a file, not a folder")
    entries = sorted(p.name for p in root.iterdir())
    if not entries:
        return
    record = read_run_record(root)
    ckpts = [c.path.name for c in list_checkpoints(root)]
    if record is None:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise TrainingError(
            f"--output_dir {root} is not empty ({shown}) and holds no run record of this script: refusing to "
            "write into it. Pick an empty folder, or pass --overwrite_output_dir to write over it."
        )
    if record.get("fingerprint") == fingerprint:
        hint = (
            f"pass --resume_from_checkpoint latest to continue it (checkpoints: {', '.join(ckpts)}), "
            if ckpts
            else ""
        )
        raise TrainingError(
            f"--output_dir {root} already holds a run with the same arguments (hash {fingerprint}): {hint}"
            "pass --overwrite_output_dir to start it again from scratch, or pick another folder."
        )
    raise TrainingError(
        f"--output_dir {root} holds another run's files (arguments hash {record.get('fingerprint')}, this run "
        f"{fingerprint}; method {_recorded_method(record)!r}). Pick another folder, pass "
        "--resume_from_checkpoint to continue that run, or --overwrite_output_dir to replace it."
    )


def _recorded_method(record: dict) -> object:
    # the DreamBooth script records --method, the commonsense script --adapter_name
    args = record.get("args", {})
    return args.get("method", args.get("adapter_name"))


def clear_for_overwrite(output_dir: PathLike) -> list[Path]:
    """With ``--overwrite_output_dir``: remove the previous run's checkpoints, step log and run
    record, which would otherwise mix with this run's (``latest``, pruning, loss history).
    Other files are left alone and overwritten when this run writes the same names."""
    root = Path(output_dir)
    removed = []
    for ckpt in list_checkpoints(root):
        shutil.rmtree(ckpt.path, ignore_errors=True)
        removed.append(ckpt.path)
    for name in (STEP_LOG, RUN_RECORD):
        if (root / name).exists():
            (root / name).unlink()
            removed.append(root / name)
    return removed


# --------------------------------------------------------------------------- accelerate hooks


def register_state_hooks(accelerator, host: Callable[[], Any], save_adapter: Callable, load_adapter: Callable) -> None:
    """Make ``accelerator.save_state`` / ``load_state`` carry the full dashdiff adapter state
    (LoRA factors, δ, U_s, V_s, step counters, β) in one ``dashdiff_adapter.safetensors`` instead
    of full model weights: the frozen base is not copied into every checkpoint.

    ``host()`` returns what ``save_adapter`` / ``load_adapter`` take (a model or an object with
    ``unet`` / ``text_encoder`` attributes), unwrapped, at the time of the call; the save/load
    functions are passed in so this module does not pin their import.
    """

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            save_adapter(host(), os.path.join(output_dir, ADAPTER_STATE))
        # Pop the full state dicts: accelerate would otherwise write every model in full.
        while weights:
            weights.pop()

    def load_hook(models: list, input_dir: str) -> None:
        # Emptying the list stops accelerate from looking for model.safetensors.
        while models:
            models.pop()
        load_adapter(host(), os.path.join(input_dir, ADAPTER_STATE))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def write_checkpoint_info(path: PathLike, info: Mapping[str, Any]) -> None:
    write_json(_jsonable(dict(info)), Path(path) / CHECKPOINT_STATE)


def read_checkpoint_info(path: PathLike) -> dict[str, Any]:
    file = Path(path) / CHECKPOINT_STATE
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainingError(f"{path} has no {CHECKPOINT_STATE}: it was not written by a dashdiff script") from None


# --------------------------------------------------------------------------- randomness


def step_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed derived from ``seed`` and the position in training (step, micro-batch,
    process, ...). Deriving instead of carrying a generator along means a resumed run draws
    exactly what an uninterrupted one draws at the same position, with nothing to checkpoint."""
    blob = ",".join(str(int(p)) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(blob.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def step_generator(seed: int, *parts: int) -> torch.Generator:
    """A CPU generator seeded by ``step_seed`` (draw on CPU, then move: identical on any device)."""
    return torch.Generator(device="cpu").manual_seed(step_seed(seed, *parts))


# --------------------------------------------------------------------------- guards and logs


def check_finite_loss(loss: torch.Tensor, step: int, phase: str, last_checkpoint: Optional[PathLike]) -> None:
    """Raise ``NonFiniteLossError`` if ``loss`` is NaN/inf. Call it before ``backward``: the
    weights then still hold the last good step, and no checkpoint of the bad state is ever saved."""
    value = float(loss.detach().float().mean())
    if math.isfinite(value):
        return
    keep = (
        f"the last good checkpoint is {last_checkpoint}; resume from it with --resume_from_checkpoint, e.g. "
        "with a lower --learning_rate or --mixed_precision bf16"
        if last_checkpoint
        else "no checkpoint was saved before it (use --checkpointing_steps to keep some)"
    )
    raise NonFiniteLossError(
        f"loss is {value} at {phase} step {step + 1}: training stopped before this step changed any weight; {keep}. "
        "No final weights were written."
    )


class StepLog:
    """One JSON line per optimizer step (step, phase, loss, lr, ...) in ``output_dir``; on resume the
    lines after the resume point are dropped first, so the file reads as one consistent run."""

    def __init__(self, path: PathLike, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def truncate(self, keep: Callable[[dict], bool]) -> None:
        if not self.enabled or not self.path.exists():
            return
        rows = [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows if keep(r))
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def write(self, row: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(_jsonable(dict(row)), sort_keys=True) + "\n")

    @staticmethod
    def read(path: PathLike) -> list[dict]:
        path = Path(path)
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def fused_adamw_ok(params: list[torch.Tensor]) -> bool:
    """PyTorch's fused AdamW takes floating-point parameters on one CPU or CUDA device type."""
    kinds = {p.device.type for p in params}
    return len(kinds) == 1 and kinds <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)


def loss_scale(optimizer: Any) -> Optional[float]:
    """The fp16 grad scaler's scale of an accelerate-prepared ``optimizer`` (its ``scaler``), None without
    one. Read it before ``optimizer.step()`` and pass it to :func:`step_skipped` after."""
    scaler = getattr(optimizer, "scaler", None)
    return None if scaler is None or not scaler.is_enabled() else float(scaler.get_scale())


def step_skipped(optimizer: Any, scale_before: Optional[float]) -> bool:
    """Whether the fp16 grad scaler skipped the ``optimizer.step()`` just taken (inf/NaN gradients).

    accelerate's ``step_was_skipped`` only sees a skip when the optimizer's ``step`` is not called; a
    fused optimizer (PyTorch's fused AdamW, Trainer's default) is called with ``found_inf`` and skips
    inside its kernel, so only the scaler backing off its scale (it does exactly on a skip) shows it."""
    if getattr(optimizer, "step_was_skipped", False):
        return True
    return scale_before is not None and float(optimizer.scaler.get_scale()) < scale_before
