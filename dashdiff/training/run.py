"""One training run's lifecycle, shared by both training scripts: the :class:`Run` object that holds
what every phase needs (accelerator, output folder, step log, run record, last checkpoint), and the
steps every run takes the same way:

- ``commit``: once a resume has been loaded (at once for a fresh start), cut the step log back to
  the resume point and record the run as running; a refused or failed resume changes nothing;
- ``check_loss``: the NaN/inf guard, its verdict shared by every process (``guard.py``);
- ``save_checkpoint`` / ``load_checkpoint``: phase-named checkpoints with the script's extras
  (``extra_state.pt`` for objects accelerate does not hold);
- ``after_optimizer_step``: the per-optimizer-step hook: LoRA-Dash's warm-up count (a step the
  fp16 grad scaler skipped does not count), and at the launch the check that every process chose
  the same directions, and the launch report;
- ``stop``: the run record says why a run stopped without final weights.

The wording of messages that name command-line flags stays in the scripts (``advice``).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from ..safeio import atomic_write
from .checkpoints import Checkpoint, read_checkpoint_info, save_checkpoint
from .guard import Advice, reduced_loss
from .records import (NEUTRAL_FLAGS, CheckpointWriteError, FlagNames, NonFiniteLossError, StepLog, mark_stopped,
                      write_run_record)

logger = logging.getLogger("dashdiff.training")

EXTRA_STATE = "extra_state.pt"
_PHASE_ORDER = {"search": 0, "train": 1}


def ddp_kwargs_handlers() -> list:
    """accelerate kwargs handlers for a dashdiff run under DDP: ``broadcast_buffers=False``. DDP would
    otherwise copy rank 0's buffers at every forward, a collective per forward that also needs equal
    forward counts on every process; dashdiff's buffers (U_s, V_s, step counters) are identical on
    every process by construction (``after_optimizer_step`` checks the directions at the launch)."""
    from accelerate.utils import DistributedDataParallelKwargs

    return [DistributedDataParallelKwargs(broadcast_buffers=False)]


def mixed_precision_dtype(accelerator: Any) -> torch.dtype:
    """The frozen weights' dtype under accelerate's mixed precision (trainable ones stay float32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def prepared_beta_optimizer(accelerator: Any, betas: list, lr: float) -> Any:
    """AutoLoRA's β optimizer: Adam with the published betas (0.5, 0.999), prepared by accelerate so
    that ``save_state`` / ``load_state`` carry its moments with the weight optimizer's (prepare it
    after that one: the checkpoint's optimizer files are numbered in preparation order).
    ``BilevelStep`` steps the torch optimizer under it: β's gradient is never loss-scaled."""
    from ..autolora.search import DEFAULT_BETA_BETAS

    return accelerator.prepare_optimizer(torch.optim.Adam(betas, lr=lr, betas=DEFAULT_BETA_BETAS))


def log_position(row: Mapping[str, Any]) -> tuple[int, int]:
    """A step-log row's place in the run: (phase order, step). ``phase_kind`` (DreamBooth, whose
    ``phase`` is a label such as ``pre-launch``) or ``phase``; rows of no known phase sort last."""
    phase = row.get("phase_kind", row.get("phase"))
    return _PHASE_ORDER.get(phase, 2), int(row.get("step", 0))


def directions_digest(model: Any) -> str:
    """SHA-256 of every launched layer's U_s and V_sᵀ: equal on all processes iff they selected alike."""
    from ..walk import iter_layers

    h = hashlib.sha256()
    for name, layer, adapter in iter_layers(model, "dash"):
        h.update(name.encode())
        for t in (layer.lora_dash_U[adapter], layer.lora_dash_V[adapter]):
            h.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def dash_optimizer_step(host: Any, step: int, skipped: bool, adapter_name: Optional[str] = None,
                        check_processes: bool = True) -> Optional[dict[str, Any]]:
    """LoRA-Dash's part of optimizer step ``step`` (1-based), called right after it: advance the
    warm-up unless the grad scaler ``skipped`` the step, and launch when due. Returns None, or at the
    launch a report ``{step, seconds, layers, num_processes, direction_digests}``. With several
    processes (``check_processes``, a collective: call on all) every process's directions digest is
    gathered, and a difference raises: the processes would otherwise train different models."""
    from ..dash.lifecycle import dash_step
    from ..walk import iter_layers

    if skipped:
        return None
    launched = dash_step(host, adapter_name)
    if not launched:
        return None
    seconds = launched.seconds
    digests = [directions_digest(host)]
    world = 1
    if check_processes:
        from accelerate.state import PartialState
        from accelerate.utils import gather_object

        world = PartialState().num_processes
        if world > 1:
            digests = gather_object(digests)
    if len(set(digests)) != 1:
        raise RuntimeError(f"LoRA-Dash launch differs between processes (direction digests {digests})")
    layers = sum(1 for _ in iter_layers(host, "dash", adapter_name))
    return {"step": step, "seconds": seconds, "layers": layers, "num_processes": world, "direction_digests": digests}


@dataclass
class Run:
    """What every phase of one run shares, and the lifecycle steps every run takes the same way."""

    accelerator: Any
    out: Path
    fingerprint: str
    method: str
    log: StepLog  # writes on the main process only
    record: dict[str, Any] = field(default_factory=dict)  # the run record (dashdiff_run.json)
    resume: Optional[Checkpoint] = None  # the checkpoint this run continues from
    restart: bool = False  # restarts in place a run interrupted before its first checkpoint
    total_limit: Optional[int] = None  # checkpoints kept
    advice: Optional[Advice] = None  # the NaN message's advice (the script names its flags)
    flags: FlagNames = NEUTRAL_FLAGS  # how the script spells the settings its messages name
    log_events: bool = True  # events (resume, checkpoint, launch) in the step log besides the steps
    last_checkpoint: Optional[Path] = None
    committed: bool = False
    launch: Optional[dict[str, Any]] = None  # LoRA-Dash's launch report
    ranks: Optional[dict[str, int]] = None  # AutoLoRA: the per-layer ranks the search found
    alphas: dict[str, Any] = field(default_factory=dict)  # AutoLoRA: α per layer at the end of the search
    timings: dict[str, float] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def commit(self) -> None:
        """Cut the step log back to the resume point and record the run as running. Called once the
        resume has been loaded (``load_checkpoint``), at once for a fresh start: a refused or failed
        resume leaves the folder as it was. Only the first call does anything."""
        if self.committed:
            return
        self.committed = True
        if self.resume is not None:
            point = (_PHASE_ORDER[self.resume.phase], self.resume.step)
            self.log.truncate(lambda r: log_position(r) <= point)
            if self.log_events:
                self.log.write({"event": "resume", "phase": self.resume.phase, "step": self.resume.step,
                                "path": str(self.resume.path)})
        elif self.restart:
            self.log.truncate(lambda r: False)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_run_record(self.out, self.record)

    def check_loss(self, loss: torch.Tensor, step: int, phase: str) -> torch.Tensor:
        """The loss's mean over the processes; NaN/inf anywhere stops every process (a collective)."""
        return reduced_loss(self.accelerator, loss, step, phase, self.last_checkpoint, self.advice)

    def save_checkpoint(self, phase: str, step: int, info: Optional[Mapping[str, Any]] = None,
                        stateful: Optional[Mapping[str, Any]] = None) -> Path:
        """``checkpoint-<step>/`` (``checkpoint-search-<step>/``): accelerate's state (prepared model
        adapter, optimizers, scheduler, grad scaler, RNG) and, for ``stateful`` (objects accelerate
        does not hold), ``extra_state.pt`` with their ``state_dict()`` (plain tensors and numbers,
        loaded back with ``weights_only=True``). Written aside and renamed into place complete."""

        def write_extra(folder: Path) -> None:
            state = {name: obj.state_dict() for name, obj in (stateful or {}).items()}
            atomic_write(folder / EXTRA_STATE, lambda tmp: torch.save(state, tmp))

        found = {"autolora_ranks": self.ranks, "autolora_alphas": self.alphas} if self.ranks else {}
        path = save_checkpoint(self.accelerator, self.out, phase, step,
                               {"method": self.method, "fingerprint": self.fingerprint, "num_processes": self.world,
                                **found, **(info or {})},
                               self.total_limit, write_extra if stateful else None, self.flags)
        self.last_checkpoint = path
        logger.info("saved %s", path)
        if self.log_events:
            self.log.write({"event": "checkpoint", "phase": phase, "step": step, "path": path.name})
        return path

    def load_checkpoint(self, ckpt: Checkpoint, stateful: Optional[Mapping[str, Any]] = None) -> None:
        """Restore ``ckpt`` into the prepared objects and ``stateful`` (as ``save_checkpoint`` got
        them), then ``commit``. The checkpoint was checked before anything was written
        (``validate_checkpoint``)."""
        self.accelerator.load_state(str(ckpt.path))
        if stateful:
            # weights_only: the file holds tensors and numbers only; anything else is refused, never run
            extra = torch.load(ckpt.path / EXTRA_STATE, map_location="cpu", weights_only=True)
            for name, obj in stateful.items():
                obj.load_state_dict(extra[name])
        self.last_checkpoint = ckpt.path
        self.commit()

    def recorded_ranks(self) -> Optional[dict[str, int]]:
        """AutoLoRA: the ranks a resumed retrain checkpoint recorded (its search is over), else None."""
        if self.resume is None or self.resume.phase != "train":
            return None
        info = read_checkpoint_info(self.resume.path)
        ranks = info.get("autolora_ranks", info.get("ranks"))  # "ranks": commonsense checkpoints before 0.2
        self.alphas.update(info.get("autolora_alphas") or {})
        return None if ranks is None else {name: int(r) for name, r in ranks.items()}

    def start_retrain(self, ranks: dict[str, int]) -> None:
        """AutoLoRA's switch from the search to the retrain with the found ``ranks`` (kept for the
        retrain's checkpoints): a search checkpoint is used up, the retrain starts fresh."""
        self.ranks = ranks
        self.results["autolora_ranks"] = ranks
        if self.resume is not None and self.resume.phase == "search":
            self.resume = None

    def after_optimizer_step(self, host: Any, step: int, skipped: bool, phase: str = "train") -> Optional[dict]:
        """The per-optimizer-step hook (call on every process after optimizer step ``step``,
        1-based): LoRA-Dash's warm-up and launch (``dash_optimizer_step``); the launch report is
        kept in ``launch`` (and the step log), the script words it for its user. Other methods: nothing."""
        if self.method != "dash":
            return None
        report = dash_optimizer_step(host, step, skipped)
        if report is None:
            return None
        self.launch = report
        if self.log_events:
            self.log.write({"event": "dash_launch", "phase": phase, **report})
        return report

    def stop(self, err: BaseException) -> None:
        """Record why the run stopped without final weights (a NaN loss, a failed checkpoint write);
        the last good checkpoint stays as it was."""
        if not self.is_main:
            return
        why = "non-finite loss" if isinstance(err, NonFiniteLossError) else (
            "checkpoint write failed" if isinstance(err, CheckpointWriteError) else type(err).__name__)
        mark_stopped(self.out, why, err, self.last_checkpoint, self.record if self.committed else None)
