"""dashdiff.dash.selection: the launch's choice of directions against an independent float64 SVD,
numerically-zero singular values, the host-spectrum path and tie-breaks."""

import pytest
import torch
from dashdiff.dash.selection import select_directions
from dash_models import decaying_weight, reference_selection


def test_launch_matches_float64_svd_selection():
    for shape, seed in [((64, 40), 0), ((40, 64), 1), ((96, 96), 2)]:
        w0 = decaying_weight(*shape, seed=seed, decades=5).float()
        g = torch.Generator().manual_seed(seed)
        a = torch.randn(4, shape[1], generator=g) * 0.1
        b = torch.randn(shape[0], 4, generator=g) * 0.1
        sel = select_directions(w0, a, b, 2.0, 8)
        ref_idx, u, vh = reference_selection(w0, a, b, 2.0, 8)
        assert sel.indices.tolist() == ref_idx.tolist()
        # the stored directions are the singular pairs, up to a common sign per pair
        for j, i in enumerate(sel.indices.tolist()):
            sign = torch.sign(sel.u_s[:, j] @ u[:, i])
            torch.testing.assert_close(sel.u_s[:, j] * sign, u[:, i], atol=1e-6, rtol=0)
            torch.testing.assert_close(sel.v_s_t[j] * sign, vh[i], atol=1e-6, rtol=0)


def test_numerically_zero_directions_are_not_eligible():
    w0 = torch.zeros(16, 12)
    w0[:3, :3] = torch.diag(torch.tensor([3.0, 2.0, 1.0]))  # rank 3
    a, b = torch.randn(2, 12), torch.randn(16, 2)
    sel = select_directions(w0, a, b, 1.0, 5)
    assert sorted(sel.indices.tolist()) == [0, 1, 2]
    assert sel.u_s.shape == (16, 5) and torch.all(sel.u_s[:, 3:] == 0) and torch.all(sel.v_s_t[3:] == 0)
    assert torch.isnan(sel.change_rate[3:]).all()


@pytest.mark.parametrize("shape", [(40, 12), (12, 40)])
def test_numerically_zero_threshold_boundary_non_square(shape):
    """METHODS.md: σ <= max(out, in)·eps32·σ_max is numerically zero. Singular values 1 % either side
    of that threshold, and one between the min(out, in) and max(out, in) versions of it, on both a
    tall and a wide weight (the launch takes a different Gram matrix for each)."""
    eps32 = torch.finfo(torch.float32).eps
    top = 8.0  # σ_max != 1, so the threshold's σ_max factor matters
    t = max(shape) * eps32 * top
    sigma = torch.tensor([1.0, 0.5, 0.25, 1.01 * t / top, 0.99 * t / top, 0.5 * (min(shape) + max(shape)) * eps32],
                         dtype=torch.float64) * top
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(shape[0], sigma.numel(), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], sigma.numel(), generator=g, dtype=torch.float64))
    w0 = (u * sigma) @ v.t()  # rank 6; the other min(shape) - 6 singular values are 0
    a = torch.randn(2, shape[1], generator=g, dtype=torch.float64)
    b = torch.randn(shape[0], 2, generator=g, dtype=torch.float64)
    from dashdiff.dash.selection import _select_from_host_eig, gram_eig

    # both launch paths: W0's own spectrum, and a spectrum prefetched to the host (its own threshold code)
    for sel in (select_directions(w0, a, b, 1.0, min(shape)),
                _select_from_host_eig(w0, a, b, 1.0, min(shape), gram_eig(w0))):
        assert sorted(sel.indices.tolist()) == [0, 1, 2, 3]  # 1.01·threshold is eligible, the rest not
        assert torch.isfinite(sel.change_rate[:4]).all() and torch.isnan(sel.change_rate[4:]).all()
        torch.testing.assert_close(sel.sigma[:6], sigma, rtol=1e-5, atol=0)
    from dashdiff.dash.selection import spectrum

    spec = spectrum(w0)  # its contract: the columns of numerically-zero singular values are zero
    assert spec.eligible.tolist() == [True] * 4 + [False] * (min(shape) - 4)
    assert torch.all(spec.u[:, 4:] == 0) and torch.all(spec.v[:, 4:] == 0)


def test_zero_weight_has_no_eligible_direction():
    """An all-zero W0 (zero-initialised layers exist): σ_max = 0, so nothing is eligible and nothing is
    selected (no 0/0 change rates)."""
    from dashdiff.dash.selection import _select_from_host_eig, gram_eig

    w0, a, b = torch.zeros(6, 4), torch.randn(2, 4), torch.randn(6, 2)
    for sel in (select_directions(w0, a, b, 1.0, 2), _select_from_host_eig(w0, a, b, 1.0, 2, gram_eig(w0))):
        assert sel.indices.numel() == 0 and torch.isnan(sel.change_rate).all()
        assert torch.all(sel.u_s == 0) and torch.all(sel.v_s_t == 0)


def test_launch_refuses_more_directions_than_the_layer_has():
    # the launch's own check (the layer's constructor has another, with another message)
    msg = ("dash_directions s=5 exceeds min(out, in)=4 of a 4x6 layer: "
           "lower dash_directions or leave this layer out of target_modules.")
    with pytest.raises(ValueError) as err:
        select_directions(torch.randn(4, 6), torch.randn(2, 6), torch.randn(4, 2), 1.0, 5)
    assert str(err.value) == msg


def test_launch_path_follows_the_decompositions_device(monkeypatch):
    """A prefetched decomposition on W0's own device goes through ``spectrum`` (the host path is for a
    decomposition left on another device than W0's, e.g. a GPU launch after a host prefetch)."""
    from dashdiff.dash import selection as launch

    w0 = decaying_weight(12, 8, seed=5).float()
    eig = launch.gram_eig(w0)
    calls = []
    monkeypatch.setattr(launch, "_select_from_host_eig", lambda *args: calls.append("host"))
    sel = select_directions(w0, torch.randn(2, 8), torch.randn(12, 2), 1.0, 3, eig=eig)
    assert calls == [] and sel.indices.numel() == 3


def test_precomputed_gram_eig_is_used(monkeypatch):
    """select_directions with a prefetched eigendecomposition does not decompose W0 again (the point of
    the prefetch) and gives the same selection."""
    from dashdiff.dash import selection as launch

    w0 = decaying_weight(24, 16, seed=4).float()
    a, b = torch.randn(2, 16), torch.randn(24, 2)
    want = select_directions(w0, a, b, 1.0, 3)
    eig = launch.gram_eig(w0)
    monkeypatch.setattr(launch, "gram_eig", lambda w: (_ for _ in ()).throw(AssertionError("decomposed again")))
    got = select_directions(w0, a, b, 1.0, 3, eig=eig)
    assert got.indices.tolist() == want.indices.tolist()


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_host_spectrum_launch_matches_float64_svd(shape):
    # The launch from a spectrum prefetched to the host (weights on a GPU in real runs) takes a
    # different arrangement of the products; reference: float64 SVD of W0 and the explicit ΔW.
    from dashdiff.dash.selection import _select_from_host_eig, gram_eig

    torch.manual_seed(0)
    w = torch.randn(*shape, dtype=torch.float64) * torch.logspace(0, -2, shape[1], dtype=torch.float64)
    a, b = torch.randn(4, shape[1]) * 0.1, torch.randn(shape[0], 4) * 0.1
    got = _select_from_host_eig(w.float(), a, b, 2.0, 5, gram_eig(w.float()))
    u, sig, vh = torch.linalg.svd(w.float().double(), full_matrices=False)
    dsig = torch.einsum("ik,ij,jk->k", u, 2.0 * b.double() @ a.double(), vh.t())
    want = torch.topk(dsig.abs() / sig, 5).indices
    assert got.indices.tolist() == want.tolist()
    torch.testing.assert_close(got.change_rate, dsig.abs() / sig, rtol=1e-9, atol=1e-12)
    # every σ_i (measured relative error 3.1e-10 at the smallest σ of the square case: the Gram route)
    torch.testing.assert_close(got.sigma, sig, rtol=3e-9, atol=0)
    for j, i in enumerate(want.tolist()):  # each chosen rank-1 direction u_i v_iᵀ (sign-free)
        torch.testing.assert_close(torch.outer(got.u_s[:, j], got.v_s_t[j]), torch.outer(u[:, i], vh[i]),
                                   rtol=0, atol=1e-9)


@pytest.mark.parametrize("shape", [(40, 64), (64, 40)])
def test_tied_change_rates_keep_the_larger_singular_values(shape):
    """B = 0 (ΔW = 0): every change rate is 0, so the order among them is the tie-break: the launch
    keeps the directions of the largest σ, in order (a stable sort), on both launch paths."""
    from dashdiff.dash.selection import _select_from_host_eig, gram_eig

    w0 = decaying_weight(*shape, seed=6, decades=2).float()
    a, b = torch.randn(2, shape[1]), torch.zeros(shape[0], 2)
    for sel in (select_directions(w0, a, b, 1.0, 6), _select_from_host_eig(w0, a, b, 1.0, 6, gram_eig(w0))):
        assert sel.indices.tolist() == [0, 1, 2, 3, 4, 5]
        assert torch.all(sel.change_rate == 0)
