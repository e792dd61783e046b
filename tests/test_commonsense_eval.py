"""LLM-Adapters commonsense format and evaluation: prompts, extraction, records, tokenization,
and end-to-end runs of train/commonsense_eval.py on a tiny random Llama."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from launch_utils import load_script

# train/commonsense_data.py: the LLM-Adapters data code, next to its scripts
_data = load_script("train/commonsense_data.py", reuse=True)
DATASETS, evaluate, extract_answer = _data.DATASETS, _data.evaluate, _data.extract_answer
generate_prompt, load_records, tokenize_example = _data.generate_prompt, _data.load_records, _data.tokenize_example

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "commonsense"
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


# --- tiny local tokenizer and model ---


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer trained on the fixture prompts + a 2-layer random Llama."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = []
    for name in DATASETS:
        for r in json.loads((FIXTURES / name / "test.json").read_text()):
            texts.append(generate_prompt(r["instruction"], "", r["output"], stage="train"))
            texts.append(generate_prompt(r["instruction"], "", r["output"], stage="eval"))
    tok = Tokenizer(models.BPE())
    # Byte level so that decoding gives the text back exactly ("### Response:" included).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    assert tokenizer.pad_token is None  # evaluate() must cope with a missing pad token
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


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


# --- the script ---


def _load_script():
    spec = importlib.util.spec_from_file_location("commonsense_eval", ROOT / "train" / "commonsense_eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parser_rejects_unknown_dataset(capsys: pytest.CaptureFixture[str]) -> None:
    script = _load_script()
    with pytest.raises(SystemExit):
        script.parse_args(["--dataset", "sciq", "--base_model", "m"])
    err = capsys.readouterr().err
    assert "sciq" in err and "boolq" in err and "openbookqa" in err
    args = script.parse_args(["--dataset", "all", "--base_model", "m"])
    assert (args.num_beams, args.max_new_tokens, args.lenient_extraction) == (4, 32, False)


def test_end_to_end_two_datasets_with_peft_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)

    script = _load_script()
    out = tmp_path / "out"
    common = ["--data_dir", str(FIXTURES), "--base_model", str(tiny_model_dir),
              "--lora_weights", str(adapter), "--batch_size", "2", "--max_new_tokens", "6",
              "--output_dir", str(out), "--no_progress"]
    script.main(script.parse_args(["--dataset", "boolq", *common]))
    payload = script.main(script.parse_args(["--dataset", "winogrande", *common]))

    for name in ("boolq", "winogrande"):
        samples = json.loads((out / f"{name}.json").read_text())
        assert len(samples) == len(load_records(FIXTURES / name / "test.json", stage="eval"))
        assert all({"output_pred", "pred", "flag", "instruction", "answer"} <= s.keys() for s in samples)
        assert payload["accuracy"][name] == sum(s["flag"] for s in samples) / len(samples)
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(payload))
    assert set(saved["accuracy"]) == {"boolq", "winogrande"} and not saved["complete"]
    assert saved["mean"] == pytest.approx(sum(saved["accuracy"].values()) / 2)
    md = (out / "results.md").read_text()
    assert "| boolq | piqa |" in md and "Avg (2/8)" in md


def test_all_datasets_on_reserved_tiny_llama(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DASHDIFF_CACHE", str(tmp_path / "cache"))  # keep the build out of ~/.cache
    script = _load_script()
    out = tmp_path / "out"
    payload = script.main(script.parse_args([
        "--dataset", "all", "--data_dir", str(FIXTURES), "--base_model", "tiny-llama",
        "--limit", "1", "--max_new_tokens", "3", "--batch_size", "1", "--output_dir", str(out),
        "--no_progress",
    ]))
    assert payload["complete"] and list(payload["accuracy"]) == list(DATASETS)
    assert payload["mean"] == pytest.approx(sum(payload["accuracy"].values()) / 8)
    assert all(len(json.loads((out / f"{n}.json").read_text())) == 1 for n in DATASETS)
    assert "| Avg |" in (out / "results.md").read_text()


def test_dashdiff_adapter_file_branch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dashdiff

    script = _load_script()
    f = tmp_path / "adapter.safetensors"
    f.write_bytes(b"")
    monkeypatch.delattr(dashdiff, "load_adapter", raising=False)
    with pytest.raises(RuntimeError, match="load_adapter"):
        script._attach_adapter(object(), str(f))
    monkeypatch.undo()
    # the real loader: a launched LoRA-Dash adapter (δ != 0) saved as a full-state file and attached to
    # a fresh base by the script reproduces the trained model's logits
    import peft
    import torch

    from dashdiff.testing import tiny_llama

    trained = peft.get_peft_model(tiny_llama(0), dashdiff.LoraDashConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], dash_directions=2, init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        dashdiff.launch_dash(trained)
        for n, p in trained.named_parameters():
            if "lora_dash_delta" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    state = tmp_path / "dash.safetensors"
    dashdiff.save_adapter(trained, state)
    ids = torch.randint(4, 460, (1, 10), generator=g)
    base = tiny_llama(0).eval()
    with torch.no_grad():
        before = base(input_ids=ids).logits
        want = trained.eval()(input_ids=ids).logits
        got = script._attach_adapter(base, str(state)).eval()(input_ids=ids).logits
    assert (want - before).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        script._attach_adapter(object(), str(tmp_path))
