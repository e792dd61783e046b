"""The plain questions of the text world (issue 14: what makes mini-llama v2 able to answer): each
task's record re-worded with the right answer, only training-split questions in the pretraining
stream, the stream's asked share of them, the pretrained model's held-out score computed right,
and bench/quality.py's commonsense overrides."""

from __future__ import annotations

import random
import re

import pytest
import torch

from launch_utils import load_script

TW = load_script("assets/pretrain/text_world.py", reuse=True)
LL = load_script("assets/pretrain/pretrain_llama.py", reuse=True)


@pytest.fixture(scope="module")
def world_tasks():
    world = TW.World(0, n_people=8)
    return world, TW.tasks(world)


def _gold(rec: dict) -> tuple[str, list[str], str]:
    """(stem, options, gold option text) read from an LLM-Adapters instruction with regular
    expressions of its own (not text_world's)."""
    ins = rec["instruction"]
    stem = re.split(r"\n\n", ins.split(": ", 1)[1])[0]
    options = re.findall(r"\n\n(?:Solution|Answer|Ending|Option)\d: (.*)", ins)
    if rec["answer"] in ("true", "false"):
        return stem, [], {"true": "yes", "false": "no"}[rec["answer"]]
    return stem, options, options[int(rec["answer"][-1]) - 1]


def test_every_task_is_reworded_with_its_gold_answer(world_tasks):
    _, tasks = world_tasks
    for task, split in tasks.items():
        for rec in split["train"][:6]:
            stem, options, gold = _gold(rec)
            for rng in (None, random.Random(3)):
                text = TW.plain_question(rec, rng)
                lines = text.split("\n")
                assert lines[0] == "Question: " + stem[0].upper() + stem[1:], (task, text)
                assert "Answer format" not in text and "correct answer" not in text and "Please" not in text
                if not options:  # true / false -> yes / no
                    assert lines[1:] == [f"Answer: {gold}"], text
                    continue
                listed = re.findall(r"\((\d)\) (.*?)(?= \(\d\) |$)", lines[1][len("Choices: "):])
                assert sorted(o for _, o in listed) == sorted(options), (task, text)
                k, said = re.fullmatch(r"Answer: \((\d)\) (.*)", lines[2]).groups()
                assert said == gold and listed[int(k) - 1][1] == gold, (task, text)
                if rng is None:  # without rng the record's own order
                    assert [o for _, o in listed] == options


def test_shuffled_options_move_the_answer_number(world_tasks):
    _, tasks = world_tasks
    rec = tasks["hellaswag"]["train"][0]
    numbers = {TW.plain_question(rec, random.Random(s)).rsplit("(", 1)[1][0] for s in range(20)}
    assert len(numbers) > 1, numbers


def test_pretraining_questions_are_training_questions_only(world_tasks):
    world, tasks = world_tasks

    def ident(stem: str, options) -> tuple:
        return stem[0].upper() + stem[1:], frozenset(options)

    train = {ident(*_gold(r)[:2]) for s in tasks.values() for r in s["train"]}
    test = {ident(*_gold(r)[:2]) for s in tasks.values() for r in s["test"]}
    docs = TW.plain_questions(world, 600, seed=1)
    assert TW.plain_questions(world, 600, seed=1) == docs and TW.plain_questions(world, 600, seed=2) != docs
    seen = set()
    for d in docs:
        lines = d.split("\n")
        options = re.findall(r"\(\d\) (.*?)(?= \(\d\) |$)", lines[1][len("Choices: "):]) if len(lines) == 3 else []
        seen.add(ident(lines[0][len("Question: "):], options))
    assert seen <= train and not seen & test
    assert len(seen) > 0.3 * len(train)  # drawn from the whole pool, not a few questions


def test_the_stream_holds_the_asked_share_of_questions():
    world = TW.World(0, n_people=6)
    tok = LL.build_tokenizer(world, 60, plain=True)
    for fraction in (0.0, 0.5, 0.75):
        stream = LL.token_stream(world, tok, copies=2, task_fraction=0.0, seed=0, qa_fraction=fraction)
        docs = [d for d in tok.decode(stream.tolist()).split(tok.eos_token) if d.strip()]
        questions = sum(d.lstrip("<s>").lstrip().startswith("Question:") for d in docs)
        facts = len(TW.corpus(world, copies=2))
        assert len(docs) == facts + questions
        assert questions == round(fraction * facts / (1 - fraction)), (fraction, questions, facts)
        if 0 < fraction:
            first = [i for i, d in enumerate(docs) if "Question:" in d]
            assert first[0] < len(docs) // 2  # mixed in, not appended
    with pytest.raises(SystemExit):
        LL.parse_args(["--output_dir", "x", "--qa_fraction", "1"])


class _Oracle(torch.nn.Module):
    """generate() appends a fixed reply to each prompt: the right one for the prompts in ``right``."""

    def __init__(self, tok, replies: dict[str, str]):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.replies = tok, replies

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        rows = []
        for ids in input_ids:
            prompt = self.tok.decode(ids, skip_special_tokens=True)
            reply = self.tok(self.replies[prompt], add_special_tokens=False).input_ids
            rows.append(torch.cat([ids, torch.tensor(reply[:max_new_tokens])]))
        width = max(len(r) for r in rows)
        return torch.stack([torch.cat([r, torch.full((width - len(r),), self.tok.pad_token_id)]) for r in rows])


def test_qa_accuracy_counts_right_answers_per_task():
    world = TW.World(0, n_people=6)
    tok = LL.build_tokenizer(world, 60, plain=True)
    tasks = TW.tasks(world)
    replies, expected = {}, {}
    for task, split in tasks.items():
        recs = split["test"][:5]
        for i, rec in enumerate(recs):
            stem, options, gold = _gold(rec)
            prompt = TW.plain_question(rec).rsplit("Answer:", 1)[0] + "Answer:"
            right = i % 2 == 0  # every other one answered right
            if not options:
                reply = f" {gold}" if right else " " + {"yes": "no", "no": "yes"}[gold]
            else:
                k = options.index(gold) + 1
                reply = f" ({k}) {gold}" if right else f" ({k % len(options) + 1}) x"
            replies[prompt] = reply
        expected[task] = sum(i % 2 == 0 for i in range(len(recs))) / len(recs)
    got = LL.qa_accuracy(_Oracle(tok, replies), tok, world, limit=5)
    assert got == pytest.approx(expected), (got, expected)


def test_quality_commonsense_overrides_and_merge_setting(tmp_path):
    Q = load_script("bench/quality.py", reuse=True)
    args = Q.parse_args(["--size", "full", "--output_dir", str(tmp_path), "--sections", "commonsense",
                         "--cs_methods", "dash-r4", "--cs_seeds", "2", "--cs_steps", "7", "--cs_learning_rate", "1e-3"])
    assert (args.cs_methods, args.cs_seeds, args.cs_steps, args.cs_learning_rate) == (["dash-r4"], [2], 7, 1e-3)
    with pytest.raises(SystemExit):
        Q.parse_args(["--output_dir", str(tmp_path), "--cs_steps", "0"])
    with pytest.raises(SystemExit):
        Q.parse_args(["--output_dir", str(tmp_path), "--cs_methods", "lora-r5"])
    # The full size answers greedily and trains on the response only (both measured: BENCHMARKS.md).
    assert Q.SIZES["full"]["cs_beams"] == 1 and Q.SIZES["full"]["cs_train_on_inputs"] is False
