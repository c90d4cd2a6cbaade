"""The fused softmax-mean kernel against a float64 brute force and the engine's SoftmaxMean.

The Triton kernel runs under ``TRITON_INTERPRET=1`` (Triton's CPU interpreter;
``conftest.py`` sets the variable before anything imports triton), on tiny inputs and
16-wide tiles so that several tiles and ragged edges are exercised in well
under a second per case. Without the ``triton`` package those tests skip; the
torch path (used when Triton is absent) is tested either way. The interpreter
computes ``tl.dot`` in numpy float32 whatever ``input_precision`` says, so
keeping TF32 out is checked on a GPU only (``benchmarks/gpu_check_fused.py``).
"""

from __future__ import annotations

import pytest
import torch

from fuzz import cases, picker
from patchmosaic import ScoreMachine
from patchmosaic.engine import (
    SoftmaxMean,
    augment_keys,
    augment_queries,
    augment_values,
    logit_coefficients,
)
from patchmosaic.kernels import TRITON_AVAILABLE, fused_softmax_mean
from patchmosaic.kernels.fused_softmax import TRITON_INTERPRETED, triton_usable

TILES = {"block_q": 16, "block_m": 16, "block_d": 16, "splits": 3}  # 3 key ranges, merged afterwards
needs_triton = pytest.mark.skipif(
    not TRITON_AVAILABLE, reason="triton is not installed (optional extra: pip install 'patchmosaic[gpu]')"
)


@pytest.fixture
def interpret():
    """Triton kernels run in its CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""
    if TRITON_AVAILABLE and not TRITON_INTERPRETED:
        pytest.fail("triton was imported without TRITON_INTERPRET=1 (tests/conftest.py sets it before any import)")


def make_inputs(G, Bq, M, D, V, *, abar=(0.3, 0.8), counts=False, seed=0):
    """Random float32 inputs; per-row alpha_bar drawn in ``abar``; noisy queries near some keys."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.rand(G, M, D, generator=g) * 2 - 1  # [G, M, D]
    values = torch.rand(G, M, V, generator=g) * 2 - 1  # [G, M, V]
    ab = torch.empty(Bq).uniform_(*abar, generator=g)  # [Bq]
    near = keys[:, torch.randint(0, max(M, 1), (Bq,), generator=g)] if M else torch.zeros(G, Bq, D)
    queries = ab.sqrt()[None, :, None] * near + (1 - ab).sqrt()[None, :, None] * torch.randn(G, Bq, D, generator=g)
    scale, bias = logit_coefficients(ab)
    c = torch.randint(0, 4, (G, M), generator=g).float() if counts else None
    return queries, scale, bias, keys, keys.square().sum(-1), values, c


def brute_force(queries, scale, bias, keys, norms, values, counts=None):
    """float64 ``(ref, acc)`` from the definition: log-sum-exp and softmax-weighted mean."""
    q, k, v, n, s, b = (t.double() for t in (queries, keys, values, norms, scale, bias))
    logits = s[None, :, None] * torch.einsum("gbd,gmd->gbm", q, k) + b[None, :, None] * n[:, None, :]
    if counts is not None:
        logits = logits + counts.double().log()[:, None, :]  # log 0 = -inf: absent
    ref = torch.logsumexp(logits, -1)  # [G, Bq]
    w = torch.exp(logits - ref[..., None])  # [G, Bq, M]
    acc = torch.cat([w @ v, w.sum(-1, keepdim=True)], dim=-1)  # [G, Bq, V + 1]
    return ref, acc


def logit_error_bound(queries, scale, bias, keys, norms):
    """Per-row bound on the float32 logit error: ``<x, k>`` (gamma_D) plus 3 roundings of the terms."""
    u = 2.0**-24
    D = queries.shape[-1]
    q, k, s, b, n = (t.double().abs() for t in (queries, keys, scale, bias, norms))
    gamma = D * u / (1 - D * u)
    absdot = torch.einsum("gbd,gmd->gbm", q, k)  # sum |x||k|
    per = s[None, :, None] * absdot * (gamma + 3 * u) + 3 * u * b[None, :, None] * n[:, None, :]
    return per.amax(-1)  # [G, Bq]


def check(got, want, rtol, atol):
    ref, acc = got
    torch.testing.assert_close(ref.double(), want[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(acc.double(), want[1], rtol=rtol, atol=atol)


SHAPES = [  # (G, Bq, M, D, V)
    (1, 5, 7, 3, 1),  # everything smaller than one tile
    (1, 16, 32, 16, 1),  # exact multiples of the tiles
    (2, 37, 75, 21, 3),  # ragged query, key and feature tiles, RGB values
    (3, 17, 33, 49, 1),  # k = 7 patches, three groups
    (1, 9, 20, 5, 70),  # two value tiles
    (1, 20, 40, 9, 4),  # RGBA-sized values through tl.dot
    (1, 20, 40, 9, 5),  # five values through tl.dot
]


@pytest.mark.parametrize("counts", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_path_matches_brute_force(shape, counts):
    inputs = make_inputs(*shape, counts=counts)
    check(fused_softmax_mean(*inputs[:6], counts=inputs[6], backend="torch"), brute_force(*inputs), 1e-5, 1e-5)


@needs_triton
@pytest.mark.parametrize("counts", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_brute_force_and_engine(interpret, shape, counts):
    inputs = make_inputs(*shape, counts=counts)
    got = fused_softmax_mean(*inputs[:6], counts=inputs[6], backend="triton", **TILES)
    check(got, brute_force(*inputs), 1e-5, 1e-5)
    check(got, tuple(t.double() for t in fused_softmax_mean(*inputs[:6], counts=inputs[6], backend="torch")), 1e-5, 1e-5)


@needs_triton
@pytest.mark.parametrize("splits", [1, 2, 5, 100])
def test_kernel_key_splits(interpret, splits):
    """Any number of key ranges (more than key tiles: clipped) gives the same state."""
    inputs = make_inputs(2, 20, 70, 9, 2, seed=5)
    got = fused_softmax_mean(*inputs[:6], backend="triton", block_q=16, block_m=16, block_d=16, splits=splits)
    check(got, brute_force(*inputs[:6]), 1e-5, 1e-5)


@needs_triton
@pytest.mark.parametrize("abar", [0.99, 0.999])
def test_kernel_at_low_noise(interpret, abar):
    """scale = sqrt(abar) / (1 - abar) ~ 1000: logit terms ~ 1e4, errors bounded by float32 rounding.

    Keys come in clusters of 8 near-copies (1e-3 apart), so each query's
    posterior spreads over a cluster (logits O(1) apart) and its mean is not
    just one key's value: an error in the logits shows in the mean.
    """
    queries, scale, bias, keys, norms, values, _ = make_inputs(2, 23, 40, 27, 1, abar=(abar, abar), seed=1)
    g = torch.Generator().manual_seed(7)
    keys = keys[:, :5].repeat_interleave(8, dim=1) + 1e-3 * torch.randn(2, 40, 27, generator=g)  # [G, 40, D]
    norms = keys.square().sum(-1)
    near = keys[:, torch.randint(0, 40, (23,), generator=g)]  # [G, Bq, D]
    queries = abar**0.5 * near + (1 - abar) ** 0.5 * torch.randn(2, 23, 27, generator=g)
    inputs = (queries, scale, bias, keys, norms, values)
    ref, acc = fused_softmax_mean(*inputs[:6], backend="triton", **TILES)
    want_ref, want_acc = brute_force(*inputs[:6])
    w = torch.softmax(torch.einsum("gbd,gmd->gbm", queries.double(), keys.double()) * scale.double()[None, :, None]
                      + bias.double()[None, :, None] * norms.double()[:, None, :], dim=-1)  # [G, Bq, M]
    assert float((1 / w.square().sum(-1)).median()) > 4  # the posterior spreads over its cluster
    delta = logit_error_bound(queries, scale, bias, keys, norms)  # [G, Bq]
    assert bool(torch.isfinite(ref).all()) and bool(torch.isfinite(acc).all())
    assert bool(((ref.double() - want_ref).abs() <= delta + 1e-6 * want_ref.abs()).all())
    mean_err = (acc[..., :-1].double() - want_acc[..., :-1]).abs().amax(-1)  # [G, Bq]
    assert bool((mean_err <= 2 * torch.expm1(2 * delta) * values.abs().max() + 1e-6).all())
    torch.testing.assert_close(acc[..., -1], torch.ones_like(acc[..., -1]))
    # and in practice about as accurate as the engine's float32 SoftmaxMean (measured: 2.7e-4 vs 4.3e-4 at 0.999)
    _, e_acc = fused_softmax_mean(*inputs[:6], backend="torch")
    engine_err = (e_acc[..., :-1].double() - want_acc[..., :-1]).abs().max()
    assert float(mean_err.max()) <= 4 * float(engine_err) + 1e-5


@needs_triton
def test_kernel_partials_merge_with_softmaxmean(interpret):
    """Two chunks by the kernel, merged into an engine state that streamed a third chunk, equal one pass."""
    queries, scale, bias, keys, norms, values, _ = make_inputs(2, 21, 90, 12, 2, seed=2)
    chunks = [slice(0, 30), slice(30, 47), slice(47, 90)]
    state = SoftmaxMean(augment_queries(queries, scale, bias), 2)
    sl = chunks[0]
    state.update(augment_keys(keys[:, sl].transpose(1, 2)), augment_values(values[:, sl]))
    for sl in chunks[1:]:
        state.merge(*fused_softmax_mean(queries, scale, bias, keys[:, sl], norms[:, sl], values[:, sl], backend="triton", **TILES))
    ref, acc = brute_force(queries, scale, bias, keys, norms, values)
    lse = state.ref + state.acc[..., -1].log()  # merge() keeps ref = max of the parts, not the log-sum-exp
    torch.testing.assert_close(lse.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.mean().double(), acc[..., :-1], rtol=1e-5, atol=1e-5)


@needs_triton
def test_kernel_reads_engine_layouts_without_copies(interpret):
    """Keys as the engine stores them (``[G, D + 2, M]`` augmented, transposed) and per-group coefficients."""
    queries, scale, bias, keys, norms, values, _ = make_inputs(2, 19, 35, 10, 1, seed=3)
    keys_t = augment_keys(keys.transpose(1, 2).contiguous())  # [G, D + 2, M]
    vals = augment_values(values)  # [G, M, V + 1]
    D = keys.shape[-1]
    s2, b2 = scale[None].repeat(2, 1), bias[None].repeat(2, 1)  # [G, Bq]
    got = fused_softmax_mean(queries, s2, b2, keys_t[:, :D].transpose(1, 2), keys_t[:, D], vals[..., :-1],
                             backend="triton", **TILES)
    check(got, brute_force(queries, scale, bias, keys, norms, values), 1e-5, 1e-5)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
def test_rows_without_candidates_are_empty(interpret, backend):
    """No keys, or only absent ones (count 0): ref = -inf and acc = 0, as an empty SoftmaxMean."""
    queries, scale, bias, keys, norms, values, _ = make_inputs(2, 6, 20, 4, 1, seed=4)
    counts = torch.ones(2, 20)
    counts[1] = 0  # group 1: every candidate absent
    ref, acc = fused_softmax_mean(queries, scale, bias, keys, norms, values, counts=counts, backend=backend, **TILES)
    assert bool(torch.isneginf(ref[1]).all()) and bool((acc[1] == 0).all())
    check((ref[:1], acc[:1]), brute_force(queries[:1], scale, bias, keys[:1], norms[:1], values[:1]), 1e-5, 1e-5)
    ref, acc = fused_softmax_mean(queries, scale, bias, keys[:, :0], norms[:, :0], values[:, :0], backend=backend, **TILES)
    assert bool(torch.isneginf(ref).all()) and bool((acc == 0).all())


def test_errors_are_clear():
    queries, scale, bias, keys, norms, values, _ = make_inputs(1, 4, 5, 3, 1)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        fused_softmax_mean(queries, scale, bias, keys[:, :, :2], norms, values)
    with pytest.raises(ValueError, match="scale must have shape"):
        fused_softmax_mean(queries, scale[:2], bias, keys, norms, values)
    with pytest.raises(ValueError, match="one dtype and device"):
        fused_softmax_mean(queries.double(), scale, bias, keys, norms, values)
    with pytest.raises(ValueError, match="unknown backend"):
        fused_softmax_mean(queries, scale, bias, keys, norms, values, backend="cuda")
    with pytest.raises(ValueError, match="unknown precision 'tf32'"):
        fused_softmax_mean(queries, scale, bias, keys, norms, values, precision="tf32")
    assert not triton_usable(torch.device("cpu"), torch.float64)
    if TRITON_AVAILABLE:
        with pytest.raises(ValueError, match="float32 CUDA"):
            fused_softmax_mean(*(t.double() for t in (queries, scale, bias, keys, norms, values)), backend="triton")
        with pytest.raises(ValueError, match="power of two"):
            fused_softmax_mean(queries, scale, bias, keys, norms, values, backend="triton", block_q=24)
        with pytest.raises(ValueError, match="splits must be"):
            fused_softmax_mean(queries, scale, bias, keys, norms, values, backend="triton", splits=0)
        with pytest.raises(ValueError, match="num_warps must be a power of two"):
            fused_softmax_mean(queries, scale, bias, keys, norms, values, backend="triton", num_warps=3)
    else:
        with pytest.raises(RuntimeError, match="needs the triton package"):
            fused_softmax_mean(queries, scale, bias, keys, norms, values, backend="triton")


def test_auto_uses_torch_for_float64():
    """float64 (the engine's reference dtype) always takes the torch path, with or without Triton."""
    inputs = [t.double() for t in make_inputs(1, 8, 9, 4, 1)[:6]]
    check(fused_softmax_mean(*inputs), brute_force(*inputs), 1e-12, 1e-12)


@pytest.mark.parametrize("kernel", [pytest.param("triton", marks=needs_triton), "torch"])
@pytest.mark.parametrize("padding,k", [("zeros", 3), ("zeros", 5), ("circular", 3)])
def test_els_through_the_kernel_equals_the_float64_machine(interpret, kernel, padding, k):
    """ScoreMachine(kernel=...) (one fused call per (group, chunk), merged) is the float64 ELS machine."""
    g = torch.Generator().manual_seed(6)
    train = torch.rand(5, 1, 8, 7, generator=g) * 2 - 1
    x = torch.randn(2, 1, 8, 7, generator=g)
    want = ScoreMachine(train.double(), kind="els", padding=padding).denoise(x.double(), 0.6, patch_size=k)
    got = ScoreMachine(train, kind="els", padding=padding, kernel=kernel).denoise(x, 0.6, patch_size=k)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@needs_triton
def test_split_precision_and_launch_options_reach_the_kernel(interpret):
    """``precision="tf32x3"`` and explicit warps/stages launch the same kernel (the interpreter computes
    every ``tl.dot`` in float32, so only the GPU check measures tf32x3's error)."""
    inputs = make_inputs(2, 37, 70, 9, 2)
    want = brute_force(*inputs[:6])
    for options in ({"precision": "tf32x3"}, {"precision": "ieee", "num_warps": 8, "num_stages": 3}):
        check(fused_softmax_mean(*inputs[:6], backend="triton", **TILES, **options), want, 2e-5, 2e-5)


@needs_triton
@pytest.mark.parametrize("D", [9, 16, 21])
def test_hoisted_query_tiles_give_the_same_state(interpret, D):
    """hoist_queries loads each query tile once when the patch fits one feature step (D <= 16 here);
    a wider patch (21) keeps the stepped loop. Both equal the brute force, with and without counts."""
    for counts in (False, True):
        inputs = make_inputs(2, 37, 70, D, 1, counts=counts)
        got = fused_softmax_mean(*inputs[:6], counts=inputs[6], backend="triton", hoist_queries=True, **TILES)
        check(got, brute_force(*inputs), 1e-5, 1e-5)


# ------------------------------------------------- wired into the machines


@needs_triton
def test_machine_passes_its_kernel_precision(interpret, monkeypatch):
    from patchmosaic import kernels

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["precision"])
        return fused_softmax_mean(*args, **kwargs)

    monkeypatch.setattr(kernels, "fused_softmax_mean", spy)
    train = torch.rand(3, 1, 6, 6) * 2 - 1
    x = torch.randn(1, 1, 6, 6)
    got = ScoreMachine(train, kind="els", kernel="triton", kernel_precision="tf32x3")(x, 1.0, patch_size=3)
    torch.testing.assert_close(got, ScoreMachine(train, kind="els", kernel="torch")(x, 1.0, patch_size=3),
                               atol=2e-5, rtol=0)
    assert seen and set(seen) == {"tf32x3"}


def test_aligned_candidate_rows_hold_the_same_keys():
    """The fused path copies each candidate's row to a 16-aligned start; keys, norms and values are unchanged."""
    from patchmosaic.engine import patch_sq_norms, patch_windows

    g = torch.Generator().manual_seed(2)
    chunk = torch.rand(3, 2, 7, 6, generator=g) * 2 - 1
    machine = ScoreMachine(chunk, kind="els", padding="zeros")
    geometry = machine._geometry(5)
    t_win, norms = patch_windows(chunk, 2, "zeros"), patch_sq_norms(chunk, 2, "zeros")[:, None]
    for rows, cols in geometry.groups():
        plain = machine._group_candidates(rows, cols, chunk, t_win, norms)
        aligned = machine._group_candidates(rows, cols, chunk, t_win, norms, align=16)
        assert aligned[0].stride(2) % 16 == 0 and aligned[0].stride(1) == 1
        assert torch.equal(plain[0], aligned[0]) and torch.equal(plain[1], aligned[1])


@needs_triton
@pytest.mark.parametrize("kind,padding", [("els", "zeros"), ("els", "circular"), ("ls", "zeros")])
def test_machine_with_the_fused_kernel_equals_the_engine(interpret, kind, padding):
    g = torch.Generator().manual_seed(3)
    train = torch.rand(4, 1, 6, 7, generator=g) * 2 - 1
    labels = torch.tensor([0, 1, 0, 1])
    x = torch.randn(2, 1, 6, 7, generator=g)
    sigma = torch.tensor([0.4, 3.0])
    fused = ScoreMachine(train, kind=kind, padding=padding, labels=labels, kernel="triton", chunk_elements=600)
    engine = ScoreMachine(train, kind=kind, padding=padding, labels=labels, kernel="torch")
    for k in (3, 5):
        want = engine(x, sigma, patch_size=k, label=torch.tensor([1, 0]))
        got = fused(x, sigma, patch_size=k, label=torch.tensor([1, 0]))
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    # provenance always runs on the engine, with the same estimate
    est, _ = fused.bind(patch_sizes=(3,)).with_provenance(x, sigma, top=2)
    torch.testing.assert_close(est, engine(x, sigma, patch_size=3), atol=2e-5, rtol=0)


def test_kernel_choice_is_checked():
    train = torch.rand(3, 1, 5, 5) * 2 - 1
    with pytest.raises(ValueError, match="unknown kernel 'cuda'"):
        ScoreMachine(train, kind="els", kernel="cuda")
    with pytest.raises(ValueError, match="unknown kernel_precision 'tf32'"):
        ScoreMachine(train, kind="els", kernel_precision="tf32")
    from patchmosaic.denoisers.score_machines import KERNEL_PRECISIONS
    from patchmosaic.kernels import PRECISIONS

    assert KERNEL_PRECISIONS == PRECISIONS  # the machines check names without importing triton
    x = torch.randn(1, 1, 5, 5)
    auto = ScoreMachine(train, kind="els", kernel="auto")  # CPU queries: the engine, bit for bit
    assert torch.equal(auto(x, 1.0, patch_size=3), ScoreMachine(train, kind="els", kernel="torch")(x, 1.0, patch_size=3))
    if TRITON_AVAILABLE:
        with pytest.raises(ValueError, match="float32 CUDA tensors"):
            ScoreMachine(train.double(), kind="els", kernel="triton")(x.double(), 1.0, patch_size=3)


@needs_triton
@pytest.mark.parametrize("case", cases(8))
def test_random_kernel_calls_are_finite_and_within_their_logit_error(interpret, case):
    """Random shapes, tiles, key splits, hoisting, multiplicities with absent candidates (a row may
    have none in a split) and noise up to abar = 0.9999 with keys scaled 30x: the state is finite
    (rows without candidates: -inf and zeros) and its mean within the logit error bound of the
    float64 brute force."""
    _, pick = picker(100 + case)
    G, Bq, M, D, V = pick([1, 2]), pick([1, 5, 40]), pick([1, 9, 70]), pick([1, 9, 20]), pick([1, 2, 5])
    ab, spread = pick([0.01, 0.5, 0.99, 0.9999]), pick([1.0, 30.0])
    queries, scale, bias, keys, norms, values, counts = make_inputs(G, Bq, M, D, V, abar=(ab, ab), seed=case,
                                                                    counts=pick([False, True]))
    keys = keys * spread
    norms = keys.square().sum(-1)
    if counts is not None:  # group 0 without candidates in its first half, or in all of it
        counts[0, : pick([M // 2, M])] = 0
    tiles = {"block_q": pick([16, 32]), "block_m": pick([16, 32]), "block_d": pick([16, 32]),
             "splits": pick([1, 3]), "hoist_queries": pick([False, True])}
    ref, acc = fused_softmax_mean(queries, scale, bias, keys, norms, values, counts=counts, backend="triton", **tiles)
    want_ref, want_acc = brute_force(queries, scale, bias, keys, norms, values, counts)
    empty = torch.isneginf(want_ref)  # rows whose candidates are all absent
    assert torch.equal(torch.isneginf(ref), empty) and not torch.isnan(ref).any() and torch.isfinite(acc).all()
    assert bool((acc[empty] == 0).all())
    # a logit error e moves the weights by at most a factor e^(2e): the mean by (e^(2e) - 1) max |v|
    err = logit_error_bound(queries, scale, bias, keys, norms)  # [G, Bq]
    tol = (torch.exp(2 * err) - 1) * values.double().abs().max() + 1e-5
    diff = (acc.double() - want_acc).abs().amax(-1)  # [G, Bq]
    assert bool((diff[~empty] <= tol[~empty]).all()), (diff.max(), tol.min(), tiles, ab, spread)


@needs_triton
@pytest.mark.parametrize("case", cases(20))
def test_random_machines_through_the_kernel_equal_the_float64_engine(interpret, case):
    """ScoreMachine(kernel="triton") on random small LS/ELS problems (paddings, wrapping, sizes, labels,
    chunks, per-sample noise, both precisions) equals the float64 machine."""
    g, pick = picker(3000 + case)
    kind, padding = pick([("ls", "zeros"), ("ls", "circular"), ("els", "zeros"), ("els", "circular")])
    wrap = pick([True, False]) if (kind, padding) == ("els", "circular") else True
    N, C, H, W, k = pick([2, 4]), pick([1, 3]), pick([6, 7]), pick([6, 7]), pick([1, 3, 5])
    train = torch.rand(N, C, H, W, generator=g) * 2 - 1
    train[:, :, :2] = -1.0  # constant rows
    labels = torch.arange(N) % 2 if pick([False, True]) else None
    label = None if labels is None else torch.tensor([0, 1])
    x = torch.randn(2, C, H, W, generator=g)
    sigma = torch.tensor([pick([0.1, 0.5]), pick([2.0, 20.0])])
    want = ScoreMachine(train.double(), kind=kind, padding=padding, wrap_training_patches=wrap, labels=labels)(
        x.double(), sigma.double(), patch_size=k, label=label)
    fused = ScoreMachine(train, kind=kind, padding=padding, wrap_training_patches=wrap, labels=labels, kernel="triton",
                         kernel_precision=pick(["ieee", "tf32x3"]), chunk_elements=pick([300, 1 << 22]))
    got = fused(x, sigma, patch_size=k, label=label)
    torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=0)
