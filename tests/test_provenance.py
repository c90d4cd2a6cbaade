"""Provenance from the engine: top candidates, N_eff and entropy against float64 brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patchmosaic import ScoreMachine
from patchmosaic.engine import SoftmaxMean, augment_keys, augment_queries, augment_values
from fuzz import cases, picker
from reference import ref_provenance

CASES = [
    ("ideal", "zeros", None, True),
    ("es", "circular", None, True),
    ("ls", "zeros", 3, True),
    ("ls", "circular", 3, True),
    ("els", "zeros", 3, True),
    ("els", "zeros", 5, True),
    ("els", "circular", 3, True),
    ("els", "circular", 3, False),
]


def _background_data(N=5, C=1, H=7, W=6, seed=3):
    """A constant -1 background with random blobs, one constant image: many constant patches."""
    g = torch.Generator().manual_seed(seed)
    train = torch.full((N, C, H, W), -1.0, dtype=torch.float64)
    train[:, :, 2:5, 1:4] = torch.rand(N, C, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    train[0] = 0.25
    labels = torch.tensor([0, 1, 0, 1, 1][:N])
    x = torch.randn(2, C, H, W, generator=g, dtype=torch.float64)
    return train, labels, x


def _entry_id(prov, b, y, x, e, kind, H, W):
    """The candidate id of entry e at pixel (y, x), in the reference's encoding."""
    i = int(prov.index[b, y, x, e])
    qy, qx = (int(v) for v in prov.source[b, y, x, e])
    if kind == "ideal":
        assert (qy, qx) == (y, x)
        return i
    if kind == "es":
        return (i * H + (y - qy) % H) * W + (x - qx) % W
    return (i * H + qy) * W + qx


def _check_against_reference(prov, x0_plain, x0, train, x, ab, kind, padding, k, wrap, top, nearest=False):
    B, C, H, W = x.shape
    if x0 is not None:
        torch.testing.assert_close(x0, x0_plain, rtol=1e-10, atol=1e-12)
    for b in range(B):
        ref = ref_provenance(x[b].numpy(), train.numpy(), ab[b], kind, padding, k, wrap, nearest=nearest)
        for (y, xx), (entries, by_id, n_eff, entropy) in ref.items():
            np.testing.assert_allclose(float(prov.n_eff[b, y, xx]), n_eff, rtol=1e-9)
            np.testing.assert_allclose(float(prov.entropy[b, y, xx]), entropy, rtol=1e-9, atol=1e-12)
            for e in range(top):
                if e >= len(entries) or entries[e][0] < 1e-25:  # empty slot or far below the floor
                    if e >= len(entries):
                        assert int(prov.index[b, y, xx, e]) == -1 and float(prov.weight[b, y, xx, e]) == 0.0
                    continue
                # Equal weights (e.g. identical zero-padded corner patches) may come in any order:
                # the entry must be the candidate's own group, with the group's weight and count.
                np.testing.assert_allclose(float(prov.weight[b, y, xx, e]), entries[e][0], rtol=1e-9, atol=1e-300)
                cid = _entry_id(prov, b, y, xx, e, kind, H, W)
                w, rep, count = by_id[cid]
                assert cid == rep, (b, y, xx, e)
                np.testing.assert_allclose(float(prov.weight[b, y, xx, e]), w, rtol=1e-9, atol=1e-300)
                assert int(prov.count[b, y, xx, e]) == count
            got = [_entry_id(prov, b, y, xx, e, kind, H, W) for e in range(top) if int(prov.index[b, y, xx, e]) >= 0]
            assert len(set(got)) == len(got), "an entry is listed twice"


@pytest.mark.parametrize("kind,padding,k,wrap", CASES)
@pytest.mark.parametrize("chunk_elements", [1, 1 << 22])
def test_provenance_matches_float64_brute_force(kind, padding, k, wrap, chunk_elements):
    train, _, x = _background_data()
    if kind == "es":  # every shift of the constant image ties: keep the reference's order well defined
        train = train[1:]
    m = ScoreMachine(train, kind=kind, padding=padding, wrap_training_patches=wrap, chunk_elements=chunk_elements)
    ab = torch.tensor([0.4, 0.9], dtype=torch.float64)
    x0, prov = m.denoise_provenance(x, ab, patch_size=k, top=4)
    assert prov.index.shape == (2, 7, 6, 4) and prov.source.shape == (2, 7, 6, 4, 2)
    _check_against_reference(prov, m.denoise(x, ab, patch_size=k), x0, train, x, ab.tolist(), kind, padding, k, wrap, 4)


@pytest.mark.parametrize("kind,padding,k", [("els", "zeros", 3), ("ideal", "zeros", None)])
def test_provenance_with_labels_uses_training_set_indices(kind, padding, k):
    train, labels, x = _background_data()
    m = ScoreMachine(train, kind=kind, padding=padding, labels=labels)
    lab = torch.tensor([1, 0])
    x0, prov = m.denoise_provenance(x, 0.6, patch_size=k, label=lab, top=3)
    torch.testing.assert_close(x0, m.denoise(x, 0.6, patch_size=k, label=lab))
    for b in range(2):
        members = set(torch.nonzero(labels == lab[b]).flatten().tolist())
        used = set(prov.index[b].flatten().tolist()) - {-1}
        assert used and used <= members
        sub = ScoreMachine(train[labels == lab[b]], kind=kind, padding=padding)
        _, want = sub.denoise_provenance(x[b : b + 1], 0.6, patch_size=k, top=3)
        torch.testing.assert_close(prov.weight[b], want.weight[0])
        torch.testing.assert_close(prov.n_eff[b], want.n_eff[0])
        remap = torch.nonzero(labels == lab[b]).flatten()
        got_local = prov.index[b]
        want_global = torch.where(want.index[0] >= 0, remap[want.index[0].clamp(min=0)], -1)
        assert torch.equal(got_local, want_global)


def test_stats_only_and_float32():
    train, _, x = _background_data()
    m64 = ScoreMachine(train, kind="els", padding="zeros")
    m32 = ScoreMachine(train.float(), kind="els", padding="zeros")
    _, p64 = m64.denoise_provenance(x, 0.7, patch_size=3, top=0)
    x0, p32 = m32.denoise_provenance(x.float(), 0.7, patch_size=3, top=2)
    assert p64.top == 0 and p64.index.shape == (2, 7, 6, 0)
    torch.testing.assert_close(p32.n_eff.double(), p64.n_eff, rtol=1e-4, atol=0)
    torch.testing.assert_close(p32.entropy.double(), p64.entropy, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(x0).all()


@pytest.mark.parametrize("alpha_bar", [1e-6, 0.999999])
def test_float32_statistics_finite_at_extreme_noise(alpha_bar):
    train, _, x = _background_data()
    m = ScoreMachine(train.float(), kind="els", padding="circular", chunk_elements=7)
    _, prov = m.denoise_provenance(x.float(), alpha_bar, patch_size=3, top=3)
    for t in (prov.n_eff, prov.entropy, prov.weight):
        assert torch.isfinite(t).all()
    assert (prov.n_eff >= 1 - 1e-4).all() and (prov.entropy >= -1e-4).all()
    assert (prov.weight.sum(-1) <= 1 + 1e-4).all(), float(prov.weight.sum(-1).max())


@pytest.mark.parametrize("kind,padding,k,wrap", [c for c in CASES if c[0] in ("ls", "els")])
def test_nearest_patches_match_brute_force(kind, padding, k, wrap):
    train, _, x = _background_data()
    m = ScoreMachine(train, kind=kind, padding=padding, wrap_training_patches=wrap, chunk_elements=5)
    prov = m.nearest_patches(x, patch_size=k, top=2)
    _check_against_reference(prov, None, None, train, x, [0.5, 0.5], kind, padding, k, wrap, 2, nearest=True)


def test_bad_top_is_refused():
    train, _, x = _background_data()
    m = ScoreMachine(train, kind="els", padding="zeros")
    with pytest.raises(ValueError, match="top must be a non-negative integer"):
        m.denoise_provenance(x, 0.5, patch_size=3, top=-1)
    with pytest.raises(ValueError, match="top must be at least 1"):
        m.nearest_patches(x, patch_size=3, top=0)


def test_engine_counts_and_absent_candidates():
    """Multiplicities count in N_eff and entropy; count-0 candidates are absent."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 6, 3, generator=g, dtype=torch.float64)  # [G, M, D]
    x = torch.randn(1, 2, 3, generator=g, dtype=torch.float64)  # [G, Bq, D]
    counts = torch.tensor([[3.0, 1.0, 0.0, 2.0, 1.0, 0.0]], dtype=torch.float64)
    scale, bias = torch.full((2,), 0.7, dtype=torch.float64), torch.full((2,), -0.35, dtype=torch.float64)
    state = SoftmaxMean(augment_queries(x, scale, bias), 3, track=2)
    values = augment_values(keys) * counts[..., None]
    ids = torch.arange(6)[None]
    state.update(augment_keys(keys.transpose(1, 2)), values, ids=ids, counts=counts)
    logits = 0.7 * torch.einsum("gbd,gmd->gbm", x, keys) - 0.35 * keys.square().sum(-1)[:, None]  # [1, 2, 6]
    w_one = torch.exp(logits) * (counts[:, None] > 0)
    Z = (w_one * counts[:, None]).sum(-1, keepdim=True)
    w = w_one / Z  # weight of one position
    n_eff, entropy = state.posterior_stats()
    torch.testing.assert_close(n_eff, 1 / (counts[:, None] * w * w).sum(-1))
    ent = -(counts[:, None] * torch.where(w > 0, w * w.clamp_min(1e-300).log(), 0)).sum(-1)
    torch.testing.assert_close(entropy, ent)
    weight, top_id, top_count = state.top_candidates()
    group = w * counts[:, None]
    best = group.topk(2, dim=-1)
    torch.testing.assert_close(weight, best.values)
    assert torch.equal(top_id, best.indices) and torch.equal(top_count, counts[0][best.indices])
    with pytest.raises(ValueError, match="needs ids"):
        state.update(augment_keys(keys.transpose(1, 2)), values)


@pytest.mark.parametrize("case", cases(10))
def test_random_provenance_matches_float64_brute_force(monkeypatch, case):
    """Random LS/ELS provenance (top candidates with constant-patch groups, N_eff, entropy) against the
    brute force: paddings, wrapping, patch sizes, per-sample noise, background data with blobs,
    chunk sizes, pruning and tiny logit blocks."""
    _, pick = picker(2000 + case)
    kind, padding = pick([("ls", "zeros"), ("ls", "circular"), ("els", "zeros"), ("els", "circular")])
    wrap = pick([True, False]) if (kind, padding) == ("els", "circular") else True
    k = pick([1, 3, 5])
    train, _, x = _background_data(N=pick([2, 4]), C=pick([1, 2]), seed=case)
    monkeypatch.setattr("patchmosaic.engine.CPU_BLOCK_BYTES", pick([64, 1 << 20]))
    m = ScoreMachine(train, kind=kind, padding=padding, wrap_training_patches=wrap,
                     chunk_elements=pick([1, 300, 1 << 22]), prune_rank=pick([0, 16]))
    ab = torch.tensor([pick([0.05, 0.4]), pick([0.9, 0.99])], dtype=torch.float64)
    top = pick([1, 3])
    x0, prov = m.denoise_provenance(x, ab, patch_size=k, top=top)
    _check_against_reference(prov, m.denoise(x, ab, patch_size=k), x0, train, x, ab.tolist(), kind, padding, k, wrap,
                             top)
