"""train/commonsense_dash.py end to end on a tiny random Llama with the LLM-Adapters fixtures, and
LoraDashCallback inside a transformers Trainer.

Most runs go in-process through the script's ``main(args)``; two go through ``accelerate launch``
with two real CPU processes. One subprocess that never imports dashdiff loads every export with
stock PEFT / transformers (tests/scripts/stock_load.py).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dashdiff import training as T
from launch_utils import accelerate_launch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "commonsense"
TRAIN = FIXTURES / "train.json"
SCRIPT = "train/commonsense_dash.py"
KINDS = ("lora", "dash", "autolora")

# 16 records, 2 held out: 14 train -> 7 micro-batches of 2 per epoch -> 4 optimizer steps of 2
# micro-batches (the last one short), 8 steps in 2 epochs. LoRA-Dash launches after step 3;
# checkpoints at 2 (pre-launch, mid-epoch), 4, 6 (dash phase, mid-epoch), 8.
COMMON = ["--val_set_size", "2", "--batch_size", "4", "--micro_batch_size", "2", "--num_epochs", "2",
          "--lora_r", "4", "--lora_alpha", "8", "--learning_rate", "1e-2", "--warmup_steps", "2",
          "--dash_warmup_steps", "3", "--eval_step", "4", "--save_step", "2", "--checkpoints_total_limit", "10",
          "--logging_steps", "100", "--autolora_beta_lr", "0.05"]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the script is executed
    spec.loader.exec_module(mod)
    return mod


script = _load("commonsense_dash", ROOT / SCRIPT)
cs_data = sys.modules["commonsense_data"]  # train/commonsense_data.py, as the script imported it


def _reset_accelerate() -> None:
    # accelerate keeps one configuration per process: every in-process run starts from scratch.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    yield
    _reset_accelerate()


def cli(base: Path, out: Path, kind: str, *extra: str) -> list[str]:
    # A method's own options are refused with another --adapter_name: give each run only its own
    # (looked up by destination: COMMON spells some flags the LLM-Adapters way, e.g. --autolora_beta_lr).
    common = []
    options = script.build_parser()._option_string_actions
    for flag, value in zip(COMMON[::2], COMMON[1::2]):
        owner = script.METHOD_OPTIONS.get(options[flag].dest)
        if owner in (None, kind):
            common += [flag, value]
    return ["--base_model", str(base), "--data_path", str(TRAIN), "--output_dir", str(out),
            "--adapter_name", kind, *common, *extra]


def run_main(argv: list[str]) -> dict:
    try:
        return script.main(script.parse_args(argv))
    finally:
        _reset_accelerate()


def steps(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "dashdiff_steps.jsonl").read_text().splitlines()]


def step_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in steps(out) if r.get("phase") == "train" and "loss" in r}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dashdiff.testing import resolve_model

    return Path(resolve_model("tiny-llama", cache_dir=str(tmp_path_factory.mktemp("cache"))))


@pytest.fixture(scope="module")
def runs(base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One in-process run per adapter type; LoRA-Dash also exports the merged model."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for kind in KINDS:
        out[kind] = root / kind
        extra = ["--export_merged"] if kind == "dash" else []
        record = run_main(cli(base, out[kind], kind, *extra))
        assert record["status"] == "done" and record["num_processes"] == 1
    return out


# --------------------------------------------------------------------------- arguments


def test_defaults_are_the_published_recipe_and_target_lists_parse() -> None:
    args = script.parse_args(["--base_model", "m", "--data_path", "d.json", "--output_dir", "o"])
    assert (args.rank, args.lora_alpha, args.learning_rate, args.num_epochs) == (32, 64, 2e-4, 3)
    assert (args.batch_size, args.micro_batch_size, args.warmup_steps, args.lora_dropout) == (16, 4, 100, 0.05)
    assert (args.cutoff_len, args.val_set_size, args.method, args.prompt_template) == (256, 120, "dash", "llm_adapters")
    assert args.target_modules == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    assert args.train_on_inputs is True and args.dash_directions == 8
    assert args.dash_warmup_steps == math.ceil(100 / (16 // 4))  # 100 training micro-batches
    base = ["--base_model", "m", "--data_path", "d.json", "--output_dir", "o"]
    a = script.parse_args([*base, "--target_modules", '["q_proj","k_proj"]', "--train_on_inputs", "False",
                           "--batch_size", "16", "--micro_batch_size", "16"])
    assert a.target_modules == ["q_proj", "k_proj"] and a.train_on_inputs is False and a.dash_warmup_steps == 100
    assert script.parse_args([*base, "--target_modules", "q_proj, v_proj"]).target_modules == ["q_proj", "v_proj"]
    with pytest.raises(SystemExit):
        script.parse_args([*base, "--batch_size", "10", "--micro_batch_size", "4"])


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def stock(runs: dict[str, Path], base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Every export loaded by stock transformers + PEFT in one process that never imports dashdiff."""
    tmp = tmp_path_factory.mktemp("stock")
    ids = torch.tensor([[1, 40, 80, 120, 200, 300, 420, 7, 9, 2], [1, 5, 6, 7, 8, 100, 101, 102, 103, 104]])
    save_file({"llama.input_ids": ids}, tmp / "inputs.safetensors")
    tasks = [{"id": k, "kind": "peft", "base": str(base), "adapter": str(runs[k])} for k in KINDS]
    tasks.append({"id": "merged", "kind": "causal_lm", "path": str(runs["dash"] / "merged")})
    job = {"inputs": str(tmp / "inputs.safetensors"), "out": str(tmp / "out.safetensors"), "tasks": tasks}
    (tmp / "job.json").write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "stock_load.py"), str(tmp / "job.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {**load_file(tmp / "out.safetensors"), "input_ids": ids}


def _dashdiff_logits(base: Path, state_file: Path, ids: torch.Tensor) -> torch.Tensor:
    import dashdiff
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    dashdiff.load_adapter(model, state_file)
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("kind", KINDS)
def test_train_export_evaluate(kind: str, runs: dict[str, Path], stock: dict, base: Path, tmp_path: Path) -> None:
    out = runs[kind]
    record = json.loads((out / "dashdiff_run.json").read_text())
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (out / "adapter_model.safetensors").is_file() and (out / "dashdiff_adapter.safetensors").is_file()
    ranks = {cfg["r"], *cfg.get("rank_pattern", {}).values()}
    if kind == "dash":  # exported at rank r + s; the record says so for serving stacks
        assert ranks == {4 + 8} and record["export"]["max_rank"] == 12
        assert record["results"]["dash_launch_step"] == 3
    elif kind == "lora":
        assert ranks == {4}
    else:
        found = json.loads((out / "autolora_ranks.json").read_text())
        assert record["results"]["autolora_ranks"] and max(ranks) <= 4
        assert {r["name"]: r["rank"] for r in found["layers"]} == record["results"]["autolora_ranks"]
        assert any(r["phase"] == "search" for r in steps(out))
    assert record["results"]["train_steps"] == 8  # AutoLoRA: the retrain, on all 14 training records

    # stock PeftModel.from_pretrained on a fresh base == dashdiff's own model from the full state
    ours = _dashdiff_logits(base, out / "dashdiff_adapter.safetensors", stock["input_ids"])
    torch.testing.assert_close(stock[f"{kind}/logits"], ours, rtol=0, atol=1e-5)
    if kind == "dash":
        torch.testing.assert_close(stock["merged/logits"], ours, rtol=0, atol=1e-4)
        assert (out / "merged" / "tokenizer_config.json").is_file()  # the merged folder is self-contained

    evaluator = _load("commonsense_eval", ROOT / "train" / "commonsense_eval.py")
    datasets = "all" if kind == "dash" else "boolq"
    payload = evaluator.main(evaluator.parse_args([
        "--dataset", datasets, "--data_dir", str(FIXTURES), "--base_model", str(base), "--lora_weights", str(out),
        "--limit", "1", "--max_new_tokens", "3", "--output_dir", str(tmp_path / "eval"), "--no_progress"]))
    assert payload["num_datasets"] == (8 if kind == "dash" else 1)
    # The evaluator ran the *trained* adapter: each answer (one record per dataset) equals a beam
    # search written out here on the export loaded by stock PEFT, and the base model answers differently
    # somewhere; each accuracy is that record's exact match.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    RESPONSE_MARKER, generate_prompt = cs_data.RESPONSE_MARKER, cs_data.generate_prompt

    tok = AutoTokenizer.from_pretrained(base)
    tok.padding_side = "left"
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(out)).eval()
    plain = AutoModelForCausalLM.from_pretrained(base).eval()

    def answer(model, record: dict) -> str:
        enc = tok([generate_prompt(record["instruction"], record.get("input"), None, "llm_adapters", "eval")],
                  return_tensors="pt")
        with torch.no_grad():
            seq = model.generate(**enc, num_beams=4, do_sample=False, max_new_tokens=3,
                                 pad_token_id=tok.pad_token_id)
        return tok.decode(seq[0], skip_special_tokens=True).split(RESPONSE_MARKER)[-1].strip()

    differs = False
    for name, acc in payload["accuracy"].items():
        (sample,) = json.loads((tmp_path / "eval" / f"{name}.json").read_text())
        assert sample["output_pred"] == answer(adapted, sample), name
        differs |= sample["output_pred"] != answer(plain, sample)
        assert acc == float(sample["pred"] == sample["answer"]), name
    assert differs or kind != "dash"  # (one record of one data set can coincide for the others)


def test_loss_goes_down_and_only_response_tokens_count(base: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    generate_prompt = cs_data.generate_prompt

    records = json.loads(TRAIN.read_text())[:4]
    data = tmp_path / "memo.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "memo"
    # lm_head is adapted too: the random model's frozen head after RMSNorm caps the logits near ±1.3,
    # so without it no adapter could take the loss far below ln(460).
    run_main(["--base_model", str(base), "--data_path", str(data), "--output_dir", str(out), "--val_set_size", "0",
              "--batch_size", "4", "--micro_batch_size", "4", "--num_epochs", "25", "--learning_rate", "2e-2",
              "--warmup_steps", "0", "--lora_r", "8", "--lora_alpha", "16", "--dash_warmup_steps", "5",
              "--target_modules", "q_proj,v_proj,up_proj,down_proj,lm_head", "--train_on_inputs", "false",
              "--save_step", "1000", "--logging_steps", "1000"])
    rows = [r for r in steps(out) if "loss" in r]
    assert len(rows) == 25 and rows[-1]["loss"] < 0.1 * rows[0]["loss"]

    # The loss counts exactly the response tokens (and EOS): an independent count from the two prompts ...
    tok = AutoTokenizer.from_pretrained(base)
    full = [tok(generate_prompt(r["instruction"], "", r["output"]))["input_ids"] + [tok.eos_token_id] for r in records]
    prompt = [tok(generate_prompt(r["instruction"], "", ""))["input_ids"] for r in records]
    response = [list(range(len(p), len(f))) for f, p in zip(full, prompt)]
    assert all(row["tokens"] == sum(map(len, response)) for row in rows)
    assert sum(map(len, response)) < sum(len(f) - 1 for f in full)
    # ... and step 1's loss (LoRA B = 0: the base model) is the mean cross-entropy over those tokens only.
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    total = 0.0
    with torch.no_grad():
        for ids, pos in zip(full, response):
            logp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
            total -= sum(float(logp[p - 1, ids[p]]) for p in pos)
    assert rows[0]["loss"] == pytest.approx(total / sum(map(len, response)), abs=1e-5)


def test_two_processes_equal_one_process(runs: dict[str, Path], base: Path, tmp_path: Path) -> None:
    """2 processes x micro-batch 2 == 1 process accumulating 2 micro-batches of 2: same directions,
    same adapter (dropout on: the masks are a function of the step and micro-batch index)."""
    out = tmp_path / "ddp"
    accelerate_launch(SCRIPT, *cli(base, out, "dash"), processes=2)
    record = json.loads((out / "dashdiff_run.json").read_text())
    assert record["num_processes"] == 2 and record["args"]["lora_dropout"] == 0.05
    launch = [r for r in steps(out) if r.get("event") == "dash_launch"]
    assert len(launch) == 1 and launch[0]["step"] == 3 and launch[0]["num_processes"] == 2
    digests = launch[0]["direction_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    one = [r for r in steps(runs["dash"]) if r.get("event") == "dash_launch"][0]
    assert one["direction_digests"] == [digests[0]]  # the 1-process run selected the same directions

    state1 = load_file(runs["dash"] / "dashdiff_adapter.safetensors")
    state2 = load_file(out / "dashdiff_adapter.safetensors")
    for key in (k for k in state1 if k.endswith("dash_record.indices")):
        assert torch.equal(state1[key], state2[key]), key
    assert max_diff(load_file(runs["dash"] / "adapter_model.safetensors"),
                    load_file(out / "adapter_model.safetensors")) <= 1e-5
    l1, l2 = step_losses(runs["dash"]), step_losses(out)
    assert l1.keys() == l2.keys() and max(abs(l1[k] - l2[k]) for k in l1) <= 1e-5


def test_autolora_two_processes(runs: dict[str, Path], base: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp_autolora"
    accelerate_launch(SCRIPT, *cli(base, out, "autolora"), processes=2)
    record = json.loads((out / "dashdiff_run.json").read_text())
    one = json.loads((runs["autolora"] / "dashdiff_run.json").read_text())
    assert record["num_processes"] == 2 and record["results"]["search_steps"] == one["results"]["search_steps"]
    assert record["results"]["autolora_ranks"] == one["results"]["autolora_ranks"]
    assert max_diff(load_file(runs["autolora"] / "adapter_model.safetensors"),
                    load_file(out / "adapter_model.safetensors")) <= 1e-5


def test_nan_on_one_process_stops_both_with_one_message(base: Path, tmp_path: Path) -> None:
    """Only rank 1's loss is NaN (its 3rd training micro-batch, optimizer step 3): the verdict is
    reduced, so both processes stop before that step's update with the same message, instead of
    rank 1 raising while rank 0 waits forever in the gradient all-reduce (issue 15)."""
    out = tmp_path / "nan"
    proc = accelerate_launch(str(ROOT / "tests" / "scripts" / "commonsense_nan.py"), *cli(base, out, "lora"),
                             processes=2)
    stopped = [line for line in proc.stdout.splitlines() if line.startswith("STOPPED ")]
    assert len(stopped) == 2 and stopped[0] == stopped[1], proc.stdout[-3000:]
    assert "loss is nan at train step 3" in stopped[0] and "checkpoint-2" in stopped[0]
    assert "--resume_from_checkpoint" in stopped[0]  # the script words the advice, with flags it has
    record = json.loads((out / "dashdiff_run.json").read_text())
    assert record["status"] == "stopped: non-finite loss" and record["last_checkpoint"].endswith("checkpoint-2")
    assert not (out / "adapter_model.safetensors").exists()


def test_nan_in_the_autolora_search_stops_the_run(base: Path, tmp_path: Path, monkeypatch) -> None:
    """The search's loss passes are guarded too (issue 15: the commonsense search had no guard and
    trained on)."""
    real = script.summed_token_loss
    second_step = T.step_seed(42, 1, 0)  # the seed of search step 2's first training micro-batch

    def flaky(model, batch):
        loss = real(model, batch)
        return loss * float("nan") if batch.get("seed") == second_step else loss

    monkeypatch.setattr(script, "summed_token_loss", flaky)
    out = tmp_path / "search_nan"
    with pytest.raises(T.NonFiniteLossError, match=r"loss is nan at search step 2.*checkpoint-search-1"):
        run_main(cli(base, out, "autolora", "--checkpointing_steps", "1"))
    record = json.loads((out / "dashdiff_run.json").read_text())
    assert record["status"] == "stopped: non-finite loss"
    assert not (out / "adapter_model.safetensors").exists()
    state = load_file(out / "checkpoint-search-1" / "dashdiff_adapter.safetensors")
    assert all(torch.isfinite(t.float()).all() for t in state.values())


@pytest.mark.parametrize("checkpoint", ["checkpoint-2", "checkpoint-6"])
def test_resume_is_exact(checkpoint: str, runs: dict[str, Path], base: Path, tmp_path: Path) -> None:
    """Resume mid-epoch before the launch (step 2 of 4 in epoch 0) and after it (step 6: epoch 1,
    dash phase): every later step's loss and the final adapter equal the uninterrupted run's."""
    full = runs["dash"]
    info = json.loads((full / checkpoint / "dashdiff_checkpoint.json").read_text())
    assert info["step"] == int(checkpoint.split("-")[1])
    out = tmp_path / "resumed"
    run_main(cli(base, out, "dash", "--resume_from_checkpoint", str(full / checkpoint)))
    a, b = step_losses(full), step_losses(out)
    later = [s for s in a if s > info["step"]]
    assert sorted(b) == later
    assert max(abs(a[s] - b[s]) for s in later) <= 1e-6
    launches = [r["step"] for r in steps(out) if r.get("event") == "dash_launch"]
    assert launches == ([3] if info["step"] < 3 else [])
    assert max_diff(load_file(full / "dashdiff_adapter.safetensors"),
                    load_file(out / "dashdiff_adapter.safetensors")) <= 1e-6


def test_autolora_resume_in_the_search_is_exact(runs: dict[str, Path], base: Path, tmp_path: Path) -> None:
    full = runs["autolora"]
    out = tmp_path / "resumed"
    run_main(cli(base, out, "autolora", "--resume_from_checkpoint", str(full / "checkpoint-search-2")))
    search = [[(r["step"], r["loss"], r["val_loss"]) for r in steps(d) if r.get("phase") == "search" and "loss" in r]
              for d in (full, out)]
    assert search[1] == search[0][2:]  # step 3 of 3 redone identically
    record = [json.loads((d / "dashdiff_run.json").read_text())["results"] for d in (full, out)]
    assert record[0]["autolora_ranks"] == record[1]["autolora_ranks"]
    assert max_diff(load_file(full / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")) <= 1e-6
    # as in the DreamBooth script (issue 15): β's Adam moments are accelerate's second optimizer file,
    # and a retrain checkpoint records the ranks the search found
    assert (full / "checkpoint-search-2" / "optimizer_1.bin").is_file()
    assert not (full / "checkpoint-search-2" / "extra_state.pt").exists()
    assert T.read_checkpoint_info(full / "checkpoint-2")["autolora_ranks"] == record[0]["autolora_ranks"]


def test_fp16_skipped_steps_do_not_count_toward_the_dash_warmup(base: Path, tmp_path: Path, monkeypatch) -> None:
    """Steps 1 and 3 overflow under a real (CPU) fp16 grad scaler: with a warm-up of 2 the launch
    comes after step 4 (2 + 2 skipped), not after step 2; the step log marks the skipped steps."""
    import accelerate
    from fp16_skips import with_overflowing_scaler

    made: list = []
    monkeypatch.setattr(accelerate, "Accelerator", with_overflowing_scaler(accelerate.Accelerator, (1, 3), made))
    out = tmp_path / "fp16"
    run_main(cli(base, out, "dash", "--dash_warmup_steps", "2", "--max_train_steps", "5", "--val_set_size", "0",
                 "--save_step", "100"))
    assert [a.scaler.skipped for a in made] == [2]
    rows = [r for r in steps(out) if r.get("phase") == "train" and "loss" in r]
    assert [r["skipped"] for r in rows] == [True, False, True, False, False]
    assert [r["step"] for r in steps(out) if r.get("event") == "dash_launch"] == [4]


# --------------------------------------------------------------------------- bad input


def test_bad_data_file_names_the_record(base: Path, tmp_path: Path) -> None:
    good = {"instruction": "q", "input": "", "output": "the correct answer is true", "answer": "true"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([good, good, {"instruction": "q", "input": ""}]))
    with pytest.raises(ValueError, match=r"bad\.json: record 2 is missing field 'output'"):
        run_main(["--base_model", str(base), "--data_path", str(bad), "--output_dir", str(tmp_path / "o1")])
    bad.write_text(json.dumps({"instruction": "q", "output": "o"}))
    with pytest.raises(ValueError, match="expected a JSON list"):
        run_main(["--base_model", str(base), "--data_path", str(bad), "--output_dir", str(tmp_path / "o2")])
    with pytest.raises(ValueError, match="leaves no training data"):
        run_main(["--base_model", str(base), "--data_path", str(TRAIN), "--output_dir", str(tmp_path / "o3"),
                  "--val_set_size", "16"])


def test_output_dir_holding_another_run(runs: dict[str, Path], base: Path, tmp_path: Path) -> None:
    from dashdiff.training import TrainingError

    with pytest.raises(TrainingError, match="holds another run's files"):
        run_main(cli(base, runs["lora"], "dash"))
    with pytest.raises(TrainingError, match="same arguments.*--resume_from_checkpoint latest"):
        run_main(cli(base, runs["lora"], "lora"))
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(TrainingError, match="not empty"):
        run_main(cli(base, stray, "lora"))
    # Resuming with settings that change the trajectory is refused, naming them.
    with pytest.raises(TrainingError, match="learning_rate"):
        run_main(cli(base, tmp_path / "r", "dash", "--learning_rate", "5e-3", "--resume_from_checkpoint",
                     str(runs["dash"] / "checkpoint-2")))


def test_quantized_base_is_refused_for_dash(base: Path, tmp_path: Path) -> None:
    from torch import nn

    from dashdiff.testing import tiny_llama

    # A pre-quantized checkpoint: refused from its config, before the weights are loaded.
    quant = tmp_path / "quantized"
    quant.mkdir()
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quant / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TypeError, match="quantized .bitsandbytes.*--adapter_name lora"):
        run_main(cli(quant, tmp_path / "o", "dash"))

    # A non-dense linear reaching the adapter injection: dashdiff's TypeError comes through unchanged.
    class FakeQuantLinear(nn.Linear):
        pass

    model = tiny_llama()
    old = model.model.layers[1].mlp.up_proj
    model.model.layers[1].mlp.up_proj = FakeQuantLinear(old.in_features, old.out_features, bias=False)
    args = script.parse_args(cli(base, tmp_path / "o", "dash"))
    with pytest.raises(TypeError, match=r"layers\.1\.mlp\.up_proj is a .*FakeQuantLinear, not a dense"):
        script.add_adapter(model, script.adapter_config(args, "dash"), 0)


def test_adapter_for_another_base_model_names_shapes(runs: dict[str, Path], tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other_base"
    LlamaForCausalLM(LlamaConfig(vocab_size=460, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    evaluator = _load("commonsense_eval", ROOT / "train" / "commonsense_eval.py")
    with pytest.raises(RuntimeError, match=r"size mismatch.*torch\.Size\(\[12, 64\]\).*torch\.Size\(\[12, 32\]\)"):
        evaluator._attach_adapter(LlamaForCausalLM.from_pretrained(other), str(runs["dash"]))
    with pytest.raises(ValueError, match=r"shape \(4, 64\) in the file but \(4, 32\) in the model"):
        evaluator._attach_adapter(LlamaForCausalLM.from_pretrained(other),
                                  str(runs["dash"] / "dashdiff_adapter.safetensors"))


# --------------------------------------------------------------------------- checkpoints and folders
# (issue 13; the DreamBooth script's cases and the kill-mid-save trials: tests/test_checkpoint_safety.py)


def _snapshot(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
            for p in sorted(folder.rglob("*"))}


def test_crafted_extra_state_is_not_executed_and_the_refused_resume_changes_nothing(
        runs: dict[str, Path], base: Path, tmp_path: Path) -> None:
    """extra_state.pt used to be read with weights_only=False: a crafted one ran its payload."""
    import shutil

    from dashdiff.training import CHECKPOINT_STATE, TrainingError

    out = tmp_path / "run"
    shutil.copytree(runs["dash"], out)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    ckpt = out / "checkpoint-6"
    torch.save({"scheduler": Payload()}, ckpt / "extra_state.pt")
    info = json.loads((ckpt / CHECKPOINT_STATE).read_text())
    info["files"]["extra_state.pt"] = (ckpt / "extra_state.pt").stat().st_size  # the attacker fixes the manifest
    (ckpt / CHECKPOINT_STATE).write_text(json.dumps(info))
    before = _snapshot(out)
    with pytest.raises(TrainingError, match=r"extra_state\.pt: refused to load it.*nothing was executed"):
        run_main(cli(base, out, "dash", "--resume_from_checkpoint", "checkpoint-6"))
    assert not marker.exists()
    assert _snapshot(out) == before  # the step log not cut, the record not flipped to "running"
    # the genuine file is plain data: it loads with weights_only=True
    assert "scheduler" in torch.load(runs["dash"] / "checkpoint-6" / "extra_state.pt", weights_only=True)


def test_resume_from_the_last_checkpoint_trains_nothing_more(runs: dict[str, Path], base: Path,
                                                             tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(runs["dash"], out)
    record = run_main(cli(base, out, "dash", "--export_merged", "--resume_from_checkpoint", "latest"))
    assert record["status"] == "done" and record["results"]["train_steps"] == 8
    assert step_losses(out) == step_losses(runs["dash"])  # no step 9
    assert max_diff(load_file(runs["dash"] / "dashdiff_adapter.safetensors"),
                    load_file(out / "dashdiff_adapter.safetensors")) == 0


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(base: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    from dashdiff import safeio
    from dashdiff.training import CheckpointWriteError, list_checkpoints, validate_checkpoint

    real, calls = safeio._save_file, {"n": 0}

    def full_disk(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # checkpoint-4's adapter state
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safeio, "_save_file", full_disk)
    out = tmp_path / "run"
    with pytest.raises(CheckpointWriteError, match=r"checkpoint-4: the disk is full.*intact \(checkpoint-2\)"):
        run_main(cli(base, out, "lora", "--checkpoints_total_limit", "1"))
    assert [c.path.name for c in list_checkpoints(out)] == ["checkpoint-2"]
    assert not any("checkpoint-4" in p.name for p in out.iterdir())  # no partial folder left
    assert validate_checkpoint(out / "checkpoint-2")["step"] == 2
    record = json.loads((out / "dashdiff_run.json").read_text())
    assert record["status"] == "stopped: checkpoint write failed" and record["last_checkpoint"].endswith("checkpoint-2")


def test_overwrite_with_a_bad_data_file_deletes_nothing(runs: dict[str, Path], base: Path, tmp_path: Path) -> None:
    import shutil

    from dashdiff.training import TrainingError

    out = tmp_path / "run"
    shutil.copytree(runs["lora"], out)
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    before = _snapshot(out)
    with pytest.raises(TrainingError, match="bad.json: not valid JSON"):
        run_main(cli(base, out, "lora", "--overwrite_output_dir", "--data_path", str(bad)))
    assert _snapshot(out) == before


# --------------------------------------------------------------------------- Trainer callback


def test_callback_launches_once_per_optimizer_step_in_trainer(base: Path, tmp_path: Path, monkeypatch) -> None:
    """gradient_accumulation_steps=2: the warm-up counts optimizer steps, not micro-batches; a
    Trainer checkpoint taken before the launch resumes to the same launch and the same weights; an
    fp16-skipped step (Trainer's default fused AdamW skips inside its kernel) does not count."""
    import warnings

    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    import dashdiff
    load_records, tokenize_example = cs_data.load_records, cs_data.tokenize_example

    tok = AutoTokenizer.from_pretrained(base)
    data = [tokenize_example(tok, r, cutoff_len=128) for r in load_records(TRAIN)[:8]]

    class Probe(TrainerCallback):
        def __init__(self) -> None:
            self.launched: dict[int, bool] = {}

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.launched[state.global_step] = bool(dashdiff.selected_directions(model))

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(b["input_ids"]) for b in batch)
        pad = lambda xs, v: torch.tensor([x + [v] * (n - len(x)) for x in xs])  # noqa: E731
        return {"input_ids": pad([b["input_ids"] for b in batch], tok.pad_token_id),
                "attention_mask": pad([b["attention_mask"] for b in batch], 0),
                "labels": pad([b["labels"] for b in batch], -100)}

    def train(resume: str | None = None, skip: tuple[int, ...] = ()):
        _reset_accelerate()
        if skip:
            import transformers.trainer
            from fp16_skips import with_overflowing_scaler

            made: list = []
            monkeypatch.setattr(transformers.trainer, "Accelerator",
                                with_overflowing_scaler(transformers.trainer.Accelerator, skip, made))
        torch.manual_seed(0)
        model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                    dashdiff.LoraDashConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                            dash_warmup_steps=3, dash_directions=4))
        forwards = []
        model.register_forward_pre_hook(lambda *_: forwards.append(1))
        callback, probe = dashdiff.LoraDashCallback(), Probe()
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_steps=4, learning_rate=1e-2, use_cpu=True,
                                 report_to="none", save_strategy="steps", save_steps=2, logging_steps=1,
                                 disable_tqdm=True, remove_unused_columns=False, seed=0, data_seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate,
                          callbacks=[callback, probe])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Trainer's checkpoints are stock PEFT saves: dashdiff warns
            trainer.train(resume_from_checkpoint=resume)
        if skip:
            assert [a.scaler.skipped for a in made] == [len(skip)] and "fused" in args.optim
            monkeypatch.undo()
        return model, trainer, callback, probe, len(forwards)

    model, trainer, callback, probe, forwards = train()
    assert forwards == 8  # 4 optimizer steps x 2 micro-batches
    assert callback.launch_step == 3
    assert probe.launched == {1: False, 2: False, 3: True, 4: True}
    layers = list(dashdiff.walk.iter_layers(model, "dash"))
    assert all(int(layer.lora_dash_step[a]) == 4 and int(layer.lora_dash_launch_step[a]) == 3 for _, layer, a in layers)
    assert {"dash_launch_step": 3, "step": 3}.items() <= next(
        h for h in trainer.state.log_history if "dash_launch_step" in h).items()

    resumed, trainer2, callback2, _, forwards2 = train(resume=str(tmp_path / "checkpoint-2"))
    assert forwards2 == 4 and callback2.launch_step == 3
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (trainer, trainer2)]
    assert losses[0] == losses[1]
    for (_, l1, a), (_, l2, _) in zip(layers, dashdiff.walk.iter_layers(resumed, "dash")):
        torch.testing.assert_close(l1.lora_dash_delta[a], l2.lora_dash_delta[a], rtol=0, atol=1e-6)
        torch.testing.assert_close(l1.lora_dash_U[a], l2.lora_dash_U[a], rtol=0, atol=0)

    # optimizer step 2 overflows and is skipped: the warm-up of 3 ends after step 4
    _, _, callback3, probe3, _ = train(skip=(2,))
    assert callback3.launch_step == 4 and probe3.launched == {1: False, 2: False, 3: False, 4: True}
