"""Training-loop support shared by dashdiff's training scripts (DreamBooth, commonsense).

What lives here is the part of a run that must behave the same everywhere and that is easy to get
subtly wrong, with no command-line wording of its own (the scripts pass their flag spellings in:
:class:`FlagNames`):

- ``run.py``: the :class:`Run` lifecycle (commit after resume, loss guard, checkpoints, the
  per-optimizer-step LoRA-Dash hook with its cross-process check, why a run stopped);
- ``checkpoints.py``: phase-named checkpoints that exist only complete, ``latest`` resolution,
  the pre-resume check that no file is a pickle of more than data, accelerate's save/load hooks;
- ``folders.py``: the output-folder guard, overwrite clean-up, model card and output lock;
- ``guard.py``: the NaN/inf loss guard reduced across processes, the fp16 scaler's skipped steps;
- ``records.py``: the run record and fingerprint, the per-step log a resume truncates, the
  per-step random generators that make a resumed run draw what an uninterrupted one draws.
"""

from ..ops import fused_adamw_ok  # noqa: F401  (the optimizer choice of both scripts and of BilevelStep)
from .records import (  # noqa: F401
    ADAPTER_STATE, args_fingerprint, CHECKPOINT_STATE, CheckpointWriteError, default_dash_warmup_steps,
    FINGERPRINT_IGNORES, FlagNames, LOCK_FILE, NEUTRAL_FLAGS, mark_stopped, NonFiniteLossError, PathLike,
    read_run_record, run_arguments, RUN_RECORD, step_generator, STEP_LOG, step_seed, StepLog, TrainingError,
    WRITE_PROBE_PREFIX, write_run_record,
)
from .checkpoints import (  # noqa: F401
    Checkpoint, checkpoint_name, checkpoint_problem, clean_stale_temporaries, _DISK_FULL_SIGNS,
    list_checkpoints, parse_checkpoint, prune_checkpoints, read_checkpoint_info, register_state_hooks,
    resolve_resume, restarts_in_place, save_checkpoint, validate_checkpoint, write_checkpoint_info,
)
from .folders import (  # noqa: F401
    check_output_dir, clear_for_overwrite, MODEL_CARD_TAG, OutputLock, _process_start, RunGuard,
    write_model_card,
)
from .guard import (  # noqa: F401
    Advice, check_finite_loss, loss_scale, nonfinite_error, optimizer_step, reduced_loss, step_skipped,
)
from .run import (  # noqa: F401
    dash_optimizer_step, ddp_kwargs_handlers, directions_digest, EXTRA_STATE, log_position,
    mixed_precision_dtype, prepared_beta_optimizer, Run,
)

__all__ = [
    "ADAPTER_STATE", "Advice", "CHECKPOINT_STATE", "Checkpoint", "CheckpointWriteError", "EXTRA_STATE",
    "FINGERPRINT_IGNORES", "FlagNames", "LOCK_FILE", "MODEL_CARD_TAG", "NEUTRAL_FLAGS", "NonFiniteLossError",
    "OutputLock", "PathLike", "RUN_RECORD", "Run", "RunGuard", "STEP_LOG", "StepLog", "TrainingError",
    "WRITE_PROBE_PREFIX",
    "args_fingerprint", "check_finite_loss", "check_output_dir", "checkpoint_name", "checkpoint_problem",
    "clean_stale_temporaries", "clear_for_overwrite", "dash_optimizer_step", "ddp_kwargs_handlers",
    "default_dash_warmup_steps", "directions_digest", "fused_adamw_ok", "list_checkpoints", "log_position",
    "loss_scale", "mark_stopped", "mixed_precision_dtype", "nonfinite_error", "optimizer_step", "parse_checkpoint", "prepared_beta_optimizer",
    "prune_checkpoints", "read_checkpoint_info", "read_run_record", "reduced_loss", "register_state_hooks",
    "resolve_resume", "restarts_in_place", "run_arguments", "save_checkpoint", "step_generator", "step_seed",
    "step_skipped", "validate_checkpoint", "write_checkpoint_info", "write_model_card", "write_run_record",
]
