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
from reference import ref_patch_machine

from patchmosaic import ScoreMachine, engine
from patchmosaic.data import load_dataset
from patchmosaic.engine import (
    SoftmaxMean,
    augment_keys,
    augment_queries,
    augment_values,
)
from patchmosaic.schedules import sigmas_cosine

SIGMAS = [float(s) for s in sigmas_cosine(20) if s > 0]  # the grid of PRESETS["mnist-resnet-zeros"]


@pytest.fixture
def always_prune(monkeypatch):
    """Bound every tile of 2 rows against blocks of 2 keys and never switch the bound off, so small
    inputs exercise it."""
    monkeypatch.setattr(engine, "PRUNE_ROWS", 2)
    monkeypatch.setattr(engine, "PRUNE_KEYS", 2)
    monkeypatch.setattr(engine, "PRUNE_MIN_BLOCKS", 2)
    monkeypatch.setattr(engine, "PRUNE_MIN_FRACTION", 0.0)


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
def test_statistics_within_the_bound_and_top_lists_exact(sigma, always_prune):
    train, _, g = _data()
    x = train[[0, 3]] + sigma * torch.randn(2, 1, 6, 5, generator=g, dtype=torch.float64)
    pruned = ScoreMachine(train, kind="els", chunk_elements=64, prune_rank=4).bind(patch_sizes=[3] * 20)
    dense = ScoreMachine(train, kind="els", chunk_elements=64, prune_rank=0).bind(patch_sizes=[3] * 20)
    for top in (0, 4):
        (a, pa), (b, pb) = pruned.with_provenance(x, sigma, top=top), dense.with_provenance(x, sigma, top=top)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(pa.n_eff, pb.n_eff, rtol=1e-9, atol=0)
        torch.testing.assert_close(pa.entropy, pb.entropy, rtol=0, atol=1e-9)
        if top:  # the dense pass's lists (no ties in random inputs), weights to rounding
            assert torch.equal(pa.index, pb.index)
            torch.testing.assert_close(pa.weight, pb.weight, rtol=1e-12, atol=1e-15)


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


def test_kd_cells_are_a_permutation_and_their_boxes_bound_every_pair():
    # the bound's geometry against brute force: the squared distance between two cells' boxes is
    # never above that of any pair of their points (ragged last cells included)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(50, 3, generator=g, dtype=torch.float64), torch.randn(37, 3, generator=g, dtype=torch.float64)
    pa, pb = engine.kd_order(a, 4, 3), engine.kd_order(b, 5, 2)
    assert torch.equal(pa.sort().values, torch.arange(50)) and torch.equal(pb.sort().values, torch.arange(37))
    alo, ahi = engine._cell_boxes(a[pa][None], 4)
    blo, bhi = engine._cell_boxes(b[pb][None], 5)
    gap = engine._box_gap2(alo, ahi, blo, bhi)[0]  # [13, 8]
    d2 = torch.cdist(a[pa], b[pb]).square()  # [50, 37]
    for i in range(gap.shape[0]):
        for j in range(gap.shape[1]):
            assert gap[i, j] <= d2[4 * i : 4 * i + 4, 5 * j : 5 * j + 5].min()
    assert (gap > 0).float().mean() > 0.5, "cells this far apart should mostly be separated"


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 4 rows, blocks of 4 keys, a reference from the first 8 keys, never switched off."""
    for name, value in (("PRUNE_ROWS", 4), ("PRUNE_KEYS", 4), ("PRUNE_MIN_BLOCKS", 2), ("PRUNE_FIRST_KEYS", 8),
                        ("PRUNE_MIN_FRACTION", 0.0)):
        monkeypatch.setattr(engine, name, value)


def _clusters(g, G, M, D, n_centres=6):
    centres = torch.randn(G, n_centres, D, generator=g, dtype=torch.float64)
    pick = torch.randint(0, n_centres, (G, M), generator=g)
    return centres.gather(1, pick[..., None].expand(G, M, D)) + 0.3 * torch.randn(G, M, D, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("track", [None, 0, 3])
def test_bounded_state_matches_the_dense_one_in_the_callers_row_order(small_tiles, track):
    # queries near clustered keys, at low noise: the bound skips blocks; every row's mean,
    # N_eff and entropy must equal the dense state's (and the softmax computed directly) in
    # the caller's row order, although the state works on rows in k-d order
    g = torch.Generator().manual_seed(4)
    G, Bq, M, D, V = 2, 37, 240, 6, 3
    keys = _clusters(g, G, M, D)  # [G, M, D]
    values = torch.randn(G, M, V, generator=g, dtype=torch.float64)
    x = keys[:, torch.randperm(M, generator=g)[:Bq]] + 0.05 * torch.randn(G, Bq, D, generator=g, dtype=torch.float64)
    ab = torch.tensor(0.99, dtype=torch.float64)
    scale, bias = (t.expand(Bq) for t in (ab.sqrt() / (1 - ab), -ab / (2 * (1 - ab))))
    states = [SoftmaxMean(augment_queries(x, scale, bias), V, track=track, prune=prune) for prune in (0, 3)]
    ids = torch.arange(M).expand(G, M)
    for s in range(0, M, 80):  # three chunks: the first gives the reference, two are bounded
        for state in states:
            state.update(augment_keys(keys[:, s : s + 80].transpose(1, 2)), augment_values(values[:, s : s + 80]),
                         ids=ids[:, s : s + 80] if track else None)
    dense, pruned = states
    d2 = ((x[:, :, None] - ab.sqrt() * keys[:, None]) ** 2).sum(-1)  # [G, Bq, M]
    w = torch.softmax(-d2 / (2 * (1 - ab)), dim=-1)
    torch.testing.assert_close(pruned.mean(), w @ values, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pruned.mean(), dense.mean(), rtol=1e-10, atol=1e-10)
    assert pruned.skipped > 0.2 * pruned.pairs, "the bound skipped too little for the test to mean anything"
    assert not torch.equal(pruned._index[2], torch.arange(Bq).expand(G, Bq)), "rows were never reordered"
    if track is not None:
        for a, b in zip(pruned.posterior_stats(), dense.posterior_stats()):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    if track:  # a skipped candidate is also below the row's m-th best: the dense pass's top lists
        (wa, ia, ca), (wb, ib, cb) = pruned.top_candidates(), dense.top_candidates()
        assert torch.equal(ia, ib) and torch.equal(ca, cb)
        torch.testing.assert_close(wa, wb, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_default_tiles_skip_blocks_at_low_noise(dtype, tol):
    # the machines' own tiling constants on bundled MNIST digits (16 x 16, 300 training images: the
    # first keys and one bounded chunk): blocks are skipped at the published schedule's lowest noise
    # level, and the result, N_eff and entropy stay those of the dense pass (float32: to its rounding,
    # which moves N_eff by up to ~1e-3 relative between any two summation orders)
    data = load_dataset("mnist", size=16, n_train=304).images.to(dtype)
    train, held = data[:300], data[300:]
    g = torch.Generator().manual_seed(6)
    x = held + SIGMAS[-1] * torch.randn(held.shape, generator=g, dtype=dtype)
    pruned = ScoreMachine(train, kind="els", chunk_elements=2**16, prune_rank=16).bind(patch_sizes=[3] * 20)
    dense = ScoreMachine(train, kind="els", chunk_elements=2**16, prune_rank=0).bind(patch_sizes=[3] * 20)
    (a, pa), (b, pb) = pruned.with_provenance(x, SIGMAS[-1], top=0), dense.with_provenance(x, SIGMAS[-1], top=0)
    skipped, pairs, bounded = pruned.machine.prune_stats
    assert skipped > 0.2 * pairs and bounded > 0.5 * pairs
    torch.testing.assert_close(a, b, rtol=0, atol=tol)
    stat_tol = 1e-10 if dtype == torch.float64 else 2e-3
    torch.testing.assert_close(pa.n_eff, pb.n_eff, rtol=stat_tol, atol=0)
    torch.testing.assert_close(pa.entropy, pb.entropy, rtol=0, atol=stat_tol)


def test_top_lists_at_low_noise_are_the_dense_ones_up_to_ties():
    # MNIST digits hold duplicate patches, whose exactly tied weights either pass may list in any
    # order; every entry that is not tied with a neighbour must be the dense pass's (the last
    # slot may tie with the unlisted ninth), and the weights must agree slot by slot
    data = load_dataset("mnist", size=16, n_train=304).images.double()
    train, held = data[:300], data[300:]
    g = torch.Generator().manual_seed(7)
    x = held + SIGMAS[-1] * torch.randn(held.shape, generator=g, dtype=torch.float64)
    pruned = ScoreMachine(train, kind="els", chunk_elements=2**16, prune_rank=16).bind(patch_sizes=[3] * 20)
    dense = ScoreMachine(train, kind="els", chunk_elements=2**16, prune_rank=0).bind(patch_sizes=[3] * 20)
    (a, pa), (b, pb) = pruned.with_provenance(x, SIGMAS[-1], top=8), dense.with_provenance(x, SIGMAS[-1], top=8)
    skipped, pairs, _ = pruned.machine.prune_stats
    assert skipped > 0.2 * pairs
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    torch.testing.assert_close(pa.weight, pb.weight, rtol=1e-9, atol=1e-15)
    w = pb.weight
    gap = (w[..., :-1] - w[..., 1:]).abs() > 1e-9 * w[..., :1]  # [B, H, W, 7]: slot j and j + 1 not tied
    untied = torch.cat([gap[..., :1], gap[..., 1:] & gap[..., :-1]], dim=-1)  # [B, H, W, 7]: slots 0-6
    assert untied.float().mean() > 0.5
    assert torch.equal(pa.index[..., :7][untied], pb.index[..., :7][untied])
    assert torch.equal(pa.count[..., :7][untied], pb.count[..., :7][untied])


@pytest.mark.parametrize("track", [None, 0])
def test_float32_prunes_below_its_own_floor_not_the_exponent_floor(track, always_prune):
    # logit = -|X|^2 for query 0: candidates 42..72 nats below the best lie above the exponent floor
    # (-80) but below the pruning floor (-40), so they are skipped, and the mean stays within
    # M e^-40 of the float64 softmax; a pruning floor at -80 would skip none of them
    assert engine.PRUNE_FLOOR[torch.float32] == -40.0
    keys = torch.linspace(0.0, 8.5, 64)  # |X|^2 up to 72.25
    queries = augment_queries(torch.zeros(1, 4, 1), torch.full((4,), 2.0), torch.full((4,), -1.0))
    state = SoftmaxMean(queries, 1, track=track, prune=1)
    for chunk in (keys[:1], keys[1:]):  # the first key gives every row a reference
        state.update(augment_keys(chunk.view(1, 1, -1)), augment_values(chunk.view(1, -1, 1)))
    assert state.skipped > 0
    skippable = int((keys.square() > 42.0).sum())
    assert state.skipped <= 4 * skippable
    w = torch.softmax(-keys.double().square(), 0)
    torch.testing.assert_close(state.mean()[0, :, 0].double(), (w * keys.double()).sum().expand(4), rtol=1e-6, atol=0)


def test_prune_stats_of_denoise_sizes_count_every_size():
    # the call's statistics: every single-size call summed, and the nested stream's pairs added
    train, _, g = _data(N=6, H=11, W=11)
    machine = ScoreMachine(train, kind="els", chunk_elements=256)
    x = train[[0, 3]] + 0.3 * torch.randn(2, 1, 11, 11, generator=g, dtype=torch.float64)
    singles = []
    for k in (3, 5):
        machine(x, 0.3, patch_size=k)
        singles.append(machine.prune_stats)
    machine.denoise_sizes(x, 0.3, [3, 5])
    assert machine.prune_stats == tuple(a + b for a, b in zip(*singles))
    machine.denoise_sizes(x, 0.3, [3, 7, 9])  # 7 and 9 in one nested stream
    assert machine.prune_stats[1] > singles[0][1]


def test_boxes_that_cannot_prove_switch_off_before_mapping_the_keys(monkeypatch):
    # MNIST at sigma 0.72, k = 7: most pairs lie below the floor, but a tile's box proves too little;
    # the tile-by-key test on the pair test's sample switches the bound off before the chunk's keys
    # are mapped to coordinates, and the result is the dense one
    data = load_dataset("mnist", n_train=402).images
    train, held = data[:400], data[400:]
    sigma = 0.72
    ab = 1.0 / (1.0 + sigma**2)
    x = (held + sigma * torch.randn(held.shape, generator=torch.Generator().manual_seed(0))) * ab**0.5
    mapped = []
    coords = SoftmaxMean._coords

    def spy(self, z):
        mapped.append(z.shape[-2])
        return coords(self, z)

    monkeypatch.setattr(SoftmaxMean, "_coords", spy)
    machine = ScoreMachine(train, kind="els", padding="zeros", kernel="torch")  # the engine's bound
    got = machine.denoise(x, ab, patch_size=7)
    assert machine.prune_stats[2] == 0  # nothing bounded
    assert mapped and max(mapped) <= max(engine.PRUNE_SAMPLE, 2 * 32 * 32)  # the sample and the rows only
    want = ScoreMachine(train, kind="els", padding="zeros", prune_rank=0, kernel="torch").denoise(x, ab, patch_size=7)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # other chunks: float32 rounding
