"""train/commonsense_eval.py end to end on a tiny random Llama: the parser, two datasets with a PEFT
adapter, every dataset on the reserved tiny Llama, and a dashdiff adapter file (the data code it
uses: test_commonsense_data.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from commonsense_llama import DATASETS, FIXTURES, load_records
from commonsense_llama import tiny_model_dir  # noqa: F401  (a fixture: pytest finds it by this name)
from launch_utils import ROOT


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
