"""The package's structure and explicit interfaces (issue 15): the method registry and the layer's
single dispatch, dash_step's launch report, AutoLoRA's paired finite-difference context, one home
for file names and the header, a light ``import dashdiff``, plots behind the ``plots`` extra, and
tests that mirror the modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def test_import_dashdiff_loads_no_framework():
    """Every public name loads on first use: ``import dashdiff`` imports neither torch nor PEFT,
    transformers, diffusers or accelerate (2,793 modules before, the interpreter's ~75 now), and a
    name or a submodule (``dashdiff.walk``) then loads what it needs."""
    code = ("import sys, dashdiff; "
            "print([m for m in ('torch', 'peft', 'transformers', 'diffusers', 'accelerate') if m in sys.modules]); "
            "from dashdiff import LoraDashConfig; "
            "print(LoraDashConfig.__module__, 'peft' in sys.modules, dashdiff.walk.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[]", "dashdiff.dash.config True dashdiff.walk"]
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        dashdiff.no_such_name
    assert set(dashdiff.__all__) <= set(dir(dashdiff))


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



def test_the_library_names_no_command_line_flag():
    """CLI wording lives in train/: the library's strings (messages, docstrings) name settings, not
    ``--flags`` (dashdiff.training takes the scripts' spellings as a FlagNames)."""
    import ast
    import re

    found = []
    for path in sorted(Path(dashdiff.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if re.search(r"(?<![\w-])--[a-z]", node.value):
                    found.append(f"{path.name}:{node.lineno}")
    assert found == []


# --------------------------------------------------------------------------- tests mirror the modules

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"

# dashdiff/<a>/<b>.py is tested in tests/test_<a>_<b>.py (package __init__ files only re-export: the
# package surface is this file's). The exceptions, each tested in another file for a reason:
TESTED_ELSEWHERE = {
    "_lazy.py": "test_structure.py: the lazy exports and the light import",
    "registry.py": "test_structure.py: every variant against the registry and the layer's declarations",
    "variant.py": "test_structure.py: the interface every method variant implements",
    "files.py": "test_structure.py: one home for the file names and the header",
    "walk.py": "every adapter test finds its layers through it (iter_layers: test_structure.py)",
    "ops.py": "test_cuda.py: mm_to's float32 output; test_structure.py: the search's Adam",
    "safeio.py": "the interrupted and killed saves of test_state.py, test_export.py, test_checkpoint_safety.py",
    "callbacks.py": "test_commonsense_train.py: the callback in a real Trainer run on that file's tiny Llama",
    "dash/config.py": "test_config.py: the checks both method configs share live in config.py",
    "autolora/config.py": "test_config.py: the checks both method configs share live in config.py",
    "dash/report.py": "test_app.py: the inspect tab reads a trained adapter's records and draws its figures",
    "inspect_plots.py": "test_app.py: the inspect tab draws the records",
    "plotting.py": "test_app.py: the inspect tab draws the records",
}

# One end-to-end file per script.
SCRIPT_TESTS = {
    "app.py": "test_app.py",
    "train/dreambooth_dash.py": "test_dreambooth.py",
    "train/dreambooth_eval.py": "test_dreambooth_eval.py",
    "train/commonsense_dash.py": "test_commonsense_train.py",
    "train/commonsense_eval.py": "test_commonsense_eval.py",
    "train/commonsense_data.py": "test_commonsense_data.py",
    "train/run_flags.py": "test_run_flags.py",
    "train/input_rules.py": "test_inputs.py",
}

# Test files that follow neither a module nor a script: a concern across several, each named here.
ACROSS = {
    "test_structure.py": "the package layout and its explicit interfaces",
    "test_cuda.py": "the CUDA path of the kernels, both scripts and the app",
    "test_devices.py": "device placement of the DreamBooth step (meta device)",
    "test_checkpoint_safety.py": "the DreamBooth script's checkpoints and folders under faults",
    "test_diffusers_controls.py": "diffusers' runtime controls on a launched LoRA-Dash UNet",
    "test_kohya_metadata.py": "what the kohya export tells A1111 / Forge / sd-scripts",
    "test_script_step_logic.py": "both training scripts' optimizer-step boundaries under gradient accumulation, in "
                                 "process (the scripts' own files run accumulation only through accelerate launch)",
    "test_export_stock_load.py": "export.py's files in the stock loaders (a ~1 min subprocess fixture: kept out "
                                 "of the mutation run, which runs export.py's in-process test_export.py)",
    "test_install.py": "the lock against pyproject.toml; text-encoder adapters without add_adapter",
    "test_bench.py": "the benchmark scripts of bench/ at CPU size",
    "test_quality.py": "bench/quality.py and its world encoder",
    "test_worlds.py": "the procedural worlds of assets/pretrain/",
    "test_pretrain.py": "the pretraining scripts of assets/pretrain/",
    "test_text_world_qa.py": "the text world's plain questions, from the world through pretraining to quality.py",
}

# Files beside the tests that are not tests: the reason each has to stay in tests/ itself.
ROOT_EXTRAS = {
    "conftest.py": "pytest's shared fixtures, and tests/scripts/ on sys.path",
}


def _module_test(rel: str) -> str:
    return "test_" + rel[:-len(".py")].replace("/", "_") + ".py"


def test_every_module_has_its_test_file():
    package = ROOT / "dashdiff"
    modules = sorted(p.relative_to(package).as_posix() for p in package.rglob("*.py") if p.name != "__init__.py")
    missing = [f"dashdiff/{m} -> tests/{_module_test(m)}" for m in modules
               if m not in TESTED_ELSEWHERE and not (TESTS / _module_test(m)).exists()]
    assert missing == []
    # an exception that no longer applies (the module is gone or has its own file now) is removed
    stale = [m for m in TESTED_ELSEWHERE if m not in modules or (TESTS / _module_test(m)).exists()]
    assert stale == []


def test_every_script_has_its_end_to_end_file_and_every_test_file_its_subject():
    scripts = {p.relative_to(ROOT).as_posix() for p in (ROOT / "train").glob("*.py")} | {"app.py"}
    assert sorted(SCRIPT_TESTS) == sorted(scripts)
    package = ROOT / "dashdiff"
    subjects = {_module_test(p.relative_to(package).as_posix()) for p in package.rglob("*.py")}
    subjects |= set(SCRIPT_TESTS.values()) | set(ACROSS)
    files = {p.name for p in TESTS.glob("test_*.py")}
    assert sorted(set(SCRIPT_TESTS.values()) - files) == [] and sorted(set(ACROSS) - files) == []
    assert sorted(files - subjects) == []  # a test file named after no module, script or listed concern


def test_tests_root_holds_only_test_files():
    entries = [p for p in TESTS.iterdir() if not p.name.startswith((".", "__pycache__"))]
    stray = [p.name for p in entries if p.is_file() and not (p.name.startswith("test_") and p.suffix == ".py")
             and p.name not in ROOT_EXTRAS]
    assert stray == []  # helper modules and launched scripts live in tests/scripts/
    assert sorted(p.name for p in entries if p.is_dir()) == ["fixtures", "scripts"]
    assert not list((TESTS / "scripts").glob("test_*.py"))  # pytest would collect them
