"""Training-loop helpers shared by dashdiff's training scripts (DreamBooth, commonsense).

What lives here is the part of a script that must behave the same everywhere and that is easy to
get subtly wrong: the LoRA-Dash warm-up default, the output-folder guard and the run record that
tells one run's folder from another's, the output-folder lock, phase-named checkpoints that exist
only complete (written aside, marker last, renamed into place, pruned after) with ``latest``
resolution that skips incomplete ones and a pre-resume check that no file in a checkpoint is a
pickle of more than data, accelerate save/load hooks that carry the full dashdiff state, per-step
random generators that make a resumed run draw the same noise as an uninterrupted one, the
NaN-loss guard and the per-step log a resume truncates.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import threading
import time
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
LOCK_FILE = ".dashdiff.lock"
WRITE_PROBE_PREFIX = ".dashdiff-write-test."  # validation.check_output_dir_writable's probe file

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


# --------------------------------------------------------------------------- checkpoints


_CHECKPOINT_RE = re.compile(r"^checkpoint-(?:(?P<phase>search)-)?(?P<step>\d+)$")
# A checkpoint being written: ``.checkpoint-<n>.tmp`` (or ``.tmp-<tag>`` for one set aside while it
# is replaced). The leading dot and the suffix keep ``latest`` and pruning from ever matching it.
_TMP_RE = re.compile(r"^\.checkpoint-(?:search-)?\d+\.tmp(?:-[A-Za-z0-9]+)?$")
# Order of phases within one run: a search checkpoint is older than any train checkpoint.
_PHASE_ORDER = {"search": 0, "train": 1}
# Files a checkpoint may hold that torch.load reads (accelerate: optimizer, scheduler, sampler,
# scaler, RNG states; the commonsense script's extra_state.pt).
_PICKLE_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")


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


def checkpoint_problem(path: PathLike) -> Optional[str]:
    """Why ``path`` is not a complete dashdiff checkpoint, or None if it is one.

    Complete means: the marker ``dashdiff_checkpoint.json`` (written last, atomically) is there
    and readable, and every file its manifest lists has the recorded size. Markers written
    before the manifest existed count on their own (they were written last too)."""
    marker = Path(path) / CHECKPOINT_STATE
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {CHECKPOINT_STATE} (an interrupted save, or not written by dashdiff)"
    except (OSError, ValueError) as err:
        return f"unreadable {CHECKPOINT_STATE} ({err})"
    if not isinstance(info, dict):
        return f"{CHECKPOINT_STATE} is not a JSON object"
    for name, size in (info.get("files") or {}).items():
        file = Path(path) / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, the checkpoint recorded {size}"
    return None


def list_checkpoints(output_dir: PathLike, complete: Optional[bool] = None) -> list[Checkpoint]:
    """Checkpoint folders in ``output_dir``, oldest first (search phase before train phase);
    ``complete=True`` / ``False``: only complete / incomplete ones (``checkpoint_problem``)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [c for c in (parse_checkpoint(p) for p in root.iterdir() if p.is_dir()) if c is not None]
    if complete is not None:
        found = [c for c in found if (checkpoint_problem(c.path) is None) == complete]
    return sorted(found, key=lambda c: c.order)


def resolve_resume(output_dir: PathLike, value: Optional[str]) -> Optional[Checkpoint]:
    """The checkpoint ``--resume_from_checkpoint`` names: ``latest`` (the newest *complete* one,
    None if the folder has none, as in diffusers: training starts fresh; incomplete ones are skipped
    with one log line), a path, or a folder name inside ``output_dir`` (refused if incomplete)."""
    if not value:
        return None
    if value == "latest":
        skipped = [c for c in list_checkpoints(output_dir, complete=False)]
        found = list_checkpoints(output_dir, complete=True)
        newest = found[-1] if found else None
        skipped = [c for c in skipped if newest is None or c.order > newest.order]
        if skipped:
            logger.warning(
                "--resume_from_checkpoint latest: skipping incomplete %s (%s); resuming from %s",
                ", ".join(c.path.name for c in skipped), checkpoint_problem(skipped[-1].path),
                newest.path.name if newest else "nothing (a fresh start)")
        return newest
    for candidate in (Path(value), Path(output_dir) / Path(value).name):
        if candidate.is_dir():
            ckpt = parse_checkpoint(candidate)
            if ckpt is None:
                raise TrainingError(
                    f"--resume_from_checkpoint {value}: {candidate} is not named checkpoint-<step> or "
                    "checkpoint-search-<step>; pass a folder the script wrote, or 'latest'"
                )
            problem = checkpoint_problem(candidate)
            if problem is not None:
                good = ", ".join(c.path.name for c in list_checkpoints(candidate.parent, complete=True)) or "none"
                raise TrainingError(
                    f"--resume_from_checkpoint {value}: {candidate} is not a complete dashdiff checkpoint: {problem}. "
                    f"Resume from a complete one (in that folder: {good}) or pass 'latest'."
                )
            return Checkpoint(path=candidate.resolve(), phase=ckpt.phase, step=ckpt.step)
    names = ", ".join(c.path.name for c in list_checkpoints(output_dir)) or "none"
    raise TrainingError(
        f"--resume_from_checkpoint {value}: no such checkpoint (checkpoints in {output_dir}: {names}); "
        "pass one of them or 'latest'"
    )


def restarts_in_place(output_dir: PathLike, value: Optional[str], resume: Optional[Checkpoint],
                      fingerprint: str) -> bool:
    """``--resume_from_checkpoint latest`` found no complete checkpoint in a folder that holds this
    same run (interrupted before its first checkpoint was complete): it starts over there, as
    diffusers' ``latest`` does, and the old step log is replaced (an auto-restart loop recovers)."""
    if value != "latest" or resume is not None:
        return False
    record = read_run_record(output_dir)
    return record is not None and record.get("fingerprint") == fingerprint


def prune_checkpoints(output_dir: PathLike, total_limit: Optional[int], keep_free: int = 1,
                      keep: Iterable[PathLike] = ()) -> list[Path]:
    """Remove the oldest complete checkpoints so that ``keep_free`` more fit under ``total_limit``
    (``save_checkpoint`` calls it with ``keep_free=0`` once the new one is complete). Folders
    without a dashdiff marker are never removed (they may be someone else's), nor ``keep``."""
    if total_limit is None:
        return []
    spare = {Path(p).resolve() for p in keep}
    found = list_checkpoints(output_dir, complete=True)
    excess = len(found) + keep_free - total_limit
    removed = []
    for ckpt in [c for c in found if c.path.resolve() not in spare][: max(excess, 0)]:
        shutil.rmtree(ckpt.path, ignore_errors=True)
        removed.append(ckpt.path)
    return removed


def clean_stale_temporaries(output_dir: PathLike) -> list[Path]:
    """Remove ``.checkpoint-<n>.tmp`` folders that a killed save left (call with the output lock
    held: then no save is in progress). Nothing else is touched."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    removed = []
    for p in sorted(root.iterdir()):
        if p.is_dir() and not p.is_symlink() and _TMP_RE.match(p.name):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if removed:
        logger.warning("removed %d unfinished checkpoint folder(s) left by an interrupted save: %s", len(removed),
                       ", ".join(p.name for p in removed))
    return removed


def _fsync(path: Path, directory: bool = False) -> None:
    # Rename-into-place orders nothing on a power cut: the files' data must be on disk first.
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError as err:  # some file systems cannot fsync a folder
        if err.errno not in (errno.EINVAL, errno.EBADF) or not directory:
            raise
    finally:
        os.close(fd)


def _fault_point(name: str, where: str) -> None:
    """Test-only: ``DASHDIFF_TEST_KILL=<checkpoint name>:<where>`` SIGKILLs this process at that
    point of that checkpoint's save (``<where>`` ``delay=<s>``: after that many seconds from its
    start), so the fault-injection test can interrupt a save anywhere. Unset: does nothing."""
    spec = os.environ.get("DASHDIFF_TEST_KILL")
    if not spec or not spec.startswith(name + ":"):
        return
    point = spec[len(name) + 1:]
    if point == where:
        os.kill(os.getpid(), signal.SIGKILL)
    elif where == "begin" and point.startswith("delay="):
        threading.Timer(float(point[6:]), os.kill, (os.getpid(), signal.SIGKILL)).start()


def _gather_errors(accelerator, error: Optional[BaseException]) -> list[str]:
    """Every process's error (as text) so that all of them stop together instead of waiting
    forever in the next collective for the one that failed."""
    from accelerate.utils import gather_object

    text = None if error is None else f"{type(error).__name__}: {error}"
    if accelerator.num_processes == 1:
        return [text] if text else []
    return [t for t in gather_object([text]) if t]


# How a full disk reads in OSError (errno 28), torch.save's RuntimeError and safetensors' error.
_DISK_FULL_SIGNS = ("No space left", "ENOSPC", "StorageFull", "file write failed", "Errno 28")


def save_checkpoint(accelerator, output_dir: PathLike, phase: str, step: int, info: Mapping[str, Any],
                    total_limit: Optional[int] = None,
                    write_extra: Optional[Callable[[Path], None]] = None) -> Path:
    """Write ``checkpoint-<step>`` (``checkpoint-search-<step>``) so that it exists only complete.

    Every process writes ``accelerator.save_state`` into ``.<name>.tmp``; the main process adds
    ``write_extra(folder)``'s files, then the marker (``info`` + a manifest of file sizes, written
    last), syncs the files to disk and renames the folder into place; only then are older
    checkpoints pruned to ``total_limit``. A failure on any process (e.g. a full disk) removes the
    temporary folder on all and raises ``CheckpointWriteError``: earlier checkpoints stay usable.
    Call on every process. Returns the checkpoint's path."""
    root = Path(output_dir)
    name = checkpoint_name(phase, step)
    final, tmp = root / name, root / f".{name}.tmp"
    main = accelerator.is_main_process
    if main and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    error: Optional[BaseException] = None
    try:
        _fault_point(name, "begin")
        accelerator.save_state(str(tmp))
        _fault_point(name, "state")
        if main and write_extra is not None:
            write_extra(tmp)
    except Exception as err:  # noqa: BLE001 - torch.save reports a full disk as a RuntimeError
        error = err
    errors = _gather_errors(accelerator, error)
    if not errors and main:
        try:
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            for rel in files:
                _fsync(tmp / rel)
            write_checkpoint_info(tmp, {**info, "phase": phase, "step": step, "files": files})
            _fsync(tmp / CHECKPOINT_STATE)
            _fsync(tmp, directory=True)
            _fault_point(name, "marker")
            _move_into_place(tmp, final)
            _fsync(root, directory=True)
            _fault_point(name, "renamed")
        except Exception as err:  # noqa: BLE001
            error = err
    errors = errors or _gather_errors(accelerator, error)
    if errors:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        full = any(sign in e for e in errors for sign in _DISK_FULL_SIGNS)
        previous = [c.path.name for c in list_checkpoints(root, complete=True)]
        raise CheckpointWriteError(
            f"could not write checkpoint {final}: {'the disk is full' if full else errors[0]}. The partial "
            f"checkpoint was removed; earlier checkpoints are intact ({', '.join(previous) or 'none'}). "
            + ("Free some space, then " if full else "Fix that, then ")
            + "resume with --resume_from_checkpoint latest."
        ) from error
    if main:
        removed = prune_checkpoints(root, total_limit, keep_free=0, keep=[final])
        if removed:
            logger.info("removed old checkpoint(s) %s (--checkpoints_total_limit %s)",
                        ", ".join(p.name for p in removed), total_limit)
    accelerator.wait_for_everyone()
    return final


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` folder to ``final``. An existing ``final`` (a resume that
    repeats a step) is replaced if dashdiff wrote it, and otherwise kept under another name."""
    if final.exists():
        if checkpoint_problem(final) is None:
            old = final.with_name(f".{final.name}.tmp-old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            return
        n = 0
        while final.with_name(f"{final.name}.unmarked{n or ''}").exists():
            n += 1
        aside = final.with_name(f"{final.name}.unmarked{n or ''}")
        os.rename(final, aside)
        logger.warning("%s was in the way and is not a complete dashdiff checkpoint (%s): kept as %s",
                       final, checkpoint_problem(aside), aside.name)
    os.rename(tmp, final)


def validate_checkpoint(path: PathLike) -> dict[str, Any]:
    """Check a checkpoint before anything is written for a resume; returns its marker's content.

    Refuses (``TrainingError``) an incomplete checkpoint and any pickle-based file in it (accelerate's
    optimizer / scheduler / RNG files, ``extra_state.pt``) that does not load under
    ``torch.load(weights_only=True)``: a file crafted to run code is refused, never executed. The
    tensors are memory-mapped, not read."""
    from accelerate.utils import load as accelerate_load  # weights_only=True plus numpy's RNG-state types

    path = Path(path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise TrainingError(f"{path} is not a complete dashdiff checkpoint: {problem}")
    for file in sorted(path.rglob("*")):
        if not (file.is_file() and file.suffix in _PICKLE_SUFFIXES):
            continue
        try:
            accelerate_load(str(file), map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # noqa: BLE001 - every failure means: do not load this file
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise TrainingError(
                f"{file}: refused to load it: it is not plain tensor/number data as a dashdiff checkpoint holds "
                f"(it may have been crafted to run code when loaded; nothing was executed). Resume from another "
                f"checkpoint, or delete this one. ({reason})"
            ) from None
    return read_checkpoint_info(path)


# --------------------------------------------------------------------------- output folder guard


def check_output_dir(output_dir: PathLike, fingerprint: str, resume: Optional[str], overwrite: bool) -> None:
    """Refuse to start in a folder that already holds a run, unless asked to resume or overwrite.

    Allowed: a missing or empty folder (the output lock does not count); any folder with ``resume``
    set (continuing is explicit); any folder with ``overwrite``. Otherwise the message says whose
    files are there and what to pass. Nothing is written or removed here.
    """
    root = Path(output_dir)
    if resume or overwrite or not root.exists():
        return
    if not root.is_dir():
        raise TrainingError(f"--output_dir {root} exists and is a file, not a folder")
    # The lock, and another process's writability probe (validation.check_output_dir_writable: under
    # DDP one rank may probe while another checks here) are not contents.
    entries = sorted(p.name for p in root.iterdir()
                     if p.name != LOCK_FILE and not p.name.startswith(WRITE_PROBE_PREFIX))
    if not entries:
        return
    record = read_run_record(root)
    ckpts = [c.path.name for c in list_checkpoints(root, complete=True)]
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
    record, which would otherwise mix with this run's (``latest``, pruning, loss history). Call it
    only once every input has been checked. Checkpoint-named folders without a dashdiff marker are
    kept (they may not be dashdiff's: one log line names them); other files are left alone and
    overwritten when this run writes the same names (the model card spares a README.md that is not
    dashdiff's: ``write_model_card``)."""
    root = Path(output_dir)
    removed = []
    for ckpt in list_checkpoints(root, complete=True):
        shutil.rmtree(ckpt.path, ignore_errors=True)
        removed.append(ckpt.path)
    kept = list_checkpoints(root, complete=False)
    if kept:
        logger.warning("--overwrite_output_dir: kept %s in %s: no dashdiff marker, so not known to be dashdiff's "
                       "(delete it yourself if it is not needed)", ", ".join(c.path.name for c in kept), root)
    for name in (STEP_LOG, RUN_RECORD):
        if (root / name).exists():
            (root / name).unlink()
            removed.append(root / name)
    return removed


MODEL_CARD_TAG = "<!-- written by dashdiff -->"


def write_model_card(output_dir: PathLike, text: str) -> Path:
    """Write the model card as ``README.md`` unless a README.md that dashdiff did not write is
    there: then it is kept and the card goes to ``README.dashdiff.md`` (one log line says so)."""
    root = Path(output_dir)
    target = root / "README.md"
    if target.exists():
        try:
            ours = MODEL_CARD_TAG in target.read_text(encoding="utf-8", errors="replace")
        except OSError:
            ours = False
        if not ours:
            target = root / "README.dashdiff.md"
            logger.warning("kept the README.md in %s (not written by dashdiff); the model card is %s", root,
                           target.name)
    body = text if text.endswith("\n") else text + "\n"
    atomic_write(target, lambda tmp: Path(tmp).write_text(body + MODEL_CARD_TAG + "\n", encoding="utf-8"))
    return target


# --------------------------------------------------------------------------- output lock


def _process_start(pid: int) -> Optional[str]:
    """The start time of ``pid`` (Linux ``/proc``), to tell a live lock from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, start: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    now = _process_start(pid)
    return start is None or now is None or now == start


class OutputLock:
    """``<output_dir>/.dashdiff.lock``: one run per output folder.

    The file (pid, host, process start time, command) is created complete and atomically
    (written under a temporary name, then hard-linked: the link fails if the lock exists). A lock
    whose process is gone from this host is reported and replaced; one from a live process or
    another host is refused with a message naming it. ``release`` removes it (only if still
    ours) and the output folder too if this lock created it and it stayed empty."""

    def __init__(self, output_dir: PathLike) -> None:
        self.root = Path(output_dir)
        self.path = self.root / LOCK_FILE
        self.held = False
        self._created_root = False
        self._content = ""

    def acquire(self) -> "OutputLock":
        if self.root.exists() and not self.root.is_dir():
            raise TrainingError(f"--output_dir {self.root} exists and is a file, not a folder")
        if not self.root.exists():
            self.root.mkdir(parents=True)
            self._created_root = True
        import sys

        pid = os.getpid()
        self._content = json.dumps({"pid": pid, "host": socket.gethostname(), "start": _process_start(pid),
                                    "since": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[:1]})
        for _ in range(5):
            tmp = self.root / f"{LOCK_FILE}.{pid}.tmp"
            tmp.write_text(self._content, encoding="utf-8")
            try:
                os.link(tmp, self.path)
                self.held = True
                return self
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
            self._replace_if_stale()
        raise TrainingError(f"could not take the lock {self.path} (it keeps changing): is another run starting?")

    def _replace_if_stale(self) -> None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return  # released meanwhile: try again
        try:
            owner = json.loads(text)
            pid, host = int(owner["pid"]), str(owner["host"])
        except (ValueError, KeyError, TypeError):
            raise TrainingError(f"{self.path} exists but is not a dashdiff lock; if no run is using --output_dir "
                                f"{self.root}, delete that file") from None
        if host != socket.gethostname():
            raise TrainingError(
                f"--output_dir {self.root} is in use by a run on host {host} (pid {pid}, since {owner.get('since')}); "
                f"pick another folder, or if that run is over, delete {self.path}")
        if _pid_alive(pid, owner.get("start")):
            raise TrainingError(
                f"--output_dir {self.root} is in use by another run (pid {pid} on this host, since "
                f"{owner.get('since')}): wait for it to end or pick another folder (lock: {self.path})")
        # Stale: move it away under a name of our own, check we moved the stale one (not a lock a
        # racing run has just taken), then retry.
        aside = self.root / f"{LOCK_FILE}.stale-{os.getpid()}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if aside.read_text(encoding="utf-8") != text:
            os.rename(aside, self.path)
            raise TrainingError(f"--output_dir {self.root}: another run took the lock {self.path} just now")
        aside.unlink()
        logger.warning("replaced a stale lock in %s: its run (pid %d on this host, since %s) is no longer running",
                       self.root, pid, owner.get("since"))

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            if self.path.read_text(encoding="utf-8") == self._content:
                self.path.unlink()
        except OSError:
            pass
        if self._created_root:
            try:
                self.root.rmdir()  # only if still empty: a run refused before writing leaves nothing
            except OSError:
                pass


class RunGuard:
    """Holds a run's output lock for the duration of a ``with`` block (released on error too).

    ``acquire(accelerator, output_dir)``: the main process takes the lock and removes leftover
    unfinished checkpoint folders; every process gets its outcome, so a refusal stops all."""

    def __init__(self) -> None:
        self.lock: Optional[OutputLock] = None

    def acquire(self, accelerator, output_dir: PathLike) -> None:
        message = None
        if accelerator.is_main_process:
            try:
                self.lock = OutputLock(output_dir).acquire()
                clean_stale_temporaries(output_dir)
            except TrainingError as err:
                message = str(err)
            except OSError as err:
                message = f"--output_dir {output_dir}: cannot write there ({err})"
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            message = broadcast_object_list([message])[0]
        if message:
            raise TrainingError(message)

    def __enter__(self) -> "RunGuard":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.lock is not None:
            self.lock.release()


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
        info = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainingError(f"{path} has no {CHECKPOINT_STATE}: it was not written by a dashdiff script") from None
    except (OSError, ValueError) as err:
        raise TrainingError(f"{file} is damaged ({err}): resume from another checkpoint") from None
    if not isinstance(info, dict):
        raise TrainingError(f"{file} is damaged (not a JSON object): resume from another checkpoint")
    missing = [name for name in (ADAPTER_STATE, "optimizer.bin") if not (Path(path) / name).is_file()]
    if missing:
        raise TrainingError(f"{path} lacks {', '.join(missing)} (an interrupted save?): resume from another "
                            "checkpoint")
    return info


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
