"""Bad inputs to ScoreMachine get a ValueError that names the problem."""

from __future__ import annotations

import pytest
import torch

from patchmosaic import ScoreMachine

TRAIN = torch.rand(4, 1, 6, 6) * 2 - 1
LABELS = torch.tensor([0, 1, 0, 1])


def _els(**kw):
    return ScoreMachine(TRAIN, kind="els", labels=LABELS, **kw)


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="nope"), "unknown machine kind"),
    (dict(kind="els", padding="reflect"), "unknown padding"),
    (dict(kind="es", padding="zeros"), "circular padding only"),
    (dict(kind="els", labels=[0, 1]), r"labels must have shape \[N\] = \[4\]"),
    (dict(kind="els", labels=[0.5, 1, 0, 1]), "labels must be integers"),
    (dict(kind="els", chunk_elements=0), "chunk_elements must be positive"),
    (dict(kind="els", workers=0), "workers must be a positive integer"),
    (dict(kind="els", workers=True), "workers must be a positive integer"),
    (dict(kind="els", workers=2, distributed=True), "cannot be combined with distributed"),
])
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScoreMachine(TRAIN, **kwargs)


@pytest.mark.parametrize("train,match", [
    (torch.rand(0, 1, 6, 6), "empty training set"),
    (torch.rand(1, 6, 6), r"shape \[N, C, H, W\]"),
    (torch.randint(0, 255, (2, 1, 6, 6)), "floating point"),
    (torch.tensor([[[[float("nan")]]]]), "train_images contains NaN"),
    (torch.tensor([[[[float("inf")]]]]), "train_images contains NaN or infinite"),
])
def test_bad_training_images(train, match):
    with pytest.raises(ValueError, match=match):
        ScoreMachine(train, kind="ideal")


@pytest.mark.parametrize("x,match", [
    (torch.randn(1, 6, 6), "missing batch dimension"),
    (torch.randn(1, 2, 6, 6), "2 channels but the training images have 1"),
    (torch.randn(1, 1, 6, 7), "x_t is 6x7 but the training images are 6x6"),
    (torch.full((1, 1, 6, 6), float("nan")), "x_t contains NaN"),
    (torch.ones(1, 1, 6, 6, dtype=torch.int64), "x_t is torch.int64: closed-form denoisers compute in float32 or float64"),
    (torch.randn(1, 1, 6, 6, dtype=torch.bfloat16), "float32 or float64"),
])
def test_bad_queries(x, match):
    with pytest.raises(ValueError, match=match):
        _els().denoise(x, 0.5, patch_size=3)


@pytest.mark.parametrize("alpha_bar", [0.0, 1.0, -0.1, 1.5, float("nan"), torch.tensor([0.5, 0.5, 0.5])])
def test_alpha_bar_outside_open_interval(alpha_bar):
    with pytest.raises(ValueError, match="alpha_bar"):
        _els().denoise(torch.randn(2, 1, 6, 6), alpha_bar, patch_size=3)


@pytest.mark.parametrize("k,match", [(4, "must be odd"), (0, "must be positive"), (-3, "must be positive"),
                                     (None, "needs a patch_size"), (2.5, "odd positive integer")])
def test_bad_patch_size(k, match):
    with pytest.raises(ValueError, match=match):
        _els().denoise(torch.randn(1, 1, 6, 6), 0.5, patch_size=k)


def test_patch_size_does_not_apply_to_ideal_and_too_large_for_circular():
    with pytest.raises(ValueError, match="does not apply"):
        ScoreMachine(TRAIN, kind="ideal").denoise(torch.randn(1, 1, 6, 6), 0.5, patch_size=3)
    with pytest.raises(ValueError, match="too large for circular"):
        ScoreMachine(TRAIN, kind="els", padding="circular").denoise(torch.randn(1, 1, 6, 6), 0.5, patch_size=13)
    with pytest.raises(ValueError, match="no non-wrapping training patch"):
        ScoreMachine(TRAIN, kind="els", padding="circular", wrap_training_patches=False).denoise(
            torch.randn(1, 1, 6, 6), 0.5, patch_size=7)


def test_bad_labels():
    x = torch.randn(2, 1, 6, 6)
    with pytest.raises(ValueError, match=r"label\(s\) \[5\] not present"):
        _els().denoise(x, 0.5, patch_size=3, label=5)
    with pytest.raises(ValueError, match=r"\[B\] = \[2\]"):
        _els().denoise(x, 0.5, patch_size=3, label=torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="built without training labels"):
        ScoreMachine(TRAIN, kind="els").denoise(x, 0.5, patch_size=3, label=0)
