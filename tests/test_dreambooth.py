"""train/dreambooth_dash.py: flags, bad input, exact resume, NaN guard (in-process through
``main(args)``), and end-to-end runs through ``accelerate launch`` (3 launches: tiny SD, tiny SDXL,
two CPU processes) whose exported files a stock-diffusers-only process loads and checks."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dashdiff import training as T
from dashdiff.testing import resolve_model
from launch_utils import ROOT, accelerate_launch, reset_accelerate

SUBJECT = str(ROOT / "assets" / "subject")
SCRIPT = ROOT / "train" / "dreambooth_dash.py"
RUNS = str(ROOT / "tests" / "scripts" / "dreambooth_runs.py")
VERIFY = ROOT / "tests" / "scripts" / "verify_stock_lora.py"
# Tiny models: threads only contend on the shared 2-core machine (10x slower matmuls measured).
THREAD_ENV = {"OMP_NUM_THREADS": "1"}

# Every flag of diffusers' train_dreambooth_lora.py and train_dreambooth_lora_sdxl.py.
REFERENCE_FLAGS = """
pretrained_model_name_or_path pretrained_vae_model_name_or_path revision variant tokenizer_name
dataset_name dataset_config_name instance_data_dir cache_dir image_column caption_column repeats
class_data_dir instance_prompt class_prompt validation_prompt num_validation_images validation_epochs
do_edm_style_training with_prior_preservation prior_loss_weight num_class_images output_dir
output_kohya_format seed resolution center_crop random_flip train_text_encoder train_batch_size
sample_batch_size num_train_epochs max_train_steps checkpointing_steps checkpoints_total_limit
resume_from_checkpoint gradient_accumulation_steps gradient_checkpointing learning_rate text_encoder_lr
scale_lr lr_scheduler snr_gamma lr_warmup_steps lr_num_cycles lr_power dataloader_num_workers optimizer
use_8bit_adam adam_beta1 adam_beta2 prodigy_beta3 prodigy_decouple adam_weight_decay
adam_weight_decay_text_encoder adam_epsilon prodigy_use_bias_correction prodigy_safeguard_warmup
max_grad_norm push_to_hub hub_token hub_model_id logging_dir allow_tf32 report_to mixed_precision
prior_generation_precision local_rank enable_xformers_memory_efficient_attention rank use_dora
lora_dropout image_interpolation_mode pre_compute_text_embeddings tokenizer_max_length
text_encoder_use_attention_mask validation_images class_labels_conditioning
lora_alpha lora_layers cache_latents
""".split()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one torch thread


def run(db, argv, **kw):
    reset_accelerate()
    torch.manual_seed(0)
    try:
        return db.main(db.parse_args(argv), **kw)
    finally:
        reset_accelerate()


def base(out, model="tiny-sd", *extra):
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", SUBJECT,
            "--instance_prompt", "a photo of sks toy", "--resolution", "64", "--train_batch_size", "2",
            "--learning_rate", "1e-2", "--output_dir", str(out), "--report_to", "none", *extra]


def parse_error(db, capsys, argv) -> str:
    with pytest.raises(SystemExit):
        db.parse_args(argv)
    return capsys.readouterr().err


def losses(folder) -> dict[tuple[str, int], float]:
    return {(r["phase_kind"], r["step"]): r["loss"] for r in T.StepLog.read(Path(folder) / T.STEP_LOG)}


# =========================================================================== flags


def test_every_reference_flag_parses_and_unsupported_ones_name_the_alternative(db, capsys, tmp_path):
    parser = db.build_parser()
    missing = [f for f in REFERENCE_FLAGS if f"--{f}" not in parser._option_string_actions]
    assert not missing
    args = db.parse_args(base(tmp_path) + ["--adam_beta1", "0.8", "--lr_num_cycles", "2", "--lr_power", "2",
                                           "--tokenizer_max_length", "77", "--image_interpolation_mode", "bicubic",
                                           "--prior_generation_precision", "fp32", "--local_rank", "0",
                                           "--text_encoder_lr", "1e-4", "--optimizer", "adamw"])
    assert args.lora_layers == ["to_k", "to_q", "to_v", "to_out.0"] and args.report_to == "none"
    assert args.dash_prefetch_spectra  # on by default; every LoRA-Dash run below launches from the prefetch
    assert not db.parse_args(base(tmp_path) + ["--no-dash_prefetch_spectra"]).dash_prefetch_spectra
    refused = {
        "--push_to_hub": "no model hub",
        "--hub_model_id=x": "no model hub",
        "--enable_xformers_memory_efficient_attention": "scaled-dot-product",
        "--optimizer=prodigy": "AdamW",
        "--prodigy_beta3=0.9": "AdamW",
        "--use_dora": "--method",
        "--do_edm_style_training": "epsilon",
        "--validation_images=a.png": "--validation_prompt",
        "--class_labels_conditioning=timesteps": "DeepFloyd",
        "--use_8bit_adam": "bitsandbytes",
        "--report_to=wandb": "wandb is not installed",
    }
    if importlib.util.find_spec("bitsandbytes"):
        refused.pop("--use_8bit_adam")
    if importlib.util.find_spec("wandb"):
        refused.pop("--report_to=wandb")
    for flag, hint in refused.items():
        err = parse_error(db, capsys, base(tmp_path) + [flag])
        assert flag.split("=")[0] in err and hint in err, (flag, err)


def test_parse_time_errors(db, capsys, tmp_path):
    cases = {
        ("--with_prior_preservation", "--class_data_dir", "x"): "--with_prior_preservation needs --class_prompt",
        ("--resolution", "100"): "multiple of 8",
        ("--dash_warmup_steps", "3"): "add --method dash",
        ("--autolora_search_steps", "3", "--method", "dash"): "add --method autolora",
        ("--no-autolora_fd_batched", "--method", "dash"): "add --method autolora",
        ("--method", "autolora", "--train_text_encoder"): "rank search runs on the UNet",
        ("--lora_layers", "to_q,,to_k"): "empty name",
        ("--dataset_name", str(tmp_path / "nope")): "give exactly one of",
    }
    for extra, msg in cases.items():
        assert msg in parse_error(db, capsys, base(tmp_path) + list(extra)), extra
    no_data = ["--pretrained_model_name_or_path", "tiny-sd", "--instance_prompt", "x", "--dataset_name",
               str(tmp_path / "nope")]
    assert "not a local folder" in parse_error(db, capsys, no_data)


def test_family_detection_and_defaults(db, tmp_path):
    assert db.detect_family(resolve_model("tiny-sd")) == "sd"
    assert db.detect_family(resolve_model("tiny-sdxl")) == "sdxl"
    for family, (lr, res, wd) in {"sd": (5e-4, 512, 1e-2), "sdxl": (1e-4, 1024, 1e-4)}.items():
        args = db.parse_args(["--pretrained_model_name_or_path", "m", "--instance_data_dir", SUBJECT,
                              "--instance_prompt", "x", "--method", "dash", "--rank", "6",
                              "--gradient_accumulation_steps", "4"])
        db.resolve_defaults(args, family)
        assert (args.learning_rate, args.resolution, args.adam_weight_decay) == (lr, res, wd)
        assert args.lora_alpha == 6 and args.dash_warmup_steps == 25 and args.dash_directions == 8
    args = db.parse_args(base(tmp_path, "m", "--learning_rate", "3e-3"))
    db.resolve_defaults(args, "sdxl")
    assert args.learning_rate == 3e-3 and args.resolution == 64
    assert T.default_dash_warmup_steps(1) == 100 and T.default_dash_warmup_steps(3) == 34


# =========================================================================== bad input


def test_bad_instance_data_is_named(db, tmp_path):
    def items(**kw):
        args = db.parse_args(base(tmp_path / "out"))
        for k, v in kw.items():
            setattr(args, k, v)
        return db.instance_items(args)

    with pytest.raises(T.TrainingError, match="does not exist"):
        items(instance_data_dir=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(T.TrainingError, match="is empty"):
        items(instance_data_dir=str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes((ROOT / "assets" / "subject" / "toycat_0.png").read_bytes())
    (bad / "notes.txt").write_text("hello")
    with pytest.raises(T.TrainingError, match=r"notes\.txt: not an image file"):
        items(instance_data_dir=str(bad))
    (bad / "notes.txt").unlink()
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(T.TrainingError, match=r"broken\.png: not an image or a corrupt one"):
        items(instance_data_dir=str(bad))
    # a local captioned dataset (imagefolder layout)
    ds = tmp_path / "captioned"
    ds.mkdir()
    (ds / "a.png").write_bytes((ROOT / "assets" / "subject" / "toycat_1.png").read_bytes())
    (ds / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "sks toy on grass"}) + "\n")
    got = items(instance_data_dir=None, dataset_name=str(ds), caption_column="text")
    assert [i.prompt for i in got] == ["sks toy on grass"]
    with pytest.raises(T.TrainingError, match="no caption column 'caption'"):
        items(instance_data_dir=None, dataset_name=str(ds), caption_column="caption")
    # AutoLoRA needs held-out images: refused before anything is written
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.png").write_bytes((ROOT / "assets" / "subject" / "toycat_2.png").read_bytes())
    argv = base(tmp_path / "never", "tiny-sd", "--method", "autolora", "--max_train_steps", "1")
    argv[argv.index("--instance_data_dir") + 1] = str(one)
    with pytest.raises(T.TrainingError, match="AutoLoRA validation split .* 1 example"):
        run(db, argv)
    assert not (tmp_path / "never").exists()


def test_unknown_lora_layer_lists_valid_names(db):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(resolve_model("tiny-sd"), subfolder="unet")
    db.check_lora_layers(unet, ["to_q", "to_out.0", "ff.net.2"])
    with pytest.raises(T.TrainingError) as err:
        db.check_lora_layers(unet, ["to_q", "to_qq"])
    msg = str(err.value)
    assert "to_qq" in msg and "Valid names:" in msg and "to_out.0" in msg and "to_k" in msg


def test_output_dir_guard(db, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(T.TrainingError, match="not empty .*mine.txt.*--overwrite_output_dir"):
        run(db, base(out, "tiny-sd", "--max_train_steps", "1"))
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]  # nothing written, nothing lost
    T.write_run_record(out, {"fingerprint": "aaaa", "args": {"method": "dash"}})
    with pytest.raises(T.TrainingError, match="another run's files"):
        T.check_output_dir(out, "bbbb", None, False)
    with pytest.raises(T.TrainingError, match="same arguments"):
        T.check_output_dir(out, "aaaa", None, False)
    T.check_output_dir(out, "bbbb", "latest", False)
    T.check_output_dir(out, "bbbb", None, True)
    # the fingerprint ignores where and how often a run is checkpointed, not what it trains
    a = db.parse_args(base(out))
    b = db.parse_args(base(tmp_path / "other", "tiny-sd", "--checkpointing_steps", "7"))
    c = db.parse_args(base(out, "tiny-sd", "--rank", "8"))
    assert T.args_fingerprint(a) == T.args_fingerprint(b) != T.args_fingerprint(c)
    # complete checkpoints (with their marker): `latest` and pruning only count those
    for name in ("checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-search-9"):
        (out / name).mkdir()
        T.write_checkpoint_info(out / name, {"files": {}})
    assert T.resolve_resume(out, "latest").path.name == "checkpoint-3"
    T.prune_checkpoints(out, 3)
    assert [c.path.name for c in T.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]
    with pytest.raises(T.TrainingError, match="no such checkpoint"):
        T.resolve_resume(out, "checkpoint-7")


# =========================================================================== in-process training


def test_exact_resume_prelaunch_and_dash_phase_mid_epoch(db, tmp_path):
    # 5 images, batch 2: 3 batches per epoch, so checkpoints 2 and 4 are both mid-epoch; the
    # launch comes after step 3: checkpoint-2 is before it, checkpoint-4 after it.
    extra = ["--method", "dash", "--dash_warmup_steps", "3", "--dash_directions", "4", "--max_train_steps", "6",
             "--checkpointing_steps", "2", "--lora_dropout", "0.1", "--random_flip", "--seed", "3"]
    full = run(db, base(tmp_path / "full", "tiny-sd", *extra))
    assert full["dash_launch"]["step"] == 3 and full["num_processes"] == 1
    ref = losses(tmp_path / "full")
    assert len(ref) == 6 and len(set(ref.values())) == 6
    ref_state = load_file(tmp_path / "full" / T.ADAPTER_STATE)

    for ckpt, first in (("checkpoint-2", 3), ("checkpoint-4", 5)):
        out = tmp_path / f"from-{ckpt}"
        rec = run(db, base(out, "tiny-sd", *extra, "--resume_from_checkpoint", str(tmp_path / "full" / ckpt)))
        got = losses(out)
        assert sorted(got) == [("train", s) for s in range(first, 7)]
        for key, value in got.items():
            assert abs(value - ref[key]) <= 1e-6, (ckpt, key, value, ref[key])
        # same launch step, same directions, same δ and factors at the end
        assert rec["dash_launch"]["step"] == 3
        state = load_file(out / T.ADAPTER_STATE)
        assert state.keys() == ref_state.keys()
        for key in ref_state:
            torch.testing.assert_close(state[key], ref_state[key], rtol=0, atol=1e-6, msg=key)
    assert any("lora_dash_U" in k for k in ref_state) and any(ref_state[k].abs().sum() > 0
                                                              for k in ref_state if "lora_dash_delta" in k)


def test_autolora_resume_lands_in_the_right_phase(db, tmp_path):
    extra = ["--method", "autolora", "--autolora_search_steps", "2", "--max_train_steps", "2",
             "--checkpointing_steps", "1", "--autolora_hypergradient", "first_order"]
    full = run(db, base(tmp_path / "full", "tiny-sd", *extra))
    names = sorted(p.name for p in (tmp_path / "full").iterdir() if p.name.startswith("checkpoint"))
    assert names == ["checkpoint-1", "checkpoint-2", "checkpoint-search-1", "checkpoint-search-2"]
    ref = losses(tmp_path / "full")
    assert sorted(ref) == [("search", 1), ("search", 2), ("train", 1), ("train", 2)]
    assert (tmp_path / "full" / "autolora_ranks.json").exists()
    # as in the commonsense script (issue 15): β's Adam moments are accelerate's second optimizer file,
    # and a retrain checkpoint records the ranks the search found
    assert (tmp_path / "full" / "checkpoint-search-1" / "optimizer_1.bin").is_file()
    assert T.read_checkpoint_info(tmp_path / "full" / "checkpoint-1")["autolora_ranks"] == full["autolora_ranks"]
    for ckpt, expect in (("checkpoint-search-1", [("search", 2), ("train", 1), ("train", 2)]),
                         ("checkpoint-1", [("train", 2)])):
        out = tmp_path / ckpt
        rec = run(db, base(out, "tiny-sd", *extra, "--resume_from_checkpoint", str(tmp_path / "full" / ckpt)))
        got = losses(out)
        assert sorted(got) == expect
        for key in expect:
            assert abs(got[key] - ref[key]) <= 1e-6, (ckpt, key)
        assert rec["autolora_ranks"] == full["autolora_ranks"]
    # a LoRA run cannot resume an AutoLoRA search checkpoint
    with pytest.raises(T.TrainingError, match="AutoLoRA search checkpoint"):
        run(db, base(tmp_path / "x", "tiny-sd", "--max_train_steps", "1", "--resume_from_checkpoint",
                     str(tmp_path / "full" / "checkpoint-search-1")))


@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_prior_loss_and_doubled_batches(db, snr_gamma):
    """The prior-preservation loss (instance MSE + weight x class MSE, class images in the second
    half) and, for the AutoLoRA search's batched finite differences, a batch twice over has the
    same loss as the batch."""
    from diffusers import DDPMScheduler

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 900, 30])
    sched = DDPMScheduler()
    args = argparse.Namespace(snr_gamma=snr_gamma, prior_loss_weight=0.7)
    mask = torch.tensor([False, False, True, True])
    got = db.compute_loss(pred, target, t, sched, args, mask)
    inst = F.mse_loss(pred[:2], target[:2], reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(sched, t[:2])
        inst = inst * torch.minimum(snr, torch.full_like(snr, snr_gamma)) / snr
    want = inst.mean() + 0.7 * F.mse_loss(pred[2:], target[2:])
    torch.testing.assert_close(got, want)
    inputs = {"noisy": pred, "target": target, "timesteps": t, "prompts": ["a", "a", "c", "c"]}
    d = db.double_inputs(inputs)
    assert d["prompts"] == ["a", "a", "c", "c"] * 2 and d["noisy"].shape[0] == 8
    torch.testing.assert_close(db.compute_loss(d["noisy"], d["target"], d["timesteps"], sched, args, d["prior_mask"]), got)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(db, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = db.compute_loss

    def flaky(*a, **kw):
        calls["n"] += 1
        loss = real(*a, **kw)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(db, "compute_loss", flaky)
    out = tmp_path / "nan"
    with pytest.raises(T.NonFiniteLossError, match=r"loss is nan at train step 3.*checkpoint-2"):
        run(db, base(out, "tiny-sd", "--max_train_steps", "4", "--checkpointing_steps", "2"))
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    state = load_file(out / "checkpoint-2" / T.ADAPTER_STATE)
    assert all(torch.isfinite(t.float()).all() for t in state.values())
    record = T.read_run_record(out)
    assert record["status"].startswith("stopped") and record["last_checkpoint"].endswith("checkpoint-2")


def test_fp16_skipped_steps_do_not_count_toward_the_dash_warmup(db, tmp_path, monkeypatch):
    """Steps 1 and 3 overflow under a real (CPU) fp16 grad scaler and are skipped: with a warm-up of 2,
    the launch comes after step 4 (2 + 2 skipped), not after step 2."""
    import accelerate
    from fp16_skips import with_overflowing_scaler

    made: list = []
    monkeypatch.setattr(accelerate, "Accelerator", with_overflowing_scaler(accelerate.Accelerator, (1, 3), made))
    rec = run(db, base(tmp_path / "fp16", "tiny-sd", "--method", "dash", "--dash_warmup_steps", "2",
                       "--dash_directions", "4", "--max_train_steps", "5", "--checkpointing_steps", "100"))
    assert [a.scaler.skipped for a in made] == [2]  # both overflows really skipped a step
    assert rec["dash_launch"]["step"] == 4


# =========================================================================== accelerate launch


def verify_stock(model: str, dirs: list[Path]) -> list[dict]:
    """A process that never imports dashdiff loads the exported files and recomputes outputs."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **THREAD_ENV}
    proc = subprocess.run([sys.executable, str(VERIFY), resolve_model(model), *map(str, dirs)], capture_output=True,
                          text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def check_outputs(folder: Path, kohya: bool, validation: bool) -> dict:
    names = {p.name for p in folder.iterdir()}
    assert {"pytorch_lora_weights.safetensors", T.ADAPTER_STATE, "README.md", T.RUN_RECORD, T.STEP_LOG} <= names
    assert ("pytorch_lora_weights_kohya.safetensors" in names) == kohya
    if validation:
        assert "validation_0.png" in names and "validation_0.png" in (folder / "README.md").read_text()
    record = json.loads((folder / T.RUN_RECORD).read_text())
    assert record["status"] == "done" and len(record["fingerprint"]) == 16
    return record


def check_stock_results(results: list[dict], expected_files: int) -> None:
    print(json.dumps(results, indent=1))  # shown with pytest -s: the measured errors
    assert len(results) == expected_files
    for r in results:
        assert r["output_err"] < 1e-4 and r["embeds_err"] < 1e-4, r
        assert r["lora_effect"] > 100 * max(r["output_err"], 1e-7), r  # the check would see a dropped LoRA


def test_sd_all_methods_through_accelerate_launch(tmp_path):
    data = tmp_path / "captioned"
    data.mkdir()
    rows = []
    for i, p in enumerate(sorted(Path(SUBJECT).iterdir())):
        (data / p.name).write_bytes(p.read_bytes())
        rows.append(json.dumps({"file_name": p.name, "text": f"a photo of sks toy, view {i}"}))
    (data / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    common = ["--pretrained_model_name_or_path", "tiny-sd", "--instance_prompt", "a photo of sks toy",
              "--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-2", "--report_to", "none",
              "--save_reference_output", "--num_inference_steps", "2", "--num_validation_images", "1"]
    lora = common + ["--method", "lora", "--dataset_name", str(data), "--caption_column", "text",
                     "--train_text_encoder", "--output_kohya_format", "--max_train_steps", "3", "--snr_gamma", "5",
                     "--validation_prompt", "a photo of sks toy", "--random_flip", "--gradient_accumulation_steps", "2",
                     "--output_dir", str(tmp_path / "lora")]
    dash = common + ["--method", "dash", "--instance_data_dir", SUBJECT, "--dash_warmup_steps", "2",
                     "--dash_directions", "4", "--max_train_steps", "4", "--cache_latents", "--output_kohya_format",
                     "--with_prior_preservation", "--class_prompt", "a photo of a toy", "--num_class_images", "2",
                     "--class_data_dir", str(tmp_path / "class"), "--output_dir", str(tmp_path / "dash")]
    # prior preservation in the search too: its batched finite differences check the doubled-batch loss
    auto = common + ["--method", "autolora", "--instance_data_dir", SUBJECT, "--autolora_search_steps", "2",
                     "--max_train_steps", "2", "--with_prior_preservation", "--class_prompt", "a photo of a toy",
                     "--num_class_images", "2", "--class_data_dir", str(tmp_path / "class"),
                     "--output_dir", str(tmp_path / "autolora")]
    proc = accelerate_launch(RUNS, *lora, "--next", *dash, "--next", *auto, env=THREAD_ENV)
    log = proc.stdout + proc.stderr
    assert "LoRA-Dash launched after optimizer step 2: 4 directions in each of 32 layers, chosen in" in log
    assert "phase=pre-launch" in log and "phase=dash" in log and "phase=search" in log and "phase=retrain" in log

    rec = check_outputs(tmp_path / "lora", kohya=True, validation=True)
    assert rec["family"] == "sd" and rec["num_processes"] == 1
    keys = load_file(tmp_path / "lora" / "pytorch_lora_weights_kohya.safetensors").keys()
    assert any(k.startswith("lora_te_") for k in keys) and any(k.startswith("lora_unet_") for k in keys)
    rec = check_outputs(tmp_path / "dash", kohya=True, validation=False)
    assert rec["dash_launch"]["step"] == 2
    assert len(list((tmp_path / "class").glob("*.png"))) == 2  # generated class images
    rec = check_outputs(tmp_path / "autolora", kohya=False, validation=False)
    assert rec["autolora_ranks"] and (tmp_path / "autolora" / "autolora_ranks.md").exists()
    # exported ranks: LoRA-Dash r + s, AutoLoRA the per-layer ranks found
    dash_w = load_file(tmp_path / "dash" / "pytorch_lora_weights.safetensors")
    assert {v.shape[0] for k, v in dash_w.items() if k.endswith("lora_A.weight")} == {8}
    auto_w = load_file(tmp_path / "autolora" / "pytorch_lora_weights.safetensors")
    found = {k.replace("unet.", "", 1).replace(".lora_A.weight", ""): v.shape[0]
             for k, v in auto_w.items() if k.endswith("lora_A.weight")}
    assert found == rec["autolora_ranks"]

    results = verify_stock("tiny-sd", [tmp_path / "lora", tmp_path / "dash", tmp_path / "autolora"])
    check_stock_results(results, expected_files=5)


def test_sdxl_all_methods_through_accelerate_launch(tmp_path):
    common = ["--pretrained_model_name_or_path", "tiny-sdxl", "--instance_data_dir", SUBJECT,
              "--instance_prompt", "a photo of sks toy", "--resolution", "64", "--train_batch_size", "2",
              "--learning_rate", "1e-2", "--report_to", "none", "--save_reference_output"]
    lora = common + ["--method", "lora", "--train_text_encoder", "--output_kohya_format", "--max_train_steps", "2",
                     "--validation_prompt", "a photo of sks toy", "--num_validation_images", "1",
                     "--num_inference_steps", "2", "--output_dir", str(tmp_path / "lora")]
    dash = common + ["--method", "dash", "--dash_warmup_steps", "1", "--dash_directions", "4", "--max_train_steps", "3",
                     "--output_kohya_format", "--train_text_encoder", "--output_dir", str(tmp_path / "dash")]
    auto = common + ["--method", "autolora", "--autolora_search_steps", "1", "--max_train_steps", "2",
                     "--output_dir", str(tmp_path / "autolora")]
    accelerate_launch(RUNS, *lora, "--next", *dash, "--next", *auto, env=THREAD_ENV)
    for name, kohya in (("lora", True), ("dash", True), ("autolora", False)):
        rec = check_outputs(tmp_path / name, kohya=kohya, validation=name == "lora")
        assert rec["family"] == "sdxl" and rec["args"]["learning_rate"] == 1e-2
    keys = load_file(tmp_path / "dash" / "pytorch_lora_weights_kohya.safetensors").keys()
    assert {k.split("_")[1] for k in keys} >= {"unet", "te1", "te2"}
    results = verify_stock("tiny-sdxl", [tmp_path / "lora", tmp_path / "dash", tmp_path / "autolora"])
    check_stock_results(results, expected_files=5)


def test_two_processes_share_directions_delta_and_beta(tmp_path):
    dump = tmp_path / "dump"
    common = ["--pretrained_model_name_or_path", "tiny-sd", "--instance_data_dir", SUBJECT,
              "--instance_prompt", "a photo of sks toy", "--resolution", "64", "--train_batch_size", "1",
              "--learning_rate", "1e-2", "--report_to", "none"]
    dash = common + ["--method", "dash", "--dash_warmup_steps", "1", "--dash_directions", "4", "--max_train_steps", "2",
                     "--output_dir", str(tmp_path / "dash")]
    auto = common + ["--method", "autolora", "--autolora_search_steps", "1", "--max_train_steps", "1",
                     "--autolora_hypergradient", "first_order", "--output_dir", str(tmp_path / "autolora")]
    accelerate_launch(RUNS, "--dump", str(dump), *dash, "--next", *auto, processes=2, env=THREAD_ENV)
    for folder in ("dash", "autolora"):
        assert json.loads((tmp_path / folder / T.RUN_RECORD).read_text())["num_processes"] == 2
    # as the commonsense script (issue 15): the launch's directions are checked across the processes,
    # and DDP does not broadcast buffers (dashdiff's are equal on every process by construction)
    launch = json.loads((tmp_path / "dash" / T.RUN_RECORD).read_text())["dash_launch"]
    assert launch["num_processes"] == 2 and len(set(launch["direction_digests"])) == 1
    assert len(launch["direction_digests"]) == 2
    for i in (0, 1):
        seen = json.loads((dump / f"ddp-rank{i}.json").read_text())
        assert seen and not any(seen), seen
    for event in ("run0-launch", "run0-end", "run1-search_end", "run1-end"):
        r0, r1 = (load_file(dump / f"{event}-rank{i}.safetensors") for i in (0, 1))
        assert r0.keys() == r1.keys() and r0, event
        for key in r0:
            assert torch.equal(r0[key], r1[key]), (event, key)
    launched = load_file(dump / "run0-launch-rank0.safetensors")
    assert any(k.endswith("lora_dash_U.default") and v.abs().sum() > 0 for k, v in launched.items())
    end = load_file(dump / "run0-end-rank0.safetensors")
    assert any("lora_dash_delta" in k and v.abs().sum() > 0 for k, v in end.items())
    beta = load_file(dump / "run1-search_end-rank0.safetensors")
    assert any("lora_autolora_beta" in k and not torch.allclose(v, torch.ones_like(v)) for k, v in beta.items())
