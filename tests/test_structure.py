"""The package's structure and explicit interfaces (issue 15): the method registry and the layer's
single dispatch, dash_step's launch report, AutoLoRA's paired finite-difference context, one home
for file names and the header, a light ``import dashdiff``, plots behind the ``plots`` extra."""

from __future__ import annotations

import subprocess
import sys

import peft
import pytest
import torch
from torch import nn

import dashdiff
from dashdiff.autolora.variant import AutoLoraVariant
from dashdiff.dash import lifecycle
from dashdiff.dash.lifecycle import LaunchReport
from dashdiff.dash.variant import LoraDashVariant
from dashdiff.layer import DashdiffLinear
from dashdiff.registry import METHODS, VARIANTS
from dashdiff.variant import MethodVariant
from dashdiff.walk import AdapterLayer, iter_layers


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(16, 12)
        self.o_proj = nn.Linear(12, 16)

    def forward(self, x):
        return self.o_proj(self.q_proj(x))


def test_registry_and_layer_declarations():
    assert VARIANTS == {"dash": LoraDashVariant, "autolora": AutoLoraVariant} and METHODS == ("lora", "dash", "autolora")
    for kind, variant in VARIANTS.items():
        assert issubclass(variant, MethodVariant) and variant.kind == kind
        assert issubclass(variant.config_class, peft.LoraConfig)
        assert set(variant.state_names) <= set(variant.containers)
        for name, role in variant.containers.items():
            names = DashdiffLinear.adapter_layer_names if role == "parameter" else DashdiffLinear.other_param_names
            assert name in names
        assert set(variant.settings) <= set(DashdiffLinear.other_param_names)
    every = [n for v in VARIANTS.values() for n in (*v.containers, *v.settings, *v.caches)]
    assert len(every) == len(set(every))  # no two methods share a container name


def test_the_layer_holds_one_variant_object_per_adapter():
    torch.manual_seed(0)
    model = peft.get_peft_model(Tiny(), dashdiff.LoraDashConfig(r=2, target_modules=["q_proj", "o_proj"],
                                                                dash_directions=2, dash_warmup_steps=1))
    model.add_adapter("auto", dashdiff.AutoLoraConfig(r=2, target_modules=["q_proj", "o_proj"]))
    model.add_adapter("plain", peft.LoraConfig(r=2, target_modules=["q_proj", "o_proj"]))
    layer = model.base_model.model.q_proj
    assert isinstance(layer.lora_variant["default"], LoraDashVariant)
    assert isinstance(layer.lora_variant["auto"], AutoLoraVariant)
    assert "plain" not in layer.lora_variant and layer.method("plain") is None
    assert layer.adapter_kind == {"default": "dash", "auto": "autolora", "plain": "lora"}


def test_dash_step_returns_a_launch_report():
    torch.manual_seed(0)
    model = peft.get_peft_model(Tiny(), dashdiff.LoraDashConfig(r=2, target_modules=["q_proj", "o_proj"],
                                                                dash_directions=2, dash_warmup_steps=2,
                                                                init_lora_weights="gaussian"))
    first = dashdiff.dash_step(model)
    assert first == LaunchReport() and not first and first.layers == () and first.prefetch is None
    second = dashdiff.dash_step(model)
    assert second and second.layers == ("q_proj", "o_proj") and second.seconds > 0 and second.prefetch is None
    # the report is the one channel: no module globals mirror it
    assert not hasattr(lifecycle, "last_launch_seconds") and not hasattr(lifecycle, "last_prefetch_report")
    assert not dashdiff.dash_step(model)  # launched once
    assert all(isinstance(t, AdapterLayer) for t in iter_layers(model, "dash"))


def test_launch_report_carries_the_prefetch():
    torch.manual_seed(0)
    model = peft.get_peft_model(Tiny(), dashdiff.LoraDashConfig(r=2, target_modules=["q_proj", "o_proj"],
                                                                dash_directions=2, dash_warmup_steps=1,
                                                                init_lora_weights="gaussian"))
    handle = dashdiff.prefetch_spectra(model, workers=1)
    handle.wait()
    assert all(layer.dash_prefetch[a] is handle for _, layer, a in iter_layers(model, "dash"))
    report = dashdiff.dash_step(model)
    assert report.prefetch is handle.report and report.prefetch.prefetched == 2


def test_former_module_paths_are_gone():
    from pathlib import Path

    from dashdiff import autolora, config, dash

    # the former modules' files (not find_spec: an editable install of another checkout would answer)
    package = Path(dashdiff.__file__).parent
    for old in ("launch", "prefetch", "functional", "ranks", "rank_report", "tiny", "commonsense"):
        assert not (package / f"{old}.py").exists(), old
    for package, name in ((dash, "_launch"), (dash, "last_launch_seconds"), (autolora, "_grads"),
                          (autolora, "DEFAULT_BETA_LR"), (config, "LoraDashConfig"), (config, "AutoLoraConfig")):
        assert not hasattr(package, name), (package.__name__, name)


def test_paired_context_sets_and_always_clears_the_pairs():
    torch.manual_seed(0)
    model = peft.get_peft_model(Tiny(), dashdiff.AutoLoraConfig(r=2, target_modules=["q_proj"]))
    layer = model.base_model.model.q_proj
    pair = (torch.zeros(2, 2, 16), torch.zeros(2, 12, 2))
    x = torch.randn(4, 16)
    with model.disable_adapter():
        want = model(x)
    with pytest.raises(RuntimeError, match="boom"):
        with AutoLoraVariant.paired([(layer, "default")], [pair]):
            assert layer._fd_pairs["default"] is pair
            torch.testing.assert_close(model(x), want)  # both halves through zero factors
            raise RuntimeError("boom")
    assert layer._fd_pairs == {}


def test_file_names_and_header_have_one_home(tmp_path):
    from dashdiff import export, files, state

    assert export.HEADER_KEY == files.HEADER_KEY == "dashdiff"
    assert export.DIFFUSERS_WEIGHT_NAME == files.DIFFUSERS_WEIGHT_NAME and state.STATE_FILE_NAME == files.STATE_FILE_NAME
    assert files.read_header(files.header_metadata({"kind": "state"})) == {"kind": "state"}
    assert files.read_header({}) == {} and files.read_header({"dashdiff": "{not json"}) == {}
    assert files.read_header({"dashdiff": "[1, 2]"}) == {}


def test_import_dashdiff_is_light():
    code = ("import sys, dashdiff; "
            "heavy = [m for m in sys.modules if m.startswith(('transformers.training_args', 'transformers.trainer', "
            "'matplotlib', 'dashdiff.callbacks', 'dashdiff.training', 'dashdiff.testing'))]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert dashdiff.LoraDashCallback.__name__ == "LoraDashCallback"  # loaded on first access
    assert sorted(dashdiff.__all__) == dashdiff.__all__ and all(hasattr(dashdiff, n) for n in dashdiff.__all__)


def test_the_search_optimizer_does_not_pull_in_script_support():
    """BilevelStep's default Adam chooses fused / foreach through dashdiff.ops, not the run lifecycle."""
    code = ("import sys, torch; from dashdiff.autolora.search import default_adam; "
            "opt = default_adam([torch.nn.Parameter(torch.zeros(2))], 1e-3); "
            "print(opt.defaults['fused'], 'dashdiff.training' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False"]


def test_plots_need_the_plots_extra(monkeypatch):
    from dashdiff import inspect_plots
    from dashdiff.autolora.report import AutoLoraLayerInfo

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    layer = AutoLoraLayerInfo("q", torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([True, True]), 0.5)
    with pytest.raises(ImportError, match=r"pip install \"dashdiff\[plots\]\""):
        inspect_plots.plot_autolora([layer])
