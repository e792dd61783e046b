"""Side-by-side demo: the base model, LoRA, LoRA-Dash and AutoLoRA on one prompt and seed.

    python app.py [--base MODEL] [--lora FILE] [--dash FILE] [--autolora FILE]
                  [--host 127.0.0.1] [--port 7860] [--max-upload-mb 256]

With no adapter arguments the adapters ``make demo`` writes under ``outputs/demo/{lora,dash,
autolora}/`` are used when present; without them the page says how to make them and still renders
the base model. gradio is an optional dependency (``pip install "dashdiff[app]"``).

Structure: ``Renderer`` holds the one pipeline and its named adapters and renders (no gradio
needed, so it is tested directly); ``build_demo(state)`` wires it into a ``gr.Blocks``;
``main(argv)`` is the command line.

Adapter files. Both kinds of file a dashdiff run writes are accepted:

- plain LoRA files (``pytorch_lora_weights.safetensors``; dashdiff's exports, diffusers' and
  kohya's) load with stock ``load_lora_weights``;
- dashdiff full-state files (``dashdiff_adapter.safetensors``) are converted once: the file is
  restored with ``dashdiff.load_adapter`` into a *scratch* copy of the pipeline whose modules share
  the live pipeline's weights (no second copy of the model in memory), exported there with
  ``dashdiff.export_lora`` to a temporary folder, and that plain file is loaded into the live
  pipeline like any other. So every adapter goes through the same stock loading path and is
  switched with ``set_adapters`` like any other, and the scratch copy, while it exists, gives the
  Inspect view its records (selected directions, σ, change rates, launch step; AutoLoRA's α).
  A plain file with a full-state file beside it (``make demo``'s folders) renders from the plain
  file; the full-state file is read for Inspect only when asked.

Gradio's own component checks (slider bounds, file type, upload size) run before the app's and
answer in gradio's words; everything else is checked by ``Renderer.validate`` / ``Renderer.load``,
whose ``RenderError`` messages the UI shows as they are (``gr.Error``), and the app keeps serving.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

if TYPE_CHECKING:
    import gradio as gr
    import torch
    from PIL import Image

    from dashdiff.inspect_plots import AutoLoraLayerInfo, DashLayerInfo

from dashdiff.files import DIFFUSERS_WEIGHT_NAME, RANK_REPORT_STEM, STATE_FILE_NAME, read_header  # noqa: E402 (light: no torch)

log = logging.getLogger("dashdiff.app")

REPO_ROOT = Path(__file__).resolve().parent
DEMO_DIR = REPO_ROOT / "outputs" / "demo"
PLAIN_FILE = DIFFUSERS_WEIGHT_NAME
STATE_FILE = STATE_FILE_NAME
# Written by the training script next to a retrained AutoLoRA (a plain LoRA with the found ranks),
# whose adapter files no longer hold β: the Inspect view reads α and the ranks from it.
RANK_REPORT = RANK_REPORT_STEM + ".json"
INSTALL_HINT = 'app.py needs gradio: pip install "dashdiff[app]"'

# Slots an adapter can occupy, in the order they are shown; "base" renders with adapters off.
SLOTS: tuple[str, ...] = ("lora", "dash", "autolora")
LABELS: dict[str, str] = {"base": "Base model", "lora": "LoRA", "dash": "LoRA-Dash", "autolora": "AutoLoRA"}
METHOD_BY_LABEL = {v: k for k, v in LABELS.items()}


class RenderError(ValueError):
    """A problem the user can fix; the message says how and is shown in the UI as it is."""


class Cancelled(RenderError):
    """A render stopped by its cancel flag (Cancel button, client gone) between two steps."""


@dataclass(frozen=True)
class Limits:
    """Accepted ranges. Sizes must be multiples of 8 (diffusers' pipelines refuse others)."""

    steps: tuple[int, int] = (1, 100)
    size: tuple[int, int] = (64, 2048)
    guidance: tuple[float, float] = (0.0, 30.0)
    scale: tuple[float, float] = (-2.0, 4.0)
    seed: tuple[int, int] = (0, 2**63 - 1)
    prompt_chars: int = 2000
    device: str = ""  # named in the messages: the size and steps caps follow it

    @classmethod
    def for_device(cls, device: str, native: int, max_side: Optional[int] = None,
                   max_steps: Optional[int] = None) -> "Limits":
        """Caps one request cannot exceed on ``device``: on a GPU 1024 px per side (or the model's
        native size if larger: SDXL's 1024) and 100 steps; on a CPU, where one 2048 px render kept a
        core busy for over 20 minutes, the native size up to 512 px (at least 256) and 50 steps.
        ``max_side`` / ``max_steps`` (``--max-side`` / ``--max-steps``) override them."""
        gpu = device.startswith("cuda")
        side = max(1024, native) if gpu else max(256, min(native, 512))
        side = max_side if max_side is not None else side
        steps = max_steps if max_steps is not None else (100 if gpu else 50)
        return cls(steps=(1, steps), size=(64, side - side % 8), device=device)


# --------------------------------------------------------------------------- adapter files


@dataclass
class FileInfo:
    """What a safetensors file holds, read from its header only (no tensor is loaded)."""

    path: Path
    full_state: bool  # a dashdiff full-state file (dashdiff_adapter.safetensors)
    method: Optional[str]  # "lora" / "dash" / "autolora" when the file says or shows it
    metadata: dict[str, Any]


def _method_from(meta: dict[str, Any], keys: Sequence[str]) -> Optional[str]:
    """The adapter kind a file declares in its ``dashdiff`` header (exports: ``method``; full-state
    files: each layer's ``method``), else the one its tensor names show; None if unknown."""
    declared = meta.get("method")
    if declared in SLOTS:
        return declared
    layers = meta.get("layers")
    if isinstance(layers, dict):
        methods = {v.get("method") for v in layers.values() if isinstance(v, dict)}
        if len(methods) == 1 and methods <= set(SLOTS):
            return methods.pop()
    if any("lora_dash_" in k for k in keys):
        return "dash"
    if any("lora_autolora_" in k for k in keys):
        return "autolora"
    return None


def read_file_info(path: str | os.PathLike) -> FileInfo:
    """Open ``path``'s safetensors header and classify the file; RenderError if it is no adapter file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise RenderError(f"{path.name}: no such file ({path}).")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            raw = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for a damaged header
        raise RenderError(
            f"{path.name} is not a readable .safetensors file ({type(e).__name__}: {e}). Use the "
            f"{PLAIN_FILE} or {STATE_FILE} a training run wrote; .bin / .ckpt files are not accepted."
        ) from None
    if not keys:
        raise RenderError(f"{path.name} holds no tensors: it is not a LoRA file.")
    meta = read_header(raw)
    dash_tensors = any(("lora_dash_" in k or "lora_autolora_" in k) for k in keys)
    # dashdiff.save_adapter writes kind "state"; dashdiff.export_lora writes kind "export" (plain).
    full_state = meta.get("kind") == "state" or dash_tensors
    if not full_state and not all("lora" in k.lower() for k in keys):
        other = next(k for k in keys if "lora" not in k.lower())
        raise RenderError(
            f"{path.name} is a safetensors file but not a LoRA (tensor {other!r} is no LoRA weight). "
            "Load a LoRA file trained for this base model."
        )
    return FileInfo(path=path, full_state=full_state, method=_method_from(meta, keys), metadata=meta)


def _mismatch_message(name: str, base: str, err: Exception, adapter_name: str = "") -> str:
    """An actionable message for a state-dict size mismatch: the LoRA was made for another model."""
    detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), "")
    if detail:
        detail = detail.replace("size mismatch for ", "")
        if adapter_name:  # the app's internal adapter name means nothing to the user
            detail = detail.replace(f".{adapter_name}.", ".")
        detail = f" First difference: {detail[:300]}"
    return (
        f"{name} was trained for a different base model: its layer shapes do not match {base}.{detail} "
        f"Load a LoRA trained on {base}, or restart the app with --base <the model it was trained on>."
    )


# --------------------------------------------------------------------------- renderer


@dataclass
class LoadedAdapter:
    slot: str
    adapter_name: str  # the name inside the pipeline (unique: a re-upload never clashes)
    source: Path  # the file the user gave
    full_state: bool
    inspect: Optional["InspectData"] = None  # records, when the source is a full-state file
    inspect_source: Optional[Path] = None  # a full-state file to read them from on demand
    method: Optional[str] = None  # what the file says it is, when it says


@dataclass
class InspectData:
    """What the Inspect view shows for one full-state file."""

    method: str  # "dash", "autolora" or "lora"
    dash: list["DashLayerInfo"] = field(default_factory=list)
    autolora: list["AutoLoraLayerInfo"] = field(default_factory=list)
    note: str = ""  # where the records come from, when not from the adapter itself


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Renderer:
    """One diffusers pipeline, its adapters loaded once under names, and rendering.

    Adapters are switched per image with ``set_adapters`` / ``disable_lora``: nothing is reloaded
    per request. All public methods hold one lock, because gradio runs handlers on worker threads
    and a pipeline's adapter state is global to it.
    """

    def __init__(self, base: str = "tiny-sd", device: Optional[str] = None, dtype: Optional[str] = None,
                 limits: Optional[Limits] = None) -> None:
        import torch
        from diffusers import DiffusionPipeline

        from dashdiff.testing import resolve_model

        self.base = base
        self.device = device or _default_device()
        torch_dtype = getattr(torch, dtype) if dtype else (torch.float16 if self.device == "cuda" else torch.float32)
        path = resolve_model(base)
        try:
            self.pipe = DiffusionPipeline.from_pretrained(path, dtype=torch_dtype)
        except Exception as e:
            raise RenderError(f"could not load base model {base!r}: {type(e).__name__}: {e}") from e
        self.pipe.to(self.device)
        # None: the caps follow the device and the model's native size (Limits.for_device)
        self.limits = limits if limits is not None else Limits.for_device(self.device, self.default_size)
        # Shallow template of the adapter-carrying components, taken before any adapter is loaded:
        # full-state files are restored into copies of it (see the module docstring).
        self._template = {name: self._share_copy(mod) for name, mod in self._components(self.pipe)}
        self.adapters: dict[str, LoadedAdapter] = {}
        self._lock = threading.RLock()
        self._counter = 0
        self._tmp = Path(tempfile.mkdtemp(prefix="dashdiff-app-"))

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _components(pipe) -> list[tuple[str, Any]]:
        from dashdiff.walk import components

        return components(pipe)

    @staticmethod
    def _share_copy(module: "torch.nn.Module") -> "torch.nn.Module":
        """A copy of ``module`` whose parameters and buffers *are* the original's (no memory)."""
        memo = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
        return copy.deepcopy(module, memo)

    @property
    def default_size(self) -> int:
        unet = getattr(self.pipe, "unet", None) or getattr(self.pipe, "transformer", None)
        sample = getattr(self.pipe, "default_sample_size", None) or getattr(unet.config, "sample_size", 64)
        return int(sample) * int(getattr(self.pipe, "vae_scale_factor", 8))

    def available(self) -> list[str]:
        """Methods that can be rendered now: "base" and every loaded slot, in display order."""
        return ["base"] + [s for s in SLOTS if s in self.adapters]

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    # ------------------------------------------------------------------ adapters
    def load(self, slot: str, path: str | os.PathLike) -> LoadedAdapter:
        """Load ``path`` into ``slot`` ("lora", "dash", "autolora"), replacing what was there.

        The new adapter is loaded under a fresh name first; the old one is removed only once that
        worked, so a bad file leaves the slot as it was."""
        if slot not in SLOTS:
            raise RenderError(f"unknown adapter slot {slot!r}: use one of {', '.join(SLOTS)}")
        with self._lock:
            info = read_file_info(path)
            self._counter += 1
            name = f"{slot}_{self._counter}"
            inspect_data = None
            inspect_source = None
            if info.full_state:
                plain, inspect_data = self._convert_full_state(info, name)
                inspect_source = info.path
            else:
                plain = info.path
                sibling = info.path.with_name(STATE_FILE)
                inspect_source = sibling if sibling.is_file() else None
            try:
                self._load_plain(plain, name, display=info.path.name)
            finally:
                if info.full_state:  # the weights are in memory now; the converted file is not needed
                    shutil.rmtree(plain.parent, ignore_errors=True)
            old = self.adapters.get(slot)
            self.adapters[slot] = LoadedAdapter(slot, name, info.path, info.full_state, inspect_data, inspect_source,
                                                info.method)
            if old is not None:
                self.pipe.delete_adapters(old.adapter_name)
            log.info("loaded %s into slot %s as %s", info.path, slot, name)
            return self.adapters[slot]

    def _loaded_names(self) -> set[str]:
        try:
            return {a for names in self.pipe.get_list_adapters().values() for a in names}
        except Exception:  # no adapter at all yet
            return set()

    def _load_plain(self, path: Path, name: str, display: str) -> None:
        try:
            self.pipe.load_lora_weights(str(path), adapter_name=name)
        except RenderError:
            raise
        except RuntimeError as e:
            if "size mismatch" in str(e):
                raise RenderError(_mismatch_message(display, self.base, e, name)) from None
            raise RenderError(f"{display} could not be loaded into {self.base}: {e}") from None
        except (ValueError, KeyError, OSError) as e:
            raise RenderError(f"{display} is not a LoRA this app can load into {self.base}: {e}") from None
        if name not in self._loaded_names():
            # diffusers only warns when no key matches a module of the pipeline
            raise RenderError(
                f"{display}: none of its LoRA weights matches a layer of {self.base} (a LoRA for another "
                f"model family?). Load a LoRA trained on {self.base}, or restart with --base <its model>."
            )

    def _scratch_pipeline(self) -> SimpleNamespace:
        """The adapter-carrying components, sharing every weight with the live pipeline but with
        no adapter in them. A namespace, not a pipeline: dashdiff's load_adapter / export_lora only
        look up components by name, and pipeline constructors have side effects (safety-checker
        warnings, required components)."""
        return SimpleNamespace(**{name: self._share_copy(t) for name, t in self._template.items()})

    def _convert_full_state(self, info: FileInfo, name: str) -> tuple[Path, InspectData]:
        """Restore a full-state file into a scratch pipeline, read its records, export the plain form."""
        try:
            from dashdiff import export_lora, load_adapter
        except ImportError:
            raise RenderError(
                f"{info.path.name} is a dashdiff full-state file, and this dashdiff has no "
                f"load_adapter/export_lora to convert it: load its {PLAIN_FILE} instead."
            ) from None
        scratch = self._scratch_pipeline()
        try:
            load_adapter(scratch, str(info.path), adapter_name=info.method or "adapter")
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise RenderError(self._restore_message(info.path.name, e)) from None
        data = self._records(scratch, info.path)
        try:
            plain = export_lora(scratch, str(self._tmp / name), format="diffusers", adapter_name=info.method or "adapter")
        except (ValueError, NotImplementedError) as e:
            raise RenderError(f"{info.path.name} could not be converted to a plain LoRA: {e}") from None
        return Path(plain), data

    def _restore_message(self, name: str, err: Exception) -> str:
        if "size mismatch" in str(err):
            return _mismatch_message(name, self.base, err)
        # load_adapter's own messages say what does not fit and what to do
        return f"{name} could not be restored into {self.base}: {str(err).removeprefix('dashdiff: ')}"

    def _records(self, scratch, path: Path) -> InspectData:
        """Inspect data of a full-state file restored into ``scratch``; for a plain LoRA (a retrained
        AutoLoRA) the rank report beside the file, when there is one."""
        data = self._inspect_model(scratch)
        report = path.with_name(RANK_REPORT)
        if data.method == "lora" and report.is_file():
            return self._report_records(report)
        return data

    @staticmethod
    def _report_records(path: Path) -> InspectData:
        from dashdiff.inspect_plots import autolora_layers_from_report

        try:
            layers = autolora_layers_from_report(path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RenderError(f"{path.name} is not an AutoLoRA rank report ({RANK_REPORT}): {e}") from None
        note = (f"α and ranks from the search, read from `{path.name}`: the adapter was retrained as a plain "
                "LoRA with these per-layer ranks, so its own files no longer hold β.")
        return InspectData("autolora", autolora=layers, note=note)

    @staticmethod
    def _inspect_model(model) -> InspectData:
        from dashdiff.inspect_plots import autolora_layers, dash_layers
        from dashdiff.walk import iter_layers

        kinds = {layer.adapter_kind[a] for _, layer, a in iter_layers(model)}
        if "dash" in kinds:
            try:
                return InspectData("dash", dash=dash_layers(model))
            except ValueError:  # saved before launch: nothing selected yet
                return InspectData("dash")
        if "autolora" in kinds:
            return InspectData("autolora", autolora=autolora_layers(model))
        return InspectData("lora")

    def inspect(self, source: str | os.PathLike) -> InspectData:
        """Records of a full-state file, or of the adapter loaded in slot ``source``."""
        with self._lock:
            if isinstance(source, str) and source in SLOTS:
                loaded = self.adapters.get(source)
                if loaded is None:
                    raise RenderError(f"no {LABELS[source]} adapter is loaded: load one, or upload a file to inspect.")
                if loaded.inspect is None and loaded.inspect_source is not None:
                    loaded.inspect = self._inspect_file(loaded.inspect_source)
                if loaded.inspect is None:
                    raise RenderError(plain_inspect_message(loaded.source.name))
                return loaded.inspect
            return self._inspect_file(Path(source))

    def _inspect_file(self, path: Path) -> InspectData:
        if path.suffix.lower() == ".json":
            return self._report_records(path)
        info = read_file_info(path)
        if not info.full_state:
            raise RenderError(plain_inspect_message(path.name))
        try:
            from dashdiff import load_adapter
        except ImportError:
            raise RenderError("this dashdiff has no load_adapter: full-state files cannot be read") from None
        scratch = self._scratch_pipeline()
        try:
            load_adapter(scratch, str(path), adapter_name=info.method or "adapter")
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise RenderError(self._restore_message(path.name, e)) from None
        return self._records(scratch, path)

    # ------------------------------------------------------------------ rendering
    def validate(self, prompt: str, seed: float, steps: float, guidance: float, width: float, height: float,
                 scale: float) -> tuple[int, int, int, int]:
        """Check inputs; returns (seed, steps, width, height) as ints. RenderError says what to change."""
        lim = self.limits
        if not prompt or not prompt.strip():
            raise RenderError("Enter a prompt: the prompt is empty.")
        if len(prompt) > lim.prompt_chars:
            raise RenderError(f"The prompt is {len(prompt)} characters long: keep it under {lim.prompt_chars}.")

        def number(value: Any) -> float:
            try:
                return float(value)
            except (TypeError, ValueError):
                return float("nan")

        on = f" on {lim.device}" if lim.device else ""

        def whole(value: Any, what: str, lo: int, hi: int, capped: bool = False) -> int:
            if not math.isfinite(number(value)) or number(value) != int(number(value)):
                raise RenderError(f"{what} must be a whole number from {lo} to {hi}, got {value!r}.")
            if not lo <= int(value) <= hi:
                why = f" (the cap{on}, so one request cannot hold the app for long)" if capped and int(value) > hi else ""
                raise RenderError(f"{what} must be from {lo} to {hi}{why}, got {int(value)}.")
            return int(value)

        seed_i = whole(seed, "Seed", *lim.seed)
        steps_i = whole(steps, "Steps", *lim.steps, capped=True)
        sizes = []
        for value, what in ((width, "Width"), (height, "Height")):
            v = whole(value, what, *lim.size, capped=True)
            if v % 8:
                raise RenderError(f"{what} must be a multiple of 8 (the pipeline requires it), got {v}: try {v - v % 8 or 8}.")
            sizes.append(v)
        for value, what, (lo, hi) in ((guidance, "Guidance", lim.guidance), (scale, "LoRA scale", lim.scale)):
            if not lo <= number(value) <= hi:  # NaN fails this too
                raise RenderError(f"{what} must be from {lo:g} to {hi:g}, got {value!r}.")
        return seed_i, steps_i, sizes[0], sizes[1]

    def render(self, prompt: str, negative_prompt: str = "", seed: int = 0, steps: int = 20,
               guidance: float = 7.5, width: Optional[int] = None, height: Optional[int] = None,
               scale: float = 1.0, methods: Optional[Sequence[str]] = None,
               on_method: Optional[Callable[[int, int, str], None]] = None,
               on_step: Optional[Callable[[int, int], None]] = None,
               cancel: Optional[threading.Event] = None) -> list["Image.Image"]:
        """One image per method ("base", "lora", "dash", "autolora"; default: all available),
        each from the same seed. ``scale`` is the LoRA scale λ (``cross_attention_kwargs``).

        ``on_step(step, steps)`` is called after every denoising step; once ``cancel`` is set the
        render raises ``Cancelled`` at the end of the step under way (diffusers'
        ``callback_on_step_end``), so a cancelled or abandoned request frees the pipeline within
        one step instead of finishing its image."""
        import torch

        width = min(self.default_size, self.limits.size[1]) if width is None else width
        height = min(self.default_size, self.limits.size[1]) if height is None else height
        seed_i, steps_i, w, h = self.validate(prompt, seed, steps, guidance, width, height, scale)
        methods = list(methods) if methods is not None else self.available()
        if not methods:
            raise RenderError("Nothing to render: tick the base model or load an adapter.")
        for m in methods:
            if m not in LABELS:
                raise RenderError(f"unknown method {m!r}: use base, {', '.join(SLOTS)}")
            if m != "base" and m not in self.adapters:
                raise RenderError(f"No {LABELS[m]} adapter is loaded: load one in the Adapters tab first.")
        def each_step(pipe, step: int, timestep, tensors: dict) -> dict:
            if on_step is not None:
                on_step(step + 1, steps_i)
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"Cancelled after step {step + 1} of {steps_i}.")
            return tensors

        images = []
        with self._lock:
            for i, m in enumerate(methods):
                if cancel is not None and cancel.is_set():
                    raise Cancelled("Cancelled before rendering.")
                if on_method is not None:
                    on_method(i, len(methods), LABELS[m])
                kwargs: dict[str, Any] = {}
                if self._loaded_names():
                    if m == "base":
                        self.pipe.disable_lora()
                    else:
                        self.pipe.enable_lora()
                        self.pipe.set_adapters([self.adapters[m].adapter_name])
                        kwargs["cross_attention_kwargs"] = {"scale": float(scale)}
                # A CPU generator gives the same starting noise on any device.
                generator = torch.Generator("cpu").manual_seed(seed_i)
                out = self.pipe(
                    prompt=prompt,
                    negative_prompt=negative_prompt or None,
                    num_inference_steps=steps_i,
                    guidance_scale=float(guidance),
                    width=w,
                    height=h,
                    generator=generator,
                    output_type="pil",
                    callback_on_step_end=each_step,
                    **kwargs,
                )
                images.append(out.images[0])
        return images


def plain_inspect_message(name: str) -> str:
    return (
        f"{name} is a plain LoRA file: it holds only the folded factors A and B, not the LoRA-Dash "
        f"launch records or AutoLoRA's α. Inspect a full-state file ({STATE_FILE}, written by "
        "dashdiff.save_adapter and by the training scripts next to the plain file)."
    )


# --------------------------------------------------------------------------- app state


@dataclass
class AppState:
    renderer: Renderer
    banner: str = ""  # markdown shown on top (how to make the demo adapters, load problems)
    max_upload_mb: int = 256
    default_steps: int = 20  # the Steps slider's initial value
    queue_size: int = 16  # requests that may wait for the render slot (demo.queue max_size)


def demo_files(folder: Path = DEMO_DIR) -> dict[str, Path]:
    """``{slot: file}`` for the demo adapters ``make demo`` writes; the plain file renders, its
    full-state sibling is found by the renderer for Inspect."""
    found = {}
    for slot in SLOTS:
        for name in (PLAIN_FILE, STATE_FILE):
            path = folder / slot / name
            if path.is_file():
                found[slot] = path
                break
    return found


def _file_arg(value: Optional[str], flag: str) -> Optional[Path]:
    """A file for --lora / --dash / --autolora; a folder means the plain file inside it."""
    if value is None:
        return None
    path = Path(value)
    if path.is_dir():
        for name in (PLAIN_FILE, STATE_FILE):
            if (path / name).is_file():
                return path / name
        raise RenderError(f"{flag} {value}: the folder holds neither {PLAIN_FILE} nor {STATE_FILE}")
    if not path.is_file():
        raise RenderError(f"{flag} {value}: no such file")
    return path


def build_state(args: argparse.Namespace, demo_dir: Path = DEMO_DIR) -> AppState:
    """Load the base model and adapters named on the command line (or the demo ones)."""
    # Check the named files before the (possibly minutes-long) model load.
    given = {slot: _file_arg(getattr(args, slot), f"--{slot}") for slot in SLOTS}
    renderer = Renderer(args.base, device=args.device, dtype=args.dtype)
    if getattr(args, "max_side", None) is not None or getattr(args, "max_steps", None) is not None:
        renderer.limits = Limits.for_device(renderer.device, renderer.default_size, args.max_side, args.max_steps)
    banner: list[str] = []
    if any(given.values()):
        for slot, path in given.items():
            if path is not None:  # a file named on the command line must load: fail loudly
                renderer.load(slot, path)
    else:
        found = demo_files(demo_dir)
        missing = [LABELS[s] for s in SLOTS if s not in found]
        for slot, path in found.items():
            try:
                renderer.load(slot, path)
            except RenderError as e:  # a stale demo output should not stop the app
                banner.append(f"⚠️ The demo {LABELS[slot]} adapter could not be loaded: {e}")
        if missing:
            banner.append(
                f"**No demo adapters for {', '.join(missing)}** in `{demo_dir}`. Run `make demo` "
                "(trains LoRA, LoRA-Dash and AutoLoRA on the tiny model, a few minutes on CPU) and restart, "
                "or load your own files in the *Adapters* tab. The base model renders meanwhile."
            )
    return AppState(renderer=renderer, banner="\n\n".join(banner), max_upload_mb=args.max_upload_mb,
                    queue_size=getattr(args, "queue_size", 16),
                    default_steps=min(20, renderer.limits.steps[1]))


# --------------------------------------------------------------------------- UI


def _status_markdown(state: AppState) -> str:
    r = state.renderer
    rows = [f"**Base model:** `{r.base}` on {r.device}"]
    for slot in SLOTS:
        a = r.adapters.get(slot)
        if a is None:
            rows.append(f"**{LABELS[slot]}:** not loaded")
        else:
            kind = "dashdiff full-state file, converted" if a.full_state else "plain LoRA file"
            inspect = "; Inspect available" if (a.inspect is not None or a.inspect_source) else ""
            # Loading a file into another slot is allowed (e.g. to compare two LoRAs), but say so.
            # (A retrained AutoLoRA is a plain LoRA: only a LoRA-Dash / AutoLoRA file in another slot is odd.)
            odd = a.method in ("dash", "autolora") and a.method != slot
            other = f" — ⚠️ the file says it is a {LABELS[a.method]} adapter" if odd else ""
            rows.append(f"**{LABELS[slot]}:** `{a.source.name}` ({kind}{inspect}){other}")
    return "  \n".join(rows)


INSPECT_HELP = f"""
**What can be inspected.** Only dashdiff **full-state** files (`{STATE_FILE}`, written by
`dashdiff.save_adapter` and by the training scripts) carry what LoRA-Dash and AutoLoRA learned
beyond the weights: for LoRA-Dash, per layer the selected directions, every direction's singular
value σ and change rate |Δσ|/σ at launch, the launch step and the learned coefficients δ; for an
AutoLoRA search, the selection weights α = softmax(β) and the per-layer ranks. An AutoLoRA that was
retrained with the found ranks is a plain LoRA: its α and ranks are in the `{RANK_REPORT}` beside
it (read automatically for loaded adapters, or upload it here). Plain exported files
(`{PLAIN_FILE}`) hold only folded LoRA factors, so they render but cannot be inspected.
"""


def build_demo(state: AppState) -> "gr.Blocks":
    """The gradio UI around ``state.renderer``. API names: /generate, /load_adapter, /inspect,
    /inspect_layer, /status."""
    import gradio as gr

    renderer = state.renderer
    lim = renderer.limits
    size = renderer.default_size

    def generate(prompt, negative, seed, steps, guidance, width, height, scale, with_base,
                 progress=gr.Progress()):
        """A generator, so that gradio can stop it: when the client goes away or Cancel is pressed,
        gradio closes the generator at its next yield (one per denoising step), and the ``finally``
        sets the render's cancel flag, which stops the pipeline at the end of the step under way.
        (A plain function would run on in its worker thread until the image was done.)"""
        methods = [m for m in renderer.available() if m != "base" or with_base]
        t0 = time.perf_counter()
        cancel = threading.Event()
        events: "queue.Queue[tuple[str, Any]]" = queue.Queue()
        current = {"label": ""}

        def on_method(i, n, label):
            current["label"] = f"{label} ({i + 1}/{n})"

        def work():
            try:
                events.put(("done", renderer.render(
                    prompt, negative, seed, steps, guidance, width, height, scale, methods, on_method=on_method,
                    on_step=lambda k, n: events.put(("step", (k, n))), cancel=cancel)))
            except BaseException as e:  # noqa: BLE001 - handed to the generator, which reports it
                events.put(("error", e))

        threading.Thread(target=work, name="dashdiff-render", daemon=True).start()
        try:
            while True:
                kind, value = events.get()
                if kind == "step":
                    k, n = value
                    progress((k, n), desc=f"Rendering {current['label']}")
                    yield gr.skip(), gr.skip(), f"Rendering {current['label']}: step {k}/{n}"
                    continue
                break
        finally:
            cancel.set()  # closed early (client gone, Cancel): stop the render; after the end: no-op
        if kind == "error":
            e = value
            if isinstance(e, RenderError):
                raise gr.Error(str(e)) from None
            log.error("generation failed", exc_info=e)  # keep the app usable, say what happened
            raise gr.Error(f"Generation failed ({type(e).__name__}: {e}). Try other settings.") from None
        images = value
        by_method = dict(zip(methods, images))
        gallery = [(img, LABELS[m]) for m, img in by_method.items()]
        pair = (by_method["lora"], by_method["dash"]) if {"lora", "dash"} <= by_method.keys() else None
        note = f"{len(images)} image(s), seed {int(seed)}, {time.perf_counter() - t0:.1f} s"
        if pair is None:
            note += " — the slider compares LoRA and LoRA-Dash once both are loaded"
        yield gallery, pair, note

    def load_adapter(slot_label, file):
        if file is None:
            raise gr.Error("Choose a .safetensors file to upload first.")
        slot = METHOD_BY_LABEL.get(slot_label, slot_label)
        try:
            renderer.load(slot, file)
        except RenderError as e:
            raise gr.Error(str(e)) from None
        except Exception as e:
            log.exception("loading failed")
            raise gr.Error(f"Loading failed ({type(e).__name__}: {e}).") from None
        return _status_markdown(state), gr.update(choices=_inspect_choices())

    def _inspect_choices() -> list[str]:
        return [LABELS[s] for s in SLOTS if s in renderer.adapters]

    def inspect(source_label, file):
        from dashdiff import inspect_plots as plots

        source = file if file is not None else METHOD_BY_LABEL.get(source_label or "", None)
        if source is None:
            raise gr.Error("Pick a loaded adapter or upload a full-state file to inspect.")
        try:
            data = renderer.inspect(source)
        except RenderError as e:
            raise gr.Error(str(e)) from None
        except ImportError as e:  # matplotlib missing
            raise gr.Error(str(e)) from None
        if data.method == "dash" and data.dash:
            names = [l.name for l in data.dash]
            rows = [
                [plots.short_name(l.name), l.launch_step, ", ".join(map(str, l.indices.tolist())),
                 ", ".join(f"{float(l.sigma[i]):.3g}" for i in l.indices.tolist()),
                 ", ".join(f"{float(c):.3g}" for c in l.selected_rates.tolist()), f"{l.median_rate:.3g}",
                 ", ".join(f"{float(d):+.3g}" for d in (l.delta.tolist() if l.delta is not None else []))]
                for l in data.dash
            ]
            headers = ["layer", "launch step", "selected indices (of k)", "σ of selected", "change rates",
                       "median rate, all", "δ"]
            summary = (f"**LoRA-Dash**: {len(names)} launched layers. The overview places each selected direction "
                       "in its layer's singular-value spectrum; pick a layer below for its whole spectrum. "
                       + data.note)
            return (summary, plots.plot_dash_overview(data.dash), gr.update(choices=names, value=names[0]),
                    plots.plot_dash_layer(data.dash[0]), {"headers": headers, "data": rows}, data)
        if data.method == "autolora" and data.autolora:
            rows = [[plots.short_name(l.name), l.rank, l.k, ", ".join(f"{a:.3f}" for a in l.alpha.tolist())]
                    for l in data.autolora]
            headers = ["layer", "rank kept", "k", "α = softmax(β)"]
            total = sum(l.rank for l in data.autolora)
            summary = (f"**AutoLoRA**: {len(rows)} layers, total rank {total} of "
                       f"{sum(l.k for l in data.autolora)}. {data.note}")
            return (summary, plots.plot_autolora(data.autolora), gr.update(choices=[], value=None), None,
                    {"headers": headers, "data": rows}, data)
        if data.method == "dash":
            raise gr.Error("This LoRA-Dash file was saved before launch: no directions were selected yet.")
        raise gr.Error(f"This full-state file holds a plain LoRA: there are no LoRA-Dash or AutoLoRA records to show "
                       f"(for a retrained AutoLoRA, inspect the {RANK_REPORT} written beside it).")

    def inspect_layer(name, data):
        from dashdiff import inspect_plots as plots

        if data is None or not getattr(data, "dash", None):
            raise gr.Error("Inspect a LoRA-Dash file first.")
        layer = next((l for l in data.dash if l.name == name), None)
        if layer is None:
            raise gr.Error(f"No layer {name!r} in the inspected file.")
        return plots.plot_dash_layer(layer)

    with gr.Blocks(title="dashdiff: LoRA vs LoRA-Dash vs AutoLoRA") as demo:
        gr.Markdown("# dashdiff — LoRA vs LoRA-Dash vs AutoLoRA\nSame prompt, same seed, one pipeline; "
                    "adapters switched per image.")
        gr.Markdown(state.banner, visible=bool(state.banner), elem_id="banner")
        status = gr.Markdown(_status_markdown(state), elem_id="status", label="Status")
        with gr.Tabs():
            with gr.Tab("Generate"):
                with gr.Row():
                    with gr.Column(scale=2):
                        prompt = gr.Textbox(label="Prompt", value="a photo of sks cat", lines=2, elem_id="prompt")
                        negative = gr.Textbox(label="Negative prompt", value="")
                        with gr.Row():
                            seed = gr.Number(label="Seed", value=0, precision=0, minimum=lim.seed[0])
                            steps = gr.Slider(lim.steps[0], lim.steps[1], value=state.default_steps, step=1, label="Steps")
                        with gr.Row():
                            guidance = gr.Slider(lim.guidance[0], lim.guidance[1], value=7.5, step=0.5, label="Guidance")
                            scale = gr.Slider(lim.scale[0], lim.scale[1], value=1.0, step=0.05, label="LoRA scale")
                        with gr.Row():
                            width = gr.Slider(lim.size[0], lim.size[1], value=min(size, lim.size[1]), step=8,
                                              label="Width")
                            height = gr.Slider(lim.size[0], lim.size[1], value=min(size, lim.size[1]), step=8,
                                               label="Height")
                        with_base = gr.Checkbox(label="Also render the base model", value=True)
                        with gr.Row():
                            button = gr.Button("Generate", variant="primary", elem_id="generate")
                            stop = gr.Button("Cancel", variant="stop", elem_id="cancel")
                        gr.Markdown(f"Up to {lim.size[1]} px per side and {lim.steps[1]} steps on {renderer.device}; "
                                    "requests wait in a queue, one render at a time.", elem_id="limits")
                    with gr.Column(scale=3):
                        gallery = gr.Gallery(label="Same seed, side by side", columns=4, format="png", height="auto",
                                             object_fit="contain", elem_id="gallery")
                        slider = gr.ImageSlider(label="LoRA ← → LoRA-Dash", format="png", type="pil",
                                                elem_id="slider")
                        note = gr.Markdown(elem_id="note", label="Note")
            with gr.Tab("Adapters"):
                gr.Markdown(
                    f"Load a `{PLAIN_FILE}` (plain LoRA: dashdiff export, diffusers or kohya) or a dashdiff "
                    f"`{STATE_FILE}` (full state; converted to its plain form, and inspectable). "
                    f"Files up to {state.max_upload_mb} MB. The adapter must be trained for `{renderer.base}`."
                )
                slot = gr.Radio([LABELS[s] for s in SLOTS], value=LABELS["lora"], label="Slot")
                upload = gr.File(label="Adapter file (.safetensors)", file_types=[".safetensors"], type="filepath")
                load_button = gr.Button("Load")
            with gr.Tab("Inspect"):
                gr.Markdown(INSPECT_HELP)
                with gr.Row():
                    source = gr.Dropdown(_inspect_choices(), value=None, label="Loaded adapter", allow_custom_value=False)
                    inspect_file = gr.File(label=f"…or a full-state file (or an AutoLoRA {RANK_REPORT})",
                                           file_types=[".safetensors", ".json"], type="filepath")
                inspect_button = gr.Button("Inspect")
                summary = gr.Markdown(label="Summary")
                overview = gr.Image(label="All layers", format="png", type="pil", interactive=False)
                layer_pick = gr.Dropdown([], label="Layer (LoRA-Dash)", allow_custom_value=False)
                layer_plot = gr.Image(label="One layer", format="png", type="pil", interactive=False)
                table = gr.Dataframe(label="Per layer", interactive=False, wrap=True)
                inspected = gr.State(None)

        renders = [
            button.click(generate, [prompt, negative, seed, steps, guidance, width, height, scale, with_base],
                         [gallery, slider, note], api_name="generate"),
            prompt.submit(generate, [prompt, negative, seed, steps, guidance, width, height, scale, with_base],
                          [gallery, slider, note], api_visibility="private"),
        ]
        stop.click(None, None, None, cancels=renders, api_visibility="private")
        load_button.click(load_adapter, [slot, upload], [status, source], api_name="load_adapter")
        inspect_button.click(inspect, [source, inspect_file], [summary, overview, layer_pick, layer_plot, table, inspected],
                             api_name="inspect")
        layer_pick.change(inspect_layer, [layer_pick, inspected], [layer_plot], api_name="inspect_layer")
        # A page opened after an upload shows the adapters loaded now, not those at start.
        demo.load(lambda: (_status_markdown(state), gr.update(choices=_inspect_choices())), None,
                  [status, source], api_name="status")
    return demo


# --------------------------------------------------------------------------- command line


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="mini-sd", help="base model: a diffusers id or folder, the pretrained miniature mini-sd (default), or the random tiny-sd / tiny-sdxl")
    p.add_argument("--lora", help=f"plain LoRA: {PLAIN_FILE} or {STATE_FILE}, or a folder holding one")
    p.add_argument("--dash", help="LoRA-Dash adapter (file or folder, as --lora)")
    p.add_argument("--autolora", help="AutoLoRA adapter (file or folder, as --lora)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="default 7860")
    p.add_argument("--max-upload-mb", type=int, default=256, help="largest accepted upload (default 256)")
    p.add_argument("--max-side", type=int, default=None,
                   help="largest width / height (default: 1024 on CUDA, the model's native size up to 512 on CPU)")
    p.add_argument("--max-steps", type=int, default=None, help="most denoising steps (default: 100 on CUDA, 50 on CPU)")
    p.add_argument("--queue-size", type=int, default=16,
                   help="requests that may wait for the one render slot; more are refused (default 16)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: float16 on cuda, float32 otherwise")
    args = p.parse_args(argv)
    if not 0 < args.max_upload_mb <= 10_000:
        p.error("--max-upload-mb must be from 1 to 10000")
    if not 1 <= args.port <= 65535:
        p.error(f"--port must be from 1 to 65535, got {args.port}")
    if args.max_side is not None and not 64 <= args.max_side <= 4096:
        p.error(f"--max-side must be from 64 to 4096, got {args.max_side}")
    if args.max_steps is not None and not 1 <= args.max_steps <= 1000:
        p.error(f"--max-steps must be from 1 to 1000, got {args.max_steps}")
    if not 1 <= args.queue_size <= 1000:
        p.error(f"--queue-size must be from 1 to 1000, got {args.queue_size}")
    return args


def launch(state: AppState, host: str = "127.0.0.1", port: Optional[int] = None, block: bool = True):
    """Queue and launch the demo; returns it (after closing, when ``block``)."""
    demo = build_demo(state)
    # One pipeline: one render at a time; a bounded queue, whose position gradio shows each waiting user.
    demo.queue(default_concurrency_limit=1, max_size=state.queue_size)
    demo.launch(server_name=host, server_port=port, max_file_size=f"{state.max_upload_mb}mb",
                prevent_thread_lock=not block, show_error=True, footer_links=["api"])
    return demo


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        import gradio  # noqa: F401  (checked before loading any model: say how to install it)
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)  # the app's own lines (adapters loaded), not every HTTP request
    try:
        state = build_state(args)
    except RenderError as e:
        print(f"app.py: {e}", file=sys.stderr)
        return 2
    try:
        launch(state, args.host, args.port, block=True)
    finally:
        state.renderer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
