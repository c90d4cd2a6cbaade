"""All patch sizes of one ELS call in one stream (patchmosaic.nested, ScoreMachine.denoise_sizes).

Every size must equal the float64 brute force of its own machine (tests/reference.py)
and the single-size call, for both paddings, without wrapping, with labels, at
low and high noise, with sizes in any order. ``NESTED_FROM`` is lowered so the
shared stream covers every size of these small images.
"""

import numpy as np
import pytest
import torch
from reference import ref_machine

from patchmosaic import ScoreMachine
from patchmosaic.denoisers import score_machines
from patchmosaic.geometry import make_geometry
from patchmosaic.nested import axis_depth, ring_order


@pytest.fixture(autouse=True)
def share_every_size(monkeypatch):
    monkeypatch.setattr(score_machines, "NESTED_FROM", 1)


def _data(C=2, H=9, W=11, N=5, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    train = torch.rand((N, C, H, W), generator=g, dtype=torch.float64) * 2 - 1
    x = torch.randn((B, C, H, W), generator=g, dtype=torch.float64)
    return train, x


@pytest.mark.parametrize("padding,wrap", [("zeros", True), ("circular", True), ("circular", False)])
@pytest.mark.parametrize("sigma", [0.15, 6.0])
def test_every_size_equals_the_float64_brute_force(padding, wrap, sigma):
    train, x = _data(H=7, W=8, N=4, B=2)
    machine = ScoreMachine(train, kind="els", padding=padding, wrap_training_patches=wrap, chunk_elements=2000)
    sizes = (7, 3, 5) if padding == "zeros" else (5, 1, 7, 3, 7)
    got = machine.denoise_sizes(x * (1 + sigma**2) ** 0.5, sigma, sizes)
    assert list(got) == sorted(set(sizes))
    ab = 1.0 / (1.0 + sigma**2)
    for k, est in got.items():
        for b in range(x.shape[0]):
            want = ref_machine(x[b].numpy(), train.numpy(), ab, "els", padding, k, wrap)
            np.testing.assert_allclose(est[b].numpy(), want, atol=1e-10, rtol=0, err_msg=f"k={k} b={b}")


def test_float32_and_labels_match_single_size_calls():
    train, x = _data(C=1, H=12, W=10, N=12, B=4, seed=1)
    labels = torch.arange(12) % 3
    machine = ScoreMachine(train.float(), kind="els", padding="zeros", labels=labels)
    label = torch.tensor([2, 0, 2, 1])
    sigma = torch.tensor([0.3, 0.3, 2.0, 9.0])
    xs = x.float() * (1 + sigma[:, None, None, None] ** 2).sqrt()
    got = machine.denoise_sizes(xs, sigma, [3, 5, 7, 9], label=label)
    for k, est in got.items():
        want = machine(xs, sigma, patch_size=k, label=label)
        torch.testing.assert_close(est, want, atol=2e-5, rtol=0)


def test_small_sizes_and_ls_take_the_single_size_path(monkeypatch):
    monkeypatch.setattr(score_machines, "NESTED_FROM", 5)
    train, x = _data()
    calls = []
    original = score_machines.nested_dense_means
    monkeypatch.setattr(score_machines, "nested_dense_means", lambda *a, **kw: calls.append(a[5]) or original(*a, **kw))
    els = ScoreMachine(train, kind="els", padding="zeros")
    got = els.denoise_sizes(x, 1.0, [3, 5, 7])
    assert calls == [[2, 3]]  # radii of the shared sizes 5 and 7; size 3 alone
    for k in (3, 5, 7):
        torch.testing.assert_close(got[k], els(x, 1.0, patch_size=k), atol=1e-12, rtol=0)
    ls = ScoreMachine(train, kind="ls", padding="zeros")
    got = ls.denoise_sizes(x, 1.0, [3, 5, 7])
    assert calls == [[2, 3]]
    torch.testing.assert_close(got[5], ls(x, 1.0, patch_size=5), atol=0, rtol=0)


def test_bad_sizes_are_refused():
    train, x = _data()
    machine = ScoreMachine(train, kind="els", padding="zeros")
    with pytest.raises(ValueError, match="odd"):
        machine.denoise_sizes(x, 1.0, [3, 4])
    with pytest.raises(ValueError, match="larger than the 9x11 image"):
        machine.denoise_sizes(x, 1.0, [3, 11])
    with pytest.raises(ValueError, match="at least one patch size"):
        machine.denoise_sizes(x, 1.0, [])


def test_ring_order_and_depths():
    perm, ends = ring_order(2, [1, 2])
    assert ends == [18, 50] and sorted(perm.tolist()) == list(range(50))
    window = torch.arange(25).view(5, 5)
    assert sorted(perm[:9].tolist()) == window[1:4, 1:4].flatten().tolist()  # channel 0, the 3 x 3 window
    rows = [make_geometry("els", "zeros", 9, 9, k).rows[0] for k in (3, 5, 7)]
    assert axis_depth(rows, "P", 9).tolist() == [-1, 0, 1, 2, 2, 2, 1, 0, -1]
    with pytest.raises(ValueError, match="shrink"):
        axis_depth(rows[::-1], "P", 9)
