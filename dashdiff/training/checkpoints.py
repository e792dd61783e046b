"""Phase-named checkpoints that exist only complete (written aside, marker last, renamed into place,
pruned after), ``latest`` resolution that skips incomplete ones, the pre-resume check that no file
in a checkpoint is a pickle of more than data, and the accelerate hooks that carry the full
dashdiff adapter state."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

from ..safeio import write_json
from .records import (NEUTRAL_FLAGS, PathLike, ADAPTER_STATE, CHECKPOINT_STATE, CheckpointWriteError, FlagNames,
                      TrainingError, _jsonable, logger, read_run_record)

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


def resolve_resume(output_dir: PathLike, value: Optional[str], flags: FlagNames = NEUTRAL_FLAGS
                   ) -> Optional[Checkpoint]:
    """The checkpoint the resume setting ``value`` names: ``latest`` (the newest *complete* one,
    None if the folder has none, as in diffusers: training starts fresh; incomplete ones are skipped
    with one log line), a path, or a folder name inside ``output_dir`` (refused if incomplete).
    Messages name the setting as ``flags.resume``."""
    if not value:
        return None
    if value == "latest":
        skipped = [c for c in list_checkpoints(output_dir, complete=False)]
        found = list_checkpoints(output_dir, complete=True)
        newest = found[-1] if found else None
        skipped = [c for c in skipped if newest is None or c.order > newest.order]
        if skipped:
            logger.warning(
                "%s latest: skipping incomplete %s (%s); resuming from %s", flags.resume,
                ", ".join(c.path.name for c in skipped), checkpoint_problem(skipped[-1].path),
                newest.path.name if newest else "nothing (a fresh start)")
        return newest
    for candidate in (Path(value), Path(output_dir) / Path(value).name):
        if candidate.is_dir():
            ckpt = parse_checkpoint(candidate)
            if ckpt is None:
                raise TrainingError(
                    f"{flags.resume} {value}: {candidate} is not named checkpoint-<step> or "
                    "checkpoint-search-<step>; pass a folder the script wrote, or 'latest'"
                )
            problem = checkpoint_problem(candidate)
            if problem is not None:
                good = ", ".join(c.path.name for c in list_checkpoints(candidate.parent, complete=True)) or "none"
                raise TrainingError(
                    f"{flags.resume} {value}: {candidate} is not a complete dashdiff checkpoint: {problem}. "
                    f"Resume from a complete one (in that folder: {good}) or pass 'latest'."
                )
            return Checkpoint(path=candidate.resolve(), phase=ckpt.phase, step=ckpt.step)
    names = ", ".join(c.path.name for c in list_checkpoints(output_dir)) or "none"
    raise TrainingError(
        f"{flags.resume} {value}: no such checkpoint (checkpoints in {output_dir}: {names}); "
        "pass one of them or 'latest'"
    )


def restarts_in_place(output_dir: PathLike, value: Optional[str], resume: Optional[Checkpoint],
                      fingerprint: str) -> bool:
    """Resuming from ``latest`` found no complete checkpoint in a folder that holds this
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
        # Renamed to a temporary name first: a save killed during the deletion then leaves a
        # folder that clean_stale_temporaries removes, not a half-deleted checkpoint-<n>.
        doomed = ckpt.path.with_name(f".{ckpt.path.name}.tmp-pruned")
        shutil.rmtree(doomed, ignore_errors=True)
        os.rename(ckpt.path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
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
                    write_extra: Optional[Callable[[Path], None]] = None, flags: FlagNames = NEUTRAL_FLAGS) -> Path:
    """Write ``checkpoint-<step>`` (``checkpoint-search-<step>``) so that it exists only complete.

    Every process writes ``accelerator.save_state`` into ``.<name>.tmp``; the main process adds
    ``write_extra(folder)``'s files, then the marker (``info`` + a manifest of file sizes, written
    last), syncs the files to disk and renames the folder into place; only then are older
    checkpoints pruned to ``total_limit``. A failure on any process (e.g. a full disk) removes the
    temporary folder on all and raises ``CheckpointWriteError``: earlier checkpoints stay usable.
    Call on every process. Returns the checkpoint's path; messages name the settings as ``flags`` spells
    them."""
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
            + f"resume with {flags.resume} latest."
        ) from error
    if main:
        removed = prune_checkpoints(root, total_limit, keep_free=0, keep=[final])
        if removed:
            logger.info("removed old checkpoint(s) %s (%s %s)",
                        ", ".join(p.name for p in removed), flags.total_limit, total_limit)
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


