"""Random problems for the closed-form family against the brute-force references (reference_family.py).

Each case draws an image shape, a training set (with duplicates and constant images), noisy queries at
per-sample noise levels from sigma 0.01 to 100, chunk sizes and the denoiser's own knob; every output
must equal the float64 reference. Cases are seeded by their index; PATCHMOSAIC_FUZZ_CASES (default 200)
scales their number (a tenth of it per denoiser).
"""

import numpy as np
import pytest
import torch

import reference_family as ref
from fuzz import cases, picker
from patchmosaic.denoisers.data_locality import DataLocality
from patchmosaic.denoisers.neighbours import TopK
from patchmosaic.denoisers.patch_composite import PatchComposite
from patchmosaic.denoisers.wiener import Wiener


def _problem(seed: int):
    g, pick = picker(seed)
    N, C, H, W = pick([1, 3, 8]), pick([1, 2]), pick([3, 4]), pick([3, 5])
    train = torch.rand(N, C, H, W, generator=g, dtype=torch.float64) * 2 - 1
    if N > 1 and pick([False, True]):
        train[-1] = train[0]  # a duplicate
    if pick([False, True]):
        train[0] = pick([-1.0, 0.0])  # a constant image
    sigma = torch.tensor([pick([0.01, 0.3]), pick([1.0, 100.0])], dtype=torch.float64)
    x = train[torch.randint(N, (2,), generator=g)] + sigma[:, None, None, None] * torch.randn(
        2, C, H, W, generator=g, dtype=torch.float64)
    return pick, train, x, sigma


def _check(out, want_fn, x, sigma, atol=1e-9):
    assert out.dtype == torch.float64 and out.shape == x.shape and torch.isfinite(out).all()
    for b in range(x.shape[0]):
        np.testing.assert_allclose(out[b].numpy(), want_fn(x[b].numpy(), float(sigma[b])), atol=atol, rtol=1e-9)


@pytest.mark.parametrize("case", cases(10))
def test_random_wiener(case):
    pick, train, x, sigma = _problem(4000 + case)
    D = train[0].numel()
    rank = pick([None, 1, D])
    _check(Wiener(train, rank=rank)(x, sigma), lambda xb, s: ref.wiener(xb, train.numpy(), s, rank), x, sigma)


@pytest.mark.parametrize("case", cases(10))
def test_random_data_locality(case):
    pick, train, x, sigma = _problem(5000 + case)
    threshold, temperature = pick([0.05, 0.3, 1.0]), pick([0.5, 1.0])
    D = DataLocality(train, threshold=threshold, temperature=temperature, chunk_elements=pick([1, 1 << 22]))
    _check(D(x, sigma), lambda xb, s: ref.data_locality(xb, train.numpy(), s, threshold, temperature), x, sigma)


@pytest.mark.parametrize("case", cases(10))
def test_random_patch_composite(case):
    pick, train, x, sigma = _problem(6000 + case)
    P, flips = pick([1, 3]), pick([False, True])
    D = PatchComposite(train, patch_size=P, flips=flips, chunk_elements=pick([1, 1 << 22]))
    _check(D(x, sigma), lambda xb, s: ref.patch_composite(xb, train.numpy(), s, P, flips), x, sigma)


@pytest.mark.parametrize("case", cases(10))
def test_random_topk(case):
    pick, train, x, sigma = _problem(7000 + case)
    k = min(pick([1, 2, 8]), train.shape[0])  # k > N is refused (a clear error)
    _check(TopK(train, k=k)(x, sigma), lambda xb, s: ref.topk(xb, train.numpy(), s, k), x, sigma)
