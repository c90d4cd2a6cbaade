"""The compiled window-sum kernel (patchmosaic.kernels.window_sums) against float64 brute force.

Every case runs the ELS machine with ``kernel="numba"`` in float32 on tiny inputs, with lane blocks
of 16 images and small chunks, so that several lane blocks, images waiting for a full block, and
several chunks are all exercised; the references are the numpy float64 brute force of
``tests/reference.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fuzz import cases, picker
from reference import ref_machine, ref_provenance

import patchmosaic.kernels.window_sums as ws
from patchmosaic import ScoreMachine
from patchmosaic.denoisers.score_machines import WINDOW_KERNEL_MIN_K
from patchmosaic.engine import (
    SoftmaxMean,
    augment_keys,
    augment_queries,
    augment_values,
    logit_coefficients,
)


@pytest.fixture
def sweeps(monkeypatch):
    """16-image lane blocks, and the images of each of the kernel's sweeps (every group through the compiled loop)."""
    monkeypatch.setattr(ws, "LANES", 16)
    calls = []
    sweep = ws.WindowGroups._sweep

    def counted(self, images):
        calls.append(images.shape[0])  # images in the sweep (every group's)
        return sweep(self, images)

    monkeypatch.setattr(ws.WindowGroups, "_sweep", counted)
    return calls


def _inputs(seed: int, n: int, C: int, H: int, alpha_bar: float, B: int = 2):
    g = torch.Generator().manual_seed(seed)
    train = torch.rand(n, C, H, H, generator=g, dtype=torch.float64) * 2 - 1
    clean = train[torch.randint(0, n, (B,), generator=g)].roll(1, dims=-1)
    x = alpha_bar**0.5 * clean + (1 - alpha_bar) ** 0.5 * torch.randn(B, C, H, H, generator=g, dtype=torch.float64)
    return train, x


CASES = [  # padding, wrap, k, alpha_bar, C
    ("zeros", True, 5, 0.5, 1),
    ("zeros", True, 3, 0.95, 1),
    ("zeros", True, 7, 0.2, 3),
    ("circular", True, 5, 0.5, 1),
    ("circular", False, 3, 0.9, 3),
    ("circular", True, 7, 0.99, 1),
]


@pytest.mark.parametrize("padding,wrap,k,alpha_bar,C", CASES)
def test_means_match_float64_brute_force(sweeps, padding, wrap, k, alpha_bar, C):
    train, x = _inputs(k * 10 + C, 37, C, 8, alpha_bar)
    machine = ScoreMachine(train.float(), kind="els", padding=padding, wrap_training_patches=wrap, kernel="numba",
                           chunk_elements=4000)  # chunks of a few images: several chunks and lane blocks
    out = machine.denoise(x.float(), alpha_bar, patch_size=k)
    want = np.stack([ref_machine(x[b].numpy(), train.numpy(), alpha_bar, "els", padding, k, wrap) for b in range(2)])
    assert sum(sweeps) == 37 and len(sweeps) >= 3  # every image swept once, in several sweeps
    np.testing.assert_allclose(out.double().numpy(), want, atol=2e-4 if alpha_bar < 0.99 else 2e-3, rtol=0)


@pytest.mark.parametrize("padding,wrap,k,alpha_bar,C", CASES[:2] + CASES[4:5])
def test_posterior_statistics_match_float64_brute_force(sweeps, padding, wrap, k, alpha_bar, C):
    train, x = _inputs(k + C, 21, C, 8, alpha_bar)
    machine = ScoreMachine(train.float(), kind="els", padding=padding, wrap_training_patches=wrap, kernel="numba")
    _, prov = machine.denoise_provenance(x.float(), alpha_bar, patch_size=k, top=0)
    assert sweeps == [16, 5]  # a full lane block, then the images left for the last
    for b in range(2):
        ref = ref_provenance(x[b].numpy(), train.numpy(), alpha_bar, "els", padding, k, wrap)
        n_eff = np.array([[ref[y, xx][2] for xx in range(8)] for y in range(8)])
        entropy = np.array([[ref[y, xx][3] for xx in range(8)] for y in range(8)])
        np.testing.assert_allclose(prov.n_eff[b].double().numpy(), n_eff, rtol=2e-4)
        np.testing.assert_allclose(prov.entropy[b].double().numpy(), entropy, atol=2e-4, rtol=1e-4)


def test_a_block_far_above_the_reference_is_redone(sweeps):
    """The first lane block sets each row's reference; a later block 2000 bits above it (an exact copy
    of the query at low noise) must be redone on its own maximum, not overflow."""
    g = torch.Generator().manual_seed(3)
    far = torch.rand(32, 1, 8, 8, generator=g, dtype=torch.float64) * 0.05 - 1  # the first two lane blocks
    query = torch.rand(1, 1, 8, 8, generator=g, dtype=torch.float64) * 1.6 - 0.6
    near = (query + 0.01 * torch.randn(5, 1, 8, 8, generator=g, dtype=torch.float64)).clamp(-1, 1)
    train = torch.cat([far, near])
    alpha_bar = 0.999
    machine = ScoreMachine(train.float(), kind="els", padding="zeros", kernel="numba")
    x = alpha_bar**0.5 * query
    out = machine.denoise(x.float(), alpha_bar, patch_size=5)
    want = ref_machine(x[0].numpy(), train.numpy(), alpha_bar, "els", "zeros", 5)
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out[0].double().numpy(), want, atol=1e-3, rtol=0)


def test_auto_picks_the_kernel_where_it_is_faster():
    train = torch.rand(4, 1, 12, 12)
    auto = ScoreMachine(train, kind="els", padding="zeros")
    k = WINDOW_KERNEL_MIN_K
    assert auto.uses_window_kernel("cpu", torch.float32, k)
    assert not auto.uses_window_kernel("cpu", torch.float32, k - 2)  # a mean alone: the engine
    assert auto.uses_window_kernel("cpu", torch.float32, k, track=0)  # with posterior statistics
    assert not auto.uses_window_kernel("cpu", torch.float32, k - 2, track=0)
    assert not auto.uses_window_kernel("cpu", torch.float32, k, track=8)  # top candidates: the engine
    assert not auto.uses_window_kernel("cpu", torch.float64, k)  # float64: the engine
    assert not auto.uses_window_kernel("cuda", torch.float32, k)
    assert not ScoreMachine(train, kind="els", kernel="torch").uses_window_kernel("cpu", torch.float32, k)
    assert not ScoreMachine(train, kind="ls").uses_window_kernel("cpu", torch.float32, k)
    forced = ScoreMachine(train, kind="els", kernel="numba")
    assert forced.uses_window_kernel("cpu", torch.float32, 3)
    with pytest.raises(ValueError, match="kernel='numba' runs float32 queries on the CPU"):
        forced.uses_window_kernel("cpu", torch.float64, 3)


def test_auto_streams_large_patches_through_the_kernel(sweeps):
    train, x = _inputs(5, 20, 1, 12, 0.3)
    k = WINDOW_KERNEL_MIN_K
    auto = ScoreMachine(train.float(), kind="els", padding="zeros")
    out = auto.denoise(x.float(), 0.3, patch_size=k)
    assert sweeps == [16, 4]
    engine = ScoreMachine(train, kind="els", padding="zeros", kernel="torch").denoise(x, 0.3, patch_size=k)
    torch.testing.assert_close(out.double(), engine, atol=1e-4, rtol=0)
    auto.denoise(x.float(), 0.3, patch_size=k - 2)
    assert sweeps == [16, 4]  # a smaller patch (no statistics): the engine


def test_merge_with_statistics_equals_one_pass():
    """SoftmaxMean.merge of two disjoint key sets, with posterior statistics, equals one state over both."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 5, 6, generator=g, dtype=torch.float64)
    keys = torch.randn(1, 6, 40, generator=g, dtype=torch.float64)
    values = augment_values(torch.randn(1, 40, 2, generator=g, dtype=torch.float64))
    scale, bias = logit_coefficients(torch.full((5,), 0.9, dtype=torch.float64))
    queries = augment_queries(q, scale, bias)
    whole = SoftmaxMean(queries, 2, track=0)
    whole.update(augment_keys(keys), values)
    a, b = SoftmaxMean(queries, 2, track=0), SoftmaxMean(queries, 2, track=0)
    a.update(augment_keys(keys[..., :25]), values[:, :25])
    b.update(augment_keys(keys[..., 25:]), values[:, 25:])
    empty = SoftmaxMean(queries, 2, track=0)  # a side that saw no candidate adds nothing
    a.merge(empty.ref, empty.acc, empty.sq, empty.xl)
    a.merge(b.ref, b.acc, b.sq, b.xl)
    torch.testing.assert_close(a.mean(), whole.mean())
    for got, want in zip(a.posterior_stats(), whole.posterior_stats()):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="posterior statistics"):
        a.merge(b.ref, b.acc)


@pytest.mark.parametrize("case", cases(10))
def test_random_machines_match_the_float64_engine(sweeps, case):
    """Random ELS problems (size, channels, patch size, padding, dictionary, noise, chunks, with or
    without statistics) through the kernel against the float64 engine (itself held to brute force)."""
    g, pick = picker(7000 + case)
    H, C = pick([6, 7, 9, 10]), pick([1, 1, 3])
    padding, wrap = pick([("zeros", True), ("circular", True), ("circular", False)])
    k = pick([k for k in (1, 3, 5, 7) if k <= H])
    n, B = pick([5, 17, 40]), pick([1, 3])
    alpha_bar = float(torch.empty(1).uniform_(0.05, 0.995, generator=g))
    train = torch.rand(n, C, H, H, generator=g, dtype=torch.float64) * 2 - 1
    x = alpha_bar**0.5 * train[:B].roll(2, dims=-2) + (1 - alpha_bar) ** 0.5 * torch.randn(
        B, C, H, H, generator=g, dtype=torch.float64)
    kw = {"kind": "els", "padding": padding, "wrap_training_patches": wrap}
    kernel = ScoreMachine(train.float(), kernel="numba", chunk_elements=pick([3000, 1 << 22]), **kw)
    engine = ScoreMachine(train, kernel="torch", **kw)
    tol = 3e-4 if alpha_bar < 0.95 else 3e-3  # float32 logits scaled by 1 / (1 - abar)
    if pick([True, False]):
        got, prov = kernel.denoise_provenance(x.float(), alpha_bar, patch_size=k, top=0)
        want, ref = engine.denoise_provenance(x, alpha_bar, patch_size=k, top=0)
        torch.testing.assert_close(prov.n_eff.double(), ref.n_eff, rtol=10 * tol, atol=0)
        torch.testing.assert_close(prov.entropy.double(), ref.entropy, rtol=0, atol=10 * tol)
    else:
        got, want = kernel.denoise(x.float(), alpha_bar, patch_size=k), engine.denoise(x, alpha_bar, patch_size=k)
    assert sum(sweeps) == n
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol)


def test_sample_kernel_flag_and_compute_record(tmp_path):
    """`sample --kernel numba|auto|torch` on ELS: the same samples up to float32 rounding, config.json names
    the sizes that took the kernel, and the flag is a usage error where the kernel cannot run."""
    from click.testing import CliRunner

    from patchmosaic.cli import main
    from patchmosaic.runs import load_samples

    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, images=rng.integers(0, 256, (6, 8, 8), dtype=np.uint8))
    args = ["sample", "--dataset", str(data), "--size", "native", "--patch-sizes", "3,7", "--steps", "2",
            "--seeds", "0-1", "--workers", "1"]
    for kernel in ("numba", "auto", "torch"):
        result = CliRunner().invoke(main, [*args, "--kernel", kernel, "--out", str(tmp_path / kernel)])
        assert result.exit_code == 0, result.output
    samples = {kernel: load_samples(tmp_path / kernel)["images"] for kernel in ("numba", "auto", "torch")}
    np.testing.assert_allclose(samples["numba"], samples["torch"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(samples["auto"], samples["torch"], rtol=0, atol=1e-4)
    compute = {kernel: json.loads((tmp_path / kernel / "config.json").read_text())["compute"]
               for kernel in ("numba", "auto", "torch")}
    assert compute["numba"]["kernel"] == "numba" and compute["numba"]["window_kernel_sizes"] == [3, 7]
    assert compute["auto"]["kernel"] == "numba" and compute["auto"]["window_kernel_sizes"] == [7]
    assert compute["torch"]["kernel"] == "torch" and "window_kernel_sizes" not in compute["torch"]
    for bad, words in ((["--machine", "ls"], "ELS machine"), (["--dtype", "float64"], "float32 on the CPU")):
        result = CliRunner().invoke(main, [*args, *bad, "--kernel", "numba", "--out", str(tmp_path / "bad")])
        assert result.exit_code != 0 and words in result.output, result.output


@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_conditioned_and_split_between_workers(sweeps, padding):
    """Class conditioning (each sample against its class's images) and two workers through the kernel:
    the float64 engine's result; each class's samples are split between the workers."""
    g = torch.Generator().manual_seed(11)
    train = torch.rand(30, 1, 9, 9, generator=g, dtype=torch.float64) * 2 - 1
    labels = torch.arange(30) % 3
    x = torch.randn(5, 1, 9, 9, generator=g, dtype=torch.float64)
    label = torch.tensor([0, 2, 1, 1, 2])
    kernel = ScoreMachine(train.float(), kind="els", padding=padding, labels=labels, kernel="numba", workers=2)
    engine = ScoreMachine(train, kind="els", padding=padding, labels=labels, kernel="torch")
    got, prov = kernel.denoise_provenance(x.float(), 0.6, patch_size=5, label=label, top=0)
    want, ref = engine.denoise_provenance(x, 0.6, patch_size=5, label=label, top=0)
    assert sweeps == [10] * 5  # per class, its samples split between the workers: 1 + 2 + 2 sweeps
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)
    torch.testing.assert_close(prov.n_eff.double(), ref.n_eff, rtol=1e-4, atol=0)
    torch.testing.assert_close(prov.entropy.double(), ref.entropy, rtol=0, atol=1e-4)
