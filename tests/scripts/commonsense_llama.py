"""The LLM-Adapters data code as the scripts load it, the commonsense fixture folder, and a tiny random
Llama with a tokenizer trained on the fixture prompts (a module fixture: each test module that imports
it builds its own), shared by test_commonsense_data.py and test_commonsense_eval.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launch_utils import ROOT, load_script

# train/commonsense_data.py: the LLM-Adapters data code, next to its scripts
_data = load_script("train/commonsense_data.py", reuse=True)
DATASETS, evaluate, extract_answer = _data.DATASETS, _data.evaluate, _data.extract_answer
generate_prompt, load_records, tokenize_example = _data.generate_prompt, _data.load_records, _data.tokenize_example

FIXTURES = ROOT / "tests" / "fixtures" / "commonsense"


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
