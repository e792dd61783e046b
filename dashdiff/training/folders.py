"""The output folder: the guard that tells one run's folder from another's, the overwrite clean-up,
the model card, and the lock that keeps one run per folder."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Optional

from ..safeio import atomic_write
from .checkpoints import clean_stale_temporaries, list_checkpoints
from .records import (NEUTRAL_FLAGS, PathLike, LOCK_FILE, RUN_RECORD, STEP_LOG, WRITE_PROBE_PREFIX, FlagNames,
                      TrainingError, logger, read_run_record)

# --------------------------------------------------------------------------- output folder guard


def check_output_dir(output_dir: PathLike, fingerprint: str, resume: Optional[str], overwrite: bool,
                     flags: FlagNames = NEUTRAL_FLAGS) -> None:
    """Refuse to start in a folder that already holds a run, unless asked to resume or overwrite.

    Allowed: a missing or empty folder (the output lock does not count); any folder with ``resume``
    set (continuing is explicit); any folder with ``overwrite``. Otherwise the message says whose
    files are there and what to pass (the settings as ``flags`` spells them). Nothing is written or
    removed here.
    """
    root = Path(output_dir)
    if resume or overwrite or not root.exists():
        return
    if not root.is_dir():
        raise TrainingError(f"{flags.output_dir} {root} exists and is a file, not a folder")
    # The lock, and another process's writability probe (train/input_rules.check_output_dir_writable: under
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
            f"{flags.output_dir} {root} is not empty ({shown}) and holds no run record of this script: refusing "
            f"to write into it. Pick an empty folder, or pass {flags.overwrite} to write over it."
        )
    if record.get("fingerprint") == fingerprint:
        hint = (
            f"pass {flags.resume} latest to continue it (checkpoints: {', '.join(ckpts)}), "
            if ckpts
            else ""
        )
        raise TrainingError(
            f"{flags.output_dir} {root} already holds a run with the same arguments (hash {fingerprint}): {hint}"
            f"pass {flags.overwrite} to start it again from scratch, or pick another folder."
        )
    raise TrainingError(
        f"{flags.output_dir} {root} holds another run's files (arguments hash {record.get('fingerprint')}, this "
        f"run {fingerprint}; method {_recorded_method(record)!r}). Pick another folder, pass "
        f"{flags.resume} to continue that run, or {flags.overwrite} to replace it."
    )


def _recorded_method(record: dict) -> object:
    # the DreamBooth script records --method, the commonsense script --adapter_name
    args = record.get("args", {})
    return args.get("method", args.get("adapter_name"))


def clear_for_overwrite(output_dir: PathLike, flags: FlagNames = NEUTRAL_FLAGS) -> list[Path]:
    """When overwriting (``flags.overwrite``): remove the previous run's checkpoints, step log and run
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
        logger.warning("%s: kept %s in %s: no dashdiff marker, so not known to be dashdiff's "
                       "(delete it yourself if it is not needed)", flags.overwrite,
                       ", ".join(c.path.name for c in kept), root)
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
    ours) and the output folder too if this lock created it and it stayed empty. Messages name the
    output folder's setting as ``flags.output_dir``."""

    def __init__(self, output_dir: PathLike, flags: FlagNames = NEUTRAL_FLAGS) -> None:
        self.root = Path(output_dir)
        self.flags = flags
        self.path = self.root / LOCK_FILE
        self.held = False
        self._created_root = False
        self._content = ""

    def acquire(self) -> "OutputLock":
        if self.root.exists() and not self.root.is_dir():
            raise TrainingError(f"{self.flags.output_dir} {self.root} exists and is a file, not a folder")
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
            raise TrainingError(f"{self.path} exists but is not a dashdiff lock; if no run is using "
                                f"{self.flags.output_dir} {self.root}, delete that file") from None
        if host != socket.gethostname():
            raise TrainingError(
                f"{self.flags.output_dir} {self.root} is in use by a run on host {host} (pid {pid}, since "
                f"{owner.get('since')}); pick another folder, or if that run is over, delete {self.path}")
        if _pid_alive(pid, owner.get("start")):
            raise TrainingError(
                f"{self.flags.output_dir} {self.root} is in use by another run (pid {pid} on this host, since "
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
            raise TrainingError(f"{self.flags.output_dir} {self.root}: another run took the lock {self.path} just now")
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
    unfinished checkpoint folders; every process gets its outcome, so a refusal stops all. Messages
    name the output folder's setting as ``flags.output_dir``."""

    def __init__(self, flags: FlagNames = NEUTRAL_FLAGS) -> None:
        self.lock: Optional[OutputLock] = None
        self.flags = flags

    def acquire(self, accelerator, output_dir: PathLike) -> None:
        message = None
        if accelerator.is_main_process:
            try:
                self.lock = OutputLock(output_dir, self.flags).acquire()
                clean_stale_temporaries(output_dir)
            except TrainingError as err:
                message = str(err)
            except OSError as err:
                message = f"{self.flags.output_dir} {output_dir}: cannot write there ({err})"
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


