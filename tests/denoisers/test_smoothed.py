import numpy as np
import pytest
import torch

import reference_family as ref
from patchmosaic.denoisers.base import call_generator
from patchmosaic.denoisers.score_machines import IdealScoreMachine as Ideal
from patchmosaic.denoisers.smoothed import Smoothed


def _train(N=6, shape=(1, 5, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((N, *shape), generator=g, dtype=torch.float64) * 2 - 1


def test_smoothed_matches_monte_carlo_formula():
    """D(x) = mean_m ideal(x + std eps_m), eps from call_generator(seed, call) as documented."""
    train = _train()
    D = Smoothed(Ideal(train), std=0.3, draws=4, seed=5)
    x = torch.randn(2, 1, 5, 6, dtype=torch.float64)
    for call, s in enumerate([0.2, 1.0]):
        out = D(x, s)
        eps = torch.randn((4, 2, 1, 5, 6), generator=call_generator(5, call), dtype=torch.float64)
        for b in range(2):
            expect = np.mean([ref.ideal((x[b] + 0.3 * eps[m, b]).numpy(), train.numpy(), s) for m in range(4)], axis=0)
            np.testing.assert_allclose(out[b].numpy(), expect, atol=1e-10)


def test_zero_std_is_the_base():
    train = _train()
    base = Ideal(train)
    x = torch.randn(3, 1, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(Smoothed(base, std=0.0, draws=3)(x, 0.4), base(x, 0.4), atol=1e-12, rtol=0)


def test_reproducible_per_seed_and_call():
    base = Ideal(_train())
    x = torch.randn(2, 1, 5, 6, dtype=torch.float64)
    a, b, c = (Smoothed(base, std=0.5, draws=3, seed=s) for s in (1, 1, 2))
    first_a, first_b, first_c = a(x, 0.3), b(x, 0.3), c(x, 0.3)
    assert torch.equal(first_a, first_b)
    assert not torch.allclose(first_a, first_c)
    second_a = a(x, 0.3)
    assert not torch.allclose(second_a, first_a)  # the next call draws new perturbations
    assert torch.equal(second_a, b(x, 0.3))
    a.reset()
    assert torch.equal(a(x, 0.3), first_a)


def test_label_is_forwarded():
    train = _train(8)
    labels = torch.tensor([0, 1] * 4)
    D = Smoothed(Ideal(train, labels=labels), std=0.2, draws=2, seed=0)
    x = torch.randn(2, 1, 5, 6, dtype=torch.float64)
    out = D(x, 0.5, label=torch.tensor([1, 0]))
    eps = torch.randn((2, 2, 1, 5, 6), generator=call_generator(0, 0), dtype=torch.float64)
    for b, cls in enumerate([1, 0]):
        sub = train[labels == cls].numpy()
        expect = np.mean([ref.ideal((x[b] + 0.2 * eps[m, b]).numpy(), sub, 0.5) for m in range(2)], axis=0)
        np.testing.assert_allclose(out[b].numpy(), expect, atol=1e-10)
    assert D(x, 0.5, label=1).shape == x.shape


def test_bad_parameters():
    base = Ideal(_train())
    with pytest.raises(ValueError, match="std must be finite and >= 0"):
        Smoothed(base, std=-0.1, draws=2)
    with pytest.raises(ValueError, match=r"draws must be in 1"):
        Smoothed(base, std=0.1, draws=0)
    with pytest.raises(ValueError, match="base must be a denoiser"):
        Smoothed("ideal", std=0.1, draws=1)
