"""dashdiff.autolora.ranks: selection weights, the keep rules at their boundaries and the ranks they give."""

from __future__ import annotations

import pytest
import torch
from peft import inject_adapter_in_model

from dashdiff import AutoLoraConfig, determine_ranks
from autolora_nets import F64, make_net
from ddp_autolora_script import Net


def test_rank_threshold_within_float32_rounding_of_alpha():
    """keep_mask's softmax rule is α_j >= λ in float64 (METHODS.md). λ is put strictly between α_0's
    float64 and float32 values, over a grid of β: α_0 must land on its float64 side every time."""
    from dashdiff.autolora.ranks import keep_mask

    for dtype in (F64, torch.float32):  # a float32 β (the usual case) too: softmax of it taken in float64
        layer = make_net(dtype).fc1
        seen = {True: 0, False: 0}
        for x in torch.linspace(0.1, 2.0, 200, dtype=F64).tolist():
            beta = torch.tensor([x, 0.3, -0.2, 0.1], dtype=dtype).to(F64)  # β as the layer holds it
            a64 = torch.softmax(beta, 0)[0].item()
            a32 = torch.softmax(beta.float(), 0)[0].item()
            lam = (a32 + a64) / 2
            if not min(a32, a64) < lam < max(a32, a64):
                continue  # float32 got this one exactly (or the two are adjacent doubles)
            with torch.no_grad():
                layer.lora_autolora_beta["default"].copy_(beta)
            want = a64 >= lam
            assert bool(keep_mask(layer, "default", threshold=lam, rule="softmax")[0]) == want, (dtype, x, a64, a32)
            seen[want] += 1
        assert min(seen.values()) >= 10, (dtype, seen)  # both sides of λ were exercised


def test_selection_weights_pick_the_named_adapter():
    """Two AutoLoRA adapters and a LoRA-Dash one on the same layers: selection_weights(model, name) is
    softmax(β) of that adapter, float64, per layer; a LoRA-Dash name or no name (ambiguous) is refused."""
    import dashdiff
    from dashdiff.autolora.ranks import selection_weights

    model = make_net()
    inject_adapter_in_model(AutoLoraConfig(r=3, lora_alpha=3, target_modules=["fc1", "fc2", "fc3"]), model,
                            adapter_name="two")
    inject_adapter_in_model(dashdiff.LoraDashConfig(r=2, target_modules=["fc1", "fc2"], dash_directions=1), model,
                            adapter_name="dash")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_autolora_beta" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    for name, k in (("default", 4), ("two", 3)):
        got = selection_weights(model, name)
        assert sorted(got) == ["fc1", "fc2", "fc3"]
        for layer_name, alpha in got.items():
            beta = getattr(model, layer_name).lora_autolora_beta[name].detach().double()
            assert alpha.dtype == torch.float64 and alpha.shape == (k,)
            torch.testing.assert_close(alpha, torch.softmax(beta, 0), rtol=0, atol=1e-15)
    for bad in ("dash", None):
        with pytest.raises(ValueError, match="AutoLoRA adapter"):
            selection_weights(model, bad)


def test_keep_mask_rules_boundaries_and_threshold_sources():
    """keep_mask against the rules worked out by hand (METHODS.md): ``published`` keeps β_j/Σβ >= λ
    (a ratio exactly at λ is kept; Σβ in (0, 1) is fine; Σβ = 0 is refused), ``softmax`` keeps
    α_j >= λ; λ is the argument, else the config's autolora_threshold, else 1/k."""
    import math

    from dashdiff.autolora.ranks import keep_mask

    layer = make_net().fc1  # k = 4: 1/k = 0.25

    def put(beta):
        with torch.no_grad():
            layer.lora_autolora_beta["default"].copy_(torch.tensor(beta, dtype=F64))

    put([1.0, 1.0, 2.0, 0.0])  # ratios 0.25, 0.25, 0.5, 0 (exact): the two at λ = 1/k are kept
    assert keep_mask(layer, "default", rule="published").tolist() == [True, True, True, False]
    put([0.05, 0.1, 0.3, 0.05])  # Σβ = 0.5: ratios 0.1, 0.2, 0.6, 0.1
    assert keep_mask(layer, "default", rule="published").tolist() == [False, False, True, False]
    assert keep_mask(layer, "default", threshold=0.15, rule="published").tolist() == [False, True, True, False]
    put([0.5, -0.5, 0.25, -0.25])  # Σβ = 0 exactly
    with pytest.raises(ValueError) as err:
        keep_mask(layer, "default", rule="published")
    assert str(err.value) == ("dashdiff: the published rank rule β_j/Σβ is undefined here (Σβ = 0 <= 0); "
                              "use autolora_rank_rule='softmax'")
    with pytest.raises(ValueError) as err:
        keep_mask(layer, "default", rule="nope")
    assert str(err.value) == "dashdiff: unknown rank rule 'nope' (use 'softmax' or 'published')"

    # the config's threshold (0.2) when none is passed; α = softmax(β) by hand
    torch.manual_seed(0)
    cfg = AutoLoraConfig(r=4, lora_alpha=4, target_modules=["fc1"], autolora_threshold=0.2)
    layer = inject_adapter_in_model(cfg, Net()).fc1
    beta = [0.0, 0.1, 0.2, 0.9]
    e = [math.exp(x) for x in beta]
    alpha = [x / sum(e) for x in e]  # 0.173, 0.191, 0.211, 0.425
    put(beta)
    assert keep_mask(layer, "default").tolist() == [a >= 0.2 for a in alpha] == [False, False, True, True]
    assert keep_mask(layer, "default", threshold=0.25).tolist() == [False, False, False, True]


def test_determine_ranks_of_the_named_adapter():
    """Two AutoLoRA adapters (k = 4, 3) and a LoRA-Dash one on the same layers: determine_ranks(model,
    threshold, name) counts that adapter's α_j >= λ (α computed by hand here); a LoRA-Dash name or no
    name (ambiguous) is refused, and so is an adapter whose β was never stepped."""
    import math

    import dashdiff

    model = make_net()
    inject_adapter_in_model(AutoLoraConfig(r=3, lora_alpha=3, target_modules=["fc1", "fc2", "fc3"]), model,
                            adapter_name="two")
    inject_adapter_in_model(dashdiff.LoraDashConfig(r=2, target_modules=["fc1", "fc2"], dash_directions=1), model,
                            adapter_name="dash")
    msg = ("dashdiff: determine_ranks before any AutoLoRA outer (β) step: α is still uniform, so every layer "
           "would keep its full rank. Run the search first (dashdiff.autolora.BilevelStep).")
    with pytest.raises(RuntimeError) as err:
        determine_ranks(model, adapter_name="two")
    assert str(err.value) == msg
    betas = {"default": {"fc1": [0.0, 0.5, 1.0, 1.5], "fc2": [2.0, 0.0, 0.0, 0.0], "fc3": [0.3, 0.2, 0.1, 0.0]},
             "two": {"fc1": [1.0, 0.0, 0.0], "fc2": [0.0, 0.1, 0.2], "fc3": [3.0, 0.0, -1.0]}}
    with torch.no_grad():
        for adapter, per_layer in betas.items():
            for name, beta in per_layer.items():
                layer = getattr(model, name)
                layer.lora_autolora_beta[adapter].copy_(torch.tensor(beta))
                if adapter == "two":  # "default" stays un-stepped
                    layer.lora_autolora_outer_steps[adapter].fill_(1)

    def want(beta, lam):
        e = [math.exp(x) for x in beta]
        return sum(x / sum(e) >= lam for x in e)

    two = betas["two"]
    assert determine_ranks(model, adapter_name="two") == {n: want(b, 1 / 3) for n, b in two.items()} \
        == {"fc1": 1, "fc2": 1, "fc3": 1}
    assert determine_ranks(model, 0.3, "two") == {n: want(b, 0.3) for n, b in two.items()} \
        == {"fc1": 1, "fc2": 3, "fc3": 1}
    with pytest.raises(RuntimeError, match="before any AutoLoRA outer"):
        determine_ranks(model, adapter_name="default")
    for bad in ("dash", None):
        with pytest.raises(ValueError, match="AutoLoRA adapter"):
            determine_ranks(model, adapter_name=bad)
