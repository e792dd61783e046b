"""dashdiff.dash.lifecycle: warm-up, launch and the selected directions; under DDP with two real CPU
processes, δ and the launched directions agree between the ranks *and* with one process training on
both ranks' batches together (computed here, in-process)."""

import torch
from safetensors.torch import load_file

import dashdiff
from launch_utils import accelerate_launch, load_script
from dash_models import dash_model, layers, reference_selection


def test_lifecycle_forward_and_gradients():
    model = dash_model(t=2)
    x = torch.randn(6, 32)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    # evaluation forwards never advance the warm-up
    model.eval()
    with torch.no_grad():
        model(x)
    assert all(layer._dash_steps["default"] == 0 for layer in layers(model).values())
    model.train()
    launched_at = []
    for step in range(1, 4):
        model(x).pow(2).mean().backward()
        deltas = [layer.lora_dash_delta["default"] for layer in layers(model).values()]
        if step <= 2:  # δ takes part before launch, with an exactly-zero gradient
            assert all(d.grad is not None and torch.all(d.grad == 0) for d in deltas)
        opt.step()
        opt.zero_grad()
        before = model(x).detach()
        if dashdiff.dash_step(model):
            launched_at.append(step)
            # launch leaves the output unchanged (δ = 0)
            torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-7)
    assert launched_at == [2]
    sel = dashdiff.selected_directions(model)
    assert set(sel) == {"q_proj", "o_proj"} and all(v.numel() == 3 for v in sel.values())

    # gradients reach A, B and δ only
    model(x).pow(2).mean().backward()
    for n, p in model.named_parameters():
        trainable = any(k in n for k in ("lora_A", "lora_B", "lora_dash_delta"))
        assert p.requires_grad == trainable, n
        if trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    for layer in layers(model).values():
        assert not layer.lora_dash_U["default"].requires_grad and not layer.lora_dash_V["default"].requires_grad

    # the dash forward equals W0 x + b + scaling·BAx + U_s diag(δ) V_sᵀ x
    for layer in layers(model).values():
        with torch.no_grad():
            layer.lora_dash_delta["default"].normal_(0, 0.3)
    layer = layers(model)["q_proj"]
    xin = torch.randn(5, 32)
    w0, bias = layer.base_layer.weight, layer.base_layer.bias
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    u, v, d = layer.lora_dash_U["default"], layer.lora_dash_V["default"], layer.lora_dash_delta["default"]
    expected = xin @ w0.t() + bias + 2.0 * xin @ a.t() @ b.t() + xin @ v.t() @ torch.diag(d) @ u.t()
    torch.testing.assert_close(layer(xin), expected, rtol=1e-5, atol=1e-6)
    # the stored directions are the ones the selection names
    rec = layer.dash_record["default"]
    _, uu, vh = reference_selection(w0.detach(), a.detach(), b.detach(), 2.0, 3)  # W0's float64 SVD
    assert torch.allclose(rec["sigma"], torch.linalg.svdvals(w0.double()), rtol=1e-8, atol=1e-10)
    assert rec["indices"].numel() == 3
    for j, i in enumerate(rec["indices"].tolist()):  # U_s column j, V_sᵀ row j: singular pair i, one sign
        sign = torch.sign(u[:, j].double() @ uu[:, i])
        torch.testing.assert_close(u[:, j].double() * sign, uu[:, i], rtol=0, atol=1e-6)
        torch.testing.assert_close(v[j].double() * sign, vh[i], rtol=0, atol=1e-6)


def test_selection_equals_reference_at_launch_time():
    model = dash_model(t=1)
    snapshot = {n: (layer.base_layer.weight.detach().clone(), layer.lora_A["default"].weight.detach().clone(),
                    layer.lora_B["default"].weight.detach().clone()) for n, layer in layers(model).items()}
    assert dashdiff.dash_step(model)
    for n, idx in dashdiff.selected_directions(model).items():
        ref, _, _ = reference_selection(*snapshot[n], 2.0, 3)
        assert idx.tolist() == ref.tolist(), n


def one_process_run() -> dict[str, torch.Tensor]:
    """What tests/scripts/ddp_dash.py dumps, from one process: DDP averages the two ranks' gradients
    of equal-size batches, i.e. the gradient of the mean loss over both batches concatenated."""
    mod = load_script("tests/scripts/ddp_dash.py", "ddp_dash")
    model, opt = mod.build()
    gens = [torch.Generator().manual_seed(100 + rank) for rank in (0, 1)]
    return mod.train_and_dump(model, opt, lambda: torch.cat([torch.randn(8, 24, generator=g) for g in gens]),
                              lambda loss: loss.backward())


def test_two_processes_share_directions_and_delta(tmp_path):
    accelerate_launch("tests/scripts/ddp_dash.py", str(tmp_path / "rank"), processes=2)
    r0, r1 = (load_file(tmp_path / f"rank{i}.safetensors") for i in (0, 1))
    assert int(r0["world"]) == int(r1["world"]) == 2
    assert int(r0["launch_step"]) == int(r1["launch_step"]) == 2
    assert set(r0) == set(r1)
    for key in r0:
        torch.testing.assert_close(r0[key], r1[key], rtol=0, atol=0, msg=key)
    # the run trained δ: identical on both ranks because DDP reduced its gradient
    assert r0["q_proj.delta"].abs().sum() > 0
    # ... and equal to one process on both batches: every layer's directions (each launched by its
    # owning rank and broadcast from it), δ and A. Float32 sums in another order: measured max
    # difference 6e-8 on A, 4e-9 on δ, 0 on the directions (2026-11-27); the bound is ~10x that.
    one = one_process_run()
    assert set(one) == set(r0) - {"world"}
    for key in one:
        if key.endswith(".idx") or key == "launch_step":
            assert torch.equal(one[key], r0[key]), key
        else:
            torch.testing.assert_close(r0[key], one[key], rtol=0, atol=6e-7, msg=key)
