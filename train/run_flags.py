"""The flags both training scripts share: one spelling, one meaning, one boolean style.

``train/dreambooth_dash.py`` and ``train/commonsense_dash.py`` add the groups below to their
parsers, so a setting is spelled the same in both (``--method``, ``--rank``,
``--autolora_hypergradient``, ``--checkpointing_steps``, ...). The LLM-Adapters spellings
(``--adapter_name``, ``--lora_r``, ``--save_step``, ``--use_gradient_checkpointing``) and the
spellings of earlier dashdiff releases (``--autolora_mode``, ``--autolora_beta_lr``) stay as
aliases of the same destination, so no published command breaks; aliases are hidden from
``--help``. Each script passes its own defaults (DreamBooth rank 4, commonsense rank 32, ...).

Booleans take one form everywhere (:class:`BoolFlag`): ``--x`` (on), ``--no-x`` (off) and
``--x true|false`` (LLM-Adapters' fire style) all parse.
"""

from __future__ import annotations

import argparse
from typing import Any, Optional, Sequence

from dashdiff.autolora.search import DEFAULT_BETA_LR, DEFAULT_VAL_FRACTION
from dashdiff.training import FlagNames

METHODS = ("lora", "dash", "autolora")

# How both scripts spell the settings that the run lifecycle's messages name (dashdiff.training
# words them neutrally unless told): every refusal names the flag the user typed.
CLI_FLAGS = FlagNames(output_dir="--output_dir", resume="--resume_from_checkpoint",
                      overwrite="--overwrite_output_dir", total_limit="--checkpoints_total_limit")
HYPERGRADIENTS = ("darts", "first_order", "darts_unrolled")

# Options of one --method (refused with another one: input_rules.method_option_errors).
# Their parser default is None ("not given"); fill_method_defaults puts the real default in.
METHOD_OPTIONS: dict[str, str] = {
    **{name: "dash" for name in ("dash_warmup_steps", "dash_directions")},
    **{name: "autolora" for name in ("autolora_search_steps", "autolora_search_epochs", "autolora_val_fraction",
                                     "autolora_threshold", "autolora_rank_rule", "autolora_hypergradient",
                                     "autolora_meta_lr", "autolora_rollback", "autolora_fd_batched")},
}
# The defaults of the method options (LoRA-Dash's s, AutoLoRA's published 70/30 split, Adam lr of β,
# ...). --dash_warmup_steps depends on the accumulation and the search length on the script: each
# script resolves those.
METHOD_DEFAULTS: dict[str, Any] = {
    "dash_directions": 8, "autolora_val_fraction": DEFAULT_VAL_FRACTION, "autolora_rank_rule": "softmax",
    "autolora_hypergradient": "darts", "autolora_meta_lr": DEFAULT_BETA_LR, "autolora_rollback": False,
    "autolora_fd_batched": True,
}


def parse_bool(value: str) -> bool:
    low = value.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


class BoolFlag(argparse.Action):
    """``--x`` / ``--x true|false`` / ``--no-x``: the one boolean style of both scripts."""

    def __init__(self, option_strings: Sequence[str], dest: str, default: Any = None, help: Optional[str] = None,
                 **kwargs: Any) -> None:
        names = list(option_strings)
        names += [f"--no-{s[2:]}" for s in option_strings if s.startswith("--")]
        super().__init__(names, dest, nargs="?", default=default, help=help, metavar="true|false", **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        if option_string is not None and option_string.startswith("--no-"):
            if values is not None:
                parser.error(f"{option_string} takes no value")
            setattr(namespace, self.dest, False)
            return
        try:
            setattr(namespace, self.dest, True if values is None else parse_bool(values))
        except argparse.ArgumentTypeError as err:
            parser.error(f"{option_string}: {err}")


def _alias(group: Any, *names: str, **kwargs: Any) -> None:
    """The canonical spelling first; the others parse to the same destination, hidden from --help
    (argparse lists every spelling of one action, so they are separate hidden actions)."""
    canonical, *aliases = names
    action = group.add_argument(canonical, **kwargs)
    for alias in aliases:
        group.add_argument(alias, **{**kwargs, "dest": action.dest, "default": argparse.SUPPRESS,
                                     "help": argparse.SUPPRESS})


def add_method_flags(parser: argparse.ArgumentParser, *, method: str, rank: int, lora_alpha: Optional[float],
                     lora_dropout: float, dash_prefetch_spectra: Optional[bool], rank_help: str = "",
                     prefetch_help: str = "") -> None:
    """``--method`` and its options (LoRA rank and scale, ``--dash_*``, ``--autolora_*``)."""
    g = parser.add_argument_group("adapter method (shared with the other training script)")
    _alias(g, "--method", "--adapter_name", default=method, choices=METHODS,
           help="lora: plain PEFT LoRA; dash: LoRA-Dash; autolora: AutoLoRA (alias: --adapter_name, LLM-Adapters)")
    _alias(g, "--rank", "--lora_r", type=int, default=rank,
           help=f"LoRA rank r; AutoLoRA: the initial rank k (alias: --lora_r){rank_help}")
    g.add_argument("--lora_alpha", type=float, default=lora_alpha,
                   help="LoRA alpha" + (" (default: --rank)" if lora_alpha is None else ""))
    g.add_argument("--lora_dropout", type=float, default=lora_dropout)

    g.add_argument("--dash_warmup_steps", type=int, default=None,
                   help="LoRA-Dash: optimizer steps before the launch (default: ceil(100 / gradient accumulation), "
                        "the published 100 training micro-batches)")
    g.add_argument("--dash_directions", type=int, default=None, help="LoRA-Dash: directions s per layer (default 8)")
    g.add_argument("--dash_prefetch_spectra", action=BoolFlag, default=dash_prefetch_spectra,
                   help="LoRA-Dash: decompose W0 on the host during the pre-launch steps so the launch is short "
                        f"(host memory 8·k² bytes per layer{prefetch_help}); --no-dash_prefetch_spectra computes "
                        "everything at the launch")

    g.add_argument("--autolora_search_steps", type=int, default=None,
                   help="AutoLoRA: optimizer steps of the bi-level search (not with --autolora_search_epochs)")
    g.add_argument("--autolora_search_epochs", type=float, default=None,
                   help="AutoLoRA: epochs of the search over its training split (not with --autolora_search_steps)")
    g.add_argument("--autolora_val_fraction", type=float, default=None,
                   help="AutoLoRA: part of the training data held out as the search's validation split (default 0.3, "
                        "the published 70/30)")
    g.add_argument("--autolora_threshold", type=float, default=None,
                   help="AutoLoRA: keep components with α_j >= λ (default 1/k)")
    g.add_argument("--autolora_rank_rule", choices=("softmax", "published"), default=None,
                   help="AutoLoRA: how ranks are read off β (default softmax)")
    _alias(g, "--autolora_hypergradient", "--autolora_mode", choices=HYPERGRADIENTS, default=None,
           help="AutoLoRA: hypergradient of the search (default darts; alias: --autolora_mode)")
    _alias(g, "--autolora_meta_lr", "--autolora_beta_lr", type=float, default=None,
           help="AutoLoRA: Adam learning rate of β, betas (0.5, 0.999) (default 3e-4; alias: --autolora_beta_lr)")
    g.add_argument("--autolora_rollback", action=BoolFlag, default=None,
                   help="AutoLoRA: redo the inner step with the new β after each β update (published; default off)")
    g.add_argument("--autolora_fd_batched", action=BoolFlag, default=None,
                   help="AutoLoRA: run the two finite-difference passes as one pass over the micro-batch twice over "
                        "(default on: faster where the step is bound by per-operation overhead; that pass holds twice "
                        "the activations); --no-autolora_fd_batched: two passes")


def add_run_flags(parser: argparse.ArgumentParser, *, output_dir: Optional[str], seed: Optional[int],
                  checkpointing_steps: int, checkpoints_total_limit: Optional[int]) -> None:
    """The run's folder, checkpoints, resume, seed and precision."""
    g = parser.add_argument_group("run: output, checkpoints, resume (shared with the other training script)")
    if output_dir is None:
        g.add_argument("--output_dir", required=True)
    else:
        g.add_argument("--output_dir", default=output_dir)
    g.add_argument("--overwrite_output_dir", action=BoolFlag, default=False,
                   help="start over in an --output_dir that holds another run (its checkpoints are removed)")
    _alias(g, "--checkpointing_steps", "--save_step", type=int, default=checkpointing_steps,
           help="checkpoint every N optimizer steps (alias: --save_step, LLM-Adapters)")
    g.add_argument("--checkpoints_total_limit", type=int, default=checkpoints_total_limit,
                   help="keep at most this many checkpoints (the newest)")
    g.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder (or its name) or 'latest'")
    g.add_argument("--seed", type=int, default=seed)
    g.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                   help="frozen weights in this precision, trainable ones in float32 (default: accelerate's config)")
    _alias(g, "--gradient_checkpointing", "--use_gradient_checkpointing", action=BoolFlag, default=False,
           help="recompute activations in the backward pass (alias: --use_gradient_checkpointing)")


def search_length_error(args: argparse.Namespace) -> Optional[str]:
    """The search length is given in one unit: steps or epochs, not both."""
    if args.autolora_search_steps is not None and args.autolora_search_epochs is not None:
        return ("--autolora_search_steps and --autolora_search_epochs both set the search length: give one "
                "(optimizer steps, or epochs over the search's training split)")
    for name in ("autolora_search_steps", "autolora_search_epochs"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            return f"--{name} must be > 0, got {value}"
    return None


def fill_method_defaults(args: argparse.Namespace) -> None:
    """Put the real defaults into the method options left at None (after the method check)."""
    for name, value in METHOD_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.lora_alpha is None:
        args.lora_alpha = args.rank


def search_steps(args: argparse.Namespace, steps_per_epoch: int, default_steps: Optional[int]) -> Optional[int]:
    """The AutoLoRA search's optimizer steps: --autolora_search_steps, else --autolora_search_epochs
    epochs of ``steps_per_epoch``, else ``default_steps`` (each script's own default)."""
    import math

    if args.autolora_search_steps is not None:
        return args.autolora_search_steps
    if args.autolora_search_epochs is not None:
        return max(1, math.ceil(args.autolora_search_epochs * steps_per_epoch))
    return default_steps


def nan_advice(last_checkpoint: Any) -> str:
    """What the NaN guard's message tells the user to do (flags both scripts have)."""
    if last_checkpoint:
        return (f"resume from it with --resume_from_checkpoint {last_checkpoint}, e.g. with a lower --learning_rate "
                "or --mixed_precision bf16")
    return "use --checkpointing_steps to keep some"
