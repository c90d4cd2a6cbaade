"""Bounded pruning (patchmosaic.engine, "Bounded pruning") against float64 brute force.

Candidates are skipped only where a distance lower bound proves their shifted
logit below the exponent floor, so the machines must match the brute force to
rounding at every noise level of the published schedule; a deliberately wrong
bound (a floor moved 98 nats up) must not.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import patchmosaic.engine as engine
from patchmosaic import ScoreMachine
from patchmosaic.schedules import sigmas_cosine
from reference import ref_patch_machine

SIGMAS = [float(s) for s in sigmas_cosine(20) if s > 0]  # the grid of PRESETS["mnist-resnet-zeros"]


@pytest.fixture
def always_prune(monkeypatch):
    """Bound every tile of 2 rows and never switch the bound off, so small inputs exercise it."""
    monkeypatch.setattr(engine, "PRUNE_ROWS", 2)
    monkeypatch.setattr(engine, "PRUNE_MIN_FRACTION", 0.0)
    monkeypatch.setattr(engine, "PRUNE_GATHER_MAX", 1.0)


def _data(N=6, C=1, H=6, W=5, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    train = torch.rand(N, C, H, W, generator=g, dtype=torch.float64) * 2 - 1
    labels = torch.tensor([0, 1, 0, 1, 0, 1][:N])
    return train, labels, g


def _check(machine, train, labels, x, sigma, k, padding, label):
    got = machine(x, sigma, patch_size=k, label=label)
    ab = 1.0 / (1.0 + sigma**2)
    for b in range(x.shape[0]):
        subset = train if label is None else train[labels == int(label[b])]
        want = ref_patch_machine((x[b] * ab**0.5).numpy(), subset.numpy(), ab, k, "els", padding)
        np.testing.assert_allclose(got[b].numpy(), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("padding", ["zeros", "circular"])
@pytest.mark.parametrize("conditioned", [False, True])
def test_pruned_matches_brute_force_on_the_published_schedule(padding, conditioned, always_prune):
    train, labels, g = _data()
    machine = ScoreMachine(train, kind="els", padding=padding, labels=labels, chunk_elements=64, prune_rank=4)
    label = torch.tensor([0, 1]) if conditioned else None
    skipped = 0
    for sigma in SIGMAS:
        x = train[[0, 3]] + sigma * torch.randn(2, 1, 6, 5, generator=g, dtype=torch.float64)
        _check(machine, train, labels, x, sigma, 3, padding, label)
        skipped += machine.prune_stats[0]
    assert skipped > 0, "the bound skipped nothing: the test would not see a wrong bound"


def test_a_wrong_bound_is_caught(monkeypatch, always_prune):
    # A bound 98 nats too optimistic (candidates within 2 nats of the running log-sum-exp
    # count as below the float64 floor of -100): the result must move past the tolerance.
    monkeypatch.setattr(engine, "PRUNE_MARGIN", -98.0)
    train, labels, g = _data()
    machine = ScoreMachine(train, kind="els", padding="zeros", chunk_elements=64, prune_rank=4)
    sigma = SIGMAS[-3]
    x = train[[0, 3]] + sigma * torch.randn(2, 1, 6, 5, generator=g, dtype=torch.float64)
    with pytest.raises(AssertionError):
        _check(machine, train, labels, x, sigma, 3, "zeros", None)


@pytest.mark.parametrize("sigma", [SIGMAS[-1], SIGMAS[-6], SIGMAS[0]])
def test_statistics_within_the_bound_and_top_lists_unpruned(sigma, always_prune):
    train, _, g = _data()
    x = train[[0, 3]] + sigma * torch.randn(2, 1, 6, 5, generator=g, dtype=torch.float64)
    pruned = ScoreMachine(train, kind="els", chunk_elements=64, prune_rank=4).bind(patch_sizes=[3] * 20)
    dense = ScoreMachine(train, kind="els", chunk_elements=64, prune_rank=0).bind(patch_sizes=[3] * 20)
    for top in (0, 4):
        (a, pa), (b, pb) = pruned.with_provenance(x, sigma, top=top), dense.with_provenance(x, sigma, top=top)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(pa.n_eff, pb.n_eff, rtol=1e-9, atol=0)
        torch.testing.assert_close(pa.entropy, pb.entropy, rtol=0, atol=1e-9)
        if top:
            assert torch.equal(pa.index, pb.index) and torch.equal(pa.weight, pb.weight)


def test_float32_pruned_equals_unpruned_on_digit_like_images(always_prune):
    g = torch.Generator().manual_seed(5)
    train = torch.full((12, 1, 10, 10), -1.0)
    train[:, :, 2:8, 3:7] = torch.rand(12, 1, 6, 4, generator=g) * 2 - 1
    for sigma in (SIGMAS[-1], SIGMAS[-5], SIGMAS[-10]):
        x = train[:2] + sigma * torch.randn(2, 1, 10, 10, generator=g)
        m = ScoreMachine(train, kind="els", chunk_elements=256, prune_rank=16)
        got = m(x, sigma, patch_size=5)
        want = ScoreMachine(train, kind="els", chunk_elements=256, prune_rank=0)(x, sigma, patch_size=5)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


def test_prune_rank_must_not_be_negative():
    with pytest.raises(ValueError, match="prune_rank"):
        ScoreMachine(torch.zeros(1, 1, 4, 4), kind="els", prune_rank=-1)
