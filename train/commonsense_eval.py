#!/usr/bin/env python
"""Evaluate a causal LM (optionally with an adapter) on the 8 LLM-Adapters commonsense test sets.

Same rules as LLM-Adapters' ``commonsense_evaluate.py`` (prompt strings, beam search 4,
32 new tokens, case-sensitive first-match extraction; see ``commonsense_data.py``), with left
padding done right so that ``--batch_size`` never changes the answers.

    python train/commonsense_eval.py --dataset all --data_dir dataset \
        --base_model <model> --lora_weights <adapter dir> --batch_size 16 --output_dir out/

Writes ``<output_dir>/<name>.json`` (per-sample ``output_pred`` / ``pred`` / ``flag``) and
``results.json`` + ``results.md`` (accuracies and their unweighted mean). Runs that evaluate one
dataset at a time into the same ``--output_dir`` with the same setup accumulate in the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):
    # Run as a script: make the repository's dashdiff and this folder's modules importable
    # without installing anything.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from commonsense_data import DATASETS, TEMPLATES, evaluate, load_records  # noqa: E402

_DTYPES = ("auto", "float32", "float16", "bfloat16")
# Settings that must match for results of separate runs to share one table.
_SETUP_KEYS = ("base_model", "lora_weights", "template", "num_beams", "max_new_tokens",
               "lenient_extraction", "dtype", "limit")


def _dataset_arg(value: str) -> str:
    if value == "all" or value in DATASETS:
        return value
    raise argparse.ArgumentTypeError(
        f"unknown dataset {value!r}; valid names: {', '.join(DATASETS)}, or 'all'"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (``argv=None`` reads ``sys.argv``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", type=_dataset_arg, required=True,
                   help=f"one of {', '.join(DATASETS)}, or 'all'")
    p.add_argument("--data_dir", default="dataset", help="folder holding <name>/test.json")
    p.add_argument("--base_model", required=True,
                   help="model folder or hub id, or a reserved tiny name (tiny-llama)")
    p.add_argument("--lora_weights", default=None,
                   help="PEFT adapter folder, or a dashdiff full-state .safetensors file")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--num_beams", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--lenient_extraction", action="store_true",
                   help="lower-case generations before matching "
                        "(not comparable with published numbers)")
    p.add_argument("--template", choices=TEMPLATES, default="llm_adapters")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate only the first N records of each set")
    p.add_argument("--output_dir", default="commonsense_results")
    p.add_argument("--dtype", choices=_DTYPES, default="auto",
                   help="auto: float16 on CUDA (as LLM-Adapters), float32 on CPU")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch_size must be >= 1")
    if args.num_beams < 1 or args.max_new_tokens < 1:
        p.error("--num_beams and --max_new_tokens must be >= 1")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    from input_rules import seed_error

    if seed_error(args.seed):
        p.error(seed_error(args.seed))
    return args


def _resolve_base_model(name: str) -> str:
    """Map reserved names (e.g. ``tiny-llama``) to a local model folder via ``dashdiff.testing``."""
    if Path(name).exists():
        return name  # a local folder: skip importing dashdiff.testing (it pulls in diffusers)
    from dashdiff.testing import resolve_model

    return resolve_model(name)


def _attach_adapter(model: Any, lora_weights: str) -> Any:
    """Load ``lora_weights`` onto ``model``: a PEFT adapter folder, or a dashdiff file."""
    path = Path(lora_weights)
    if path.is_file() and path.suffix == ".safetensors":
        # --- dashdiff full-state adapter file (LoRA-Dash / AutoLoRA with extra tensors) ---
        # Imported lazily: dashdiff.load_adapter is written separately and may be absent.
        import dashdiff

        load_adapter = getattr(dashdiff, "load_adapter", None)
        if load_adapter is None:
            raise RuntimeError(
                f"{lora_weights} is a dashdiff adapter file, but this dashdiff has no "
                "load_adapter(); pass a PEFT adapter folder (adapter_config.json + weights) instead"
            )
        loaded = load_adapter(model, str(path))
        return model if loaded is None else loaded  # accept in-place or returning loaders
    if not (path.is_dir() and (path / "adapter_config.json").is_file()):
        raise FileNotFoundError(
            f"--lora_weights {lora_weights}: expected a PEFT adapter folder with "
            "adapter_config.json, or a dashdiff .safetensors file"
        )
    from peft import PeftModel

    from input_rules import check_peft_weights_loaded

    peft_model = PeftModel.from_pretrained(model, str(path))
    # PEFT only warns when the weights name modules its target_modules did not adapt: the model
    # would be evaluated without them (or with freshly initialised layers).
    check_peft_weights_loaded(peft_model, path)
    return peft_model


def check_lora_weights_path(lora_weights: str) -> None:
    """What ``_attach_adapter`` accepts, checked before the model is loaded (seconds, not minutes)."""
    path = Path(lora_weights)
    if not path.exists():
        raise FileNotFoundError(f"--lora_weights {lora_weights} does not exist")
    if path.is_file() and path.suffix != ".safetensors":
        raise FileNotFoundError(f"--lora_weights {lora_weights}: expected a PEFT adapter folder with "
                                "adapter_config.json, or a dashdiff .safetensors file")
    if path.is_dir() and not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"--lora_weights {lora_weights}: the folder has no adapter_config.json (a PEFT "
                                "adapter folder holds adapter_config.json and adapter_model.safetensors)")


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """Return ``(model, tokenizer)`` for ``args``, in eval mode on ``args.device``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype == "auto":
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    base = _resolve_base_model(args.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    if args.lora_weights:
        model = _attach_adapter(model, args.lora_weights)
    model.to(device).eval()
    return model, tokenizer


def _write_tables(
    out: Path, setup: dict, accuracies: dict[str, float], counts: dict[str, int]
) -> dict:
    """Write results.json and results.md; return the JSON payload."""
    done = [d for d in DATASETS if d in accuracies]
    mean = sum(accuracies[d] for d in done) / len(done) if done else None
    payload = {
        "setup": setup,
        "accuracy": {d: accuracies[d] for d in done},
        "num_samples": {d: counts[d] for d in done},
        "mean": mean,
        "num_datasets": len(done),
        "complete": len(done) == len(DATASETS),
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}"

    mean_name = "Avg" if payload["complete"] else f"Avg ({len(done)}/{len(DATASETS)})"
    head = "| " + " | ".join([*DATASETS, mean_name]) + " |"
    rule = "|" + "---:|" * (len(DATASETS) + 1)
    row = "| " + " | ".join([*(pct(accuracies.get(d)) for d in DATASETS), pct(mean)]) + " |"
    lines = [
        "# Commonsense accuracy (%)",
        "",
        f"base_model: `{setup['base_model']}`; lora_weights: `{setup['lora_weights']}`; "
        f"template {setup['template']}, beams {setup['num_beams']}, "
        f"max_new_tokens {setup['max_new_tokens']}, lenient {setup['lenient_extraction']}",
        "",
        head,
        rule,
        row,
        "",
        "Avg is the unweighted mean over the datasets evaluated.",
        "",
    ]
    (out / "results.md").write_text("\n".join(lines), encoding="utf-8")
    return payload


def main(args: argparse.Namespace) -> dict:
    """Evaluate, write per-sample JSON and the results table; return the results payload."""
    from transformers import set_seed

    set_seed(args.seed)
    names = list(DATASETS) if args.dataset == "all" else [args.dataset]
    # Validate every input file before spending time on loading the model.
    data: dict[str, list[dict]] = {}
    for name in names:
        path = Path(args.data_dir) / name / "test.json"
        if not path.is_file():
            raise FileNotFoundError(f"no test set for {name}: {path} does not exist")
        records = load_records(path, stage="eval")
        if not records:
            raise ValueError(f"{path} holds no records: an empty test set has no accuracy")
        data[name] = records[: args.limit] if args.limit else records
    if args.lora_weights:
        check_lora_weights_path(args.lora_weights)
    from input_rules import check_output_dir_writable

    check_output_dir_writable(args.output_dir)

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup = {k: getattr(args, k) for k in _SETUP_KEYS}

    # Keep earlier per-dataset runs into this folder if they were made with the same setup.
    accuracies: dict[str, float] = {}
    counts: dict[str, int] = {}
    previous = out / "results.json"
    if previous.is_file():
        try:
            old = json.loads(previous.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            old = {}
        if old.get("setup") == setup:
            accuracies.update(old.get("accuracy", {}))
            counts.update(old.get("num_samples", {}))

    model, tokenizer = load_model(args)
    for name in names:
        acc, samples = evaluate(
            model, tokenizer, name, data[name],
            batch_size=args.batch_size, num_beams=args.num_beams,
            max_new_tokens=args.max_new_tokens, lenient=args.lenient_extraction,
            progress=not args.no_progress, template=args.template,
        )
        (out / f"{name}.json").write_text(json.dumps(samples, indent=4, allow_nan=False) + "\n", encoding="utf-8")
        accuracies[name], counts[name] = acc, len(samples)
        print(f"{name}: accuracy {acc:.4f} ({sum(s['flag'] for s in samples)}/{len(samples)})")
    payload = _write_tables(out, setup, accuracies, counts)
    if payload["mean"] is not None:
        print(f"mean over {payload['num_datasets']} dataset(s): {payload['mean']:.4f}")
    return payload


def cli(argv: Sequence[str] | None = None) -> int:
    """The command line: bad input (a missing file, a malformed record, an adapter that does not fit
    the model) is one line on stderr and exit status 1, not a traceback."""
    args = parse_args(argv)
    try:
        main(args)
    except (OSError, ValueError) as err:
        print(f"commonsense_eval.py: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
