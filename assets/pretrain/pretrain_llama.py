#!/usr/bin/env python
"""Pretrain ``mini-llama``: a small ``LlamaForCausalLM`` on the text world's corpus, in chunks.

Next-token prediction on the corpus of :mod:`text_world` (documents joined with EOS, random
windows of ``--block_size`` tokens). The tokenizer is byte-level BPE built as
``dashdiff.testing.tiny_llama_tokenizer`` builds its own (same specials ``<unk> <s> </s> <pad>``,
same byte alphabet, same deterministic merge learner), with merges learned on the world's corpus
and the LLM-Adapters prompt text, so facts and prompts take few tokens.

Preset ``mini`` (the first shipped model) learns the world's sentences only: it recalls every fact
but fine-tuning cannot make it answer the tasks (it never saw a question). Preset ``mini-qa`` mixes
in ``--qa_fraction`` of *plain questions* (:func:`text_world.plain_question`: the training-split
questions of the eight tasks worded ``Question: ... / Choices: (1) ... / Answer: (2) ...``, options
re-shuffled each time), so the model learns to answer from the facts it stores, the way a pretrained
LLM answers before LLM-Adapters' fine-tuning teaches it the eight formats. No test-split question is
ever in the stream; :func:`qa_accuracy` measures the pretrained model on them. ``--task_fraction F``
(default 0) mixes training-split prompts in the LLM-Adapters format itself.

At the end the float16 model and the tokenizer are saved to ``OUT/model`` (ordinary
``LlamaForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``) with
``pretrain_info.json`` (device time, final loss, fact recall, sizes, settings).

    python assets/pretrain/pretrain_llama.py --output_dir runs/mini-llama --max_minutes 20 [--resume]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # imported lazily in the builders
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if str(HERE.parents[1]) not in sys.path:
    sys.path.insert(0, str(HERE.parents[1]))  # the repository's dashdiff, without installing it
if str(HERE.parents[1] / "train") not in sys.path:
    sys.path.append(str(HERE.parents[1] / "train"))  # train/commonsense_data.py: the LLM-Adapters prompt and scoring

import _common as C  # noqa: E402
import text_world as T  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    # fp16: 7.4 MB (hidden 256, 5 layers, vocab 1024).
    "mini": {"model": {"hidden_size": 256, "intermediate_size": 576, "num_hidden_layers": 5,
                       "num_attention_heads": 8, "num_key_value_heads": 4},
             "merges": 764, "block_size": 256, "batch_size": 64, "steps": 30000, "lr": 1e-3, "copies": 8,
             "qa_fraction": 0.0},
    # The shipped mini-llama, fp16: 8.7 MB. Of the variants tried (qa_fraction 0.5 / 0.7, 6 / 8 layers;
    # BENCHMARKS.md, eighth round) this one answered most held-out questions.
    "mini-qa": {"model": {"hidden_size": 256, "intermediate_size": 576, "num_hidden_layers": 6,
                          "num_attention_heads": 8, "num_key_value_heads": 4},
                "merges": 764, "block_size": 256, "batch_size": 128, "steps": 5000, "lr": 1e-3, "copies": 96,
                "qa_fraction": 0.7},
    "test": {"model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "num_key_value_heads": 1},
             "merges": 60, "block_size": 32, "batch_size": 4, "steps": 20, "lr": 3e-3, "copies": 1,
             "qa_fraction": 0.0},
}
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3, as dashdiff.testing


def tokenizer_text(world: T.World, plain: bool = False) -> str:
    """The text the merges are learned on: the corpus once, one prompt of each task and, with
    ``plain``, the plain form of each task's first training question."""
    from commonsense_data import generate_prompt

    tasks = T.tasks(world)
    prompts = [generate_prompt(split["train"][0]["instruction"], "", split["train"][0]["output"])
               for split in tasks.values()]
    if plain:
        prompts += [T.plain_question(split["train"][0]) for split in tasks.values()]
    return "\n".join(T.corpus(world, copies=1) + prompts)


def build_tokenizer(world: T.World, merges: int, plain: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE ``PreTrainedTokenizerFast`` (4 specials + 256 bytes + ``merges``)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    # dashdiff.testing's deterministic helpers (private: kept in step with its own tokenizers).
    from dashdiff.testing.models import _byte_alphabet, _learn_merges

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = [list(w) for w, _ in pre.pre_tokenize_str(tokenizer_text(world, plain))]
    learned = _learn_merges(words, merges)
    symbols = list(SPECIALS) + _byte_alphabet() + [a + b for a, b in learned]
    vocab = {s: i for i, s in enumerate(symbols)}
    if len(vocab) != len(symbols):
        raise RuntimeError("duplicate symbol in the mini-llama vocab")
    backend = Tokenizer(BPE(vocab=vocab, merges=learned, unk_token="<unk>", fuse_unk=False))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>", padding_side="left",
                                   model_max_length=2048)


def build_model(preset: dict[str, Any], vocab_size: int) -> LlamaForCausalLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=512, unk_token_id=0, bos_token_id=1,
                      eos_token_id=2, pad_token_id=3, tie_word_embeddings=False, attention_dropout=0.0,
                      **preset["model"])
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = 3
    return model


def count_parameters(preset: dict[str, Any]) -> int:
    with torch.device("meta"):
        model = build_model(preset, len(SPECIALS) + 256 + preset["merges"])
    return sum(p.numel() for p in model.parameters())


def _share(fraction: float, others: int) -> int:
    """How many documents make ``fraction`` of a stream that has ``others`` other documents."""
    return round(fraction * others / max(1e-9, 1 - fraction))


def token_stream(world: T.World, tok: Any, copies: int, task_fraction: float, seed: int,
                 qa_fraction: float = 0.0) -> torch.Tensor:
    """All training tokens: corpus documents (and optionally plain questions and task prompts),
    shuffled, EOS-separated. The fractions count documents."""
    from commonsense_data import generate_prompt

    docs = T.corpus(world, copies=copies)
    if qa_fraction > 0:
        docs = docs + T.plain_questions(world, _share(qa_fraction, len(docs)), seed)
        C.step_rng(seed, 0, "qa-mix").shuffle(docs)
    if task_fraction > 0:
        recs = [r for split in T.tasks(world).values() for r in split["train"]]
        n = min(len(recs), _share(task_fraction, len(docs)))
        rng = C.step_rng(seed, 0, "task-mix")
        docs = docs + [generate_prompt(r["instruction"], "", r["output"]) for r in rng.sample(recs, n)]
        rng.shuffle(docs)
    ids: list[int] = []
    for d in docs:
        ids += tok(d)["input_ids"] + [tok.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def fact_recall(model: Any, tok: Any, world: T.World) -> dict[str, float]:
    """Greedy completion of canonical fact prefixes (town, age, pet species): fraction correct."""
    device = next(model.parameters()).device
    probes = {"town": [], "age": [], "pet": []}
    for p in world.people.values():
        probes["town"].append((f"{p.name} lives in", f" {p.town}."))
        probes["age"].append((f"{p.name} is", f" {p.age} years old."))
        probes["pet"].append((f"{p.name} has a {p.pet_colour}", f" {p.pet_species} called {p.pet}."))
    out = {}
    model.eval()
    for name, pairs in probes.items():
        right = 0
        for prompt, answer in pairs:
            enc = tok(prompt, return_tensors="pt").to(device)
            n_new = len(tok(answer, add_special_tokens=False)["input_ids"])
            seq = model.generate(**enc, max_new_tokens=n_new, do_sample=False, num_beams=1,
                                 pad_token_id=tok.pad_token_id)
            right += tok.decode(seq[0, enc["input_ids"].shape[1]:], skip_special_tokens=True) == answer
        out[name] = right / len(pairs)
    return out


@torch.no_grad()
def qa_accuracy(model: Any, tok: Any, world: T.World, limit: int | None = None) -> dict[str, float]:
    """Greedy answers to the *test-split* questions of each task in the plain question form
    (``... Answer:`` -> ``(k)`` or ``yes`` / ``no``): the fraction right, per task (first ``limit``)."""
    device = next(model.parameters()).device
    model.eval()
    out = {}
    for task, split in T.tasks(world).items():
        recs = split["test"][:limit] if limit else split["test"]
        if not recs:
            continue
        docs = [T.plain_question(r) for r in recs]
        prompts = [d[: d.rindex("Answer:") + len("Answer:")] for d in docs]
        answers = [d[len(p):] for d, p in zip(docs, prompts)]  # " (2) fish" or " yes"
        wanted = [a[: a.index(")") + 1] if a.startswith(" (") else a for a in answers]
        right = 0
        for i in range(0, len(prompts), 64):
            enc = tok(prompts[i:i + 64], return_tensors="pt", padding=True).to(device)
            seq = model.generate(**enc, max_new_tokens=4, do_sample=False, num_beams=1, pad_token_id=tok.pad_token_id)
            for row, want in zip(seq[:, enc["input_ids"].shape[1]:], wanted[i:i + 64]):
                right += tok.decode(row, skip_special_tokens=True).startswith(want)
        out[task] = right / len(recs)
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--preset", choices=tuple(PRESETS), default="mini")
    p.add_argument("--seed", type=int, default=0, help="initialisation and training draws")
    p.add_argument("--world_seed", type=int, default=0, help="which text world")
    p.add_argument("--n_people", type=int, default=24)
    p.add_argument("--copies", type=int, default=None, help="shuffled copies of the facts in the corpus")
    p.add_argument("--task_fraction", type=float, default=0.0,
                   help="fraction of the stream made of training-split task prompts (default 0: facts only)")
    p.add_argument("--qa_fraction", type=float, default=None,
                   help="fraction of the stream made of plain training-split questions (default: the preset's)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's)")
    p.add_argument("--block_size", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--learning_rate", type=float, default=None)
    p.add_argument("--mixed_precision", choices=("no", "bf16"), default="bf16", help="bf16 autocast on CUDA")
    p.add_argument("--device", default=None)
    p.add_argument("--fixed_batch", action="store_true", help="train on one batch (a check that the loss falls)")
    C.add_chunk_args(p)
    args = p.parse_args(argv)
    C.check_chunk_args(p, args)
    C.check_positive(p, args, ("max_steps", "chunk_steps", "block_size", "batch_size", "copies", "layers"))
    for flag in ("task_fraction", "qa_fraction"):
        value = getattr(args, flag)
        if value is not None and not 0 <= value < 1:
            p.error(f"--{flag} must be in [0, 1)")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = C.setup_device(args)
    preset = PRESETS[args.preset]
    if args.layers:
        preset = {**preset, "model": {**preset["model"], "num_hidden_layers": args.layers}}
    world = T.World(args.world_seed, args.n_people)
    qa_fraction = preset["qa_fraction"] if args.qa_fraction is None else args.qa_fraction
    tok = build_tokenizer(world, preset["merges"], plain=qa_fraction > 0)
    cfg = {"preset": args.preset, "seed": args.seed, "world_seed": args.world_seed, "n_people": args.n_people,
           "copies": args.copies or preset["copies"], "task_fraction": args.task_fraction,
           "qa_fraction": qa_fraction,
           "layers": preset["model"]["num_hidden_layers"],
           "block_size": args.block_size or preset["block_size"], "batch_size": args.batch_size or preset["batch_size"],
           "max_steps": args.max_steps or preset["steps"], "lr": args.learning_rate or preset["lr"],
           "fixed_batch": args.fixed_batch, "mixed_precision": args.mixed_precision, "vocab_size": len(tok)}
    stream = token_stream(world, tok, cfg["copies"], args.task_fraction, args.seed, cfg["qa_fraction"])
    if len(stream) <= cfg["block_size"] + 1:
        raise ValueError(f"the corpus has only {len(stream)} tokens; use a smaller --block_size")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = build_model(preset, len(tok))
    model.to(device)
    steps = cfg["max_steps"]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg["lr"], betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, C.lr_lambda(min(1000, steps // 10 + 1), steps))
    bs, blk = cfg["batch_size"], cfg["block_size"]
    offsets = torch.arange(blk + 1)

    def loss_fn(step: int) -> torch.Tensor:
        rng = C.step_rng(args.seed, 0 if args.fixed_batch else step, "windows")
        starts = torch.tensor([rng.randrange(len(stream) - blk - 1) for _ in range(bs)])
        win = stream[starts[:, None] + offsets].to(device)
        ctx = (torch.autocast("cuda", dtype=torch.bfloat16)
               if device.type == "cuda" and args.mixed_precision == "bf16" else contextlib.nullcontext())
        with ctx:
            logits = model(input_ids=win[:, :-1]).logits.float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), win[:, 1:].reshape(-1))

    state, done = C.train_chunked(args=args, folder=args.output_dir / "llama", modules={"model": model},
                                  optimizer=opt, scheduler=sched, loss_fn=loss_fn, config=cfg,
                                  max_steps=steps, device=device)
    info: dict[str, Any] = {"model": "mini-llama", "steps": state.step, "seconds": round(state.seconds, 3),
                            "chunks": state.chunks, "final_loss": C.mean_tail(state.losses),
                            "device": C.device_info(device), "config": cfg, "tokens": len(stream)}
    if done:
        info["fact_recall"] = fact_recall(model, tok, world)
        info["qa_accuracy"] = qa_accuracy(model, tok, world)
        info["parameters"] = sum(p.numel() for p in model.parameters())
        info["versions"] = C.versions()
        model.to(torch.float16)

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            info["safetensors_bytes"] = C.safetensors_bytes(tmp)
            C.write_json_atomic(tmp / "pretrain_info.json", info)

        final = C.save_folder_atomic(args.output_dir / "model", write)
        print(f"model saved: {final} ({info['safetensors_bytes'] / 1e6:.2f} MB); fact recall {info['fact_recall']}; "
              f"test questions {info['qa_accuracy']}")
    return info


if __name__ == "__main__":
    main()
