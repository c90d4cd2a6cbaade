"""The benchmark's released-code baseline computes the same ELS machine (a fair comparison)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from released_baseline import released_els  # noqa: E402

from patchmosaic import ScoreMachine  # noqa: E402


@pytest.mark.parametrize("padding,wrap", [("zeros", True), ("circular", True), ("circular", False)])
@pytest.mark.parametrize("k", [1, 3, 5, 7])
@pytest.mark.parametrize("batch_images", [3, 64])
def test_baseline_equals_machine(padding, wrap, k, batch_images):
    """float64 on a non-square image, training batches that do not divide N (3) or hold all of it (64)."""
    g = torch.Generator().manual_seed(k)
    train = torch.rand(7, 2, 9, 8, dtype=torch.float64, generator=g) * 2 - 1
    x = torch.randn(2, 2, 9, 8, dtype=torch.float64, generator=g)
    want = ScoreMachine(train, kind="els", padding=padding, wrap_training_patches=wrap).denoise(x, 0.4, patch_size=k)
    got = released_els(
        x, train, 0.4, k, padding, wrap_training_patches=wrap and padding == "circular", batch_images=batch_images
    )
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_baseline_low_noise_matches_machine():
    """At alpha_bar = 0.999 the softmax is nearly one-hot: the running log-sum-exp must not overflow."""
    g = torch.Generator().manual_seed(0)
    train = torch.rand(5, 1, 8, 8, dtype=torch.float64, generator=g) * 2 - 1
    x = 0.999**0.5 * train[:2] + 0.001**0.5 * torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=g)
    for padding in ("zeros", "circular"):
        machine = ScoreMachine(train, kind="els", padding=padding, wrap_training_patches=padding == "zeros")
        want = machine.denoise(x, 0.999, patch_size=5)
        torch.testing.assert_close(released_els(x, train, 0.999, 5, padding, batch_images=2), want)


def test_baseline_rejects_bad_arguments():
    x, train = torch.zeros(1, 1, 6, 6), torch.zeros(2, 1, 6, 6)
    with pytest.raises(ValueError, match="odd and at most 6"):
        released_els(x, train, 0.5, 7)
    with pytest.raises(ValueError, match="circular padding only"):
        released_els(x, train, 0.5, 3, "zeros", wrap_training_patches=True)
