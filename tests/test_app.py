"""The demo app: Renderer directly, the served app through gradio_client, and a real browser.

Adapters are made here on the tiny SD model: one LoRA-Dash adapter (launched, δ ≠ 0) and a plain
LoRA with *the same* A and B, so LoRA and LoRA-Dash images differ by the dash term alone; an
AutoLoRA adapter; and a LoRA for tiny-sdxl, whose cross-attention shapes differ (the "LoRA for
another base model" case). Each is written both ways, plain (``export_lora``) and full state
(``save_adapter``), as ``make demo`` does.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import dashdiff
from dashdiff.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

REPO = Path(__file__).resolve().parent.parent
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
STEPS = 4  # a 64 px, 4-step render of the tiny model takes ~0.1 s


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


app = _load_module("dashdiff_app", REPO / "app.py")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one torch thread


def _fill(pipe, pattern: str, std: float, seed: int, mean: float = 0.0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if pattern in name:
                p.copy_(torch.randn(p.shape, generator=g) * std + mean)


def _dash_config():
    # lora_alpha 8, r 4: scaling 2, so a change rate that lost its scaling shows in the Inspect test
    return dashdiff.LoraDashConfig(r=4, lora_alpha=8, target_modules=TARGETS, dash_warmup_steps=1, dash_directions=2)


def _reference_change_rates(layer) -> torch.Tensor:
    """|Δσ_i| / σ_i with Δσ_i = u_iᵀ (α/r · B A) v_i from a float64 SVD of W0 (METHODS.md), NaN where
    σ_i <= max(out, in)·eps32·σ_max; written out here, independent of dashdiff.dash.selection."""
    w0 = layer.get_base_layer().weight.detach().double()
    u, sig, vh = torch.linalg.svd(w0, full_matrices=False)
    dw = (layer.lora_alpha["default"] / layer.r["default"]) * (
        layer.lora_B["default"].weight.detach().double() @ layer.lora_A["default"].weight.detach().double())
    rate = torch.diagonal(u.t() @ dw @ vh.t()).abs() / sig
    rate[sig <= max(w0.shape) * torch.finfo(torch.float32).eps * sig[0]] = float("nan")
    return rate


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Any]:
    """Folders ``lora``, ``dash``, ``autolora``, ``sdxl`` and ``retrained``, each with both files
    (``retrained`` also with an AutoLoRA rank report); ``records``: the LoRA-Dash selection per
    layer; ``report_ranks``: the ranks in the report."""
    from peft import LoraConfig

    root = tmp_path_factory.mktemp("adapters")
    # LoRA A factors come from the global RNG (PEFT's init): fix it, so the pictures do not depend
    # on which tests ran before in this process.
    torch.manual_seed(int(os.environ.get("DASHDIFF_TEST_APP_SEED", "0")))
    dash = tiny_sd_pipeline()
    dash.unet.add_adapter(_dash_config())
    _fill(dash, "lora_B", 0.3, 1)
    dashdiff.launch_dash(dash.unet)
    rates = {n: _reference_change_rates(l) for n, l, _ in dashdiff.walk.iter_layers(dash, "dash")}
    _fill(dash, "lora_dash_delta", 2.0, 2)

    lora = tiny_sd_pipeline()
    lora.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    same = {n: p for n, p in dash.unet.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    with torch.no_grad():
        for n, p in lora.unet.named_parameters():
            if n in same:
                p.copy_(same[n])

    auto = tiny_sd_pipeline()
    auto.unet.add_adapter(dashdiff.AutoLoraConfig(r=4, lora_alpha=4, target_modules=TARGETS))
    _fill(auto, "lora_B", 0.6, 3)
    _fill(auto, "lora_autolora_beta", 0.5, 4, mean=1.0)

    sdxl = tiny_sdxl_pipeline()
    sdxl.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS))
    _fill(sdxl, "lora_B", 0.3, 5)

    out = {}
    for name, pipe in (("dash", dash), ("lora", lora), ("autolora", auto), ("sdxl", sdxl)):
        dashdiff.export_lora(pipe, root / name)
        dashdiff.save_adapter(pipe, root / name)
        out[name] = root / name
    out["records"] = {n: l.dash_record["default"]["indices"].tolist()
                      for n, l, _ in dashdiff.walk.iter_layers(dash, "dash")}
    out["rates"] = rates
    # A retrained AutoLoRA, as the training script leaves it: a plain LoRA (full state and export)
    # plus the search's rank report beside it.
    from dashdiff.autolora.report import write_rank_report

    retrained = root / "retrained"
    dashdiff.export_lora(lora, retrained)
    dashdiff.save_adapter(lora, retrained)
    ranks = {f"layer{i}": i % 4 + 1 for i in range(6)}
    alphas = {n: torch.softmax(torch.arange(4.0) * (i + 1), 0) for i, n in enumerate(ranks)}
    write_rank_report((ranks, alphas), retrained, plot=False)
    out["retrained"], out["report_ranks"] = retrained, list(ranks.values())
    return out


@pytest.fixture(scope="module")
def renderer(files):
    """One Renderer for the module: LoRA from its plain file, LoRA-Dash and AutoLoRA from their
    full-state files (converted on load). Tests that load bad files check the slots survive."""
    r = app.Renderer("tiny-sd", device="cpu")
    r.load("lora", files["lora"] / app.PLAIN_FILE)
    r.load("dash", files["dash"] / app.STATE_FILE)
    r.load("autolora", files["autolora"] / app.STATE_FILE)
    yield r
    r.close()


def _px(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB")).astype(np.int16)


def _differ(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(_px(a) - _px(b)).mean())


# --------------------------------------------------------------------------- Renderer, no gradio


def test_render_same_seed_identical_methods_differ(renderer, files):
    first = renderer.render("a photo of sks cat", seed=3, steps=STEPS)
    assert [im.size for im in first] == [(64, 64)] * 4  # base, LoRA, LoRA-Dash, AutoLoRA
    again = renderer.render("a photo of sks cat", seed=3, steps=STEPS)
    for a, b in zip(first, again):
        assert np.array_equal(_px(a), _px(b)), "same seed, same settings must give the same pixels"
    base, lora, dash, auto = first
    assert _differ(base, lora) > 1 and _differ(lora, dash) > 1 and _differ(base, auto) > 1
    # another seed gives another image
    assert _differ(renderer.render("a photo of sks cat", seed=4, steps=STEPS, methods=["base"])[0], base) > 1
    # scale 0 switches the adapter off: LoRA-Dash at λ = 0 is the base model exactly
    zero = renderer.render("a photo of sks cat", seed=3, steps=STEPS, scale=0.0, methods=["dash"])[0]
    assert np.array_equal(_px(zero), _px(base))


def test_every_method_starts_from_the_seeds_noise(renderer, monkeypatch):
    """The "same seed" guarantee across methods: each method's image in one render starts from the
    seed's own initial latents (drawn here, independently) and equals that method rendered alone."""
    seen: list[torch.Tensor] = []
    real = renderer.pipe.prepare_latents

    def spy(*args, **kwargs):
        latents = real(*args, **kwargs)
        seen.append(latents.detach().clone())
        return latents

    monkeypatch.setattr(renderer.pipe, "prepare_latents", spy)
    methods = ["base", "lora", "dash", "autolora"]
    images = renderer.render("a photo of sks cat", seed=5, steps=STEPS, methods=methods)
    assert len(seen) == len(methods)
    noise = torch.randn(seen[0].shape, generator=torch.Generator("cpu").manual_seed(5))
    for m, latents in zip(methods, seen):
        torch.testing.assert_close(latents, noise * renderer.pipe.scheduler.init_noise_sigma, rtol=0, atol=0, msg=m)
    for m, img in zip(methods[-1:], images[-1:]):  # the last: furthest from a shared generator's start
        alone = renderer.render("a photo of sks cat", seed=5, steps=STEPS, methods=[m])[0]
        assert np.array_equal(_px(alone), _px(img)), m


def test_full_state_file_renders_like_its_plain_export(renderer, files):
    before = renderer.render("a toy", seed=1, steps=STEPS, methods=["dash"])[0]
    other = app.Renderer("tiny-sd", device="cpu")
    try:
        other.load("dash", files["dash"] / app.PLAIN_FILE)
        plain = other.render("a toy", seed=1, steps=STEPS, methods=["dash"])[0]
    finally:
        other.close()
    assert np.array_equal(_px(before), _px(plain))
    # the slot's adapter is loaded once, under one name, and switched, not reloaded
    names = {a for v in renderer.pipe.get_list_adapters().values() for a in v}
    assert names == {renderer.adapters[s].adapter_name for s in app.SLOTS}


def test_inspect_records_match_the_trained_adapter(renderer, files):
    data = renderer.inspect("dash")
    assert data.method == "dash" and len(data.dash) == len(files["records"])
    assert {l.name: l.indices.tolist() for l in data.dash} == files["records"]
    layer = data.dash[0]
    assert layer.sigma.shape == layer.change_rate.shape and layer.launch_step == 0
    assert torch.all(layer.selected_rates >= layer.median_rate)
    # every layer's change rates by value, against a float64 SVD written out in the test
    for info in data.dash:
        want = files["rates"][info.name]
        assert torch.equal(torch.isnan(info.change_rate), torch.isnan(want)), info.name
        torch.testing.assert_close(info.change_rate, want, rtol=1e-6, atol=0, equal_nan=True, msg=info.name)
    auto = renderer.inspect(str(files["autolora"] / app.STATE_FILE))
    assert auto.method == "autolora" and all(1 <= l.rank <= 4 for l in auto.autolora)
    with pytest.raises(app.RenderError, match="plain LoRA file"):
        renderer.inspect(str(files["dash"] / app.PLAIN_FILE))
    # a retrained AutoLoRA: the ranks and α come from the rank report beside the file, or the report itself
    for source in (files["retrained"] / app.STATE_FILE, files["retrained"] / app.RANK_REPORT):
        data = renderer.inspect(str(source))
        assert data.method == "autolora" and [l.rank for l in data.autolora] == files["report_ranks"]
        assert app.RANK_REPORT in data.note
    assert renderer.inspect(str(files["lora"] / app.STATE_FILE)).method == "lora"  # no report: nothing to show


def test_plots_draw_the_records(renderer, monkeypatch):
    """PNG images with something drawn, and what the Inspect plots draw, read back from the figures: the overview puts layer row r's
    selected directions at i/(k-1) coloured by their change rates; the layer plot draws σ and the
    rates of the selected indices; the AutoLoRA plot's bars are the ranks, its heat map is α and
    the outlined cells are the kept components."""
    from matplotlib.collections import PathCollection
    from matplotlib.image import AxesImage
    from matplotlib.patches import Rectangle

    from dashdiff import inspect_plots as plots

    figs = []
    real = plots._to_image
    monkeypatch.setattr(plots, "_to_image", lambda fig: (figs.append(fig), real(fig))[1])
    dash = renderer.inspect("dash").dash
    auto = renderer.inspect("autolora").autolora

    images = [plots.plot_dash_overview(dash), plots.plot_dash_layer(dash[1]), plots.plot_autolora(auto)]
    for img in images:
        assert img.format == "PNG" and img.size[0] >= 600 and img.size[1] >= 300
        assert _px(img).std() > 10  # something was drawn
    assert plots.short_name("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q") == \
        "down1.att0.tb0.attn1.to_q"

    ax_pos, ax_rate = figs[0].axes[:2]
    (points,) = [c for c in ax_pos.collections if isinstance(c, PathCollection)]
    want = [(i / (l.k - 1), row, float(l.change_rate[i])) for row, l in enumerate(dash) for i in l.indices.tolist()]
    got = [(x, y, c) for (x, y), c in zip(points.get_offsets().tolist(), points.get_array().tolist())]
    assert np.allclose(np.array(got), np.array(want), rtol=1e-12, atol=0)
    red = [c for c in ax_rate.collections if isinstance(c, PathCollection)][0::2]  # per row: selected, median
    assert [sorted(c.get_offsets()[:, 0].tolist()) for c in red] == \
        [pytest.approx(sorted(l.selected_rates.tolist()), rel=1e-12) for l in dash]

    layer = dash[1]
    ax_sigma, ax_rates = figs[1].axes[:2]
    assert ax_sigma.lines[0].get_ydata().tolist() == pytest.approx(layer.sigma.tolist(), rel=1e-12)
    sel = [c for c in ax_rates.collections if isinstance(c, PathCollection)][1].get_offsets()
    assert sel[:, 0].tolist() == layer.indices.tolist()
    assert sel[:, 1].tolist() == pytest.approx(layer.selected_rates.tolist(), rel=1e-12)

    ax_rank, ax_alpha = figs[2].axes[:2]
    assert [p.get_width() for p in ax_rank.patches] == [l.rank for l in auto]
    (image,) = [i for i in ax_alpha.get_images() if isinstance(i, AxesImage)]
    assert np.allclose(np.asarray(image.get_array()), np.stack([l.alpha.numpy() for l in auto]), rtol=1e-12)
    kept = sorted((int(p.get_y() + 0.5), int(p.get_x() + 0.5)) for p in ax_alpha.patches if isinstance(p, Rectangle))
    assert kept == sorted((row, j) for row, l in enumerate(auto) for j in torch.nonzero(l.keep).flatten().tolist())
    assert 0 < len(kept) < sum(l.k for l in auto)  # some components pruned, some kept: the outlines mean something


def test_bad_files_are_refused_and_slots_survive(renderer, files, tmp_path):
    kept = {s: a.adapter_name for s, a in renderer.adapters.items()}
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    not_lora = tmp_path / "weights.safetensors"
    from safetensors.torch import save_file

    save_file({"conv.weight": torch.zeros(2, 2)}, str(not_lora))
    cases = [
        (corrupt, "not a readable .safetensors"),
        (not_lora, "not a LoRA"),
        (files["sdxl"] / app.PLAIN_FILE, "different base model"),
        (files["sdxl"] / app.STATE_FILE, "trained on another base model"),
        (tmp_path / "missing.safetensors", "no such file"),
    ]
    for path, message in cases:
        with pytest.raises(app.RenderError, match=message):
            renderer.load("lora", path)
    assert {s: a.adapter_name for s, a in renderer.adapters.items()} == kept
    assert len(renderer.render("still works", steps=STEPS, methods=["lora"])) == 1


def test_upload_sized_by_its_header_is_refused_quickly(renderer, files, tmp_path):
    """A full-state upload goes through load_adapter's whole-file check: a header claiming
    r = 2,000,000 is refused from the numbers, before anything is allocated (issue 13)."""
    import json
    import time

    from safetensors.torch import save_file

    from dashdiff import safeio
    from dashdiff.files import HEADER_KEY

    tensors, meta = safeio.read_safetensors(files["dash"] / app.STATE_FILE)
    header = json.loads(meta[HEADER_KEY])
    for layer in header["layers"].values():
        layer["r"] = 2_000_000
    for cfg in header["configs"].values():
        cfg["fields"]["r"] = 2_000_000
    crafted = tmp_path / app.STATE_FILE
    save_file(tensors, str(crafted), {"format": "pt", HEADER_KEY: json.dumps(header)})
    kept = {s: a.adapter_name for s, a in renderer.adapters.items()}
    t0 = time.perf_counter()
    with pytest.raises(app.RenderError, match=r"claims rank r=2000000"):
        renderer.load("dash", crafted)
    assert time.perf_counter() - t0 < 5
    assert {s: a.adapter_name for s, a in renderer.adapters.items()} == kept
    renderer.load("dash", files["dash"] / app.STATE_FILE)  # the right file still loads afterwards


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prompt": "   "}, "Enter a prompt"),
        ({"steps": 0}, "Steps must be from 1"),
        ({"steps": 2.5}, "whole number"),
        ({"width": 60}, "Width must be from 64"),
        ({"height": 100}, "multiple of 8"),
        ({"width": 4096}, r"Width must be from 64 to 256 \(the cap on cpu"),  # device cap (issue 13)
        ({"guidance": float("nan")}, "Guidance"),
        ({"seed": -1}, "Seed"),
    ],
)
def test_bad_inputs_are_refused(renderer, change, message):
    kwargs = dict(prompt="a cat", seed=0, steps=STEPS, guidance=7.5, width=64, height=64, scale=1.0) | change
    with pytest.raises(app.RenderError, match=message):
        renderer.render(**kwargs)


# --------------------------------------------------------------------------- limits and cancellation


def test_limits_follow_the_device_and_the_native_size():
    cpu, gpu = app.Limits.for_device("cpu", 1024), app.Limits.for_device("cuda", 1024)
    assert (cpu.size, cpu.steps, gpu.size, gpu.steps) == ((64, 512), (1, 50), (64, 1024), (1, 100))
    assert app.Limits.for_device("cpu", 64).size == (64, 256) and app.Limits.for_device("cuda:1", 512).size == (64, 1024)
    assert app.Limits.for_device("cpu", 512, max_side=2000, max_steps=7) == app.Limits(
        steps=(1, 7), size=(64, 2000), device="cpu")


def test_caps_are_refused_with_the_reason(renderer):
    assert renderer.limits == app.Limits.for_device("cpu", 64)  # tiny-sd: 64 px native
    with pytest.raises(app.RenderError, match=r"Width must be from 64 to 256 \(the cap on cpu, so one request "
                                              r"cannot hold the app for long\), got 2048"):
        renderer.render("a cat", steps=STEPS, width=2048, height=64)
    with pytest.raises(app.RenderError, match=r"Steps must be from 1 to 50 \(the cap on cpu"):
        renderer.render("a cat", steps=51)


def test_cancel_stops_a_render_within_a_step(renderer):
    import threading

    before = renderer.render("a cat", seed=1, steps=STEPS, methods=["base"])[0]
    cancel, seen = threading.Event(), []

    def on_step(step, steps):
        seen.append(step)
        if step == 3:
            cancel.set()  # as the UI's generator does when gradio closes it

    with pytest.raises(app.Cancelled, match="after step 3 of 50"):
        renderer.render("a cat", seed=1, steps=50, methods=["base", "lora"], on_step=on_step, cancel=cancel)
    assert seen == [1, 2, 3]  # stopped at the end of the step under way; the second method never started
    # from another thread, mid-render: the pipeline is free again within a step
    cancel, started, seen = threading.Event(), threading.Event(), []
    errors = []

    def work():
        try:
            renderer.render("a cat", seed=1, steps=50, methods=["base"], on_step=lambda k, n: (seen.append(k),
                                                                                           started.set()),
                            cancel=cancel)
        except app.Cancelled as e:
            errors.append(e)

    t = threading.Thread(target=work)
    t.start()
    assert started.wait(30)
    at = len(seen)
    cancel.set()
    t.join(30)
    assert not t.is_alive() and errors and len(seen) <= at + 2
    assert _differ(before, renderer.render("a cat", seed=1, steps=STEPS, methods=["base"])[0]) == 0  # unharmed


def test_queue_is_bounded_with_one_render_at_a_time(renderer):
    state = app.AppState(renderer=renderer, default_steps=STEPS, queue_size=3)
    demo = app.launch(state, "127.0.0.1", _free_port(), block=False)
    try:
        assert demo._queue.max_size == 3 and demo._queue.default_concurrency_limit == 1
        cancels = [d for d in demo.config["dependencies"] if d.get("cancels")]
        assert len(cancels) == 1 and len(cancels[0]["cancels"]) == 2  # the Cancel button stops both triggers
    finally:
        demo.close()


def test_port_and_caps_flags(capsys):
    for argv, msg in ((["--port", "99999"], "--port must be from 1 to 65535, got 99999"),
                      (["--max-side", "8"], "--max-side must be from 64"), (["--queue-size", "0"], "--queue-size")):
        with pytest.raises(SystemExit):
            app.parse_args(argv)
        assert msg in capsys.readouterr().err
    args = app.parse_args(["--max-side", "128", "--max-steps", "9", "--queue-size", "4"])
    assert (args.max_side, args.max_steps, args.queue_size) == (128, 9, 4)


# --------------------------------------------------------------------------- command line


def test_missing_gradio_gives_a_one_line_hint(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert app.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err == app.INSTALL_HINT and "dashdiff[app]" in err


def test_defaults_and_demo_banner(tmp_path, files):
    args = app.parse_args([])
    assert (args.base, args.host, args.port, args.lora) == ("mini-sd", "127.0.0.1", 7860, None)
    state = app.build_state(args, demo_dir=tmp_path / "nothing")
    try:
        assert "make demo" in state.banner and state.renderer.available() == ["base"]
    finally:
        state.renderer.close()
    # a demo folder as make demo writes it: plain files render, their full-state siblings inspect
    # (the fixture's adapters were trained on tiny-sd)
    args = app.parse_args(["--base", "tiny-sd"])
    demo = tmp_path / "demo"
    for slot in ("lora", "dash"):
        (demo / slot).mkdir(parents=True)
        for name in (app.PLAIN_FILE, app.STATE_FILE):
            (demo / slot / name).write_bytes((files[slot] / name).read_bytes())
    state = app.build_state(args, demo_dir=demo)
    try:
        assert "AutoLoRA" in state.banner and "LoRA-Dash," not in state.banner
        assert state.renderer.adapters["dash"].source.name == app.PLAIN_FILE
        assert state.renderer.inspect("dash").method == "dash"
    finally:
        state.renderer.close()


# --------------------------------------------------------------------------- served app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(renderer):
    state = app.AppState(renderer=renderer, max_upload_mb=1, default_steps=STEPS)
    port = _free_port()
    demo = app.launch(state, "127.0.0.1", port, block=False)
    url = f"http://127.0.0.1:{port}/"
    yield url
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


def _generate(client, prompt="a photo of sks cat", steps=STEPS, width=64, seed=5, with_base=True):
    """/generate with the UI's inputs in order: prompt, negative, seed, steps, guidance, width,
    height, LoRA scale, also-render-base."""
    return client.predict(prompt, "", seed, steps, 7.5, width, 64, 1.0, with_base, api_name="/generate")


def test_client_renders_side_by_side(client):
    gallery, pair, note = _generate(client)
    assert [g["caption"] for g in gallery] == ["Base model", "LoRA", "LoRA-Dash", "AutoLoRA"]
    images = [Image.open(g["image"]) for g in gallery]
    assert all(im.format == "PNG" and im.size == (64, 64) for im in images)
    lora, dash = images[1], images[2]
    assert _differ(lora, dash) > 1  # the dash term is all that differs between the two files
    slider = [Image.open(p) for p in pair]
    assert np.array_equal(_px(slider[0]), _px(lora)) and np.array_equal(_px(slider[1]), _px(dash))
    gallery2, _, _ = _generate(client)
    for a, b in zip(gallery, gallery2):
        assert np.array_equal(_px(Image.open(a["image"])), _px(Image.open(b["image"])))
    assert "seed 5" in note


def test_client_cancel_stops_the_render(client, renderer):
    """A job the client cancels (as gradio does when a page closes) stops within a step or two,
    and the render slot is free again at once."""
    import time

    calls = []
    unet = renderer.pipe.unet
    original = unet.forward

    def counting(*a, **kw):
        calls.append(time.perf_counter())
        time.sleep(0.05)  # a slow step, so the job is surely mid-render when cancelled
        return original(*a, **kw)

    unet.forward = counting
    try:
        job = client.submit("a cat", "", 1, 50, 7.5, 64, 64, 1.0, True, api_name="/generate")
        deadline = time.time() + 60
        while len(calls) < 3 and time.time() < deadline:
            time.sleep(0.01)
        assert len(calls) >= 3
        job.cancel()
        at = len(calls)
        assert renderer._lock.acquire(timeout=30)  # the render let go of the pipeline
        renderer._lock.release()
        assert len(calls) <= at + 2 < 50 * 4  # 4 methods x 50 steps if it had run on
    finally:
        unet.forward = original
    gallery, _, _ = _generate(client)  # the next request is served
    assert len(gallery) == 4


def test_client_errors_then_recovers(client, files, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file at all")
    calls = [
        (lambda: _generate(client, prompt=""), "Enter a prompt"),
        (lambda: _generate(client, steps=500), "500"),  # gradio's own slider check or ours
        (lambda: _generate(client, width=60), "60"),
        (lambda: client.predict("LoRA", handle_file(str(corrupt)), api_name="/load_adapter"), "not a readable"),
        (lambda: client.predict("LoRA", handle_file(str(files["sdxl"] / app.PLAIN_FILE)), api_name="/load_adapter"),
         "different base model"),
        (lambda: client.predict(None, handle_file(str(files["dash"] / app.PLAIN_FILE)), api_name="/inspect"),
         "plain LoRA file"),
    ]
    for call, message in calls:
        with pytest.raises(AppError, match=message):
            call()
        gallery, _, _ = _generate(client, steps=1, with_base=False)  # the app keeps working
        assert len(gallery) == 3


def test_client_upload_size_limit(client, tmp_path):
    from gradio_client import handle_file

    big = tmp_path / "big.safetensors"
    big.write_bytes(b"\x00" * (2 * 1024 * 1024))  # the test server allows 1 MB
    # gradio_client refuses before sending; the server would answer 413 to a browser
    with pytest.raises(Exception, match="exceeds the maximum file size"):
        client.predict("LoRA", handle_file(str(big)), api_name="/load_adapter")
    assert len(_generate(client, with_base=False)[0]) == 3


def test_client_upload_replaces_slot_and_inspects(client, renderer, files):
    from gradio_client import handle_file

    old = renderer.adapters["autolora"].adapter_name
    status, _ = client.predict("AutoLoRA", handle_file(str(files["autolora"] / app.STATE_FILE)),
                               api_name="/load_adapter")
    assert "AutoLoRA:** `dashdiff_adapter.safetensors`" in status
    assert renderer.adapters["autolora"].adapter_name != old
    assert old not in {a for v in renderer.pipe.get_list_adapters().values() for a in v}
    summary, overview, layers, layer_plot, table = client.predict("LoRA-Dash", None, api_name="/inspect")
    assert "LoRA-Dash" in summary and Image.open(overview).format == "PNG"
    assert Image.open(layer_plot).size[0] > 300 and len(table["data"]) == len(files["records"])
    for path in (files["autolora"] / app.STATE_FILE, files["retrained"] / app.RANK_REPORT):
        summary, overview, *_ = client.predict(None, handle_file(str(path)), api_name="/inspect")
        assert "AutoLoRA" in summary and Image.open(overview).format == "PNG"


# --------------------------------------------------------------------------- real browser


def test_browser_renders_images(server, tmp_path):
    shot = _load_module("make_screenshot", REPO / "assets" / "make_screenshot.py")
    if shot.find_chromium() is None:
        pytest.skip("Chromium is not installed (apt-get install chromium): the real-browser test needs it")
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (drives the system Chromium)")
    out = tmp_path / "app.png"
    shown = shot.capture(server, out)
    assert shown["error"] == ""
    assert len(shown["images"]) == 4 and all(w == 64 and h == 64 for w, h in shown["images"])
    assert shown["captions"] == ["Base model", "LoRA", "LoRA-Dash", "AutoLoRA"]
    assert shown["slider"] == 2
    img = Image.open(out)
    assert img.size[0] >= 1000 and _px(img).std() > 10
