"""Input rules shared by the entry points (train/input_rules.py, issue 13): each case is a silent
wrong result or a traceback that became a clear refusal or a correct result. Flag checks go
through the parsers (no model); the few end-to-end cases use the reserved tiny models in-process."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dashdiff import training as T
from launch_utils import load_script, reset_accelerate

ROOT = Path(__file__).resolve().parents[1]
SUBJECT = ROOT / "assets" / "subject"
TRAIN = ROOT / "tests" / "fixtures" / "commonsense" / "train.json"


db = load_script("train/dreambooth_dash.py", reuse=True)
cs = load_script("train/commonsense_dash.py", reuse=True)
V = sys.modules["input_rules"]  # train/input_rules.py, as the scripts imported it


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def db_argv(out, *extra):
    return ["--pretrained_model_name_or_path", "tiny-sd", "--instance_data_dir", str(SUBJECT),
            "--instance_prompt", "a photo of sks toy", "--resolution", "64", "--train_batch_size", "2",
            "--learning_rate", "1e-2", "--output_dir", str(out), "--report_to", "none", *extra]


def cs_argv(out, *extra, base="tiny-llama"):
    return ["--base_model", base, "--data_path", str(TRAIN), "--output_dir", str(out), "--val_set_size", "2",
            "--batch_size", "4", "--micro_batch_size", "2", "--save_step", "1000", "--logging_steps", "1000", *extra]


def parse_error(parse, argv, capsys) -> str:
    with pytest.raises(SystemExit):
        parse(argv)
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    from dashdiff.testing import resolve_model

    return resolve_model("tiny-llama", cache_dir=str(tmp_path_factory.mktemp("cache")))


# --------------------------------------------------------------------------- flags, both scripts


@pytest.mark.parametrize("script", ["dreambooth", "commonsense"])
def test_bad_numbers_and_foreign_method_options_are_refused(script, tmp_path, capsys):
    # one vocabulary: --method in both (the commonsense script's --adapter_name is its alias)
    parse, argv, flag = (db.parse_args, db_argv, "--method") if script == "dreambooth" else (cs.parse_args, cs_argv,
                                                                                              "--method")
    cases = {
        ("--seed", "-1"): "--seed must be from 0 to 4294967295",
        ("--seed", str(2**32)): "--seed must be from 0",
        ("--learning_rate", "nan"): "--learning_rate must be a finite number > 0, got nan",
        ("--learning_rate", "inf"): "--learning_rate must be a finite number > 0",
        ("--learning_rate", "0"): "--learning_rate must be a finite number > 0",
        ("--learning_rate=-1e-4",): "--learning_rate must be a finite number > 0",
        (flag, "lora", "--dash_directions", "4"): f"--dash_directions is a LoRA-Dash option: add {flag} dash",
        (flag, "lora", "--dash_warmup_steps", "4"): f"--dash_warmup_steps is a LoRA-Dash option",
        (flag, "dash", "--autolora_threshold", "0.1"): f"--autolora_threshold is an AutoLoRA option: add {flag} "
                                                       "autolora",
    }
    for extra, msg in cases.items():
        err = parse_error(parse, argv(tmp_path) + list(extra), capsys)
        assert msg in err, (extra, err)
    # the same flags with their own method parse
    parse(argv(tmp_path) + [flag, "dash", "--dash_directions", "4", "--seed", str(2**32 - 1)])
    parse(argv(tmp_path) + [flag, "autolora", "--autolora_threshold", "0.1"])


def test_commonsense_method_defaults_are_filled_only_after_the_check(tmp_path):
    args = cs.parse_args(cs_argv(tmp_path, "--adapter_name", "lora"))
    # the defaults the run record and checkpoints hold are unchanged
    assert (args.dash_directions, args.autolora_val_fraction, args.autolora_hypergradient, args.autolora_retrain) == (
        8, 0.3, "darts", True)
    cs.validate_args(args)  # main() validates again: the filled defaults are not "given" options
    assert "_defaults_filled" not in T.run_arguments(args)


@pytest.mark.parametrize("script", ["dreambooth", "commonsense"])
def test_dash_shorter_than_its_warmup_is_refused_at_parse_time(script, tmp_path, capsys):
    # one vocabulary: --method in both (the commonsense script's --adapter_name is its alias)
    parse, argv, flag = (db.parse_args, db_argv, "--method") if script == "dreambooth" else (cs.parse_args, cs_argv,
                                                                                              "--method")
    # default warm-up: 100 micro-batches, i.e. 100 steps (DreamBooth here) or 50 (2 micro-batches a step)
    w = 100 if script == "dreambooth" else 50
    err = parse_error(parse, argv(tmp_path) + [flag, "dash", "--max_train_steps", str(w - 1)], capsys)
    assert f"{w - 1} optimizer steps (--max_train_steps)" in err and f"--dash_warmup_steps {w}" in err
    assert f"at most {w - 1}" in err
    parse(argv(tmp_path) + [flag, "dash", "--max_train_steps", str(w)])
    err = parse_error(parse, argv(tmp_path) + [flag, "dash", "--max_train_steps", "2", "--dash_warmup_steps", "3"],
                      capsys)
    assert "never launch" in err
    parse(argv(tmp_path) + [flag, "dash", "--max_train_steps", "3", "--dash_warmup_steps", "3"])  # launches at 3
    parse(argv(tmp_path) + [flag, "lora", "--max_train_steps", "2"])


def test_commonsense_dash_from_epochs_is_refused_before_anything_is_written(llama, tmp_path):
    # 14 training records, 2 micro-batches of 2 per step: 4 steps per epoch, 2 epochs = 8 steps
    out = tmp_path / "o"
    args = cs.parse_args(cs_argv(out, "--adapter_name", "dash", "--num_epochs", "2", "--dash_warmup_steps", "9",
                                 base=llama))
    with pytest.raises(T.TrainingError, match=r"8 optimizer steps \(--num_epochs 2 x 4 per epoch\).*"
                                              r"--dash_warmup_steps 9"):
        cs.main(args)
    assert not out.exists()


def test_dreambooth_dash_from_epochs_fails_with_one_line_and_a_failed_record(tmp_path, capsys):
    # 5 images, batch 2: 3 steps per epoch; 1 epoch < warm-up 4. Known only once the data loader
    # exists, after the record is written: the command line marks it failed.
    out = tmp_path / "o"
    code = db.cli(db_argv(out, "--method", "dash", "--num_train_epochs", "1", "--dash_warmup_steps", "4"))
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "3 optimizer steps (--num_train_epochs 1 x 3 per epoch)" in err and "--dash_warmup_steps 4" in err
    record = T.read_run_record(out)
    assert record["status"] == "failed" and "--dash_warmup_steps 4" in record["error"]
    assert not (out / "pytorch_lora_weights.safetensors").exists()


def test_model_card_states_the_exported_rank(tmp_path):
    args = db.parse_args(db_argv(tmp_path, "--method", "dash", "--rank", "4", "--dash_directions", "8",
                                 "--max_train_steps", "200"))
    db.resolve_defaults(args, "sd")
    launched = db.model_card(args, "sd", {"dash_launch": {"step": 100}}, [])
    never = db.model_card(args, "sd", {"dash_launch": None}, [])
    assert "exported LoRA has rank 4+8 per layer" in launched
    assert "exported LoRA has rank 4 per layer" in never and "never" in never


# --------------------------------------------------------------------------- folders


def test_class_folder_inside_the_instance_folder_is_refused(tmp_path, capsys):
    inst = tmp_path / "subject"
    inst.mkdir()
    for case in (inst, inst / "classes"):
        argv = db_argv(tmp_path / "o", "--with_prior_preservation", "--class_prompt", "a toy",
                       "--class_data_dir", str(case))
        argv[argv.index("--instance_data_dir") + 1] = str(inst)
        err = parse_error(db.parse_args, argv, capsys)
        assert "among the subject's images" in err, case
    assert sorted(inst.iterdir()) == []  # nothing written
    argv = db_argv(tmp_path / "o", "--with_prior_preservation", "--class_prompt", "a toy",
                   "--class_data_dir", str(tmp_path / "classes"))
    db.parse_args(argv)  # a sibling folder is fine


def test_output_folder_that_cannot_be_written_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(T.TrainingError, match="is a file, not a folder"):
        V.check_output_dir_writable(tmp_path / "file" / "out")
    # root passes os.access everywhere: /proc refuses new files even to root
    with pytest.raises(T.TrainingError, match="cannot write there"):
        V.check_output_dir_writable("/proc/dashdiff-test/out")
    V.check_output_dir_writable(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_commonsense_cli_read_only_output_is_one_line(llama, capsys):
    code = cs.cli(cs_argv("/proc/dashdiff-test/out", "--adapter_name", "lora", base=llama))
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("commonsense_dash.py: error: --output_dir /proc/dashdiff-test/out: cannot write there")


# --------------------------------------------------------------------------- data


def test_cutoff_that_leaves_no_target_is_refused_and_the_record_says_failed(llama, tmp_path, capsys):
    out = tmp_path / "o"
    code = cs.cli(cs_argv(out, "--adapter_name", "lora", "--cutoff_len", "8", "--train_on_inputs", "false",
                          "--max_train_steps", "1", base=llama))
    err = capsys.readouterr().err
    assert code == 1 and "--cutoff_len 8 leaves no token in the loss" in err and "Traceback" not in err
    record = T.read_run_record(out)
    assert record["status"] == "failed" and "--cutoff_len 8" in record["error"]
    assert not (out / "adapter_model.safetensors").exists()


def test_some_examples_cut_before_the_response_are_counted(llama, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama)
    args = cs.parse_args(cs_argv(tmp_path, "--train_on_inputs", "false", "--cutoff_len", "256", base=llama))
    records = json.loads(TRAIN.read_text())[:3]
    full = cs.tokenize_records(records, tok, args)
    shortest_prompt = min(len(e.input_ids) - e.targets - 1 for e in full)  # tokens before the first target
    records[0] = dict(records[0], instruction=records[0]["instruction"] + " word" * 400)
    with pytest.warns(UserWarning, match="1 of 3 training examples have no token in the loss"):
        got = cs.tokenize_records(records, tok, args)
    assert [e.targets == 0 for e in got] == [True, False, False] and shortest_prompt > 0


def test_commonsense_mistyped_or_empty_inputs_are_one_line(llama, tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    cases = {
        ("--data_path", str(empty)): "holds no records",
        ("--data_path", str(tmp_path / "typo.json")): f"--data_path {tmp_path / 'typo.json'}: No such file",
        ("--base_model", str(tmp_path / "no-model")): "no-model",
    }
    for (flag, value), msg in cases.items():
        argv = cs_argv(tmp_path / "o", "--adapter_name", "lora", base=llama)
        argv[argv.index(flag) + 1] = value
        assert cs.cli(argv) == 1, flag
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert last.startswith("commonsense_dash.py: error: ") and msg in last and "Traceback" not in err, (flag, err)


def test_mark_failed_touches_only_this_process_record(tmp_path):
    T.write_run_record(tmp_path, {"status": "running", "pid": os.getpid() + 1})
    assert not V.mark_failed(tmp_path, "x") and T.read_run_record(tmp_path)["status"] == "running"
    T.write_run_record(tmp_path, {"status": "done", "pid": os.getpid()})
    assert not V.mark_failed(tmp_path, "x") and T.read_run_record(tmp_path)["status"] == "done"
    T.write_run_record(tmp_path, {"status": "running", "pid": os.getpid()})
    assert V.mark_failed(tmp_path, "disk full")
    assert T.read_run_record(tmp_path) == {"status": "failed", "pid": os.getpid(), "error": "disk full"}


# --------------------------------------------------------------------------- images


def test_image_modes_are_read_as_meant(tmp_path):
    # 16-bit grey: PIL's convert("RGB") clips at 255 (an almost white image); the values are scaled.
    grey16 = (np.arange(64 * 64, dtype=np.float64).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as img:
        assert img.mode.startswith("I")
        got = np.asarray(V.to_rgb(img))
    expect = np.rint(grey16 * (255 / 65535)).astype(np.uint8)
    assert got.shape == (64, 64, 3) and (got == expect[..., None]).all()
    # transparency over white, whatever colour hides under it
    rgba = Image.new("RGBA", (4, 4), (200, 0, 0, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    out = np.asarray(V.to_rgb(rgba))
    assert tuple(out[0, 0]) == (10, 20, 30) and tuple(out[1, 1]) == (255, 255, 255)
    pal = Image.new("P", (2, 2), 1)
    pal.putpalette([0, 0, 0, 9, 9, 9] + [0] * 762)
    pal.info["transparency"] = 1
    assert tuple(np.asarray(V.to_rgb(pal))[0, 0]) == (255, 255, 255)
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    assert tuple(np.asarray(V.to_rgb(cmyk))[0, 0]) == (255, 0, 0)
    with pytest.raises(T.TrainingError, match="floating-point image"):
        V.to_rgb(Image.new("F", (2, 2)), "x.tif")


def test_dreambooth_images_too_large_or_16_bit(tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    grey16 = np.full((64, 64), 30000, dtype=np.uint16)
    Image.fromarray(grey16).save(folder / "a.png")
    img = db.load_image(folder / "a.png")
    assert img.mode == "RGB" and int(np.asarray(img)[0, 0, 0]) == round(30000 * 255 / 65535)
    # over twice PIL's pixel limit: DecompressionBombError, which is not an OSError
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for fn in (db.load_image, lambda p: db.check_images([p])):
        with pytest.raises(T.TrainingError, match=r"a\.png: the image is too large to decode safely"):
            fn(folder / "a.png")
    monkeypatch.undo()
    Image.new("F", (4, 4)).save(folder / "f.tif")
    for fn in (db.load_image, lambda p: db.check_images([p])):
        with pytest.raises(T.TrainingError, match=r"^\S*f\.tif: a 32-bit floating-point image"):
            fn(folder / "f.tif")


# --------------------------------------------------------------------------- eval script

ev = load_script("train/commonsense_eval.py", reuse=True)


def test_eval_refuses_a_peft_folder_whose_targets_miss_its_weights(llama, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama),
                           LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    good = tmp_path / "good"
    model.save_pretrained(good)
    ev._attach_adapter(AutoModelForCausalLM.from_pretrained(llama), str(good))  # fits: no error
    bad = tmp_path / "bad"
    model.save_pretrained(bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["target_modules"] = ["k_proj"]  # the weights still name q_proj
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"targets \['k_proj'\].*name modules it did not adapt .*q_proj.*"
                                         r"adapted weights have nothing in the file .*k_proj"):
        ev._attach_adapter(AutoModelForCausalLM.from_pretrained(llama), str(bad))
    data = tmp_path / "data"
    (data / "boolq").mkdir(parents=True)
    (data / "boolq" / "test.json").write_text(json.dumps([{"instruction": "q", "input": "", "answer": "true"}]))
    argv = ["--dataset", "boolq", "--data_dir", str(data), "--base_model", llama, "--lora_weights", str(bad),
            "--max_new_tokens", "2", "--num_beams", "1", "--output_dir", str(tmp_path / "out"), "--no_progress"]
    assert ev.cli(argv) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (transformers' loading bars come before it)
    assert last.startswith("commonsense_eval.py: error: ") and "does not fit this model" in last
    assert "Traceback" not in err and not (tmp_path / "out" / "boolq.json").exists()


def test_eval_checks_inputs_before_loading_the_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ev, "load_model", lambda args: pytest.fail("the model was loaded before the inputs were checked"))
    data = tmp_path / "data"
    (data / "boolq").mkdir(parents=True)
    (data / "boolq" / "test.json").write_text(json.dumps([{"instruction": "q", "input": "", "answer": "true"}]))
    base = ["--dataset", "boolq", "--data_dir", str(data), "--base_model", "tiny-llama", "--no_progress",
            "--output_dir", str(tmp_path / "out")]
    cases = {
        ("--lora_weights", str(tmp_path / "typo")): "--lora_weights " + str(tmp_path / "typo") + " does not exist",
        ("--lora_weights", str(data)): "the folder has no adapter_config.json",
        ("--lora_weights", str(data / "boolq" / "test.json")): "expected a PEFT adapter folder",
        ("--output_dir", "/proc/dashdiff-test/out"): "cannot write there",
        ("--data_dir", str(tmp_path / "nope")): "no test set for boolq",
    }
    for extra, msg in cases.items():
        assert ev.cli(base + list(extra)) == 1, extra
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and err.count("\n") == 1, (extra, err)
    (data / "boolq" / "test.json").write_text("[]")
    assert ev.cli(base) == 1 and "holds no records" in capsys.readouterr().err
    assert "--seed must be from 0" in parse_error(ev.parse_args, base + ["--seed", "-1"], capsys)


def test_a_full_disk_anywhere_is_one_line():
    # Exports and step-log appends are not checkpoint writes: their full-disk errors come wrapped by
    # torch (RuntimeError) or safetensors; each still reads as one line naming the fix.
    import errno

    failure_line = V.failure_line

    for err in (OSError(errno.ENOSPC, "No space left on device", "/out/x.safetensors"),
                RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing "
                             "file data/0: file write failed"),
                Exception("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")):
        line = failure_line(err)
        assert line is not None and line.startswith("the disk is full") and "--resume_from_checkpoint latest" in line
    assert failure_line(RuntimeError("shape mismatch")) is None  # a bug keeps its traceback
