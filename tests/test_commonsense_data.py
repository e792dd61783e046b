"""train/commonsense_data.py, the LLM-Adapters commonsense format: the published prompts, answer
extraction, record validation, tokenization and batched evaluation (on a tiny random Llama)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from commonsense_llama import (DATASETS, FIXTURES, evaluate, extract_answer, generate_prompt, load_records,
                               tokenize_example)
from commonsense_llama import tiny_model_dir  # noqa: F401  (a fixture: pytest finds it by this name)

I16 = " " * 16


# --- published prompt strings, written out as literals (LLM-Adapters finetune.py and
# commomsense_evaluate.py; see train/commonsense_data.py's docstring for the commits) ---
TRAIN_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.  \n"
    "\n"
    "                ### Instruction:\n"
    "                Is water wet?\n"
    "                \n"
    "                ### Response:\n"
    "                the correct answer is true"
)


TRAIN_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request. \n"
    "\n"
    "                ### Instruction:\n"
    "                Is water wet?\n"
    "                \n"
    "                ### Input:\n"
    "                some context\n"
    "                \n"
    "                ### Response:\n"
    "                the correct answer is true"
)


EVAL_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request. \n"
    "\n"
    "                ### Instruction:\n"
    "                Is water wet?\n"
    "\n"
    "                ### Response:\n"
    "                "
)


EVAL_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n"
    "\n"
    "                ### Instruction:\n"
    "                Is water wet?\n"
    "\n"
    "                ### Input:\n"
    "                some context\n"
    "\n"
    "                ### Response:\n"
    "                "
)


ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nIs water wet?\n\n### Response:\n"
)


ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nIs water wet?\n\n### Input:\nsome context\n\n### Response:\n"
)


def test_llm_adapters_prompts_match_published_strings() -> None:
    out = "the correct answer is true"
    assert generate_prompt("Is water wet?", "", out, stage="train") == TRAIN_NO_INPUT
    assert generate_prompt("Is water wet?", None, out, stage="train") == TRAIN_NO_INPUT
    assert generate_prompt("Is water wet?", "some context", out, stage="train") == TRAIN_INPUT
    assert generate_prompt("Is water wet?", "", stage="eval") == EVAL_NO_INPUT
    assert generate_prompt("Is water wet?", "some context", stage="eval") == EVAL_INPUT
    # The masked "user prompt" of training is the training prompt with an empty output.
    assert generate_prompt("Is water wet?", "", "", stage="train") == TRAIN_NO_INPUT[: -len(out)]
    first = TRAIN_NO_INPUT.split("\n")[0]
    assert first.endswith("request.  ") and EVAL_NO_INPUT.split("\n")[0].endswith("request. ")
    assert all(line.startswith(I16) for line in TRAIN_NO_INPUT.split("\n")[2:])


def test_alpaca_template_and_bad_arguments() -> None:
    assert generate_prompt("Is water wet?", template="alpaca", stage="eval") == ALPACA_NO_INPUT
    assert generate_prompt("Is water wet?", "some context", template="alpaca") == ALPACA_INPUT
    assert generate_prompt("Is water wet?", output="x", template="alpaca").endswith("### Response:\nx")
    with pytest.raises(ValueError, match="llm_adapters"):
        generate_prompt("q", template="vicuna")
    with pytest.raises(ValueError, match="stage"):
        generate_prompt("q", stage="test")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "dataset, text, expected",
    [
        ("boolq", "the correct answer is true", "true"),
        ("boolq", "false, not true", "false"),  # several candidates: the first one wins
        ("boolq", "the correct answer is True", ""),  # case-sensitive, as published
        ("boolq", "no idea", ""),
        ("piqa", "solution2 rather than solution1", "solution2"),
        ("piqa", "solution3", ""),
        ("social_i_qa", "the correct answer is answer3", "answer3"),
        ("ARC-Challenge", "answer4 or answer1", "answer4"),
        ("ARC-Easy", "answer5", "answer5"),
        ("openbookqa", "Answer2", ""),
        ("openbookqa", "answer6", ""),
        ("hellaswag", "ending4 then ending2", "ending4"),
        ("hellaswag", "ending5", ""),
        ("winogrande", "option2", "option2"),
        ("winogrande", "Option1", ""),
    ],
)
def test_extract_answer_rules(dataset: str, text: str, expected: str) -> None:
    assert extract_answer(dataset, text) == expected


def test_extract_answer_lenient_marker_and_unknown() -> None:
    assert extract_answer("boolq", "The correct answer is TRUE", lenient=True) == "true"
    assert extract_answer("winogrande", "Option1", lenient=True) == "option1"
    # Only the text after the LAST marker counts: the prompt's "Answer format: true/false"
    # and an earlier response are ignored.
    text = "Answer format: true/false\n### Response:\nthe answer is false\n### Response:\ntrue"
    assert extract_answer("boolq", text) == "true"
    assert extract_answer("boolq", "Answer format: true/false\n### Response:\n nothing") == ""
    with pytest.raises(ValueError, match="boolq.*openbookqa"):
        extract_answer("sciq", "answer1")
    assert len(DATASETS) == 8


def _write(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def test_load_records_validation(tmp_path: Path) -> None:
    good = {"instruction": "q", "input": "", "output": "the correct answer is true", "answer": "true"}
    p = _write(tmp_path / "ok.json", [good, {"instruction": "q", "output": "o", "answer": "a"}])
    assert len(load_records(p)) == 2 and len(load_records(p, stage="eval")) == 2
    assert len(load_records(FIXTURES / "train.json")) >= 16
    for name in DATASETS:
        recs = load_records(FIXTURES / name / "test.json", stage="eval")
        assert 3 <= len(recs) <= 4 and all(extract_answer(name, r["output"]) == r["answer"] for r in recs)

    p = _write(tmp_path / "bad.json", [good, good, {"instruction": "q", "output": "o"}])
    with pytest.raises(ValueError, match=r"bad\.json: record 2 is missing field 'answer'"):
        load_records(p, stage="eval")
    load_records(p, stage="train")  # training needs only instruction and output
    p = _write(tmp_path / "type.json", [good, {"instruction": "q", "output": 3}])
    with pytest.raises(ValueError, match=r"record 1 field 'output' must be a string"):
        load_records(p)
    p = _write(tmp_path / "inp.json", [{"instruction": "q", "input": ["x"], "output": "o"}])
    with pytest.raises(ValueError, match=r"record 0 field 'input'"):
        load_records(p)
    p = _write(tmp_path / "dict.json", {"instruction": "q"})
    with pytest.raises(ValueError, match="JSON list"):
        load_records(p)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, tokenizer


def test_tokenize_example_masks_prompt(tiny) -> None:
    _, tokenizer = tiny
    rec = load_records(FIXTURES / "boolq" / "test.json")[0]
    full = tokenize_example(tokenizer, rec, cutoff_len=512, train_on_inputs=True)
    assert full["labels"] == full["input_ids"] and full["input_ids"][-1] == tokenizer.eos_token_id
    assert len(full["attention_mask"]) == len(full["input_ids"])

    masked = tokenize_example(tokenizer, rec, cutoff_len=512, train_on_inputs=False)
    assert masked["input_ids"] == full["input_ids"]
    user_len = len(tokenizer(generate_prompt(rec["instruction"], "", "", stage="train"))["input_ids"])
    labels = masked["labels"]
    assert labels[:user_len] == [-100] * user_len
    kept = [t for t in labels if t != -100]
    assert kept == masked["input_ids"][user_len:] and len(kept) > 1
    # Only response tokens (and EOS) are left in the loss. As in LLM-Adapters, the prompt's
    # trailing indentation can merge with the first response word into one token that falls
    # inside the prompt length, so the kept text is a suffix of the output holding the answer.
    kept_text = tokenizer.decode(kept, skip_special_tokens=True).strip()
    assert rec["output"].endswith(kept_text) and kept_text.endswith(rec["answer"])

    cut = tokenize_example(tokenizer, rec, cutoff_len=20, train_on_inputs=False)
    assert len(cut["input_ids"]) == 20 and cut["input_ids"][-1] != tokenizer.eos_token_id
    assert set(cut["labels"]) == {-100}  # truncated inside the prompt: nothing to learn


def test_batch_size_does_not_change_answers(tiny) -> None:
    model, tokenizer = tiny
    recs = load_records(FIXTURES / "hellaswag" / "test.json", stage="eval")
    recs += load_records(FIXTURES / "openbookqa" / "test.json", stage="eval")[:1]
    kw = dict(num_beams=4, max_new_tokens=10, progress=False)
    acc1, s1 = evaluate(model, tokenizer, "hellaswag", recs, batch_size=1, **kw)
    acc4, s4 = evaluate(model, tokenizer, "hellaswag", recs, batch_size=4, **kw)
    assert [s["output_pred"] for s in s1] == [s["output_pred"] for s in s4]
    assert acc1 == acc4
    assert any(s["output_pred"] for s in s1)  # the model did generate something
    assert tokenizer.padding_side == "right" and tokenizer.pad_token is None  # restored
    for rec, s in zip(recs, s1):
        assert {k: s[k] for k in rec} == rec
        assert s["pred"] == extract_answer("hellaswag", s["output_pred"])
        assert s["flag"] == (s["pred"] == rec["answer"])
