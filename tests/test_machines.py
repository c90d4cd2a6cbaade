"""Score machines against float64 brute force and closed forms."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from patchmosaic import ScoreMachine
from patchmosaic.denoisers import EquivariantLocalScoreMachine
from fuzz import cases, picker
from reference import ref_machine

CASES = [
    ("ideal", "zeros", None, True),
    ("ideal", "circular", None, True),
    ("es", "circular", None, True),
    ("ls", "zeros", 3, True),
    ("ls", "circular", 3, True),
    ("ls", "zeros", 5, True),
    ("els", "zeros", 3, True),
    ("els", "zeros", 5, True),
    ("els", "circular", 3, True),
    ("els", "circular", 5, True),
    ("els", "circular", 3, False),
    ("els", "circular", 5, False),
]


def _data(N=4, C=2, H=6, W=5, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    train = torch.rand(N, C, H, W, generator=g, dtype=torch.float64) * 2 - 1
    labels = torch.tensor([0, 1, 0, 2][:N])
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    return train, labels, x


@pytest.mark.parametrize("kind,padding,k,wrap", CASES)
@pytest.mark.parametrize("conditioned", [False, True])
@pytest.mark.parametrize("chunk_elements", [1, 1 << 22])
def test_matches_float64_brute_force(kind, padding, k, wrap, conditioned, chunk_elements):
    train, labels, x = _data()
    alpha_bar = torch.tensor([0.3, 0.8], dtype=torch.float64)  # per-sample noise levels
    machine = ScoreMachine(
        train, kind=kind, padding=padding, labels=labels, wrap_training_patches=wrap,
        chunk_elements=chunk_elements,
    )
    label = torch.tensor([0, 2]) if conditioned else None
    got = machine.denoise(x, alpha_bar, patch_size=k, label=label)
    assert got.dtype == torch.float64
    for b in range(x.shape[0]):
        subset = train[labels == label[b]] if conditioned else train
        want = ref_machine(x[b].numpy(), subset.numpy(), float(alpha_bar[b]), kind, padding, k, wrap)
        np.testing.assert_allclose(got[b].numpy(), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind,padding,k", [("els", "zeros", 3), ("els", "circular", 5), ("ls", "zeros", 3)])
def test_float32_matches_float64(kind, padding, k):
    train, _, x = _data(N=6, C=1, H=8, W=8)
    m64 = ScoreMachine(train, kind=kind, padding=padding)
    m32 = ScoreMachine(train.float(), kind=kind, padding=padding)
    for ab in (0.05, 0.5, 0.9):
        want = m64.denoise(x, ab, patch_size=k)
        got = m32.denoise(x.float(), ab, patch_size=k)
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.double().numpy(), want.numpy(), atol=2e-4)


def test_ideal_of_one_image_returns_it():
    train, _, x = _data(N=1)
    got = ScoreMachine(train, kind="ideal").denoise(x, 0.5)
    torch.testing.assert_close(got, train.expand_as(got), rtol=0, atol=0)


def test_els_with_whole_image_patch_is_es():
    # On a 5x5 torus a 5x5 patch sees every pixel exactly once, so the ELS
    # candidate (i, q) for pixel p is training image i shifted by q - p: ES.
    g = torch.Generator().manual_seed(1)
    train = torch.rand(3, 1, 5, 5, generator=g, dtype=torch.float64) * 2 - 1
    x = torch.randn(2, 1, 5, 5, generator=g, dtype=torch.float64)
    els = ScoreMachine(train, kind="els", padding="circular").denoise(x, 0.6, patch_size=5)
    es = ScoreMachine(train, kind="es", padding="circular").denoise(x, 0.6)
    torch.testing.assert_close(els, es, rtol=1e-10, atol=1e-10)


def test_ls_equals_els_at_corners():
    train, _, x = _data(N=5, C=1, H=9, W=9)
    k, r = 5, 2
    ls = ScoreMachine(train, kind="ls", padding="zeros").denoise(x, 0.4, patch_size=k)
    els = ScoreMachine(train, kind="els", padding="zeros").denoise(x, 0.4, patch_size=k)
    for ys, xs in itertools.product([slice(0, r), slice(9 - r, 9)], repeat=2):
        torch.testing.assert_close(els[..., ys, xs], ls[..., ys, xs], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(els[..., r:-r, r:-r], ls[..., r:-r, r:-r])  # interior differs


def test_els_is_translation_equivariant_on_the_torus():
    train, _, x = _data(N=3, C=1, H=7, W=7)
    m = ScoreMachine(train, kind="els", padding="circular")
    shifted = m.denoise(torch.roll(x, (2, 3), dims=(2, 3)), 0.5, patch_size=3)
    torch.testing.assert_close(shifted, torch.roll(m.denoise(x, 0.5, patch_size=3), (2, 3), dims=(2, 3)))


def test_score_formula():
    train, _, x = _data()
    m = ScoreMachine(train, kind="els", padding="zeros")
    x0 = m.denoise(x, 0.7, patch_size=3)
    torch.testing.assert_close(m.score(x, 0.7, patch_size=3), -(x - 0.7**0.5 * x0) / 0.3)


def test_conditioning_equals_machine_on_class_subset():
    train, labels, x = _data()
    got = ScoreMachine(train, kind="els", labels=labels).denoise(x, 0.5, patch_size=3, label=0)
    want = ScoreMachine(train[labels == 0], kind="els").denoise(x, 0.5, patch_size=3)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind,padding,k", [("ideal", "zeros", None), ("es", "circular", None),
                                            ("ls", "zeros", 3), ("els", "zeros", 15), ("els", "circular", 3)])
@pytest.mark.parametrize("alpha_bar", [1e-6, 0.999999])
def test_float32_finite_at_extreme_noise_levels(kind, padding, k, alpha_bar):
    train = torch.rand(8, 1, 16, 16) * 2 - 1
    x = (alpha_bar**0.5) * train[:2] + (1 - alpha_bar) ** 0.5 * torch.randn(2, 1, 16, 16)
    got = ScoreMachine(train, kind=kind, padding=padding).denoise(x, alpha_bar, patch_size=k)
    assert torch.isfinite(got).all()
    if alpha_bar > 0.5:  # at vanishing noise the query's own training image wins
        torch.testing.assert_close(got, train[:2], atol=1e-4, rtol=0)


def _mostly_background(N=5, C=1, H=9, W=8, seed=3):
    """MNIST-like images: a constant -1 background with a random blob (many constant patches)."""
    g = torch.Generator().manual_seed(seed)
    train = torch.full((N, C, H, W), -1.0, dtype=torch.float64)
    train[:, :, 3:6, 2:5] = torch.rand(N, C, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    train[0] = 0.25  # a second constant value
    x = torch.randn(2, C, H, W, generator=g, dtype=torch.float64)
    return train, x


@pytest.mark.parametrize("padding,wrap", [("zeros", True), ("circular", True), ("circular", False)])
@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("C", [1, 2])
@pytest.mark.parametrize("chunk_elements", [1, 1 << 22])
def test_constant_patch_compaction_matches_brute_force(padding, wrap, k, C, chunk_elements, monkeypatch):
    train, x = _mostly_background(C=C)
    calls = []
    original = EquivariantLocalScoreMachine._update_flat
    monkeypatch.setattr(EquivariantLocalScoreMachine, "_update_flat", staticmethod(lambda *a: (calls.append(1), original(*a))))
    m = ScoreMachine(train, kind="els", padding=padding, wrap_training_patches=wrap, chunk_elements=chunk_elements)
    got = m.denoise(x, torch.tensor([0.3, 0.97], dtype=torch.float64), patch_size=k)
    assert calls, "constant patches were not compacted"
    for b, ab in enumerate((0.3, 0.97)):
        want = ref_machine(x[b].numpy(), train.numpy(), ab, "els", padding, k, wrap)
        np.testing.assert_allclose(got[b].numpy(), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", cases(10))
def test_random_machines_match_float64_brute_force(monkeypatch, case):
    """Random LS/ELS machines against the brute force: image sizes, channels, patch sizes, paddings,
    wrapping, class conditioning, per-sample noise from abar 0.01 to 0.999, training images with
    constant regions and duplicates (constant-patch compaction), chunk sizes, pruning, tiny logit
    blocks; ELS also through ``denoise_sizes`` (the nested one-pass path of calibration) at every
    size it takes."""
    g, pick = picker(1000 + case)
    kind, padding = pick([("ls", "zeros"), ("ls", "circular"), ("els", "zeros"), ("els", "circular")])
    wrap = pick([True, False]) if (kind, padding) == ("els", "circular") else True
    N, C, H, W = pick([1, 2]), pick([1, 2]), pick([7, 8]), pick([7, 8])
    train = torch.rand(N, C, H, W, generator=g, dtype=torch.float64) * 2 - 1
    train[:, :, : pick([0, 2, H])] = pick([0.0, -1.0])  # constant rows (whole images, when H)
    if N > 1 and pick([False, True]):
        train[-1] = train[0]  # a duplicate image
    B = 2
    alpha_bar = torch.tensor([pick([0.01, 0.3]), pick([0.9, 0.999])], dtype=torch.float64)
    x0 = train[torch.randint(N, (B,), generator=g)]
    x_t = alpha_bar.sqrt()[:, None, None, None] * x0 + (1 - alpha_bar).sqrt()[:, None, None, None] * torch.randn(
        B, C, H, W, generator=g, dtype=torch.float64)
    monkeypatch.setattr("patchmosaic.engine.CPU_BLOCK_BYTES", pick([64, 1 << 20]))
    labels = torch.arange(N) % 2 if pick([False, True]) else None  # class conditioning
    label = None if labels is None else labels[torch.randint(N, (B,), generator=g)]
    machine = ScoreMachine(train, kind=kind, padding=padding, wrap_training_patches=wrap, labels=labels,
                           chunk_elements=pick([1, 300, 1 << 22]), prune_rank=pick([0, 16]))
    sizes = [1, 3, 5] if padding == "circular" and not wrap else [1, 3, 5, 7]  # without wrapping, k < H - 1
    subsets = [train if label is None else train[labels == label[b]] for b in range(B)]
    want = {k: np.stack([ref_machine(x_t[b].numpy(), subsets[b].numpy(), float(alpha_bar[b]), kind, padding, k, wrap)
                         for b in range(B)]) for k in sizes}
    single = ScoreMachine(train.float(), kind=kind, padding=padding, wrap_training_patches=wrap, labels=labels,
                          chunk_elements=machine.chunk_elements, prune_rank=machine.prune_rank)
    for k in sizes:
        got = machine.denoise(x_t, alpha_bar, patch_size=k, label=label)
        np.testing.assert_allclose(got.numpy(), want[k], rtol=1e-9, atol=1e-9, err_msg=f"k={k}")
        # float32: finite, and within what its logit rounding allows (abar 0.999: logits ~1e3 x |x||X|)
        got32 = single.denoise(x_t.float(), alpha_bar.float(), patch_size=k, label=label)
        assert torch.isfinite(got32).all()
        np.testing.assert_allclose(got32.double().numpy(), want[k], rtol=0, atol=2e-2, err_msg=f"float32 k={k}")
    if kind == "els":
        # every size from 3 through the nested stream (NESTED_FROM is 7 by default: one size only here)
        monkeypatch.setattr("patchmosaic.denoisers.score_machines.NESTED_FROM", 3)
        sigma = ((1 - alpha_bar) / alpha_bar).sqrt()  # the protocol's x = x_t / sqrt(abar)
        nested = machine.denoise_sizes(x_t / alpha_bar.sqrt()[:, None, None, None], sigma, sizes, label=label)
        for k in sizes:
            np.testing.assert_allclose(nested[k].numpy(), want[k], rtol=1e-9, atol=1e-9, err_msg=f"nested k={k}")
