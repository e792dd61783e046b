#!/usr/bin/env python
"""Fine-tune a causal LM on LLM-Adapters commonsense data with LoRA, LoRA-Dash or AutoLoRA.

The command line of LLM-Adapters' ``finetune.py`` (the pipeline LoRA-Dash's LLM numbers were
produced with), the published LoRA-Dash recipe as defaults, plus the LoRA-Dash and AutoLoRA
options::

    accelerate launch train/commonsense_dash.py --base_model <llama folder or hub id> \
        --data_path commonsense_170k.json --output_dir out/llama-dash --method dash \
        --mixed_precision bf16
    python train/commonsense_eval.py --dataset all --base_model <same> --lora_weights out/llama-dash

The settings both training scripts share are spelled as in ``train/dreambooth_dash.py``
(``train/run_flags.py``: ``--method``, ``--rank``, ``--checkpointing_steps``, ...); the
LLM-Adapters spellings (``--adapter_name``, ``--lora_r``, ``--save_step``,
``--use_gradient_checkpointing``) parse as aliases.

Runs on one or several GPUs (``accelerate launch``, bf16 / fp16) or with plain ``python`` on CPU.

Writes to ``--output_dir``: ``adapter_config.json`` + ``adapter_model.safetensors`` (a plain PEFT
LoRA that stock ``PeftModel.from_pretrained`` loads; LoRA-Dash exports at rank r+s, which is what
a serving stack's maximum LoRA rank must allow), ``dashdiff_adapter.safetensors`` (dashdiff's
full adapter state), ``dashdiff_steps.jsonl`` (one JSON object per optimizer step, evaluation and
event), ``dashdiff_run.json`` (settings, processes, timings, results), ``checkpoint-<step>/``
folders that resume exactly, ``merged/`` with ``--export_merged``, and for AutoLoRA the rank
report (``autolora_ranks.md`` / ``.json`` / ``.png``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):
    # Run as a script: make the repository's dashdiff and this folder's modules importable
    # without installing anything.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import run_flags  # noqa: E402
from commonsense_data import TEMPLATES, load_records, tokenize_example  # noqa: E402
from dashdiff.training import Run as RunBase  # noqa: E402
from run_flags import BoolFlag, add_method_flags, add_run_flags  # noqa: E402

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
IGNORE = -100
# Settings a checkpoint's trajectory depends on: resuming with other values would not be exact.
_TRAJECTORY_KEYS = (
    "base_model", "data_path", "batch_size", "micro_batch_size", "num_epochs", "max_train_steps",
    "learning_rate", "weight_decay", "warmup_steps", "max_grad_norm", "cutoff_len", "val_set_size",
    "method", "target_modules", "rank", "lora_alpha", "lora_dropout", "train_on_inputs",
    "prompt_template", "seed", "dash_warmup_steps", "dash_directions", "autolora_val_fraction",
    "autolora_hypergradient", "autolora_search_steps", "autolora_search_epochs", "autolora_meta_lr",
    "autolora_threshold", "autolora_rank_rule", "autolora_rollback", "autolora_retrain",
)
# Options of one --method (refused with another one), filled in by validate_args: the shared ones
# (run_flags) and this script's own.
METHOD_OPTIONS = {**run_flags.METHOD_OPTIONS, "dash_prefetch_spectra": "dash", "autolora_retrain": "autolora"}
METHOD_DEFAULTS = {"dash_prefetch_spectra": False, "autolora_retrain": True}


# --------------------------------------------------------------------------- arguments


def parse_target_modules(value: str) -> list[str]:
    """``'["q_proj","k_proj"]'`` (LLM-Adapters' JSON list) or ``q_proj,k_proj`` -> list of names."""
    text = value.strip()
    if text.startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError:
            # fire (LLM-Adapters' CLI) also accepted single-quoted Python lists.
            names = [n.strip().strip("'\"") for n in text.strip("[]").split(",")]
    else:
        names = text.split(",")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise argparse.ArgumentTypeError(f"--target_modules: expected a list of module names, got {value!r}")
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--target_modules: no module names given")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("model and data (LLM-Adapters flags)")
    g.add_argument("--base_model", required=True,
                   help="AutoModelForCausalLM folder or hub id, or a reserved tiny name (tiny-llama)")
    g.add_argument("--data_path", required=True, help="LLM-Adapters JSON list of {instruction, input, output}")
    g.add_argument("--prompt_template", choices=TEMPLATES, default="llm_adapters",
                   help="llm_adapters: the published indented strings (needed to reproduce published "
                        "numbers); alpaca: the clean Alpaca form")
    g.add_argument("--cutoff_len", type=int, default=256)
    g.add_argument("--val_set_size", type=int, default=120,
                   help="held-out examples for the evaluation loss (not trained on)")
    g.add_argument("--train_on_inputs", action=BoolFlag, default=True,
                   help="false: only response tokens enter the loss")

    g = p.add_argument_group("training (LLM-Adapters flags, LoRA-Dash recipe defaults)")
    g.add_argument("--batch_size", type=int, default=16, help="global batch: examples per optimizer step")
    g.add_argument("--micro_batch_size", type=int, default=4, help="examples per forward, per process")
    g.add_argument("--num_epochs", type=float, default=3)
    g.add_argument("--max_train_steps", type=int, default=None,
                   help="stop after this many optimizer steps (overrides --num_epochs; the schedule spans it)")
    g.add_argument("--learning_rate", type=float, default=2e-4)
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--warmup_steps", type=int, default=100, help="learning-rate warm-up, then linear decay to 0")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping (Trainer's default is 1)")
    g.add_argument("--eval_step", type=int, default=80, help="evaluate every N optimizer steps")
    g.add_argument("--logging_steps", type=int, default=10, help="console log interval (the jsonl has every step)")
    add_run_flags(p, output_dir=None, seed=42, checkpointing_steps=80, checkpoints_total_limit=3)

    add_method_flags(p, method="dash", rank=32, lora_alpha=64, lora_dropout=0.05, dash_prefetch_spectra=None,
                     prefetch_help=", ~21 GB for LLaMA-7B's 160 targets")
    g = p.add_argument_group("adapter (this script)")
    g.add_argument("--target_modules", type=parse_target_modules, default=list(DEFAULT_TARGETS),
                   help='JSON list (\'["q_proj","k_proj"]\') or comma list')
    g.add_argument("--export_merged", action=BoolFlag, default=False,
                   help="also write the merged model to <output_dir>/merged")
    g.add_argument("--autolora_retrain", action=BoolFlag, default=None,
                   help="AutoLoRA: true: retrain a fresh LoRA with the found ranks on the whole training set "
                        "(published); false: export the searched adapter with the pruned components dropped")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line (``argv=None`` reads ``sys.argv``); builds no model."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate_args(args)
    except ValueError as e:
        parser.error(str(e))
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Check the settings that need no model or data; fill the derived defaults."""
    import input_rules as V

    # Before the defaults are filled: a method's option given with another method is refused (as
    # train/dreambooth_dash.py does), not silently ignored.
    # main() validates again: the defaults filled below must not read as "given" then.
    given = not getattr(args, "_defaults_filled", False)
    errors = V.method_option_errors(args, args.method, METHOD_OPTIONS, "--method") if given else []
    errors += [V.seed_error(args.seed), V.positive_finite_error("--learning_rate", args.learning_rate),
               V.positive_finite_error("--autolora_meta_lr", args.autolora_meta_lr),
               run_flags.search_length_error(args)]
    try:
        V.raise_errors(errors)
    except V.TrainingError as err:
        raise ValueError(str(err)) from None
    run_flags.fill_method_defaults(args)
    for name, value in METHOD_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args._defaults_filled = True  # a leading underscore keeps it out of the run record and fingerprint
    positive = ("batch_size", "micro_batch_size", "cutoff_len", "eval_step", "checkpointing_steps", "rank",
                "dash_directions", "logging_steps")
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.batch_size % args.micro_batch_size:
        raise ValueError(
            f"--batch_size {args.batch_size} must be a multiple of --micro_batch_size {args.micro_batch_size}"
        )
    if args.num_epochs <= 0 and args.max_train_steps is None:
        raise ValueError("--num_epochs must be > 0")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise ValueError("--max_train_steps must be >= 1")
    if args.val_set_size < 0 or args.warmup_steps < 0:
        raise ValueError("--val_set_size and --warmup_steps must be >= 0")
    if args.checkpoints_total_limit < 1:
        raise ValueError("--checkpoints_total_limit must be >= 1 (the latest checkpoint is always kept)")
    if args.learning_rate <= 0 or args.max_grad_norm < 0 or not 0 <= args.lora_dropout < 1:
        raise ValueError("need --learning_rate > 0, --max_grad_norm >= 0 and 0 <= --lora_dropout < 1")
    if not 0 < args.autolora_val_fraction < 1:
        raise ValueError(f"--autolora_val_fraction must be in (0, 1), got {args.autolora_val_fraction}")
    if args.dash_warmup_steps is None:
        from dashdiff.training import default_dash_warmup_steps

        args.dash_warmup_steps = default_dash_warmup_steps(args.batch_size // args.micro_batch_size)
    if args.dash_warmup_steps < 0:
        raise ValueError("--dash_warmup_steps must be >= 0")
    if args.method == "dash" and args.max_train_steps is not None:
        error = V.dash_warmup_error(args.dash_warmup_steps, args.max_train_steps, "--max_train_steps")
        if error:
            raise ValueError(error)


# --------------------------------------------------------------------------- data


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    # Tokens whose prediction enters the loss: labels[1:] that are not -100 (the causal shift).
    targets: int = field(init=False)

    def __post_init__(self) -> None:
        self.targets = sum(1 for t in self.labels[1:] if t != IGNORE)


def split_records(records: list[dict], val_set_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, val): ``val_set_size`` records drawn at random (seeded), as LLM-Adapters' train_test_split."""
    if val_set_size >= len(records):
        raise ValueError(
            f"--val_set_size {val_set_size} leaves no training data: the data file has {len(records)} records"
        )
    perm = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    return [records[i] for i in perm[val_set_size:]], [records[i] for i in perm[:val_set_size]]


def tokenize_records(records: list[dict], tokenizer: Any, args: argparse.Namespace, what: str = "training") -> list[Example]:
    """Tokenized examples. An example cut by ``--cutoff_len`` before its response has no token in the
    loss: refused when that is true of every example (the run would train on nothing), counted in a
    warning when of some (they only dilute their batches)."""
    from dashdiff.training import TrainingError

    out = []
    for rec in records:
        enc = tokenize_example(tokenizer, rec, cutoff_len=args.cutoff_len, train_on_inputs=args.train_on_inputs,
                               template=args.prompt_template)
        out.append(Example(enc["input_ids"], enc["labels"]))
    empty = sum(1 for e in out if e.targets == 0)
    if out and empty == len(out):
        longest = max(len(e.input_ids) for e in out)
        raise TrainingError(
            f"--cutoff_len {args.cutoff_len} leaves no token in the loss of any of the {len(out)} {what} examples "
            f"(their prompts fill the {args.cutoff_len} tokens before the response starts): raise --cutoff_len"
            + ("" if args.train_on_inputs else " or pass --train_on_inputs true")
            + f"; the longest example here has {longest} tokens after the cut")
    if empty:
        warnings.warn(f"--cutoff_len {args.cutoff_len}: {empty} of {len(out)} {what} examples have no token in the "
                      "loss (cut before their response); raise --cutoff_len to train on them")
    return out


def collate(examples: list[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded tensors (length rounded up to a multiple of 8, as LLM-Adapters' collator).

    Right, not left as LLM-Adapters: without explicit position ids a left-padded sample's positions
    shift with the padding, so its loss would depend on what it is batched with; right padding is
    invisible to the real tokens of a causal model."""
    length = max(len(e.input_ids) for e in examples)
    length = -(-length // 8) * 8
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


class BatchPlan:
    """Which examples every optimizer step uses, as a pure function of (seed, step).

    Epoch ``e`` visits the examples in a permutation seeded by ``seed + e``; each optimizer step takes
    the next ``micro_per_step`` micro-batches of that order (the last step of an epoch may take fewer,
    and the last micro-batch may be short), and micro-batch ``j`` of a step runs on process
    ``j % num_processes``. So a step sees the same examples on any number of processes, and resuming
    needs nothing but the step counter (no sampler or dataloader state to restore).
    """

    def __init__(self, num_examples: int, micro_batch_size: int, micro_per_step: int, seed: int) -> None:
        self.n, self.micro, self.per_step, self.seed = num_examples, micro_batch_size, micro_per_step, seed
        self.micro_per_epoch = math.ceil(num_examples / micro_batch_size)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / micro_per_step)
        self._order: tuple[int, list[int]] = (-1, [])

    def order(self, epoch: int) -> list[int]:
        if self._order[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._order = (epoch, torch.randperm(self.n, generator=gen).tolist())
        return self._order[1]

    def step(self, step: int) -> tuple[int, list[list[int]]]:
        """(epoch, micro-batches as index lists) of 0-based optimizer step ``step``."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self.order(epoch)
        first = within * self.per_step
        last = min(first + self.per_step, self.micro_per_epoch)
        return epoch, [order[m * self.micro : (m + 1) * self.micro] for m in range(first, last)]


# --------------------------------------------------------------------------- model


def resolve_base_model(name: str) -> str:
    if Path(name).exists():
        return name
    from dashdiff.testing import resolve_model  # reserved tiny names; imported lazily (pulls in diffusers)

    return resolve_model(name)


def check_base_dense(config: Any, adapter: str) -> None:
    """A pre-quantized checkpoint cannot take LoRA-Dash / AutoLoRA: say so before loading 7B weights."""
    quant = getattr(config, "quantization_config", None)
    if quant is not None and adapter != "lora":
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else getattr(quant, "quant_method", "?")
        raise TypeError(
            f"--base_model is quantized ({method}); LoRA-Dash and AutoLoRA need dense nn.Linear weights (the "
            "launch SVD and merging read them). Load an unquantized bf16/fp16 checkpoint, or use --method lora "
            "(--adapter_name lora)."
        )


def load_base_model(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    """(model on ``device``, tokenizer with a pad token)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_base_model(args.base_model)
    check_base_dense(AutoConfig.from_pretrained(path), args.method)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        # Pad positions are masked out of attention and loss; any id will do (LLM-Adapters used unk = 0).
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    # Straight onto this process's GPU: eight processes each staging a 7B model in host memory first
    # would need ~100 GB of RAM.
    placement = {"device_map": {"": device}} if device.type == "cuda" else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **placement).to(device)
    model.config.use_cache = False  # no KV cache while training (and required by gradient checkpointing)
    return model, tokenizer


def adapter_config(args: argparse.Namespace, kind: str) -> Any:
    from peft import LoraConfig

    from dashdiff import AutoLoraConfig, LoraDashConfig

    common = dict(r=args.rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                  target_modules=list(args.target_modules), bias="none", task_type="CAUSAL_LM")
    if kind == "dash":
        return LoraDashConfig(**common, dash_warmup_steps=args.dash_warmup_steps,
                              dash_directions=args.dash_directions)
    if kind == "autolora":
        return AutoLoraConfig(**common, autolora_threshold=args.autolora_threshold,
                              autolora_rank_rule=args.autolora_rank_rule)
    return LoraConfig(**common)  # stock PEFT LoRA: exactly the LLM-Adapters baseline


def add_adapter(model: Any, config: Any, seed: int) -> Any:
    """``get_peft_model`` with the adapter's trainable tensors in float32 (the base may be bf16/fp16:
    fp16 gradient scaling needs float32 parameters, and bf16 updates of small LoRA steps round away).

    The initial ``lora_A`` is drawn from ``seed`` whatever ran before. A non-dense target (a
    quantized linear) raises dashdiff's TypeError here, unchanged."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(model, config)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def trainable_parameters(model: Any) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]



# --------------------------------------------------------------------------- loss


def summed_token_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum (not mean) of the next-token cross-entropies of the labelled tokens, in float32.

    The caller divides by the token count of the whole optimizer step (all micro-batches on all
    processes), so the gradient is the global per-token mean whatever the batch is split into."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logits = logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


# --------------------------------------------------------------------------- the run


@dataclass
class Run(RunBase):
    """What every phase of one run shares: the shared lifecycle (``dashdiff.training.Run``: step log,
    run record, checkpoints, loss guard, LoRA-Dash hook) and this script's settings and padding."""

    args: argparse.Namespace = None
    pad_id: int = 0
    model: Any = None  # the model being trained (as prepared); checkpoints save and load its adapter

    def print(self, message: str) -> None:
        if self.accelerator.is_main_process:
            print(message, flush=True)


def trajectory_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in _TRAJECTORY_KEYS}


def train_steps(args: argparse.Namespace, plan: "BatchPlan") -> int:
    """Optimizer steps of the training phase: --max_train_steps, else --num_epochs of ``plan``."""
    return args.max_train_steps or math.ceil(args.num_epochs * plan.steps_per_epoch)


def micro_per_step(args: argparse.Namespace) -> int:
    """Micro-batches per optimizer step over all processes (LLM-Adapters' batch_size // micro_batch_size)."""
    return args.batch_size // args.micro_batch_size


@torch.no_grad()
def evaluation_loss(run: Run, model: Any, examples: list[Example]) -> float:
    """Mean per-token loss over ``examples`` (dropout off), shared out over the processes.

    Runs on the module under DDP: evaluation needs no gradient sync, and processes may hold
    different numbers of batches."""
    net = run.accelerator.unwrap_model(model)
    was_training = net.training
    net.eval()
    micro = run.args.micro_batch_size
    chunks = [examples[i : i + micro] for i in range(0, len(examples), micro)][run.rank :: run.world]
    total = torch.zeros(2, dtype=torch.float64, device=run.accelerator.device)
    for chunk in chunks:
        total[0] += summed_token_loss(net, collate(chunk, run.pad_id, run.accelerator.device)).double()
        total[1] += sum(e.targets for e in chunk)
    total = run.accelerator.reduce(total, reduction="sum")
    net.train(was_training)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def save_checkpoint(run: Run, phase: str, step: int, stateful: dict[str, Any], info: dict[str, Any]) -> Path:
    """The run's checkpoint (``Run.save_checkpoint``) with the trajectory settings a resume is checked
    against; ``stateful``: objects accelerate does not hold (the scheduler, stepped here)."""
    return run.save_checkpoint(phase, step, {"trajectory": trajectory_settings(run.args), **info}, stateful)


def check_resume(ckpt: Any, fingerprint: str, args: argparse.Namespace) -> dict[str, Any]:
    """Refuse a checkpoint that is incomplete, holds a pickle that is more than data, or was made
    with other trajectory settings; returns its marker. Reads only."""
    from dashdiff import training as T

    info = T.validate_checkpoint(ckpt.path)
    if info.get("fingerprint") != fingerprint:
        saved = info.get("trajectory", {})
        now = trajectory_settings(args)
        diff = {k: (saved.get(k), now[k]) for k in now if json.dumps(saved.get(k)) != json.dumps(now[k])}
        raise T.TrainingError(
            f"--resume_from_checkpoint {ckpt.path}: the checkpoint was made with other settings, so resuming would "
            f"not continue that run: {', '.join(f'{k} {a!r} -> {b!r}' for k, (a, b) in diff.items()) or 'unknown'}"
        )
    return info


def load_checkpoint(run: Run, ckpt: Any, stateful: dict[str, Any]) -> int:
    """Restore checkpoint ``ckpt`` (None: a fresh start) into the prepared objects and ``stateful``
    (as ``save_checkpoint`` got them); returns the number of steps already done."""
    if ckpt is None:
        return 0
    # check_resume has already refused a checkpoint with a pickle that is more than data, with a
    # clear message, before anything was written
    info = check_resume(ckpt, run.fingerprint, run.args)
    run.load_checkpoint(ckpt, stateful)
    run.print(f"resumed from {ckpt.path} at {ckpt.phase} step {info['step']}")
    return info["step"]


def train_step(run: Run, model: Any, examples: list[Example], micro: list[list[int]], step: int) -> torch.Tensor:
    """Forward/backward of this process's micro-batches of one optimizer step; returns (summed token
    loss over this process's micro-batches, how many of its losses were NaN/inf): the caller reduces
    both in one collective and stops every process before the optimizer step if any was.

    Each micro-batch's loss is ``sum of token losses · world / tokens of the whole step``: DDP
    averages gradients over the processes, so the update is the per-token mean over the global
    batch, exactly as one process accumulating all micro-batches would compute it."""
    from dashdiff import training as T

    acc = run.accelerator
    tokens = sum(examples[i].targets for batch in micro for i in batch)
    mine = list(range(run.rank, len(micro), run.world))
    ghost = not mine  # the short last step of an epoch may leave a process without a micro-batch:
    if ghost:  # it still runs one with weight 0, so DDP's gradient all-reduce has every process
        mine = [0]
    scale = 0.0 if ghost or tokens == 0 else run.world / tokens
    total = torch.zeros((), dtype=torch.float32, device=acc.device)
    nonfinite = torch.zeros((), dtype=torch.float32, device=acc.device)
    for n, j in enumerate(mine):
        batch = collate([examples[i] for i in micro[j]], run.pad_id, acc.device)
        torch.manual_seed(T.step_seed(run.args.seed, step, j))  # dropout masks: a function of (step, j) only
        sync = acc.no_sync(model) if n < len(mine) - 1 else contextlib.nullcontext()
        with sync:
            loss = summed_token_loss(model, batch)
            # Counted, not raised here: the processes may run different numbers of micro-batches, so a
            # verdict must wait for the step's one reduction (fit), which every process reaches.
            nonfinite += (~torch.isfinite(loss.detach())).float()
            acc.backward(loss * scale)
        if not ghost:
            total += loss.detach()
    return torch.stack([total, nonfinite])


def fit(run: Run, model: Any, examples: list[Example], val_examples: list[Example], kind: str,
        resume: Any = None) -> Any:
    """The training phase (LoRA, LoRA-Dash, or AutoLoRA's retrain): AdamW, linear warm-up and decay,
    one ``dash_step`` per optimizer step that the grad scaler did not skip. Returns the prepared model."""
    from transformers import get_linear_schedule_with_warmup

    import dashdiff
    from dashdiff import training as T

    args, acc = run.args, run.accelerator
    plan = BatchPlan(len(examples), args.micro_batch_size, micro_per_step(args), args.seed)
    total_steps = train_steps(args, plan)
    params = trainable_parameters(model)
    # fused: one kernel for all parameters (LoRA-Dash's δ is a third tensor per layer)
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay,
                                  **({"fused": True} if T.fused_adamw_ok(params) else {}))
    # The scheduler is stepped here, once per optimizer step; accelerate's prepared scheduler would
    # step once per process and make the schedule depend on the number of processes.
    scheduler = get_linear_schedule_with_warmup(optimizer, args.warmup_steps, total_steps)
    model, optimizer = acc.prepare(model, optimizer)
    run.model = model

    step = load_checkpoint(run, resume, {"scheduler": scheduler})
    params = trainable_parameters(model)
    run.print(f"training {kind}: {len(examples)} examples, {plan.steps_per_epoch} optimizer steps per epoch, "
              f"{total_steps} steps, global batch {args.batch_size} = {micro_per_step(args)} micro-batches of "
              f"{args.micro_batch_size} over {run.world} process(es); {sum(p.numel() for p in params):,} "
              "trainable parameters")
    model.train()
    t0 = time.perf_counter()
    while step < total_steps:
        epoch, micro = plan.step(step)
        tokens = sum(examples[i].targets for batch in micro for i in batch)
        # (loss sum, NaN/inf count) over all processes: one collective, and the same verdict on all.
        loss_sum, nonfinite = acc.reduce(train_step(run, model, examples, micro, step), reduction="sum").tolist()
        if nonfinite:
            raise T.nonfinite_error(loss_sum if not math.isfinite(loss_sum) else float("nan"), step, "train",
                                    run.last_checkpoint, run.advice)
        grad_norm = acc.clip_grad_norm_(params, args.max_grad_norm) if args.max_grad_norm > 0 else None
        lr = scheduler.get_last_lr()[0]
        skipped = T.optimizer_step(optimizer)
        if not skipped:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        loss = loss_sum / max(tokens, 1)
        row = {"phase": "train", "step": step, "epoch": round(step / plan.steps_per_epoch, 4), "loss": loss,
               "lr": lr, "tokens": tokens, "skipped": skipped}
        if grad_norm is not None:
            row["grad_norm"] = float(grad_norm)
        run.log.write(row)
        if step % args.logging_steps == 0 or step == total_steps:
            run.print(f"step {step}/{total_steps} epoch {epoch} loss {loss:.4f} lr {lr:.3g}")
        if run.after_optimizer_step(acc.unwrap_model(model), step, skipped):  # LoRA-Dash launched
            run.results["dash_launch_step"] = step
            run.print(f"LoRA-Dash launched after optimizer step {step}: {run.launch['layers']} layers, "
                      f"{run.launch['seconds']:.2f} s, same directions on {run.world} process(es)")
        if val_examples and (step % args.eval_step == 0 or step == total_steps):
            eval_loss = evaluation_loss(run, model, val_examples)
            run.log.write({"event": "eval", "phase": "train", "step": step, "eval_loss": eval_loss})
            run.results["eval_loss"] = eval_loss
            run.print(f"step {step}: eval loss {eval_loss:.4f}")
        if step % args.checkpointing_steps == 0 or step == total_steps:
            save_checkpoint(run, "train", step, {"scheduler": scheduler}, {})  # with AutoLoRA's ranks in the retrain
        run.results["final_loss"] = loss
    run.timings["train_s"] = run.timings.get("train_s", 0.0) + time.perf_counter() - t0
    run.results["train_steps"] = total_steps
    return model


# --------------------------------------------------------------------------- AutoLoRA search


def search_loss(run: Run, step: int, net: Any, batch: dict[str, Any]) -> torch.Tensor:
    """The search's loss of one micro-batch: its per-token mean, guarded. Every pass BilevelStep makes
    (inner, validation, finite differences) is checked on every process together; BilevelStep puts
    w, β and the optimizers back when this raises."""
    from dashdiff import training as T

    # The dropout masks travel with the batch, so BilevelStep's repeated passes agree.
    torch.manual_seed(batch["seed"])
    loss = summed_token_loss(net, batch) / max(batch["targets"], 1)
    run.check_loss(loss, step, "search")
    return loss


def search_micro_batch(run: Run, examples: list[Example], idx: list[int], seed: int) -> dict[str, Any]:
    batch = collate([examples[i] for i in idx], run.pad_id, run.accelerator.device)
    return {**batch, "seed": seed, "targets": sum(examples[i].targets for i in idx)}


def double_micro_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """A micro-batch twice over (the batched finite-difference pass): the token count doubles with
    the tokens, so the loss of the result is the mean of the copies'."""
    from dashdiff.autolora import double_batch

    return {**double_batch(batch), "targets": 2 * batch["targets"]}


def search(run: Run, model: Any, train_ex: list[Example], val_ex: list[Example], resume: Any = None) -> Any:
    """AutoLoRA's bi-level search: per step an inner AdamW step of A, B on a training batch (constant
    --learning_rate) and a hypergradient step of β on a validation batch (Adam, --autolora_meta_lr;
    dashdiff.autolora.BilevelStep). Returns the prepared model. The loss here is each micro-batch's
    per-token mean (BilevelStep averages over micro-batches)."""
    from functools import partial

    from dashdiff import training as T
    from dashdiff.autolora import BilevelStep
    from dashdiff.walk import iter_layers

    args, acc = run.args, run.accelerator
    per_step = micro_per_step(args)
    if per_step % run.world:
        raise T.TrainingError(
            f"AutoLoRA search: batch_size // micro_batch_size = {per_step} micro-batches per step must be a multiple "
            f"of the {run.world} processes"
        )
    plan = BatchPlan(len(train_ex), args.micro_batch_size, per_step, args.seed)
    val_plan = BatchPlan(len(val_ex), args.micro_batch_size, per_step, args.seed + 1)
    total_steps = run_flags.search_steps(args, plan.steps_per_epoch, plan.steps_per_epoch)  # default: one epoch
    layers = list(iter_layers(model, "autolora"))
    weights = [p for _, layer, a in layers for p in (layer.lora_A[a].weight, layer.lora_B[a].weight)]
    betas = [layer.lora_autolora_beta[a] for _, layer, a in layers]
    weight_opt = torch.optim.AdamW(weights, lr=args.learning_rate, weight_decay=args.weight_decay)
    model, weight_opt = acc.prepare(model, weight_opt)
    beta_opt = T.prepared_beta_optimizer(acc, betas, args.autolora_meta_lr)  # checkpointed by accelerate
    run.model = model
    # BilevelStep counts its micro-batch calls against the accelerator's accumulation setting.
    acc.gradient_accumulation_steps = per_step // run.world
    bilevel = BilevelStep(model, weight_opt, beta_opt, mode=args.autolora_hypergradient, accelerator=acc,
                          rollback=args.autolora_rollback,
                          max_grad_norm=args.max_grad_norm or None, fd_batched=args.autolora_fd_batched,
                          double=double_micro_batch)

    step = load_checkpoint(run, resume, {})
    run.print(f"AutoLoRA search ({args.autolora_hypergradient}): {len(train_ex)} train / {len(val_ex)} validation "
              f"examples, {total_steps} steps")
    model.train()
    t0 = time.perf_counter()
    try:
        while step < total_steps:
            _, micro = plan.step(step)
            _, val_micro = val_plan.step(step)  # the validation split cycles at its own pace
            for j in range(run.rank, per_step, run.world):
                # An epoch's last step may be short: repeat its micro-batches, as BilevelStep needs a full count.
                tb = search_micro_batch(run, train_ex, micro[j % len(micro)], T.step_seed(args.seed, step, j))
                vb = search_micro_batch(run, val_ex, val_micro[j % len(val_micro)], T.step_seed(args.seed + 1, step, j))
                out = bilevel.step(tb, vb, partial(search_loss, run, step))
            step += 1
            run.log.write({"phase": "search", "step": step, "loss": out["train_loss"], "val_loss": out["val_loss"],
                           "skipped": out["skipped"]})
            if step % args.logging_steps == 0 or step == total_steps:
                run.print(f"search step {step}/{total_steps} train loss {out['train_loss']:.4f} "
                          f"val loss {out['val_loss'] if out['val_loss'] is None else round(out['val_loss'], 4)}")
            if step % args.checkpointing_steps == 0 and step < total_steps:
                save_checkpoint(run, "search", step, {}, {})
    finally:
        acc.gradient_accumulation_steps = 1
    run.timings["search_s"] = time.perf_counter() - t0
    run.results["search_steps"] = total_steps
    return model


# --------------------------------------------------------------------------- outputs


def export_outputs(run: Run, model: Any, tokenizer: Any) -> dict[str, Any]:
    """The PEFT adapter folder (plain LoRA, stock-loadable), dashdiff's full state, and the merged
    model with --export_merged. Main process only."""
    import dashdiff
    from dashdiff.training import ADAPTER_STATE

    args, out = run.args, run.out
    net = run.accelerator.unwrap_model(model)
    threshold = args.autolora_threshold
    dashdiff.export_lora(net, out, format="peft", threshold=threshold)
    dashdiff.save_adapter(net, out / ADAPTER_STATE)
    if args.export_merged:
        dashdiff.export_lora(net, out / "merged", format="merged", threshold=threshold)
        tokenizer.save_pretrained(out / "merged")
    cfg = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    ranks = [cfg["r"], *cfg.get("rank_pattern", {}).values()]
    exported = {"adapter_dir": str(out), "max_rank": max(ranks), "min_rank": min(ranks),
                "merged_dir": str(out / "merged") if args.export_merged else None}
    # Serving stacks size their LoRA buffers by a maximum rank (vLLM --max-lora-rank, TGI / LoRAX
    # similar): a LoRA-Dash export has rank r + s, not r.
    run.print(f"exported a plain PEFT LoRA to {out} (rank {exported['max_rank']}"
              + (f" = r {args.rank} + s {args.dash_directions}" if args.method == "dash" else "")
              + "; serving stacks need a max LoRA rank >= that)")
    return exported


def write_rank_report(run: Run, model: Any) -> dict[str, int]:
    """The per-layer ranks the search found; ``autolora_ranks.md`` / ``.json`` (+ ``.png`` with
    matplotlib) in the output folder."""
    import importlib.util

    import dashdiff
    from dashdiff.autolora.report import write_rank_report as write_report

    net = run.accelerator.unwrap_model(model)
    ranks = dashdiff.determine_ranks(net, threshold=run.args.autolora_threshold)
    if run.accelerator.is_main_process:
        write_report(net, run.out, threshold=run.args.autolora_threshold,
                     plot=importlib.util.find_spec("matplotlib") is not None)
    run.log.write({"event": "autolora_ranks", "phase": "search", "step": run.results.get("search_steps", 0),
                   "ranks": ranks})
    return ranks


# --------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train, export and record one run; returns the run record (also in <output_dir>/dashdiff_run.json).
    The output folder is locked for the run (released at the end, also on error)."""
    from dashdiff import training as T

    with T.RunGuard(run_flags.CLI_FLAGS) as guard:
        return _main(args, guard)


def _main(args: argparse.Namespace, guard: Any) -> dict[str, Any]:
    from accelerate import Accelerator

    import dashdiff
    from dashdiff import training as T
    import input_rules as V

    validate_args(args)
    t_start = time.perf_counter()
    # broadcast_buffers=False under DDP (dashdiff's buffers are equal on every process by construction)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, kwargs_handlers=T.ddp_kwargs_handlers())
    out = Path(args.output_dir)
    # Every check before anything in the folder changes (the lock aside): a refused run, a bad data
    # file or a refused resume leaves the folder as it was.
    guard.acquire(accelerator, out)
    fingerprint = T.args_fingerprint(trajectory_settings(args))
    resume = T.resolve_resume(out, args.resume_from_checkpoint, run_flags.CLI_FLAGS)
    restart = T.restarts_in_place(out, args.resume_from_checkpoint, resume, fingerprint)
    T.check_output_dir(out, fingerprint, args.resume_from_checkpoint if resume or restart else None,
                       args.overwrite_output_dir, run_flags.CLI_FLAGS)
    if resume is not None:
        check_resume(resume, fingerprint, args)
    V.check_output_dir_writable(out)

    # Data first: a bad file fails in a second, before any model is loaded (and on the command
    # line as one message naming the file and record, no traceback).
    try:
        records = load_records(args.data_path, stage="train")
        if not records:
            raise ValueError(f"--data_path {args.data_path} holds no records (an empty JSON list)")
        train_records, val_records = split_records(records, args.val_set_size, args.seed)
    except OSError as err:  # a mistyped path: name the flag as well as the file
        raise T.TrainingError(f"--data_path {args.data_path}: {err.strerror or err}") from err
    except ValueError as err:
        raise T.TrainingError(str(err)) from err
    if args.method == "dash":  # a run shorter than the warm-up would never launch
        plan = BatchPlan(len(train_records), args.micro_batch_size, micro_per_step(args), args.seed)
        V.raise_errors([V.dash_warmup_error(args.dash_warmup_steps, train_steps(args, plan),
                                            f"--num_epochs {args.num_epochs:g} x {plan.steps_per_epoch} per epoch")])

    weight_dtype = T.mixed_precision_dtype(accelerator)
    kind = args.method
    # BilevelStep's finite differences need float32 weights: the AutoLoRA search keeps the base in float32.
    model, tokenizer = load_base_model(args, torch.float32 if kind == "autolora" else weight_dtype,
                                       accelerator.device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    accelerator.wait_for_everyone()  # every process has checked everything before rank 0 deletes
    if accelerator.is_main_process and args.overwrite_output_dir and resume is None:
        T.clear_for_overwrite(out, run_flags.CLI_FLAGS)

    record = {
        "script": "train/commonsense_dash.py", "fingerprint": fingerprint, "args": T.run_arguments(args),
        "method": kind, "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device), "status": "running",
        "pid": os.getpid(),  # lets cli() mark this record "failed" (input_rules.mark_failed)
        "data": {"records": len(records), "train": len(train_records), "val": len(val_records)},
        "versions": {"torch": torch.__version__, "dashdiff": dashdiff.__version__},
    }
    run = Run(accelerator=accelerator, out=out, fingerprint=fingerprint, method=kind,
              log=T.StepLog(out / T.STEP_LOG, enabled=accelerator.is_main_process), record=record, resume=resume,
              restart=restart, total_limit=args.checkpoints_total_limit, advice=run_flags.nan_advice,
              flags=run_flags.CLI_FLAGS, args=args,
              pad_id=tokenizer.pad_token_id)
    if resume is None:
        run.commit()  # else once the checkpoint has been loaded: a failed resume changes nothing
    T.register_state_hooks(accelerator, lambda: accelerator.unwrap_model(run.model), dashdiff.save_adapter,
                           dashdiff.load_adapter)

    val_ex = tokenize_records(val_records, tokenizer, args, "held-out (--val_set_size)")
    try:
        model = train_phases(run, model, tokenizer, train_records, val_ex)
    except (T.NonFiniteLossError, T.CheckpointWriteError) as err:
        run.stop(err)  # the record says why there are no final weights; the last checkpoint is kept
        raise

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        record["export"] = export_outputs(run, model, tokenizer)
    run.timings["total_s"] = time.perf_counter() - t_start
    record.update(status="done", results=run.results, timings=run.timings)
    if accelerator.is_main_process:
        T.write_run_record(out, record)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return record


def train_phases(run: Run, model: Any, tokenizer: Any, train_records: list[dict], val_ex: list[Example]) -> Any:
    """The method's phases from ``run.resume`` on: LoRA / LoRA-Dash training, or AutoLoRA's search,
    rank read-out and retrain. Returns the trained (prepared) model."""
    import dashdiff
    from dashdiff import training as T

    args, accelerator, kind, resume = run.args, run.accelerator, run.method, run.resume
    if kind == "autolora":
        # The search's validation split comes out of the training records; --val_set_size stays the
        # held-out evaluation set, as in LLM-Adapters. The retrain uses all training records.
        from dashdiff.autolora import split_train_val

        search_records, search_val_records = split_train_val(train_records, args.autolora_val_fraction, args.seed)
        run.record["data"].update(search_train=len(search_records), search_val=len(search_val_records))
        ranks = run.recorded_ranks()  # a resumed retrain: the search is over
        if ranks is None:
            model = add_adapter(model, adapter_config(args, "autolora"), args.seed)
            model = search(run, model, tokenize_records(search_records, tokenizer, args),
                           tokenize_records(search_val_records, tokenizer, args), resume)
            ranks = write_rank_report(run, model)
        run.start_retrain(ranks)
        if args.autolora_retrain:
            from peft import PeftModel

            from dashdiff.autolora import retrain_config

            # A fresh plain LoRA with the found per-layer ranks on the frozen base (now in the training dtype).
            base = accelerator.unwrap_model(model)
            if isinstance(base, PeftModel):  # after a search; a resumed retrain starts from the bare base
                base = base.unload()
            accelerator.free_memory()
            base.to(T.mixed_precision_dtype(accelerator))
            cfg = retrain_config(ranks, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, bias="none",
                                 task_type="CAUSAL_LM")
            model = add_adapter(base, cfg, args.seed)
            model = fit(run, model, tokenize_records(train_records, tokenizer, args), val_ex, "lora", run.resume)
    else:
        model = add_adapter(model, adapter_config(args, kind), args.seed)
        if kind == "dash" and args.dash_prefetch_spectra:
            dashdiff.prefetch_spectra(model)
        model = fit(run, model, tokenize_records(train_records, tokenizer, args), val_ex, kind, resume)
    return model


def cli(argv: Sequence[str] | None = None) -> int:
    """The command line: one clear line and exit status 1 for the user's input or folders."""
    import input_rules as V

    return V.run_command_line(main, parse_args(argv), "commonsense_dash.py")


if __name__ == "__main__":
    sys.exit(cli())
