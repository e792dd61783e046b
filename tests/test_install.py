"""Installs that reproduce: the lock agrees with pyproject.toml, and text-encoder adapters attach
without transformers' version-gated ``add_adapter`` exactly as it would attach them."""

import tomllib

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from launch_utils import ROOT


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("-e") and "@" not in line, f"constraints.txt: not a version pin: {line!r}"
        name, sep, version = line.partition("==")
        assert sep, f"constraints.txt: every line pins one version with ==, got {line!r}"
        pins[canonicalize_name(name)] = version
    return pins


def test_lock_pins_every_declared_dependency_within_its_range():
    """Each dependency of the package and of its test extra is pinned, at a version its
    pyproject range admits (a range raised past the lock, or a lock edited past a bound, fails)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _lock()
    declared = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    for req in declared:
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt does not pin {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} is outside {req}"
    # The Makefile installs torch==2.13.0 from whichever index serves it (+cpu here): no local tag.
    assert pins["torch"] == "2.13.0"


@pytest.mark.parametrize("method", ["lora", "dash", "autolora"])
def test_text_encoder_adapter_is_what_add_adapter_gives(db, method):
    """The script's PEFT injection against transformers' add_adapter, from the same seed: the same
    tensors under the same names, the same config (base model recorded), the same trainable set."""
    from transformers import CLIPTextModel

    from dashdiff.testing import resolve_model

    path = resolve_model("tiny-sd")
    args = db.parse_args(["--pretrained_model_name_or_path", path, "--instance_data_dir", str(ROOT / "assets" / "subject"),
                          "--instance_prompt", "x", "--output_dir", "unused", "--method", method, "--rank", "3",
                          "--lora_alpha", "6"])
    db.resolve_defaults(args, "sd")

    def attach(use_script: bool):
        te = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").requires_grad_(False)
        cfg = db.adapter_config(args, db.TEXT_ENCODER_LAYERS)
        torch.manual_seed(7)
        if use_script:
            db.add_text_encoder_adapter(te, cfg)
        else:
            te.add_adapter(cfg)
        return te

    try:
        ref = attach(use_script=False)
    except ValueError as e:  # this transformers refuses the installed PEFT: nothing to compare with
        pytest.skip(f"transformers' add_adapter is unusable here: {e}")
    got = attach(use_script=True)
    want_sd, got_sd = ref.state_dict(), got.state_dict()
    assert list(got_sd) == list(want_sd) and any(".lora_A." in k for k in got_sd)
    for k in want_sd:
        assert torch.equal(got_sd[k], want_sd[k]), k
    assert got.peft_config["default"].to_dict() == ref.peft_config["default"].to_dict()
    assert got.peft_config["default"].base_model_name_or_path  # the export writes it into adapter_config.json
    trainable = {n for n, p in got.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in ref.named_parameters() if p.requires_grad} and trainable
