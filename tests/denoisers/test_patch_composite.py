import numpy as np
import pytest
import torch

import reference_family as ref
from patchmosaic.denoisers.score_machines import IdealScoreMachine as Ideal
from patchmosaic.denoisers.patch_composite import PatchComposite, pspc_cifar10_schedule
from patchmosaic.schedules import PSPC_CIFAR10_SIZES, PatchSchedule, sigmas_karras

SIGMAS = [0.05, 0.5, 2.0, 40.0]


def _train(N=6, shape=(2, 4, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((N, *shape), generator=g, dtype=torch.float64) * 2 - 1


@pytest.mark.parametrize("P,flips", [(1, False), (2, True), (3, False), (4, True)])
def test_patch_composite_matches_brute_force(P, flips):
    train = _train()
    D = PatchComposite(train, patch_size=P, flips=flips)
    x = train[:2] + 0.6 * torch.randn(2, 2, 4, 5, dtype=torch.float64)
    for s in SIGMAS:
        out = D(x, s)
        for b in range(2):
            expect = ref.patch_composite(x[b].numpy(), train.numpy(), s, P, flips)
            np.testing.assert_allclose(out[b].numpy(), expect, atol=1e-10)


def test_whole_image_window_is_the_ideal_denoiser():
    train = _train(8, shape=(1, 5, 5))
    x = torch.randn(3, 1, 5, 5, dtype=torch.float64)
    for s in SIGMAS:
        torch.testing.assert_close(PatchComposite(train, patch_size=5)(x, s), Ideal(train)(x, s), atol=1e-10, rtol=0)


def test_chunking_and_float32():
    train = _train(9)
    x = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    sig = torch.tensor([0.2, 3.0, 0.2], dtype=torch.float64)
    whole = PatchComposite(train, patch_size=3)(x, sig)
    tiny = PatchComposite(train, patch_size=3, chunk_elements=1)(x, sig)  # one image, one window row per chunk
    torch.testing.assert_close(tiny, whole, atol=1e-12, rtol=0)
    for b in range(3):
        np.testing.assert_allclose(whole[b].numpy(), ref.patch_composite(x[b].numpy(), train.numpy(), float(sig[b]), 3),
                                   atol=1e-10)
    out32 = PatchComposite(train.float(), patch_size=3)(x.float(), sig.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), whole, atol=1e-4, rtol=0)


def test_sigma_keyed_schedule_and_conditioning():
    train = _train(8)
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    sched = PatchSchedule((1, 3, 4), (0.1, 1.0, 10.0), centred=False)
    D = PatchComposite(train, patch_size=sched, flips=True, labels=labels)
    x = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    sig = torch.tensor([12.0, 0.9, 0.08], dtype=torch.float64)
    out = D(x, sig, label=torch.tensor([1, 0, 1]))
    for b, (c, P) in enumerate(zip([1, 0, 1], [4, 3, 1])):
        assert D.size_at(float(sig[b])) == P
        expect = ref.patch_composite(x[b].numpy(), train.numpy()[labels.numpy() == c], float(sig[b]), P, flips=True)
        np.testing.assert_allclose(out[b].numpy(), expect, atol=1e-10)


def test_published_cifar10_schedule():
    PSPC_CIFAR10_SIGMAS = sigmas_karras(18)[:-1].tolist()  # high to low
    assert len(PSPC_CIFAR10_SIZES) == len(PSPC_CIFAR10_SIGMAS) == 18
    assert PSPC_CIFAR10_SIZES[:8] == (32,) * 7 + (23,) and PSPC_CIFAR10_SIZES[-7:] == (5,) + (3,) * 6
    assert PSPC_CIFAR10_SIGMAS[0] == pytest.approx(80.0) and PSPC_CIFAR10_SIGMAS[-1] == pytest.approx(0.002)
    # EDM Eq. 5 at i = 9 of 18, written out
    assert PSPC_CIFAR10_SIGMAS[9] == pytest.approx((80 ** (1 / 7) + 9 / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7)
    assert all(a > b for a, b in zip(PSPC_CIFAR10_SIGMAS, PSPC_CIFAR10_SIGMAS[1:]))
    k = pspc_cifar10_schedule()
    assert [k(s) for s in PSPC_CIFAR10_SIGMAS] == list(PSPC_CIFAR10_SIZES)
    assert sigmas_karras(1).tolist() == [80.0, 0.0]


def test_bad_patch_sizes():
    train = _train()
    with pytest.raises(ValueError, match=r"patch_size must be in 1\.\.4 \(the image is 4x5\)"):
        PatchComposite(train, patch_size=5)
    with pytest.raises(ValueError, match="patch_size must be in"):
        PatchComposite(train, patch_size=0)
    D = PatchComposite(train, patch_size=lambda s: 32)  # a CIFAR schedule on a 4x5 image: error at call
    with pytest.raises(ValueError, match=r"patch_size must be in 1\.\.4"):
        D(train[:1], 1.0)
