import numpy as np
import pytest
import torch

import reference_family as ref
from patchmosaic.denoisers.wiener import GaussianMoments, Wiener

SIGMAS = [0.01, 0.3, 1.0, 20.0]


def _train(N, shape=(2, 3, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((N, *shape), generator=g, dtype=torch.float64) * 2 - 1


@pytest.mark.parametrize("N", [5, 20])  # Gram path (N < n = 12) and covariance path (N >= n)
@pytest.mark.parametrize("rank", [None, 3])
def test_wiener_matches_brute_force(N, rank):
    train = _train(N)
    D = Wiener(train, rank=rank)
    x = torch.randn(3, 2, 3, 2, dtype=torch.float64)
    for s in SIGMAS:
        out = D(x, s)
        assert out.dtype == torch.float64 and out.shape == x.shape
        for b in range(3):
            np.testing.assert_allclose(out[b].numpy(), ref.wiener(x[b].numpy(), train.numpy(), s, rank), atol=1e-10)


def test_wiener_per_row_sigma_and_float32():
    train = _train(8)
    D = Wiener(train)
    x = torch.randn(4, 2, 3, 2, dtype=torch.float64)
    sig = torch.tensor([0.05, 0.5, 2.0, 10.0], dtype=torch.float64)
    out = D(x, sig)
    for b in range(4):
        np.testing.assert_allclose(out[b].numpy(), ref.wiener(x[b].numpy(), train.numpy(), float(sig[b])), atol=1e-10)
    out32 = D(x.float(), sig.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out, atol=1e-5, rtol=1e-5)


def test_wiener_conditioning_uses_class_moments():
    train = _train(10)
    labels = torch.tensor([0, 1] * 5)
    D = Wiener(train, labels=labels)
    x = torch.randn(2, 2, 3, 2, dtype=torch.float64)
    out = D(x, 0.7, label=torch.tensor([1, 0]))
    for b, c in enumerate([1, 0]):
        expect = ref.wiener(x[b].numpy(), train[labels == c].numpy(), 0.7)
        np.testing.assert_allclose(out[b].numpy(), expect, atol=1e-10)
    with pytest.raises(ValueError, match=r"label\(s\) \[7\] not present"):
        D(x, 0.7, label=7)
    with pytest.raises(ValueError, match="without training labels"):
        Wiener(train)(x, 0.7, label=0)


def test_wiener_converges_to_known_gaussian_posterior():
    """N samples of a known N(m, S) on n = 4: the error to the true posterior mean shrinks with N."""
    g = torch.Generator().manual_seed(1)
    A = torch.randn(4, 4, generator=g, dtype=torch.float64)
    S = A @ A.T / 4 + 0.1 * torch.eye(4, dtype=torch.float64)
    m = torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=torch.float64)
    x = torch.randn(16, 1, 2, 2, generator=g, dtype=torch.float64)
    sigma = 0.5
    truth = m + (x.reshape(16, 4) - m) @ torch.linalg.solve(S + sigma**2 * torch.eye(4, dtype=torch.float64), S)
    errors = []
    for N in (100, 1000, 10000):
        samples = m + torch.randn(N, 4, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(S).T
        out = Wiener(samples.reshape(N, 1, 2, 2))(x, sigma).reshape(16, 4)
        errors.append(float((out - truth).norm() / truth.norm()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.02, errors


def test_gram_and_covariance_paths_agree():
    train = _train(11, shape=(1, 3, 4))  # N = 11 < n = 12: Gram path
    m = GaussianMoments.fit(train)
    X = train.reshape(11, -1)
    Sigma = torch.cov(X.T, correction=0)
    torch.testing.assert_close((m.U * m.lam) @ m.U.T, Sigma, atol=1e-12, rtol=0)
    assert m.lam.numel() == 10  # rank N - 1


def test_wiener_bad_inputs():
    train = _train(5)
    with pytest.raises(ValueError, match=r"rank must be in 1\.\.12"):
        Wiener(train, rank=13)
    with pytest.raises(ValueError, match=r"rank must be in 1\.\.12"):
        Wiener(train, rank=0)
    D = Wiener(train)
    x = torch.randn(2, 2, 3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        D(x, 0.0)
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        D(x, torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match=r"sigma must be a float or a \[B\] = \[2\] tensor"):
        D(x, torch.ones(3))
    with pytest.raises(ValueError, match="NaN or infinite"):
        D(torch.full_like(x, float("nan")), 1.0)
    with pytest.raises(ValueError, match="missing batch dimension"):
        D(x[0], 1.0)
    with pytest.raises(ValueError, match="x has 1 channels but the training images have 2"):
        D(torch.randn(2, 1, 3, 2), 1.0)
    with pytest.raises(ValueError, match="float32 or float64"):
        D(x.half(), 1.0)
    with pytest.raises(ValueError, match="floating point"):
        Wiener(torch.zeros(3, 1, 2, 2, dtype=torch.long))
