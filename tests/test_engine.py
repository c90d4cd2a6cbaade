"""The streaming softmax engine against a direct softmax."""

from __future__ import annotations

import itertools

import pytest
import torch

from fuzz import cases, picker
from patchmosaic.engine import SoftmaxMean, augment_keys, augment_queries, augment_values


def _direct(x, keys, values, ab):
    """Softmax over -|x - a key|^2 / (2 s2), weighted mean of values; [G, Bq, V]."""
    d2 = ((x[:, :, None, :] - ab**0.5 * keys[:, None, :, :]) ** 2).sum(-1)  # [G, Bq, M]
    w = torch.softmax(-d2 / (2 * (1 - ab)), dim=-1)
    return w @ values


def _stream(x, keys, values, ab, chunk, order=None):
    G, Bq, _ = x.shape
    coef = torch.tensor(ab, dtype=x.dtype)
    scale, bias = coef.sqrt() / (1 - coef), -coef / (2 * (1 - coef))
    state = SoftmaxMean(augment_queries(x, scale.expand(Bq), bias.expand(Bq)), values.shape[-1])
    M = keys.shape[1]
    idx = torch.arange(M) if order is None else order
    for s in range(0, M, chunk):
        sel = idx[s : s + chunk]
        state.update(augment_keys(keys[:, sel].transpose(1, 2)), augment_values(values[:, sel]))
    return state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [1, 3, 50])
def test_streaming_equals_direct_softmax(dtype, chunk):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    keys = torch.randn(2, 50, 4, generator=g, dtype=torch.float64)
    values = torch.randn(2, 50, 3, generator=g, dtype=torch.float64)
    for ab in (0.01, 0.5, 0.99):
        want = _direct(x, keys, values, ab)
        got = _stream(x.to(dtype), keys.to(dtype), values.to(dtype), ab, chunk).mean()
        tol = 1e-12 if dtype == torch.float64 else 2e-4
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,jump", [(torch.float32, 1000.0), (torch.float64, 5000.0)])
def test_a_much_better_later_chunk_is_redone_exactly(dtype, jump):
    # keys far from the query first, then one that matches it: the logit jumps
    # by far more than EXP_CAP above the running reference.
    x = torch.zeros(1, 1, 2, dtype=torch.float64)
    keys = torch.tensor([[[30.0, 0.0], [0.0, 30.0], [0.0, 0.0], [0.1, 0.0]]], dtype=torch.float64)
    values = torch.tensor([[[1.0], [2.0], [3.0], [4.0]]], dtype=torch.float64)
    ab = 1 - 1 / jump
    want = _direct(x, keys, values, ab)
    got = _stream(x.to(dtype), keys.to(dtype), values.to(dtype), ab, chunk=1).mean()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("track", [None, 2])
def test_an_absent_candidate_far_above_the_present_ones_weighs_nothing(dtype, track):
    """A candidate of count 0 whose logit lies thousands of nats above every present one: e^(+large)
    times its count 0 must not turn the row into NaN (found by benchmarks/gpu_check_fused.py)."""
    x = torch.zeros(1, 1, 2, dtype=torch.float64)
    keys = torch.tensor([[[0.0, 0.0], [30.0, 0.0], [0.0, 30.0], [30.0, 1.0]]], dtype=torch.float64)
    values = torch.tensor([[[1.0], [2.0], [3.0], [4.0]]], dtype=torch.float64)
    counts = torch.tensor([[0.0, 1.0, 2.0, 1.0]], dtype=torch.float64)  # the best match is absent
    ab = 1 - 1 / 5000
    coef = torch.tensor(ab, dtype=torch.float64)
    scale, bias = coef.sqrt() / (1 - coef), -coef / (2 * (1 - coef))
    logits = -((x[:, :, None] - coef.sqrt() * keys[:, None]) ** 2).sum(-1) / (2 * (1 - coef)) + counts.log()[:, None]
    want = torch.softmax(logits, -1) @ values  # [1, 1, 1], over the present candidates
    state = SoftmaxMean(augment_queries(x.to(dtype), scale.expand(1).to(dtype), bias.expand(1).to(dtype)), 1,
                        track=track)
    vals = augment_values(values) * counts[..., None]
    state.update(augment_keys(keys.transpose(1, 2)).to(dtype), vals.to(dtype), counts=counts.to(dtype),
                 ids=torch.arange(4)[None] if track else None)
    assert torch.isfinite(state.mean()).all() and torch.isfinite(state.ref).all()
    torch.testing.assert_close(state.mean().double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_tracked_state_moves_its_reference_up_for_much_better_later_chunks(dtype, chunk):
    # Row 0 meets its match last (its logits jump by ~500 nats, far above the cap, several times),
    # row 1 first (no jump): the mean, N_eff, entropy and top candidates equal the direct softmax's.
    x = torch.tensor([[[0.0, 0.0], [9.0, 9.0]]], dtype=torch.float64)
    keys = torch.tensor([[[9.0, 9.0], [6.0, 0.0], [3.0, 0.0], [1.0, 0.0], [0.3, 0.0], [0.0, 0.1], [0.0, 0.0]]],
                        dtype=torch.float64)
    values = torch.arange(7, dtype=torch.float64).reshape(1, 7, 1)
    ab = 0.99
    coef = torch.tensor(ab, dtype=dtype)
    scale, bias = coef.sqrt() / (1 - coef), -coef / (2 * (1 - coef))
    state = SoftmaxMean(augment_queries(x.to(dtype), scale.expand(2), bias.expand(2)), 1, track=3)
    for s in range(0, 7, chunk):
        state.update(augment_keys(keys[:, s : s + chunk].transpose(1, 2).to(dtype)),
                     augment_values(values[:, s : s + chunk].to(dtype)), ids=torch.arange(s, min(7, s + chunk))[None])
    d2 = ((x[:, :, None, :] - ab**0.5 * keys[:, None, :, :]) ** 2).sum(-1)
    w = torch.softmax(-d2 / (2 * (1 - ab)), dim=-1)  # [1, 2, 7]
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.mean().double(), w @ values, **tol)
    n_eff, entropy = state.posterior_stats()
    torch.testing.assert_close(n_eff.double(), 1 / (w * w).sum(-1), **tol)
    torch.testing.assert_close(entropy.double(), -(w * w.clamp_min(1e-300).log()).sum(-1), **tol)
    weight, ids, _ = state.top_candidates()
    want_w, want_ids = w.topk(3, dim=-1)
    held = want_w > 1e-12  # row 1's runners-up lie below the exponent floor: their order is not kept
    assert held.sum() == 4 and ids[held].tolist() == want_ids[held].tolist()
    torch.testing.assert_close(weight.double(), want_w, **tol)


def _spy_blockwise(monkeypatch):
    """Count the calls of SoftmaxMean._blockwise (block-by-block updates, each rebased)."""
    calls = []
    original = SoftmaxMean._blockwise

    def spy(self, *args, **kwargs):
        calls.append(args[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SoftmaxMean, "_blockwise", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("track", [None, 0])
@pytest.mark.parametrize("V", [1, 12])  # thin values (weighted sum as values^T @ weights^T) and wide
def test_swept_blocks_equal_direct_softmax(monkeypatch, dtype, track, V):
    # Blocks of 2 keys: after the first chunk every row block sweeps 25 blocks on one shift
    # and is rebased once; mean, N_eff and entropy equal the direct softmax's.
    calls = _spy_blockwise(monkeypatch)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    keys = torch.randn(2, 150, 4, generator=g, dtype=torch.float64)
    values = torch.randn(2, 150, V, generator=g, dtype=torch.float64)
    for ab in (0.05, 0.6, 0.95):
        coef = torch.tensor(ab, dtype=dtype)
        scale, bias = coef.sqrt() / (1 - coef), -coef / (2 * (1 - coef))
        state = SoftmaxMean(augment_queries(x.to(dtype), scale.expand(5), bias.expand(5)), V, max_logits=20,
                            track=track)
        calls.clear()
        for s in range(0, 150, 50):
            state.update(augment_keys(keys[:, s : s + 50].transpose(1, 2).to(dtype)),
                         augment_values(values[:, s : s + 50].to(dtype)))
        assert len(calls) == 1  # the first chunk only (no reference yet): the other two were swept
        d2 = ((x[:, :, None, :] - ab**0.5 * keys[:, None, :, :]) ** 2).sum(-1)
        w = torch.softmax(-d2 / (2 * (1 - ab)), dim=-1)  # [2, 5, 150]
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
        torch.testing.assert_close(state.mean().double(), w @ values, **tol)
        if track is not None:
            n_eff, entropy = state.posterior_stats()
            torch.testing.assert_close(n_eff.double(), 1 / (w * w).sum(-1), **tol)
            torch.testing.assert_close(entropy.double(), -(w * w.log()).sum(-1), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("track", [None, 0])
def test_a_sweep_with_a_capped_logit_is_redone_block_by_block(monkeypatch, dtype, track):
    # The second chunk's last block holds the query's match, ~1000 nats above the reference
    # the sweep shifts by: the sweep's normaliser reaches e^cap, so it is redone exactly.
    calls = _spy_blockwise(monkeypatch)
    x = torch.zeros(1, 3, 2, dtype=torch.float64)
    far = torch.tensor([[30.0, 0.0], [0.0, 30.0], [30.0, 30.0], [-30.0, 0.0]], dtype=torch.float64)
    keys = torch.cat([far, far, torch.tensor([[0.0, 0.0], [0.1, 0.0]], dtype=torch.float64)])[None]  # [1, 10, 2]
    values = torch.arange(10, dtype=torch.float64).reshape(1, 10, 1)
    ab = 1 - 1 / 1000
    coef = torch.tensor(ab, dtype=dtype)
    scale, bias = coef.sqrt() / (1 - coef), -coef / (2 * (1 - coef))
    state = SoftmaxMean(augment_queries(x.to(dtype), scale.expand(3), bias.expand(3)), 1, max_logits=6, track=track)
    for s, e in ((0, 4), (4, 10)):  # blocks of 2 keys: the second chunk is swept in 3 blocks
        state.update(augment_keys(keys[:, s:e].transpose(1, 2).to(dtype)), augment_values(values[:, s:e].to(dtype)))
    assert len(calls) == 2  # the first chunk, then the second chunk's redo
    d2 = ((x[:, :, None, :] - ab**0.5 * keys[:, None, :, :]) ** 2).sum(-1)
    w = torch.softmax(-d2 / (2 * (1 - ab)), dim=-1)
    assert torch.isfinite(state.mean()).all()
    torch.testing.assert_close(state.mean().double(), w @ values, rtol=1e-5, atol=1e-5)
    if track is not None:
        n_eff, _ = state.posterior_stats()
        torch.testing.assert_close(n_eff.double(), 1 / (w * w).sum(-1), rtol=1e-5, atol=1e-5)


def test_merging_rows_empty_on_both_sides_keeps_them_empty():
    """A row no shard has a candidate for stays (ref = -inf, acc = 0) through merge(), instead of
    exp(-inf - -inf) = NaN; rows with candidates merge as usual."""
    state = SoftmaxMean(augment_queries(torch.zeros(1, 2, 0), torch.ones(2), torch.ones(2)), 1)
    inf = float("inf")
    state.merge(torch.tensor([[-inf, 0.5]]), torch.tensor([[[0.0, 0.0], [2.0, 1.0]]]))
    state.merge(torch.tensor([[-inf, 0.5]]), torch.tensor([[[0.0, 0.0], [4.0, 1.0]]]))
    assert torch.isneginf(state.ref[0, 0]) and torch.equal(state.acc[0, 0], torch.zeros(2))
    torch.testing.assert_close(state.mean()[0, 1], torch.tensor([3.0]))


def test_partial_states_of_disjoint_shards_merge_exactly():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 4, generator=g, dtype=torch.float64)
    keys = torch.randn(1, 40, 4, generator=g, dtype=torch.float64)
    values = torch.randn(1, 40, 2, generator=g, dtype=torch.float64)
    a = _stream(x, keys[:, :25], values[:, :25], 0.7, chunk=7)
    b = _stream(x, keys[:, 25:], values[:, 25:], 0.7, chunk=7)
    a.merge(b.ref, b.acc)
    torch.testing.assert_close(a.mean(), _direct(x, keys, values, 0.7), rtol=1e-12, atol=1e-12)


def test_half_precision_is_refused():
    with pytest.raises(ValueError, match="float32 or float64"):
        SoftmaxMean(torch.zeros(1, 1, 3, dtype=torch.bfloat16), 1)


def test_bf16_logits_pick_the_wrong_patch_at_low_noise():
    # Why half precision is refused: two candidates 0.01 apart in squared
    # distance; at abar = 0.9999 the logit gap is ~50, but bf16 rounding of
    # <x, key> (~8 bits of mantissa) erases it.
    ab = 0.9999
    scale = ab**0.5 / (1 - ab)
    x = torch.full((64,), 0.5, dtype=torch.float64)
    keys = torch.stack([torch.full((64,), 0.5), torch.full((64,), 0.5)]).double() / ab**0.5
    keys[1, 0] += 0.1  # |d|^2 larger by 0.01
    exact = scale * keys @ x - ab / (2 * (1 - ab)) * (keys**2).sum(1)
    rounded = (scale * keys.bfloat16() @ x.bfloat16()).double() - ab / (2 * (1 - ab)) * (
        keys.bfloat16().double() ** 2).sum(1)
    assert exact[0] - exact[1] > 40  # candidate 0 wins decisively
    assert abs((rounded[0] - rounded[1]) - (exact[0] - exact[1])) > 10  # bf16 gets the gap wrong


def test_engine_pins_full_precision_float32_matmuls():
    from patchmosaic import ScoreMachine

    train = torch.rand(6, 1, 8, 8) * 2 - 1
    x = 0.999**0.5 * train[:2] + 0.001**0.5 * torch.randn(2, 1, 8, 8)
    m = ScoreMachine(train, kind="els")
    want = m.denoise(x, 0.999, patch_size=3)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        got = m.denoise(x, 0.999, patch_size=3)
        assert torch.get_float32_matmul_precision() == "medium"  # the caller's setting is restored
    finally:
        torch.set_float32_matmul_precision(previous)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("case", cases())
def test_random_streams_equal_the_float64_softmax_and_stay_finite(monkeypatch, case):
    """Random states against the definition: groups, rows, keys, multiplicities with absent candidates,
    noise levels up to abar = 0.9999 with keys scaled up to 30x (logit jumps of thousands of nats),
    statistics and top candidates, pruning, tiny logit blocks, ragged chunks and two merged shards.
    float64 must equal the direct softmax; float32 must at least stay finite (the NaN cases of
    e^(+large) * 0 and exp(-inf - -inf) that a GPU check's reference found fail here)."""
    g, pick = picker(case)
    G, Bq, M, D, V = pick([1, 2]), pick([1, 3, 9]), pick([1, 7, 60, 700]), pick([1, 3, 6]), pick([1, 3])
    ab, spread = pick([0.01, 0.5, 0.99, 0.9999]), pick([1.0, 30.0])
    track = pick([None, 0, 2])
    with_counts = M > 1 and pick([False, True])
    prune = pick([0, 4]) if not with_counts and track is None else 0
    monkeypatch.setattr("patchmosaic.engine.CPU_BLOCK_BYTES", pick([64, 4096, 1 << 20]))
    keys = torch.rand(G, M, D, generator=g, dtype=torch.float64) * 2 - 1
    keys[:, : M // 2] *= spread  # far keys: their logits lie thousands of nats away at low noise
    x = ab**0.5 * keys[:, torch.randint(M, (Bq,), generator=g)] + (1 - ab) ** 0.5 * torch.randn(G, Bq, D, generator=g,
                                                                                                  dtype=torch.float64)
    values = torch.randn(G, M, V, generator=g, dtype=torch.float64)
    counts = torch.randint(0, 3, (G, M), generator=g).double() if with_counts else None
    if counts is not None:
        counts[:, -1] = 1.0  # every row has a present candidate
    logits = -((x[:, :, None] - ab**0.5 * keys[:, None]) ** 2).sum(-1) / (2 * (1 - ab))  # [G, Bq, M]
    if counts is not None:
        logits = logits + counts.log()[:, None]
    want = torch.softmax(logits, -1) @ values  # [G, Bq, V]
    cuts = sorted({0, M, *torch.randint(1, M + 1, (pick([0, 2, 5]),), generator=g).tolist()})
    for dtype in (torch.float64, torch.float32):
        coef = torch.tensor(ab, dtype=torch.float64)
        scale, bias = coef.sqrt() / (1 - coef), -coef / (2 * (1 - coef))
        state = SoftmaxMean(augment_queries(x, scale.expand(Bq), bias.expand(Bq)).to(dtype), V,
                            max_logits=pick([8, 50, 1 << 22]), track=track, prune=prune)
        for lo, hi in itertools.pairwise(cuts):
            vals = augment_values(values[:, lo:hi])
            if counts is not None:
                vals = vals * counts[:, lo:hi, None]
            state.update(augment_keys(keys[:, lo:hi].transpose(1, 2)).to(dtype), vals.to(dtype),
                         ids=torch.arange(lo, hi).expand(G, -1) if track else None,
                         counts=None if counts is None else counts[:, lo:hi].to(dtype))
        got = state.mean()
        assert torch.isfinite(got).all() and torch.isfinite(state.ref).all(), (dtype, got)
        if dtype == torch.float64:
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)
        if track is None:  # the same keys as two shards (the first may hold only absent candidates), merged
            shards = []
            for part in (slice(0, M // 2), slice(M // 2, M)):
                shard = SoftmaxMean(augment_queries(x, scale.expand(Bq), bias.expand(Bq)).to(dtype), V)
                vals = augment_values(values[:, part])
                if counts is not None:
                    vals = vals * counts[:, part, None]
                shard.update(augment_keys(keys[:, part].transpose(1, 2)).to(dtype), vals.to(dtype),
                             counts=None if counts is None else counts[:, part].to(dtype))
                shards.append(shard)
            total = SoftmaxMean(augment_queries(x[..., :0], scale.expand(Bq), bias.expand(Bq)).to(dtype), V)
            for shard in shards:  # from an empty state, as the fused path merges its partial states
                total.merge(shard.ref, shard.acc)
            merged = total.mean()
            assert torch.isfinite(merged).all(), (dtype, merged)
            if dtype == torch.float64:
                torch.testing.assert_close(merged, want, rtol=1e-8, atol=1e-8)
