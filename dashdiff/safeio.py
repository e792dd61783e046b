"""Crash-safe file writing and safetensors reading with errors that name the file.

Every file dashdiff writes goes to a temporary name in the destination folder first and is then
renamed over the destination with ``os.replace``, which is atomic on POSIX and Windows for two
names on one file system: an interrupted write (exception, Ctrl-C, full disk, killed process)
leaves the previous file as it was, never a truncated one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

PathLike = Union[str, os.PathLike]

# The writer, looked up at call time so tests can make it fail mid-write.
_save_file = save_file

# mkstemp creates 0600 files; give finished files the mode open() would (0666 minus the umask).
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` for a temporary file next to ``path``, then rename it onto ``path``.

    On any exception the temporary file is removed and ``path`` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as the destination: os.replace is only atomic within one file system.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_safetensors(tensors: dict[str, torch.Tensor], path: PathLike, metadata: Optional[dict[str, str]] = None) -> None:
    """Atomically write ``tensors`` (contiguous, unshared copies are made) with string ``metadata``."""
    # safetensors refuses views that share storage (LoRA-Dash's A/B/U/V are views of one buffer).
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: _save_file(plain, tmp, metadata=metadata))


def write_json(obj: object, path: PathLike) -> None:
    """Atomically write ``obj`` as indented, key-sorted JSON."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False)  # strict JSON: no bare NaN

    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, _write)


def move_tree(src: PathLike, dst: PathLike) -> None:
    """Move every file under ``src`` to the same relative place under ``dst`` (one ``os.replace``
    per file, so each destination file is either the old or the complete new one), then remove ``src``.
    ``src`` must be on ``dst``'s file system (create it inside ``dst``'s parent)."""
    src, dst = Path(src), Path(dst)
    for root, _, files in os.walk(src):
        rel = Path(root).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            os.replace(Path(root) / name, dst / rel / name)
    shutil.rmtree(src, ignore_errors=True)


def _bad_file_message(path: Path, err: Exception) -> str:
    with open(path, "rb") as fh:
        head = fh.read(8)
    size = path.stat().st_size
    if head[:2] == b"PK" or head[:1] == b"\x80":
        kind = "it looks like a PyTorch pickle/zip checkpoint (.bin/.pt/.ckpt), not safetensors"
    elif size < 8:
        kind = f"it is only {size} bytes long (empty or truncated)"
    else:
        kind = "it is truncated (an interrupted copy or download?) or not a safetensors file"
    return f"dashdiff: cannot read {path}: {kind} (safetensors: {err})"


def _check_file(path: PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dashdiff: no such file: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"dashdiff: {path} is a folder, expected a .safetensors file")
    return path


def read_metadata(path: PathLike) -> dict[str, str]:
    """The safetensors header metadata of ``path`` (``{}`` if none); clear errors for bad files."""
    path = _check_file(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except SafetensorError as err:
        raise ValueError(_bad_file_message(path, err)) from err


def read_safetensors(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of ``path`` on CPU; a non-safetensors or truncated file raises a
    ``ValueError`` that names it."""
    path = _check_file(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except SafetensorError as err:
        raise ValueError(_bad_file_message(path, err)) from err
    return tensors, meta
