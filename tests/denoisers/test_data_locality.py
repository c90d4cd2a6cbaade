import numpy as np
import pytest
import torch

import reference_family as ref
from patchmosaic.denoisers.data_locality import DATA_LOCALITY_THRESHOLDS, DataLocality
from patchmosaic.denoisers.score_machines import IdealScoreMachine as Ideal

SIGMAS = [0.05, 0.4, 1.5, 30.0]


def _train(N=7, shape=(2, 3, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((N, *shape), generator=g, dtype=torch.float64) * 2 - 1


@pytest.mark.parametrize("threshold,temperature", [(0.05, 1.0), (0.3, 0.5), (1.0, 1.0)])
def test_data_locality_matches_brute_force(threshold, temperature):
    train = _train()
    D = DataLocality(train, threshold=threshold, temperature=temperature)
    x = train[:2] + 0.5 * torch.randn(2, 2, 3, 2, dtype=torch.float64)
    for s in SIGMAS:
        mask = ref.locality_mask(train.numpy(), s, threshold)
        np.testing.assert_array_equal(D.mask(s).numpy(), mask)
        out = D(x, s)
        for b in range(2):
            expect = ref.data_locality(x[b].numpy(), train.numpy(), s, threshold, temperature)
            np.testing.assert_allclose(out[b].numpy(), expect, atol=1e-10)


def test_mask_is_neither_trivial_nor_full_in_the_brute_force_cases():
    """The test above must exercise a real mask: some but not all entries at a mid threshold."""
    m = ref.locality_mask(_train().numpy(), 0.4, 0.3)
    assert 0 < m.mean() < 1


def test_threshold_to_zero_is_the_ideal_denoiser():
    train = _train(9)
    D = DataLocality(train, threshold=1e-12)
    ideal = Ideal(train)
    x = torch.randn(3, 2, 3, 2, dtype=torch.float64)
    for s in SIGMAS:
        assert bool(D.mask(s).all())
        torch.testing.assert_close(D(x, s), ideal(x, s), atol=1e-10, rtol=0)


def test_chunking_per_row_sigma_and_float32():
    train = _train(11)
    x = torch.randn(3, 2, 3, 2, dtype=torch.float64)
    sig = torch.tensor([0.3, 2.0, 0.3], dtype=torch.float64)
    whole = DataLocality(train, threshold=0.05)(x, sig)
    tiny = DataLocality(train, threshold=0.05, chunk_elements=1)(x, sig)  # one image per chunk
    torch.testing.assert_close(tiny, whole, atol=1e-12, rtol=0)
    for b in range(3):
        expect = ref.data_locality(x[b].numpy(), train.numpy(), float(sig[b]), 0.05)
        np.testing.assert_allclose(whole[b].numpy(), expect, atol=1e-10)
    out32 = DataLocality(train.float(), threshold=0.05)(x.float(), sig.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), whole, atol=1e-4, rtol=0)


def test_conditioning_restricts_images_and_moments():
    train = _train(10)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    D = DataLocality(train, threshold=0.1, labels=labels)
    x = torch.randn(2, 2, 3, 2, dtype=torch.float64)
    out = D(x, 0.8, label=torch.tensor([2, 0]))
    for b, c in enumerate([2, 0]):
        expect = ref.data_locality(x[b].numpy(), train.numpy()[labels == c], 0.8, 0.1)
        np.testing.assert_allclose(out[b].numpy(), expect, atol=1e-10)
    with pytest.raises(ValueError, match=r"label\(s\) \[5\] not present"):
        D(x, 0.8, label=5)


def test_mask_cache_per_sigma():
    D = DataLocality(_train(), threshold=0.2)
    assert D.mask(0.5) is D.mask(0.5)
    assert D.mask(0.5) is not D.mask(5.0)


def test_published_thresholds_and_bad_parameters():
    assert DATA_LOCALITY_THRESHOLDS["mnist"] == 0.005 and DATA_LOCALITY_THRESHOLDS["cifar10"] == 0.05
    train = _train()
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
            DataLocality(train, threshold=bad)
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        DataLocality(train, threshold=0.1, temperature=0.0)
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        DataLocality(train, threshold=0.1)(train[:1], -1.0)
