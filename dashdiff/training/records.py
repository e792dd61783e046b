"""The run's record, its per-step log, file names, errors, and the seeds derived from the position in
training: what every part of a run's lifecycle refers to."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch

from ..safeio import atomic_write, write_json

PathLike = Union[str, os.PathLike]


RUN_RECORD = "dashdiff_run.json"
ADAPTER_STATE = "dashdiff_adapter.safetensors"
CHECKPOINT_STATE = "dashdiff_checkpoint.json"
STEP_LOG = "dashdiff_steps.jsonl"
LOCK_FILE = ".dashdiff.lock"
WRITE_PROBE_PREFIX = ".dashdiff-write-test."  # train/input_rules.check_output_dir_writable's probe file

logger = logging.getLogger("dashdiff.training")

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


@dataclass(frozen=True)
class FlagNames:
    """How the caller names the settings that the lifecycle's messages ask the user to change. The
    library's default is neutral (the settings' names); a command-line script passes its spellings
    (train/run_flags.py's ``CLI_FLAGS``), so a refusal names the flag the user typed."""

    output_dir: str = "output_dir"
    resume: str = "resume_from_checkpoint"
    overwrite: str = "overwrite_output_dir"
    total_limit: str = "checkpoints_total_limit"


NEUTRAL_FLAGS = FlagNames()


class TrainingError(ValueError):
    """A problem with the user's input or folders, reported as one clear message (no traceback)."""


class CheckpointWriteError(TrainingError):
    """Writing a checkpoint failed (full disk, lost permission): the partial folder was removed and
    the previous checkpoints are as they were."""


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
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN / Infinity: a bare NaN makes the file unreadable to strict parsers
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


def mark_stopped(output_dir: PathLike, why: str, error: BaseException, last_checkpoint: Optional[PathLike],
                 record: Optional[Mapping[str, Any]] = None) -> None:
    """Record that the run stopped (``status: "stopped: <why>"``, the error, the last good
    checkpoint) in ``record`` or the record on disk. Best effort: on a full disk this write may fail
    too, and the error being reported matters more than the record."""
    updated = dict(record if record is not None else read_run_record(output_dir) or {})
    updated.update(status=f"stopped: {why}", error=str(error),
                   last_checkpoint=str(last_checkpoint) if last_checkpoint else None)
    try:
        write_run_record(output_dir, updated)
    except OSError:
        logger.warning("could not update the run record in %s (disk full?)", output_dir)


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


class StepLog:
    """One JSON line per optimizer step (step, phase, loss, lr, ...) in ``output_dir``; on resume the
    lines after the resume point are dropped first, so the file reads as one consistent run."""

    def __init__(self, path: PathLike, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def truncate(self, keep: Callable[[dict], bool]) -> None:
        if not self.enabled or not self.path.exists():
            return
        rows = self.read(self.path)
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows if keep(r))
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def write(self, row: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(_jsonable(dict(row)), sort_keys=True, allow_nan=False) + "\n")

    @staticmethod
    def read(path: PathLike) -> list[dict]:
        """The rows; a torn last line (a run killed mid-write) is dropped, a damaged earlier one
        raises ``TrainingError`` naming the line."""
        path = Path(path)
        if not path.exists():
            return []
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        rows = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                if n == len(lines):  # only the last write can have been cut short
                    continue
                raise TrainingError(f"{path} line {n} is damaged (not JSON): fix or delete that line") from None
        return rows


