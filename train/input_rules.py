"""Input rules shared by dashdiff's entry points (both training scripts, the eval script).

Each rule is one function used the same way everywhere, so the scripts cannot drift apart: a flag
that belongs to another method, a seed or learning rate that cannot work, a LoRA-Dash warm-up longer
than the run, folders that would overwrite the user's data, images PIL refuses to decode, and the
run record a failed run leaves behind. Functions named ``*_error(s)`` return messages (the parsers
collect them and report all at once); ``check_*`` raise :class:`TrainingError`.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
import sys
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from dashdiff.training import WRITE_PROBE_PREFIX, TrainingError, read_run_record, write_run_record

PathLike = Union[str, os.PathLike]

# numpy's legacy seeding (called by accelerate's and transformers' set_seed) takes 0 .. 2**32 - 1.
SEED_RANGE = (0, 2**32 - 1)

_METHOD_LABELS = {"dash": "LoRA-Dash", "autolora": "AutoLoRA", "lora": "LoRA"}


# --------------------------------------------------------------------------- flags


def method_option_errors(args: Any, method: str, options: Mapping[str, str], method_flag: str) -> list[str]:
    """Flags of one method given with another would be silently ignored: one message per such flag.

    ``options`` maps an attribute name to the method it belongs to; a value of None means "not
    given" (parsers must use None defaults for these and fill the real defaults afterwards)."""
    errors = []
    for name, owner in options.items():
        if getattr(args, name, None) is not None and method != owner:
            label = _METHOD_LABELS.get(owner, owner)
            article = "an" if label[0] in "AEIOU" else "a"
            errors.append(f"--{name} is {article} {label} option: add {method_flag} {owner} or drop it")
    return errors


def seed_error(seed: Optional[int]) -> Optional[str]:
    lo, hi = SEED_RANGE
    if seed is not None and not lo <= seed <= hi:
        return f"--seed must be from {lo} to {hi} (numpy's seed range), got {seed}"
    return None


def positive_finite_error(flag: str, value: Optional[float]) -> Optional[str]:
    """``value`` must be a finite number > 0 (``nan <= 0`` is False, so NaN needs its own test)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        return f"{flag} must be a finite number > 0, got {value}"
    return None


def dash_warmup_error(warmup_steps: int, total_steps: int, total_from: str) -> Optional[str]:
    """LoRA-Dash launches after optimizer step ``warmup_steps``: a run with fewer steps would end as a
    plain LoRA while calling itself LoRA-Dash. ``total_from`` says how the total was computed."""
    if total_steps < warmup_steps:
        return (f"--method dash: the run has {total_steps} optimizer steps ({total_from}) but LoRA-Dash launches "
                f"after --dash_warmup_steps {warmup_steps}, so it would never launch and the result would be a "
                f"plain LoRA. Lower --dash_warmup_steps to at most {total_steps}, or train longer "
                "(--max_train_steps / epochs)")
    return None


def raise_errors(errors: Sequence[Optional[str]]) -> None:
    """Raise one TrainingError listing every message that is not None."""
    found = [e for e in errors if e]
    if found:
        raise TrainingError("\n  ".join(found))


# --------------------------------------------------------------------------- folders


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def check_class_dir(class_dir: PathLike, instance_dirs: Sequence[PathLike]) -> None:
    """Generated class images must not land among the subject's images (the folder is then read
    back as *instance* data too, and the user's folder gets files it never had)."""
    for inst in instance_dirs:
        if inst is not None and _inside(Path(class_dir), Path(inst)):
            raise TrainingError(
                f"--class_data_dir {class_dir} is (inside) the instance folder {inst}: class images would be written "
                "among the subject's images. Use a separate folder, e.g. class_images/ next to it")


def check_output_dir_writable(output_dir: PathLike, flag: str = "--output_dir") -> None:
    """Fail now, not after loading a model, if ``output_dir`` cannot be created or written. Tries a
    real file (root passes ``os.access`` even on a read-only file system)."""
    path = Path(output_dir)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise TrainingError(f"{flag} {output_dir}: {probe} is a file, not a folder; pick another path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=WRITE_PROBE_PREFIX, dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise TrainingError(f"{flag} {output_dir}: cannot write there ({err.strerror or err}); pick a folder you "
                            "can write to") from None


# --------------------------------------------------------------------------- adapters


def _adapter_weight_keys(folder: Path) -> set[str]:
    from safetensors import safe_open

    file = folder / "adapter_model.safetensors"
    if file.is_file():
        with safe_open(str(file), framework="pt") as fh:
            return set(fh.keys())
    file = folder / "adapter_model.bin"
    if file.is_file():
        import torch

        # weights_only: a tensor dict, never code (a crafted pickle is refused by torch itself)
        return set(torch.load(file, map_location="meta", weights_only=True).keys())
    raise FileNotFoundError(f"{folder}: no adapter_model.safetensors or adapter_model.bin")


def check_peft_weights_loaded(peft_model: Any, folder: PathLike, adapter_name: str = "default") -> None:
    """Raise ``ValueError`` unless every weight in the PEFT folder went into the model and every
    adapted module got its weights. PEFT itself only warns when ``target_modules`` in
    ``adapter_config.json`` do not match the weights' module names, and the model then runs with
    none of them (or with freshly initialised layers)."""
    from peft import get_peft_model_state_dict

    folder = Path(folder)
    in_file = {k for k in _adapter_weight_keys(folder)}
    in_model = set(get_peft_model_state_dict(peft_model, adapter_name=adapter_name).keys())
    unused, unset = sorted(in_file - in_model), sorted(in_model - in_file)
    if not unused and not unset:
        return
    cfg = peft_model.peft_config.get(adapter_name)
    targets = sorted(cfg.target_modules) if isinstance(getattr(cfg, "target_modules", None), (set, list)) else \
        getattr(cfg, "target_modules", None)
    msg = [f"{folder} does not fit this model: its adapter_config.json targets {targets!r}, but"]
    if unused:
        msg.append(f"{len(unused)} of the {len(in_file)} weights in the file name modules it did not adapt "
                   f"(e.g. {unused[0]})" + (";" if unset else "."))
    if unset:
        msg.append(f"{len(unset)} adapted weights have nothing in the file (e.g. {unset[0]}).")
    msg.append("Was it trained on another base model, or was adapter_config.json edited? Fix target_modules to the "
               "modules the weights name.")
    raise ValueError(" ".join(msg))


# --------------------------------------------------------------------------- images


def image_error(path: PathLike, err: BaseException) -> str:
    """One line for a file PIL cannot or will not open, naming the file."""
    from PIL import Image

    if isinstance(err, Image.DecompressionBombError) or "decompression bomb" in str(err).lower():
        return (f"{path}: the image is too large to decode safely ({err}). Downscale it (e.g. to 1024 px) or, if it "
                "is trusted, raise PIL.Image.MAX_IMAGE_PIXELS")
    return f"{path}: not an image or a corrupt one ({err}). Remove or replace the file."


# PIL's errors for undecodable or oversized files (DecompressionBombError is not an OSError).
def image_exceptions() -> tuple[type[BaseException], ...]:
    from PIL import Image, UnidentifiedImageError

    return (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def to_rgb(img: Any, path: PathLike = "") -> Any:
    """An 8-bit RGB copy of a PIL image, reading every mode the way a user means it.

    PIL's own ``convert("RGB")`` clips 16-bit grey (PNG ``I;16`` / ``I``) at 255, turning a normal
    photo almost white, and keeps whatever colour hides under fully transparent pixels. Here 16-bit
    values are scaled to 8 bits and transparency is composited over white; float images, whose
    range is unknown, are refused."""
    import numpy as np
    from PIL import Image

    mode = img.mode
    if mode == "F":
        raise TrainingError(f"{path}: a 32-bit floating-point image (mode F) has no defined 0-255 range; save it "
                            "as an 8-bit RGB PNG or JPEG")
    # I;16, I;16B, I;16L, I (16-bit PNGs open as one of these); values that all fit in 0..255 are
    # taken as 8-bit data stored wide, anything larger as the full 16-bit range
    if mode.startswith("I"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 / 65535.0 if arr.size and arr.max() > 255 else 1.0
        img = Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


# --------------------------------------------------------------------------- run record


def mark_failed(output_dir: PathLike, reason: str) -> bool:
    """Turn this process's "running" record into "failed" with ``reason``; True if it did.

    Only a record this process wrote (its ``pid``) is touched: a run refused because the folder
    holds *another* run must leave that run's record alone."""
    try:
        record = read_run_record(output_dir)
        if not record or record.get("status") != "running" or record.get("pid") != os.getpid():
            return False
        record.update(status="failed", error=reason)
        write_run_record(output_dir, record)
        return True
    except OSError:  # the folder itself may be what failed (read-only, disk full)
        return False


def failure_line(err: BaseException) -> Optional[str]:
    """The one-line message for errors a user can fix from the command line, None for a bug
    (whose traceback should be seen)."""
    from dashdiff.training import _DISK_FULL_SIGNS, NonFiniteLossError

    if isinstance(err, (TrainingError, NonFiniteLossError)):  # the NaN guard's message names the fix
        return str(err)

    text = f"{type(err).__name__}: {err}"
    if any(sign in text for sign in _DISK_FULL_SIGNS):  # OSError 28, or torch / safetensors wrapping it
        return (f"the disk is full ({text.splitlines()[0][:200]}): free space, then resume with "
                "--resume_from_checkpoint latest (the last complete checkpoint is intact)")
    if isinstance(err, OSError):  # the file system or a model folder, not the code
        if getattr(err, "strerror", None):
            where = f": {err.filename}" if err.filename else ""
            return f"{err.strerror}{where} ({type(err).__name__})"
        return str(err) or type(err).__name__  # e.g. transformers' "not a model folder" messages
    return None


def run_command_line(main: Callable[[Any], Any], args: Any, prog: str) -> int:
    """Both training scripts' command line: ``main(args)``; an error the user can fix is one line on
    stderr and exit status 1, a bug keeps its traceback; either way the run record is left saying
    "failed", not "running"."""
    try:
        main(args)
    except BaseException as err:  # noqa: BLE001 - the record must not keep saying "running"
        line = failure_line(err)
        mark_failed(args.output_dir, line or f"{type(err).__name__}: {err}")
        if line is None:
            raise
        print(f"{prog}: error: {line}", file=sys.stderr)
        return 1
    return 0
