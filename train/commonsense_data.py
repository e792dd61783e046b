"""LLM-Adapters commonsense-reasoning data format and evaluation rules.

LoRA-Dash's LLM numbers were produced with the LLM-Adapters pipeline
(``AGI-Edgerunners/LLM-Adapters``): Alpaca-style prompts, beam search with 4 beams and 32 new
tokens, a per-dataset regular expression on the generated text, exact match with ``answer``.
This module reproduces those rules as plain functions so that published adapters can be
evaluated and published numbers reproduced; ``train/commonsense_dash.py`` (training) and
``train/commonsense_eval.py`` (evaluation) are the command lines. It is task data code, not
library: it lives next to its scripts.

Prompt strings (template ``"llm_adapters"``), checked character by character against the
stored public sources:

* training, ``generate_prompt`` in ``AGI-Edgerunners/LLM-Adapters`` ``finetune.py`` at commit
  91770aba93bbbde16f3e16d1bf395a59706fa390, identical in LoRA-Dash's copy
  ``Chongjie-Si/Subspace-Tuning`` ``CR_MR/finetune.py`` (commit 5fb16a74...): no-input first
  line ends ``"request.  "`` (two spaces), with-input first line ends ``"request. "`` (one
  space); after an empty second line every line starts with 16 spaces (the blank separators
  are 16 spaces);
  the output follows ``"### Response:\\n"`` plus 16 spaces. (An older revision, 063e3d42,
  had ``"  # noqa: E501"`` *inside* the string; that revision is not reproduced.)
* evaluation, ``generate_prompt`` in ``AGI-Edgerunners/LLM-Adapters``
  ``commomsense_evaluate.py`` (sic, commit e0efdc0e...), identical in
  ``HZQ950419/LLM-Adapters`` and in ``Chongjie-Si/Subspace-Tuning``
  ``CR_MR/commonsense_evaluate.py``: no-input first line ends ``"request. "`` (one space),
  with-input first line ends ``"request."`` (none); blank separator lines are empty; the
  prompt ends with ``"### Response:\\n"`` plus 16 spaces.

The commonsense data always has ``input == ""``, so only the no-input forms matter for
published numbers. Answer extraction follows the same files: case-sensitive, first match.
LLM-Adapters takes the text after the *first* ``"### Response:"`` of the decoded sequence;
LoRA-Dash's copy takes the *last*, which is what :func:`extract_answer` does (it differs only
when the model itself writes the marker again).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Literal

import torch

DATASETS: tuple[str, ...] = (
    "boolq",
    "piqa",
    "social_i_qa",
    "hellaswag",
    "winogrande",
    "ARC-Challenge",
    "ARC-Easy",
    "openbookqa",
)
TEMPLATES: tuple[str, ...] = ("llm_adapters", "alpaca")
RESPONSE_MARKER = "### Response:"

# Alternations in the published order: re.search returns the leftmost match, as findall()[0] did.
_ANSWER_PATTERNS: dict[str, re.Pattern[str]] = {
    "boolq": re.compile(r"true|false"),
    "piqa": re.compile(r"solution1|solution2"),
    "hellaswag": re.compile(r"ending1|ending2|ending3|ending4"),
    "winogrande": re.compile(r"option1|option2"),
}
for _name in ("social_i_qa", "ARC-Challenge", "ARC-Easy", "openbookqa"):
    _ANSWER_PATTERNS[_name] = re.compile(r"answer1|answer2|answer3|answer4|answer5")

_HEAD_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
_HEAD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)
_INDENT = " " * 16  # the published prompts are indented f-strings inside a function body


def check_dataset(dataset: str) -> str:
    """Return ``dataset`` if it is one of :data:`DATASETS`, else raise ``ValueError``."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid names: {', '.join(DATASETS)}")
    return dataset


def generate_prompt(
    instruction: str,
    input: str | None = None,  # noqa: A002 - the LLM-Adapters field name
    output: str | None = None,
    template: str = "llm_adapters",
    stage: Literal["train", "eval"] = "train",
) -> str:
    """Build the prompt text for one record.

    ``template="llm_adapters"`` gives the published strings byte for byte (see the module
    docstring); ``"alpaca"`` the clean, unindented Alpaca form (same for both stages). An empty
    or missing ``input`` selects the no-input form, as the published ``if input:`` did. At
    evaluation ``output`` is normally omitted: the prompt then ends where generation starts.
    """
    if stage not in ("train", "eval"):
        raise ValueError(f"stage must be 'train' or 'eval', got {stage!r}")
    out = output or ""
    if template == "alpaca":
        head = _HEAD_INPUT if input else _HEAD_NO_INPUT
        body = f"{head}\n\n### Instruction:\n{instruction}\n\n"
        if input:
            body += f"### Input:\n{input}\n\n"
        return f"{body}### Response:\n{out}"
    if template != "llm_adapters":
        raise ValueError(f"unknown template {template!r}; valid: {', '.join(TEMPLATES)}")

    i = _INDENT
    if stage == "train":
        # Training: blank separators hold the indentation; the heads carry stray trailing spaces.
        first = _HEAD_INPUT + " " if input else _HEAD_NO_INPUT + "  "
        sep = f"\n{i}\n"
    else:
        # Evaluation: separators are truly empty lines, and the heads carry one or no space.
        first = _HEAD_INPUT if input else _HEAD_NO_INPUT + " "
        sep = "\n\n"
    text = f"{first}\n\n{i}### Instruction:\n{i}{instruction}{sep}"
    if input:
        text += f"{i}### Input:\n{i}{input}{sep}"
    return f"{text}{i}### Response:\n{i}{out}"


def load_records(
    path: str | os.PathLike[str], stage: Literal["train", "eval"] = "train"
) -> list[dict]:
    """Read an LLM-Adapters JSON list and validate its records.

    Every record needs a string ``instruction`` and a string ``output`` (``stage="train"``) or
    ``answer`` (``stage="eval"``); ``input`` is optional but must be a string (or null) when
    present. Raises ``ValueError`` naming the file, the record index and the field.
    """
    if stage not in ("train", "eval"):
        raise ValueError(f"stage must be 'train' or 'eval', got {stage!r}")
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    target = "output" if stage == "train" else "answer"
    for idx, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: record {idx} is a {type(rec).__name__}, expected an object")
        for field in ("instruction", target):
            if field not in rec:
                raise ValueError(f"{path}: record {idx} is missing field {field!r}")
            if not isinstance(rec[field], str):
                raise ValueError(
                    f"{path}: record {idx} field {field!r} must be a string, "
                    f"got {type(rec[field]).__name__}"
                )
        if rec.get("input") is not None and not isinstance(rec["input"], str):
            raise ValueError(
                f"{path}: record {idx} field 'input' must be a string, "
                f"got {type(rec['input']).__name__}"
            )
    return data


def extract_answer(dataset: str, text: str, lenient: bool = False) -> str:
    """Return the predicted label in ``text`` for ``dataset``, or ``""`` when there is none.

    Only the text after the last ``"### Response:"`` counts (all of it if the marker is absent).
    Matching is case-sensitive, as published ("True" is no answer for boolq); ``lenient=True``
    lower-cases first, which is *not* comparable with published numbers.
    """
    pattern = _ANSWER_PATTERNS[check_dataset(dataset)]
    response = text.split(RESPONSE_MARKER)[-1].strip()
    if lenient:
        response = response.lower()
    m = pattern.search(response)
    return m.group(0) if m else ""


def tokenize_example(
    tokenizer: Any,
    record: dict,
    cutoff_len: int = 256,
    train_on_inputs: bool = True,
    template: str = "llm_adapters",
    add_eos: bool = True,
) -> dict[str, list[int]]:
    """Tokenize one training record as LLM-Adapters' ``finetune.py`` does.

    The full training prompt (with ``output``) is truncated to ``cutoff_len``; EOS is appended
    when it fits and is not already last. With ``train_on_inputs=False`` the labels of the
    prompt part (the prompt tokenized with an empty output, without EOS) are -100, so only the
    response tokens enter the loss. As published, the prompt length is counted on the prompt
    tokenized alone: where a tokenizer merges the trailing indentation with the first response
    word, that word's token is masked too.
    """

    def _tok(text: str, eos: bool) -> dict[str, list[int]]:
        res = tokenizer(text, truncation=True, max_length=cutoff_len, padding=False)
        ids, mask = list(res["input_ids"]), list(res["attention_mask"])
        eos_id = tokenizer.eos_token_id
        if eos and eos_id is not None and ids and ids[-1] != eos_id and len(ids) < cutoff_len:
            ids.append(eos_id)
            mask.append(1)
        return {"input_ids": ids, "attention_mask": mask}

    inp = record.get("input")
    prompt = generate_prompt(record["instruction"], inp, record["output"], template, "train")
    full = _tok(prompt, add_eos)
    labels = list(full["input_ids"])
    if not train_on_inputs:
        user = _tok(generate_prompt(record["instruction"], inp, "", template, "train"), False)
        n = min(len(user["input_ids"]), len(labels))
        labels = [-100] * n + labels[n:]
    return {
        "input_ids": full["input_ids"],
        "attention_mask": full["attention_mask"],
        "labels": labels,
    }


@torch.no_grad()
def evaluate(
    model: Any,
    tokenizer: Any,
    dataset: str,
    records: list[dict],
    batch_size: int = 1,
    num_beams: int = 4,
    max_new_tokens: int = 32,
    lenient: bool = False,
    progress: bool = True,
    template: str = "llm_adapters",
) -> tuple[float, list[dict]]:
    """Generate answers for ``records`` and score them by exact match with ``answer``.

    Beam search (``num_beams``, no sampling) as LLM-Adapters; the full decoded sequence is cut
    after the last ``"### Response:"`` (``output_pred``) and :func:`extract_answer` gives
    ``pred``. Unlike the published script, the attention mask is passed to ``generate`` and the
    batch is left-padded, so the batch size does not change the answers. Returns the accuracy
    and one dict per record: the record's fields plus ``output_pred``, ``pred`` and ``flag``.
    """
    from tqdm.auto import tqdm

    check_dataset(dataset)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    saved_side, saved_pad = tokenizer.padding_side, tokenizer.pad_token
    # Decoder-only generation continues from the last position: padding must go on the left.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    was_training = model.training
    model.eval()
    results: list[dict] = []
    correct = 0
    try:
        bar = tqdm(total=len(records), desc=dataset, disable=not progress)
        for start in range(0, len(records), batch_size):
            batch = records[start : start + batch_size]
            # LLM-Adapters passed input=None here; the record's own input is the same prompt
            # for the commonsense sets (input is always "") and right for other data.
            prompts = [
                generate_prompt(r["instruction"], r.get("input"), None, template, "eval")
                for r in batch
            ]
            enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
            seqs = model.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                num_beams=num_beams,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
            texts = tokenizer.batch_decode(seqs, skip_special_tokens=True)
            for rec, text in zip(batch, texts):
                output_pred = text.split(RESPONSE_MARKER)[-1].strip()
                pred = extract_answer(dataset, output_pred, lenient=lenient)
                flag = pred == rec.get("answer")
                correct += flag
                results.append({**rec, "output_pred": output_pred, "pred": pred, "flag": flag})
            bar.update(len(batch))
            bar.set_postfix(acc=f"{correct / len(results):.4f}")
        bar.close()
    finally:
        tokenizer.padding_side = saved_side
        tokenizer.pad_token = saved_pad
        model.train(was_training)
    accuracy = correct / len(results) if results else 0.0
    return accuracy, results
