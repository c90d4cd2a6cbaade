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
@pytest.mark.parametrize("k", [3, 5])
def test_baseline_equals_machine(padding, wrap, k):
    train = torch.rand(7, 2, 9, 8, dtype=torch.float64) * 2 - 1
    x = torch.randn(2, 2, 9, 8, dtype=torch.float64)
    want = ScoreMachine(train, kind="els", padding=padding, wrap_training_patches=wrap).denoise(x, 0.4, patch_size=k)
    got = released_els(x, train, 0.4, k, padding, wrap_training_patches=wrap, batch_images=3)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
