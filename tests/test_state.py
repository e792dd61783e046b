"""save_adapter / load_adapter: the full training state round-trips exactly (outputs identical,
training continues), bad inputs raise errors that name the problem, writes are crash-safe, and
stock PEFT / diffusers saves of dashdiff layers warn."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

import dashdiff
from dashdiff import safeio
from dashdiff.files import HEADER_KEY
from dashdiff.testing import tiny_llama, tiny_sd_pipeline
from dashdiff.walk import iter_layers, iter_lora_layers
from te_adapters import add_te_adapter

TARGETS = ["q_proj", "v_proj", "down_proj"]


def dash_config(**kw) -> dashdiff.LoraDashConfig:
    kw = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "dash_directions": 2, "dash_warmup_steps": 2,
          "init_lora_weights": "gaussian", **kw}
    return dashdiff.LoraDashConfig(**kw)


def lora_params(model) -> list[torch.Tensor]:
    """Trainable adapter parameters in a wrapper-independent order (A, B, δ / β per layer)."""
    out = []
    for _, _, name, layer in sorted(iter_lora_layers(model), key=lambda t: (t[0], t[2])):
        for adapter in sorted(layer.lora_A.keys()):
            out += [layer.lora_A[adapter].weight, layer.lora_B[adapter].weight]
            for dct in ("lora_dash_delta", "lora_autolora_beta"):
                if adapter in getattr(layer, dct, {}):
                    out.append(getattr(layer, dct)[adapter])
    return out


def train_step(model, ids: torch.Tensor, lr: float = 0.5) -> None:
    """One plain-SGD step (stateless, so two models stay comparable) + dashdiff's step counter."""
    params = lora_params(model)
    loss = model(input_ids=ids, labels=ids).loss
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.sub_(lr * g)
    dashdiff.dash_step(model)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 40, 41, 42, 77, 78, 90, 100, 120, 7]])


@pytest.fixture
def mid_dash():
    """A Llama PeftModel three optimizer steps in: launched after step 2, δ trained one step."""
    model = get_peft_model(tiny_llama(0), dash_config())
    for _ in range(3):
        train_step(model, IDS)
    layers = list(iter_layers(model, "dash"))
    assert all(layer.is_launched(a) for _, layer, a in layers)
    assert any(layer.lora_dash_delta[a].abs().sum() > 0 for _, layer, a in layers)
    return model


def test_round_trip_mid_dash_into_fresh_model(mid_dash, tmp_path):
    path = dashdiff.save_adapter(mid_dash, tmp_path / "state.safetensors")
    fresh = dashdiff.load_adapter(tiny_llama(0), path)  # bare model: injected from the stored config
    assert torch.equal(logits(fresh, IDS), logits(mid_dash, IDS))
    src = {n: (layer, a) for n, layer, a in iter_layers(mid_dash, "dash")}
    dst = {n: (layer, a) for n, layer, a in iter_layers(fresh, "dash")}
    assert src.keys() == dst.keys() and len(src) == 6
    for name, (s_layer, a) in src.items():
        d_layer, _ = dst[name]
        assert d_layer.is_launched(a) and int(d_layer.lora_dash_launch_step[a]) == 2
        assert d_layer._dash_steps[a] == 3
        for field in ("indices", "sigma", "change_rate"):
            assert torch.equal(d_layer.dash_record[a][field], s_layer.dash_record[a][field])
    assert dashdiff.selected_directions(fresh).keys() == dashdiff.selected_directions(mid_dash).keys()

    # Training continues identically: no relaunch, counters go on.
    u_before = {n: layer.lora_dash_U[a].clone() for n, (layer, a) in dst.items()}
    for model in (mid_dash, fresh):
        train_step(model, IDS)
    assert torch.equal(logits(fresh, IDS), logits(mid_dash, IDS))
    for name, (layer, a) in dst.items():
        assert int(layer.lora_dash_step[a]) == 4 and int(layer.lora_dash_launch_step[a]) == 2
        assert torch.equal(layer.lora_dash_U[a], u_before[name])
    assert all(p.grad is None for p in lora_params(fresh))


def test_round_trip_into_model_with_adapter(mid_dash, tmp_path):
    """Loading into a model that already has the adapter copies the state in place."""
    dashdiff.save_adapter(mid_dash, tmp_path)  # a folder: dashdiff_adapter.safetensors inside
    target = get_peft_model(tiny_llama(0), dash_config())
    assert dashdiff.load_adapter(target, tmp_path) is target
    assert torch.equal(logits(target, IDS), logits(mid_dash, IDS))
    header = json.loads(safeio.read_metadata(tmp_path / "dashdiff_adapter.safetensors")[HEADER_KEY])
    assert header["kind"] == "state" and header["adapter_name"] == "default"
    assert (header["format_version"], header["dashdiff_version"]) == (1, dashdiff.__version__)
    assert safeio.read_metadata(tmp_path / "dashdiff_adapter.safetensors")["format"] == "pt"  # stock readers want it
    assert header["configs"][""]["class"] == "LoraDashConfig"
    # the model's own config (its short target names), not one rebuilt from the layers
    assert sorted(header["configs"][""]["fields"]["target_modules"]) == sorted(TARGETS)
    assert header["layers"]["model.layers.0.self_attn.q_proj"] == {"method": "dash", "r": 4, "s": 2, "launched": True}


@pytest.mark.parametrize("name", [None, "renamed"])
def test_round_trip_pipeline_dash_and_autolora(tmp_path, name):
    """Pipeline: LoRA-Dash on the UNet, AutoLoRA on the text encoder, one file, fresh pipeline; under
    the stored name and renamed (the UNet's add_adapter and the text encoder's injection must both
    take the new name)."""
    pipe = tiny_sd_pipeline(0)
    pipe.unet.add_adapter(dashdiff.LoraDashConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], dash_directions=2))
    add_te_adapter(pipe.text_encoder, dashdiff.AutoLoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, _, _, layer in iter_lora_layers(pipe):
            b = layer.lora_B["default"].weight
            b.copy_(1e-2 * torch.randn(b.shape, generator=g))
            if "default" in layer.lora_autolora_beta:
                layer.lora_autolora_beta["default"].copy_(torch.randn(4, generator=g))
                layer.lora_autolora_outer_steps["default"].fill_(5)
    dashdiff.launch_dash(pipe)
    with torch.no_grad():
        for _, layer, a in iter_layers(pipe, "dash"):
            layer.lora_dash_delta[a].copy_(torch.randn(2, generator=g))
    path = dashdiff.save_adapter(pipe, tmp_path / "pipe.safetensors")

    fresh = dashdiff.load_adapter(tiny_sd_pipeline(0), path, adapter_name=name)
    adapter = name or "default"
    assert {a for _, _, _, layer in iter_lora_layers(fresh) for a in layer.lora_A} == {adapter}
    sample, t, ehs = torch.randn(1, 4, 32, 32, generator=g), torch.tensor([5]), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        assert torch.equal(fresh.unet(sample, t, ehs).sample, pipe.unet(sample, t, ehs).sample)
        tokens = torch.tensor([[672, 50, 60, 673]])
        assert torch.equal(fresh.text_encoder(tokens).last_hidden_state, pipe.text_encoder(tokens).last_hidden_state)
    layer = fresh.text_encoder.encoder.layers[0].self_attn.q_proj
    assert layer.adapter_kind[adapter] == "autolora" and int(layer.lora_autolora_outer_steps[adapter]) == 5
    assert dashdiff.determine_ranks(fresh) == dashdiff.determine_ranks(pipe)
    assert all(layer.is_launched(a) for _, layer, a in iter_layers(fresh, "dash"))
    # again into the pipeline that now has the adapter: its layers are found under their component
    # prefixes and the tensors copied in place
    with torch.no_grad():
        for _, _, _, layer in iter_lora_layers(fresh):
            layer.lora_B[adapter].weight.zero_()
        assert dashdiff.load_adapter(fresh, path, adapter_name=name) is fresh
        assert torch.equal(fresh.unet(sample, t, ehs).sample, pipe.unet(sample, t, ehs).sample)


def test_round_trip_plain_peft_lora(tmp_path):
    """Ordinary PEFT LoRA layers (no dashdiff layer) round-trip too, re-injected as stock layers."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    model = get_peft_model(tiny_llama(0), LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "up_proj"]))
    with torch.no_grad():
        for _, _, _, layer in iter_lora_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.05)
    path = dashdiff.save_adapter(model, tmp_path / "plain.safetensors")
    fresh = dashdiff.load_adapter(tiny_llama(0), path)
    assert type(fresh.model.layers[0].self_attn.q_proj) is LoraLinear
    assert torch.equal(logits(fresh, IDS), logits(model, IDS))


# --------------------------------------------------------------------------- bad input


def test_shape_mismatch_names_module_shapes_and_fix(mid_dash, tmp_path):
    path = dashdiff.save_adapter(mid_dash, tmp_path / "s.safetensors")
    other_r = get_peft_model(tiny_llama(0), dash_config(r=8))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight has shape \(4, 64\) "
                                         r"in the file but \(8, 64\) in the model: this adapter was trained for another"):
        dashdiff.load_adapter(other_r, path)
    # Another base model (hidden 48): injected from the stored config, then the shapes disagree.
    from transformers import LlamaForCausalLM

    cfg = tiny_llama(0).config
    cfg.hidden_size, cfg.intermediate_size = 48, 96
    with pytest.raises(ValueError, match=r"has shape .* in the file but .* another base model"):
        dashdiff.load_adapter(LlamaForCausalLM(cfg), path)


def test_missing_modules_are_named(mid_dash, tmp_path):
    path = dashdiff.save_adapter(mid_dash, tmp_path / "s.safetensors")
    from transformers import LlamaForCausalLM

    cfg = tiny_llama(0).config
    cfg.num_hidden_layers = 1
    with pytest.raises(ValueError, match=r"not adapted in the model \(3\): model\.layers\.1\.mlp\.down_proj, "
                                         r"model\.layers\.1\.self_attn\.q_proj"):
        dashdiff.load_adapter(LlamaForCausalLM(cfg), path)


def test_bad_files_are_named(mid_dash, tmp_path):
    good = tmp_path / "good.safetensors"
    dashdiff.save_adapter(mid_dash, good)
    data = good.read_bytes()
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.safetensors.*truncated"):
        dashdiff.load_adapter(tiny_llama(0), truncated)
    text = tmp_path / "notes.safetensors"
    text.write_text("this is not a safetensors file at all")
    with pytest.raises(ValueError, match=r"notes\.safetensors"):
        dashdiff.load_adapter(tiny_llama(0), text)
    pickle = tmp_path / "adapter.bin"
    torch.save({"w": torch.zeros(2)}, pickle)
    with pytest.raises(ValueError, match=r"adapter\.bin: it looks like a PyTorch pickle"):
        dashdiff.load_adapter(tiny_llama(0), pickle)
    with pytest.raises(FileNotFoundError, match=r"nowhere\.safetensors"):
        dashdiff.load_adapter(tiny_llama(0), tmp_path / "nowhere.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, plain)
    with pytest.raises(ValueError, match=r"plain\.safetensors has no 'dashdiff' header"):
        dashdiff.load_adapter(tiny_llama(0), plain)
    export = dashdiff.export_lora(mid_dash, tmp_path / "exp", format="peft")
    with pytest.raises(ValueError, match=r"is a dashdiff \*export\*"):
        dashdiff.load_adapter(tiny_llama(0), f"{export}/adapter_model.safetensors")
    with pytest.raises(ValueError, match="several adapters"):
        mid_dash.add_adapter("second", dash_config())
        dashdiff.save_adapter(mid_dash, tmp_path / "x.safetensors")


def test_interrupted_save_leaves_old_file(mid_dash, tmp_path, monkeypatch):
    path = tmp_path / "state.safetensors"
    dashdiff.save_adapter(mid_dash, path)
    old = path.read_bytes()
    train_step(mid_dash, IDS)

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"\x00" * 100)
        raise KeyboardInterrupt  # an interrupted process, not just an exception

    monkeypatch.setattr(safeio, "_save_file", broken)
    with pytest.raises(KeyboardInterrupt):
        dashdiff.save_adapter(mid_dash, path)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["state.safetensors"]
    monkeypatch.undo()
    dashdiff.load_adapter(tiny_llama(0), path)  # still a valid file


# --------------------------------------------------------------------------- stock save paths warn


@pytest.mark.parametrize("config", [dash_config(), dashdiff.AutoLoraConfig(r=4, lora_alpha=4, target_modules=TARGETS)],
                         ids=["dash", "autolora"])
def test_stock_peft_save_pretrained_warns(config, tmp_path):
    model = get_peft_model(tiny_llama(0), config)
    with pytest.warns(UserWarning, match=r"dashdiff: a stock PEFT/diffusers save.*export_lora"):
        model.save_pretrained(tmp_path)


def test_stock_diffusers_state_dict_warns():
    from peft.utils import get_peft_model_state_dict

    pipe = tiny_sd_pipeline(0)
    pipe.unet.add_adapter(dashdiff.LoraDashConfig(r=2, lora_alpha=2, target_modules=["to_q"], dash_directions=1))
    with pytest.warns(UserWarning, match=r"dashdiff: a stock PEFT/diffusers save"):
        get_peft_model_state_dict(pipe.unet)


def test_plain_lora_stock_save_does_not_warn(tmp_path):
    model = get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj"]))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="dashdiff")
        model.save_pretrained(tmp_path)


def test_split_name_of_a_layer_in_a_file():
    """A file's layer name -> (component, name relative to it): a plain model's single component is "";
    a pipeline's names start with the component ("unet.down.0.proj" -> unet, "down.0.proj"); an unknown
    first part gives (None, name)."""
    from dashdiff.state import _split_name

    assert _split_name("down.0.proj", {"": None}) == ("", "down.0.proj")
    pipe = {"unet": None, "text_encoder": None}
    assert _split_name("unet.down.0.proj", pipe) == ("unet", "down.0.proj")
    assert _split_name("text_encoder.layers.1.q_proj", pipe) == ("text_encoder", "layers.1.q_proj")
    assert _split_name("vae.decoder.proj", pipe) == (None, "vae.decoder.proj")


# --------------------------------------------------------------------------- a file that does not fit


def test_fit_message_names_up_to_ten_modules_on_each_side():
    """The refusal of a file whose modules differ from the model's: each side that has modules, with
    its count and at most ten names, " ..." after the tenth; then the hint. The strings are written
    out by hand (catches a wrong cut-off, a "..." at exactly ten, a lost side, a changed hint)."""
    from pathlib import Path

    from dashdiff.state import _fit_message

    f = Path("f.safetensors")
    names = [f"m{i}" for i in range(11)]
    head = "dashdiff: f.safetensors does not fit this model's adapter 'a'."
    hint = "Was it trained on another base model or with other target_modules?"
    ten = "m0, m1, m2, m3, m4, m5, m6, m7, m8, m9"
    assert _fit_message(f, "a", names[:10], []) == (
        f"{head} Modules in the file but not adapted in the model (10): {ten}. {hint}")
    assert _fit_message(f, "a", names, []) == (
        f"{head} Modules in the file but not adapted in the model (11): {ten} .... {hint}")
    assert _fit_message(f, "a", [], names[:10]) == (
        f"{head} Modules adapted in the model but not in the file (10): {ten}. {hint}")
    assert _fit_message(f, "a", [], names) == (
        f"{head} Modules adapted in the model but not in the file (11): {ten} .... {hint}")
    assert _fit_message(f, "a", ["x.q"], ["y.k"]) == (
        f"{head} Modules in the file but not adapted in the model (1): x.q. "
        f"Modules adapted in the model but not in the file (1): y.k. {hint}")


def test_other_target_modules_are_refused_with_both_lists(tmp_path):
    """A file for q/v/down_proj into a model adapted on q/k/v_proj: the full message names what the
    file has and the model lacks (down_proj) and what the model has and the file lacks (k_proj)."""
    path = dashdiff.save_adapter(get_peft_model(tiny_llama(0), dash_config()), tmp_path / "s.safetensors")
    other = get_peft_model(tiny_llama(0), dash_config(target_modules=["q_proj", "k_proj", "v_proj"]))
    with pytest.raises(ValueError) as err:
        dashdiff.load_adapter(other, path)
    assert str(err.value) == (
        f"dashdiff: {path} does not fit this model's adapter 'default'. Modules in the file but not adapted in "
        "the model (2): model.layers.0.mlp.down_proj, model.layers.1.mlp.down_proj. Modules adapted in the model "
        "but not in the file (2): model.layers.0.self_attn.k_proj, model.layers.1.self_attn.k_proj. Was it trained "
        "on another base model or with other target_modules?")


# --------------------------------------------------------------------------- renaming, and undoing a failed load


def test_load_under_another_name_beside_an_existing_adapter(mid_dash, tmp_path):
    """``adapter_name`` into a PeftModel that has another adapter: PeftModel.add_adapter under the new
    name, which is then made active (PEFT leaves a new adapter inactive), so the outputs are the
    file's; the model's own adapter is kept. Into a bare model: injected under the new name."""
    path = dashdiff.save_adapter(mid_dash, tmp_path / "s.safetensors")
    target = get_peft_model(tiny_llama(0), dash_config(r=2))
    assert dashdiff.load_adapter(target, path, adapter_name="second") is target
    assert target.active_adapter == "second" and sorted(target.peft_config) == ["default", "second"]
    assert torch.equal(logits(target, IDS), logits(mid_dash, IDS))
    bare = dashdiff.load_adapter(tiny_llama(0), path, adapter_name="renamed")
    assert {a for _, _, _, layer in iter_lora_layers(bare) for a in layer.lora_A} == {"renamed"}
    assert torch.equal(logits(bare, IDS), logits(mid_dash, IDS))


def _structure(model) -> list:
    """What ``_Undo`` promises to put back, module by module: the type, the identities of its
    children / parameters / buffers, its attribute names (an added or dropped ``peft_config`` shows),
    the keys of every dict it holds (a LoRA layer's per-adapter dicts, a ParameterDict's own key
    list), and the PEFT config dict (identity and keys) and diffusers' ``_hf_peft_config_loaded``
    flag where the module holds them."""
    out = []
    for name, m in model.named_modules(remove_duplicate=False):
        own = vars(m)
        cfg = own.get("peft_config")
        out.append((name, type(m).__name__, {k: id(v) for k, v in m._modules.items()},
                    {k: id(v) for k, v in m._parameters.items()}, {k: id(v) for k, v in m._buffers.items()},
                    sorted(own), {k: sorted(map(str, v)) for k, v in own.items() if isinstance(v, dict)},
                    (id(cfg), sorted(cfg)) if isinstance(cfg, dict) else repr(cfg),
                    repr(own.get("_hf_peft_config_loaded"))))
    return out


def _fail_on_injection(monkeypatch, nth: int) -> None:
    """Make the ``nth`` injection of a load (1-based) inject, then fail like an out-of-memory."""
    from dashdiff import state

    real, calls = state._inject, []

    def inject(comp, cfg, adapter):
        calls.append(adapter)
        real(comp, cfg, adapter)
        if len(calls) == nth:
            raise MemoryError("simulated: out of memory half-way")

    monkeypatch.setattr(state, "_inject", inject)


def test_a_failed_injection_beside_an_existing_adapter_is_undone(mid_dash, tmp_path, monkeypatch):
    """A load under a second name into a PeftModel that fails after PEFT's add_adapter: the LoRA
    layers' per-adapter dicts (r, scaling, lora_A, ...), the shared peft_config dict and the model's
    attributes are exactly as before, the original error comes through, and the model still loads
    the file afterwards."""
    path = dashdiff.save_adapter(mid_dash, tmp_path / "s.safetensors")
    target = get_peft_model(tiny_llama(0), dash_config(r=2))
    before = _structure(target)
    _fail_on_injection(monkeypatch, 1)
    with pytest.raises(MemoryError, match="simulated"):
        dashdiff.load_adapter(target, path, adapter_name="second")
    assert _structure(target) == before
    assert sorted(target.peft_config) == ["default"]
    monkeypatch.undo()
    dashdiff.load_adapter(target, path, adapter_name="second")
    assert torch.equal(logits(target, IDS), logits(mid_dash, IDS))


@pytest.mark.parametrize("unet_adapter", [True, False], ids=["unet_adapted", "unet_bare"])
def test_a_failed_injection_into_a_pipeline_undoes_every_component(tmp_path, monkeypatch, unet_adapter):
    """A pipeline file (UNet and text encoder) loaded under a new name into a pipeline whose text
    encoder has no adapter and whose UNet has one already / none; the second injection fails: both
    components are put back, the first one's injection included (the UNet's peft_config dict and
    its ``_hf_peft_config_loaded`` flag, set back to True / removed again; the text encoder's absent
    peft_config)."""
    pipe = tiny_sd_pipeline(0)
    pipe.unet.add_adapter(dashdiff.LoraDashConfig(r=2, lora_alpha=2, target_modules=["to_q"], dash_directions=1))
    add_te_adapter(pipe.text_encoder, dashdiff.AutoLoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    path = dashdiff.save_adapter(pipe, tmp_path / "pipe.safetensors")
    target = tiny_sd_pipeline(0)
    if unet_adapter:
        target.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k"]), adapter_name="mine")
    assert vars(target.unet).get("_hf_peft_config_loaded") is (True if unet_adapter else None)
    assert "peft_config" not in vars(target.text_encoder)
    before = [_structure(target.unet), _structure(target.text_encoder)]
    _fail_on_injection(monkeypatch, 2)
    with pytest.raises(MemoryError, match="simulated"):
        dashdiff.load_adapter(target, path, adapter_name="loaded")
    assert [_structure(target.unet), _structure(target.text_encoder)] == before


# --------------------------------------------------------------------------- refusals, word for word

Q = "model.layers.0.self_attn.q_proj"
BROKEN = "(a damaged or hand-edited file)"
SHAPE_FIX = ("this adapter was trained for another base model (or another r / dash_directions). Load it into the "
             "base model it was trained on, or into a model without this adapter so that it is injected from the "
             "stored config.")


def _edit_layer(key: str, value):
    def edit(tensors, header):
        header["layers"][Q][key] = value
    return edit


def _edit_tensor(suffix: str, change):
    def edit(tensors, header):
        tensors[f"{Q}.{suffix}"] = change(tensors[f"{Q}.{suffix}"])
    return edit


def _nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[0, 0] = float("nan")
    return t


# name: (edit of the tensors / header, the message after "dashdiff: <file>"); the messages are the
# behaviour (they tell the user what is wrong and what to do), so they are compared whole
REFUSALS = {
    "no_adapter_name": (lambda t, h: h.pop("adapter_name"),
                        f": the 'dashdiff' header lacks adapter_name, configs or layers {BROKEN}"),
    "adapter_name_not_text": (lambda t, h: h.__setitem__("adapter_name", 5),
                              f": the 'dashdiff' header lacks adapter_name, configs or layers {BROKEN}"),
    "no_configs": (lambda t, h: h.__setitem__("configs", {}),
                   f": the 'dashdiff' header lacks adapter_name, configs or layers {BROKEN}"),
    "no_layers": (lambda t, h: h.__setitem__("layers", {}),
                  f": the 'dashdiff' header lacks adapter_name, configs or layers {BROKEN}"),
    "invalid_config": (lambda t, h: h["configs"][""]["fields"].__setitem__("dash_directions", -1),
                       ": the stored config of 'the model' is invalid (ValueError: dash_directions must be >= 1, got -1)"),
    "r_bool": (_edit_layer("r", True), f": layer '{Q}' in the header has no valid method / r / s "
                                       "({'method': 'dash', 'r': True, 's': 2, 'launched': False})"),
    "r_zero": (_edit_layer("r", 0), f": layer '{Q}' in the header has no valid method / r / s "
                                    "({'method': 'dash', 'r': 0, 's': 2, 'launched': False})"),
    "unknown_method": (_edit_layer("method", "dora"), f": layer '{Q}' in the header has no valid method / r / s "
                                                      "({'method': 'dora', 'r': 4, 's': 2, 'launched': False})"),
    "s_zero": (_edit_layer("s", 0), f": layer '{Q}' in the header has no valid method / r / s "
                                    "({'method': 'dash', 'r': 4, 's': 0, 'launched': False})"),
    "pipeline_file": (lambda t, h: h.__setitem__("configs", {"unet": h["configs"][""]}),
                      " holds an adapter for pipeline component 'unet', but the target has ['(model)']"),
    "short_A": (_edit_tensor("lora_A.weight", lambda t: t[:3].contiguous()),
                f": {Q}.lora_A.weight has shape (3, 64) in the file but (4, 64) in the model: {SHAPE_FIX}"),
    "integer_A": (_edit_tensor("lora_A.weight", lambda t: t.long()),
                  f": {Q}.lora_A.weight is torch.int64, expected a floating-point tensor {BROKEN}"),
    "float_counter": (_edit_tensor("lora_dash_step", lambda t: t.float()),
                      f": {Q}.lora_dash_step is torch.float32, expected a integer tensor {BROKEN}"),
    "all_linear": (lambda t, h: h["configs"][""]["fields"].__setitem__("target_modules", "all-linear"),
                   ": target_modules 'all-linear' cannot be checked before injection; save the adapter with an "
                   "explicit list"),
    "r_over_layer": (_edit_layer("r", 65), f": {Q} claims rank r=65, s=2 but the layer is 64x64 (at most 64): a "
                                           "damaged or hand-edited file"),
    "s_over_layer": (_edit_layer("s", 65), f": {Q} claims rank r=4, s=65 but the layer is 64x64 (at most 64): a "
                                           "damaged or hand-edited file"),
    "r_not_the_configs": (_edit_layer("r", 3), f": the stored config gives {Q} rank 4, the layer list says 3 "
                                               f"{BROKEN}"),
    "missing_V": (lambda t, h: t.pop(f"{Q}.lora_dash_V"), f" lacks tensor {Q}.lora_dash_V {BROKEN}"),
    "stray_tensor": (lambda t, h: t.__setitem__("model.layers.0.mlp.up_proj.lora_A.weight", torch.zeros(4, 64)),
                     " holds 1 tensor(s) that belong to no layer of its header (e.g. "
                     "model.layers.0.mlp.up_proj.lora_A.weight): a damaged or hand-edited file"),
    "nan_B": (_edit_tensor("lora_B.weight", _nan),
              f": {Q}.lora_B.weight holds NaN or infinite values: the run that wrote it had diverged; load an "
              "earlier checkpoint"),
}


@pytest.fixture(scope="module")
def small_state(tmp_path_factory):
    """Tensors and header of a LoRA-Dash state (q/v_proj of the tiny Llama, r=4, s=2, not launched)."""
    path = tmp_path_factory.mktemp("state") / "small.safetensors"
    model = get_peft_model(tiny_llama(0), dash_config(target_modules=["q_proj", "v_proj"]))
    dashdiff.save_adapter(model, path)
    tensors, meta = safeio.read_safetensors(path)
    return tensors, json.loads(meta[HEADER_KEY])


def _rewrite(state: tuple, edit, path):
    """``state`` (tensors, header) edited by ``edit`` and written to ``path``, as a hand-edit would."""
    import copy

    tensors, header = dict(state[0]), copy.deepcopy(state[1])
    edit(tensors, header)
    save_file(tensors, path, {"format": "pt", HEADER_KEY: json.dumps(header)})
    return path


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_file_and_the_problem_word_for_word(case, small_state, tmp_path):
    edit, tail = REFUSALS[case]
    path = _rewrite(small_state, edit, tmp_path / f"{case}.safetensors")
    with pytest.raises(ValueError) as err:
        dashdiff.load_adapter(tiny_llama(0), path)  # a bare model: the adapter would be injected
    assert str(err.value) == f"dashdiff: {path}{tail}"


def test_a_single_model_file_into_a_pipeline_is_refused(tmp_path):
    path = dashdiff.save_adapter(get_peft_model(tiny_llama(0), dash_config()), tmp_path / "s.safetensors")
    with pytest.raises(ValueError) as err:
        dashdiff.load_adapter(tiny_sd_pipeline(0), path)
    assert str(err.value) == (f"dashdiff: {path} holds an adapter for a single model, but the target has "
                              "['unet', 'text_encoder']")


def test_rank_one_is_a_valid_rank(tmp_path):
    """r = 1 is the smallest rank a header may hold (r = 0 is refused above)."""
    model = get_peft_model(tiny_llama(0), dash_config(r=1))
    with torch.no_grad():
        for _, _, _, layer in iter_lora_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.05)
    fresh = dashdiff.load_adapter(tiny_llama(0), dashdiff.save_adapter(model, tmp_path / "r1.safetensors"))
    assert torch.equal(logits(fresh, IDS), logits(model, IDS))


@pytest.mark.parametrize("method", ["lora", "dash"])
def test_a_model_without_its_peft_config_stores_one_rebuilt_from_the_layers(method, tmp_path):
    """An injected model whose ``peft_config`` is gone: the stored config is rebuilt from the layers
    (the first layer's r / alpha, every adapted module, rsLoRA, per-layer ranks and alphas for plain
    LoRA, the method's own settings for LoRA-Dash), and a fresh model loads it to the same outputs.
    The expected fields are the ones the adapter was made with, written out."""
    from peft import inject_adapter_in_model

    names = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    if method == "lora":
        cfg = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                         alpha_pattern={"v_proj": 6}, use_rslora=True)
    else:
        cfg = dash_config(lora_alpha=12, target_modules=["q_proj", "v_proj"], use_rslora=True, dash_directions=3,
                          dash_warmup_steps=5)
    model = tiny_llama(0)
    inject_adapter_in_model(cfg, model)
    del model.peft_config
    with torch.no_grad():
        for _, _, _, layer in iter_lora_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.05)
    path = dashdiff.save_adapter(model, tmp_path / "s.safetensors")
    stored = json.loads(safeio.read_metadata(path)[HEADER_KEY])["configs"][""]
    fields = stored["fields"]
    # alpha 12, not PEFT's default of 8: a rebuilt config that dropped it would still pass
    assert (fields["r"], fields["lora_alpha"], fields["use_rslora"]) == (4, 12, True)
    assert sorted(fields["target_modules"]) == names
    if method == "lora":
        assert stored["class"] == "LoraConfig"
        assert fields["rank_pattern"] == {n: 2 if n.endswith("v_proj") else 4 for n in names}
        assert fields["alpha_pattern"] == {n: 6 if n.endswith("v_proj") else 12 for n in names}
    else:
        assert stored["class"] == "LoraDashConfig"
        assert (fields["dash_directions"], fields["dash_warmup_steps"]) == (3, 5)
    fresh = dashdiff.load_adapter(tiny_llama(0), path)
    assert torch.equal(logits(fresh, IDS), logits(model, IDS))
    v = fresh.model.layers[1].self_attn.v_proj
    assert v.scaling["default"] == (6 / 2 ** 0.5 if method == "lora" else 12 / 4 ** 0.5)  # rsLoRA: α/√r


def test_files_that_are_not_states_are_refused_word_for_word(small_state, tmp_path):
    """No dashdiff header, a header that is not JSON, an export, a newer format: each message names
    the file and says what to do. A header without a format_version (older files) still loads."""
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, plain, {"format": "pt"})
    bad_json = tmp_path / "json.safetensors"
    save_file(dict(small_state[0]), bad_json, {"format": "pt", HEADER_KEY: "{"})
    try:
        json.loads("{")
    except json.JSONDecodeError as e:
        json_err = str(e)
    export = _rewrite(small_state, lambda t, h: h.update(kind="export", export_format="peft"),
                      tmp_path / "export.safetensors")
    newer = _rewrite(small_state, lambda t, h: h.__setitem__("format_version", 2), tmp_path / "newer.safetensors")
    cases = {
        plain: f"dashdiff: {plain} has no 'dashdiff' header: it is not a dashdiff adapter file. A plain LoRA loads "
               "with pipe.load_lora_weights(...) or PeftModel.from_pretrained(...).",
        bad_json: f"dashdiff: {bad_json}: the 'dashdiff' header is not valid JSON ({json_err})",
        export: f"dashdiff: {export} is a dashdiff *export* (a plain LoRA, 'peft' format), not a training state: "
                "load it with the stock loader (pipe.load_lora_weights / PeftModel.from_pretrained).",
        newer: f"dashdiff: {newer} was written by a newer dashdiff (state format 2); upgrade dashdiff",
    }
    for path, message in cases.items():
        with pytest.raises(ValueError) as err:
            dashdiff.load_adapter(tiny_llama(0), path)
        assert str(err.value) == message
    unversioned = _rewrite(small_state, lambda t, h: h.pop("format_version"), tmp_path / "old.safetensors")
    dashdiff.load_adapter(tiny_llama(0), unversioned)


def test_another_method_under_the_same_name_is_refused(small_state, tmp_path):
    path = _rewrite(small_state, lambda t, h: None, tmp_path / "s.safetensors")
    model = get_peft_model(tiny_llama(0), dashdiff.AutoLoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError) as err:
        dashdiff.load_adapter(model, path)
    assert str(err.value) == (
        f"dashdiff: {path}: {Q} holds a 'dash' adapter in the file but a 'autolora' adapter named 'default' in the "
        "model; delete the model's adapter first or load under another adapter_name")


def test_plain_lora_rank_over_the_layer_names_no_s(tmp_path):
    model = get_peft_model(tiny_llama(0), LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"]))
    src = tmp_path / "plain.safetensors"
    dashdiff.save_adapter(model, src)
    tensors, meta = safeio.read_safetensors(src)
    path = _rewrite((tensors, json.loads(meta[HEADER_KEY])), _edit_layer("r", 65), tmp_path / "r65.safetensors")
    with pytest.raises(ValueError) as err:
        dashdiff.load_adapter(tiny_llama(0), path)
    assert str(err.value) == (f"dashdiff: {path}: {Q} claims rank r=65 but the layer is 64x64 (at most 64): a damaged "
                              "or hand-edited file")


@pytest.mark.parametrize("config", [
    LoraConfig(r=64, lora_alpha=64, target_modules=["q_proj"]),
    dash_config(r=2, target_modules=["q_proj"], dash_directions=64),
    LoraConfig(r=2, lora_alpha=4, target_modules=r".*\.(q_proj|v_proj)"),
], ids=["r_equals_the_layer", "s_equals_the_layer", "regex_targets"])
def test_boundary_ranks_and_a_regex_target_load(config, tmp_path):
    """r or s equal to min(out, in) of the 64x64 q_proj is allowed (only more is refused), and a
    regular expression as target_modules is checked like a list (only 'all-linear' is refused)."""
    model = get_peft_model(tiny_llama(0), config)
    with torch.no_grad():
        for _, _, _, layer in iter_lora_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.05)
    fresh = dashdiff.load_adapter(tiny_llama(0), dashdiff.save_adapter(model, tmp_path / "s.safetensors"))
    assert torch.equal(logits(fresh, IDS), logits(model, IDS))


def test_save_picks_the_named_adapter_of_several(tmp_path):
    """``adapter_name`` saves that adapter's layers and config only, under its name."""
    model = get_peft_model(tiny_llama(0), dash_config())
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=2, target_modules=["k_proj"]))
    path = dashdiff.save_adapter(model, tmp_path / "s.safetensors", adapter_name="other")
    header = json.loads(safeio.read_metadata(path)[HEADER_KEY])
    assert header["adapter_name"] == "other" and header["configs"][""]["class"] == "LoraConfig"
    assert sorted(header["layers"]) == [f"model.layers.{i}.self_attn.k_proj" for i in (0, 1)]
    assert all(meta == {"method": "lora", "r": 2} for meta in header["layers"].values())


def test_a_launch_record_out_of_range_is_named(mid_dash, tmp_path):
    """The launch record is checked with the file's name too (an index past the layer's k = 64)."""
    src = dashdiff.save_adapter(mid_dash, tmp_path / "s.safetensors")
    tensors, meta = safeio.read_safetensors(src)

    def edit(t, h):
        idx = t[f"{Q}.dash_record.indices"].clone()
        idx[0] = 999
        t[f"{Q}.dash_record.indices"] = idx

    path = _rewrite((tensors, json.loads(meta[HEADER_KEY])), edit, tmp_path / "idx.safetensors")
    with pytest.raises(ValueError) as err:
        dashdiff.load_adapter(tiny_llama(0), path)
    assert str(err.value) == f"dashdiff: {path}: {Q}.dash_record.indices out of range 0..63"


# --------------------------------------------------------------------------- adapter files (load_adapter)


def _dash_state(tmp_path) -> Path:
    """A LoRA-Dash state file of a tiny Llama, launched (it carries the launch record)."""
    import dashdiff
    from peft import get_peft_model
    from dashdiff.testing import tiny_llama

    model = get_peft_model(tiny_llama(0), dashdiff.LoraDashConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], dash_directions=2, dash_warmup_steps=1,
        init_lora_weights="gaussian"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    dashdiff.dash_step(model)  # launch: U_s, V_s and the record are set
    return Path(dashdiff.save_adapter(model, tmp_path / "good.safetensors"))


def _tamper(src: Path, dst: Path, edit) -> Path:
    from dashdiff import safeio
    from dashdiff.files import HEADER_KEY
    from safetensors.torch import save_file

    tensors, meta = safeio.read_safetensors(src)
    header = json.loads(meta[HEADER_KEY])
    edit(tensors, header)
    save_file(tensors, dst, {"format": "pt", HEADER_KEY: json.dumps(header)})
    return dst


def _snapshot(model) -> tuple:
    tree = [(n, type(m).__name__) for n, m in model.named_modules()]
    return tree, {k: v.clone() for k, v in model.state_dict().items()}, dict(getattr(model, "peft_config", {}) or {})


def _same(a: tuple, b: tuple) -> bool:
    return (a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
            and a[2].keys() == b[2].keys())


def _set_rank(tensors, header, r):
    for meta in header["layers"].values():
        meta["r"] = r
    header["configs"][""]["fields"]["r"] = r


BAD_FILES = {
    # name: (edit, message)
    "huge_rank": (lambda t, h: _set_rank(t, h, 2_000_000), r"claims rank r=2000000, s=2 but the layer is 64x64 \(at most 64\)"),
    "rank_over_layer": (lambda t, h: _set_rank(t, h, 65), r"claims rank r=65"),
    "nan": (lambda t, h: t[f"{Q}.lora_B.weight"].__setitem__((0, 0), float("nan")), r"q_proj\.lora_B\.weight holds NaN"),
    "int_weights": (lambda t, h: t.__setitem__(f"{Q}.lora_A.weight", t[f"{Q}.lora_A.weight"].long()),
                    r"lora_A\.weight is torch\.int64, expected a floating-point"),
    "float_counter": (lambda t, h: t.__setitem__(f"{Q}.lora_dash_step", t[f"{Q}.lora_dash_step"].float()),
                      r"lora_dash_step is torch\.float32, expected a\(?n?\)? ?integer"),
    "short_U": (lambda t, h: t.__setitem__(f"{Q}.lora_dash_U", t[f"{Q}.lora_dash_U"][:, :1].contiguous()),
                r"lora_dash_U has shape \(64, 1\) in the file but \(64, 2\)"),
    "stray": (lambda t, h: t.__setitem__("model.layers.0.mlp.up_proj.lora_A.weight", torch.zeros(4, 32)),
              r"1 tensor\(s\) that belong to no layer"),
    "unknown_module": (lambda t, h: h["layers"].__setitem__("model.layers.0.self_attn.zz_proj", h["layers"][Q]),
                       r"not adapted in the model \(1\): model\.layers\.0\.self_attn\.zz_proj"),
    "bad_method": (lambda t, h: h["layers"][Q].__setitem__("method", "dora"), r"no valid method"),
    "indices": (lambda t, h: t[f"{Q}.dash_record.indices"].__setitem__(0, 999), r"indices out of range"),
    "missing": (lambda t, h: t.pop(f"{Q}.lora_dash_V"), r"lacks tensor .*q_proj\.lora_dash_V"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_load_adapter_refuses_a_bad_file_and_leaves_the_model_as_it_was(case, tmp_path):
    import time

    import dashdiff
    from peft import get_peft_model
    from dashdiff.testing import tiny_llama

    edit, message = BAD_FILES[case]
    bad = _tamper(_dash_state(tmp_path), tmp_path / f"{case}.safetensors", edit)
    # into a bare model (the adapter would be injected) and into one that has it already
    bare = tiny_llama(0)
    ready = get_peft_model(tiny_llama(0), dashdiff.LoraDashConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], dash_directions=2, dash_warmup_steps=1))
    for model in (bare, ready):
        before = _snapshot(model)
        t0 = time.perf_counter()
        with pytest.raises(ValueError, match=message):
            dashdiff.load_adapter(model, bad)
        assert time.perf_counter() - t0 < 2.0  # refused from the numbers, nothing sized by the header
        assert _same(before, _snapshot(model)), case
    dashdiff.load_adapter(bare, tmp_path / "good.safetensors")  # still loads the right file afterwards


def test_a_failure_during_injection_is_undone(tmp_path, monkeypatch):
    import dashdiff
    from dashdiff import state
    from dashdiff.testing import tiny_llama

    good = _dash_state(tmp_path)
    model = tiny_llama(0)
    before = _snapshot(model)
    real = state._inject

    def inject_then_fail(comp, cfg, adapter):
        real(comp, cfg, adapter)
        raise MemoryError("simulated: out of memory half-way")

    monkeypatch.setattr(state, "_inject", inject_then_fail)
    with pytest.raises(MemoryError):
        dashdiff.load_adapter(model, good)
    assert _same(before, _snapshot(model))
    monkeypatch.setattr(state, "_inject", real)
    dashdiff.load_adapter(model, good)
    ids = torch.tensor([[1, 40, 41, 42, 77]])
    fresh = dashdiff.load_adapter(tiny_llama(0), good)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)
