"""train/run_flags.py: one vocabulary of flags in both training scripts (issue 15)."""

import argparse

import pytest

from launch_utils import ROOT, load_script

ALIASES = {  # the LLM-Adapters / earlier spellings -> the one spelling both scripts document
    "--adapter_name": "--method",
    "--lora_r": "--rank",
    "--autolora_mode": "--autolora_hypergradient",
    "--autolora_beta_lr": "--autolora_meta_lr",
    "--save_step": "--checkpointing_steps",
    "--use_gradient_checkpointing": "--gradient_checkpointing",
}


@pytest.fixture(scope="module")
def parsers() -> dict[str, argparse.ArgumentParser]:
    return {"dreambooth": load_script("train/dreambooth_dash.py", reuse=True).build_parser(),
            "commonsense": load_script("train/commonsense_dash.py", reuse=True).build_parser()}


def _shared() -> dict[str, str]:
    flags = load_script("train/run_flags.py", reuse=True)
    p = argparse.ArgumentParser()
    flags.add_method_flags(p, method="lora", rank=4, lora_alpha=None, lora_dropout=0.0, dash_prefetch_spectra=None)
    flags.add_run_flags(p, output_dir="o", seed=None, checkpointing_steps=1, checkpoints_total_limit=None)
    return {s: a.dest for s, a in p._option_string_actions.items() if s not in ("-h", "--help")}


def test_both_scripts_accept_the_shared_vocabulary_with_the_same_destinations(parsers):
    shared = _shared()
    assert set(ALIASES) | set(ALIASES.values()) <= set(shared)
    for name, parser in parsers.items():
        have = parser._option_string_actions
        missing = [s for s in shared if s not in have]
        assert not missing, (name, missing)
        assert {s: have[s].dest for s in shared} == shared, name
    for alias, canonical in ALIASES.items():
        assert shared[alias] == shared[canonical] == canonical[2:], alias


@pytest.mark.parametrize("script", ["dreambooth", "commonsense"])
def test_aliases_parse_to_the_same_values_and_booleans_take_one_form(parsers, script):
    parser = parsers[script]
    spelled = ["--adapter_name", "autolora", "--lora_r", "3", "--autolora_mode", "first_order",
               "--autolora_beta_lr", "0.1", "--save_step", "7", "--use_gradient_checkpointing"]
    canonical = ["--method", "autolora", "--rank", "3", "--autolora_hypergradient", "first_order",
                 "--autolora_meta_lr", "0.1", "--checkpointing_steps", "7", "--gradient_checkpointing"]
    required = (["--pretrained_model_name_or_path", "m", "--instance_prompt", "p"] if script == "dreambooth"
                else ["--base_model", "m", "--data_path", "d", "--output_dir", "o"])
    a, b = (vars(parser.parse_args(required + argv)) for argv in (spelled, canonical))
    assert a == b and (a["method"], a["rank"], a["checkpointing_steps"], a["gradient_checkpointing"]) == (
        "autolora", 3, 7, True)
    for argv, want in ((["--autolora_fd_batched"], True), (["--autolora_fd_batched", "false"], False),
                       (["--no-autolora_fd_batched"], False), (["--autolora_fd_batched", "True"], True)):
        assert parser.parse_args(required + argv).autolora_fd_batched is want, argv
    with pytest.raises(SystemExit):
        parser.parse_args(required + ["--autolora_fd_batched", "maybe"])


@pytest.mark.parametrize("script", ["dreambooth", "commonsense"])
def test_search_length_is_steps_or_epochs_never_both(script, tmp_path, capsys):
    mod = load_script(f"train/{script}_dash.py", reuse=True)
    required = (["--pretrained_model_name_or_path", "tiny-sd", "--instance_data_dir", str(ROOT / "assets" / "subject"),
                 "--instance_prompt", "p", "--output_dir", str(tmp_path)] if script == "dreambooth"
                else ["--base_model", "m", "--data_path", "d", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        mod.parse_args(required + ["--method", "autolora", "--autolora_search_steps", "2",
                                   "--autolora_search_epochs", "1"])
    assert "give one" in capsys.readouterr().err
    args = mod.parse_args(required + ["--method", "autolora", "--autolora_search_epochs", "0.5"])
    flags = load_script("train/run_flags.py", reuse=True)
    assert flags.search_steps(args, 10, 99) == 5 and args.autolora_search_steps is None
    args = mod.parse_args(required + ["--method", "autolora", "--autolora_search_steps", "3"])
    assert flags.search_steps(args, 10, 99) == 3


def test_the_run_lifecycle_messages_name_flags_both_scripts_have(parsers):
    """dashdiff.training words its refusals with the spellings the scripts pass in (CLI_FLAGS): each is
    a flag of both parsers, with the destination the library's neutral name says."""
    from dataclasses import asdict

    from dashdiff.training import NEUTRAL_FLAGS

    cli = asdict(load_script("train/run_flags.py", reuse=True).CLI_FLAGS)
    for name, parser in parsers.items():
        have = parser._option_string_actions
        assert {role: have[flag].dest for role, flag in cli.items()} == asdict(NEUTRAL_FLAGS), name
