"""Torch-free atomic writes shared by the worlds and the pretraining scripts.

``image_world.py`` and ``text_world.py`` must import without torch (they are run on their own to
look at the data), so the folder helper lives here rather than in ``_common.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary sibling and rename it into place (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; these files are shared and committed
    os.replace(tmp, path)


def save_folder_atomic(final: str | os.PathLike[str], write: Callable[[Path], None], replace: bool = False) -> Path:
    """Call ``write(tmp_dir)`` on a temporary sibling folder and rename it to ``final``.

    An interrupted ``write`` never leaves a partial folder under ``final`` (the temporary one is
    removed). ``replace=False``: an existing ``final`` is refused with ``FileExistsError`` before
    anything is written, and is left as it was. ``replace=True``: an old ``final`` is replaced only
    after the new one is complete.
    """
    final = Path(final)
    if final.exists() and not replace:
        raise FileExistsError(f"{final} exists; choose a new folder (nothing was overwritten)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp creates 0700
    try:
        write(tmp)
        if final.exists():
            # Checked again: a folder may have appeared while writing, and os.rename would silently
            # move onto an *empty* directory.
            if not replace:
                raise FileExistsError(f"{final} appeared while writing; nothing was overwritten")
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
