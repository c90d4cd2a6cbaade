"""Bundled MNIST / Fashion-MNIST subsets and the ImageDataset API (patchmosaic.data)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from importlib import resources

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import patchmosaic.data as pmdata
from patchmosaic.data import (
    BUNDLED,
    FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
    ImageDataset,
    load_dataset,
)

N_BUNDLED = 10_000


@pytest.fixture(scope="module")
def mnist() -> ImageDataset:
    return load_dataset("mnist")


@pytest.fixture(scope="module")
def fashion() -> ImageDataset:
    return load_dataset("fashion-mnist")


@pytest.fixture(scope="module")
def provenance() -> dict:
    return json.loads(resources.files("patchmosaic.data").joinpath("bundled", "provenance.json").read_text())


@pytest.mark.parametrize("name", ["mnist", "fashion"])
def test_bundled_shape_dtype_range(name: str, request: pytest.FixtureRequest) -> None:
    ds: ImageDataset = request.getfixturevalue(name)
    assert ds.images.shape == (N_BUNDLED, 1, 32, 32)
    assert ds.images.dtype == torch.float32
    assert ds.images.min() == -1.0 and ds.images.max() == 1.0
    assert ds.labels is not None and ds.labels.shape == (N_BUNDLED,) and ds.labels.dtype == torch.int64
    assert len(ds) == N_BUNDLED


def test_bundled_names_and_classes(mnist: ImageDataset, fashion: ImageDataset) -> None:
    assert BUNDLED == ("mnist", "fashion-mnist")
    assert mnist.name == "mnist" and mnist.classes == MNIST_CLASSES == tuple("0123456789")
    assert fashion.name == "fashion-mnist" and fashion.classes == FASHION_MNIST_CLASSES
    assert fashion.classes[0] == "T-shirt/top" and fashion.classes[9] == "Ankle boot"
    alias = load_dataset("fashion", n_train=50)
    assert alias.name == "fashion-mnist" and torch.equal(alias.images, fashion.images[:50])


def test_label_counts(mnist: ImageDataset, fashion: ImageDataset, provenance: dict) -> None:
    assert torch.bincount(fashion.labels, minlength=10).tolist() == [1000] * 10
    mnist_counts = torch.bincount(mnist.labels, minlength=10).tolist()
    assert sum(mnist_counts) == N_BUNDLED and min(mnist_counts) > 800
    assert mnist_counts == provenance["datasets"]["mnist"]["label_counts"]


def test_prefixes_are_class_balanced(mnist: ImageDataset, fashion: ImageDataset) -> None:
    for k in (1, 5, 10, 100):
        assert torch.bincount(fashion.labels[: 10 * k], minlength=10).tolist() == [k] * 10
    counts = torch.bincount(mnist.labels[:100], minlength=10)
    assert counts.min() >= 8 and counts.max() <= 12


def test_pixels_are_original_bytes_upright_and_not_inverted(mnist: ImageDataset, fashion: ImageDataset) -> None:
    raw = load_dataset("mnist", size=None)
    assert raw.images.shape == (N_BUNDLED, 1, 28, 28)
    pixels = (raw.images + 1.0) * 127.5  # [N, 1, 28, 28] in [0, 255]
    torch.testing.assert_close(pixels, pixels.round(), atol=1e-4, rtol=0)  # exact uint8 values
    for ds in (mnist, fashion):
        assert (ds.images[:, :, 0, 0] == -1.0).float().mean() > 0.95  # black background corners
    # "1"s and trousers are tall and thin: ink spreads more along rows (H) than columns (W).
    for ds, cls in ((raw, 1), (load_dataset("fashion", size=None), 1)):
        mean = (ds.images[ds.labels == cls, 0] + 1.0).mean(0)  # [28, 28], ink >= 0
        coords = torch.arange(28, dtype=torch.float32)
        p_row, p_col = mean.sum(1) / mean.sum(), mean.sum(0) / mean.sum()  # [28], [28]
        var_row = (p_row * (coords - (p_row * coords).sum()) ** 2).sum()
        var_col = (p_col * (coords - (p_col * coords).sum()) ** 2).sum()
        assert var_row > 2.0 * var_col


def test_resize_rule_is_bilinear_no_antialias(mnist: ImageDataset) -> None:
    raw = load_dataset("mnist", size=None, n_train=20)
    expected = F.interpolate(raw.images, size=(32, 32), mode="bilinear", align_corners=False, antialias=False)
    torch.testing.assert_close(mnist.images[:20], expected)  # resize commutes with the affine x/127.5 - 1
    assert torch.equal(load_dataset("mnist", size=28, n_train=20).images, raw.images)
    assert load_dataset("mnist", size=16, n_train=3).images.shape == (3, 1, 16, 16)


def test_subset_takes_first_n(fashion: ImageDataset) -> None:
    sub = fashion.subset(30)
    assert len(sub) == 30 and sub.classes == fashion.classes and sub.name == fashion.name
    assert torch.equal(sub.images, fashion.images[:30]) and torch.equal(sub.labels, fashion.labels[:30])
    assert len(fashion.subset(N_BUNDLED)) == N_BUNDLED
    via_load = load_dataset("fashion-mnist", n_train=30)
    assert torch.equal(via_load.images, sub.images) and torch.equal(via_load.labels, sub.labels)


@pytest.mark.parametrize("n", [0, -1, N_BUNDLED + 1, True, 2.0])
def test_subset_rejects_bad_n(fashion: ImageDataset, n: object) -> None:
    with pytest.raises(ValueError, match="subset size n must be"):
        fashion.subset(n)  # type: ignore[arg-type]


def test_load_dataset_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n_train"):
        load_dataset("mnist", n_train=0)
    with pytest.raises(ValueError, match="n_train"):
        load_dataset("mnist", n_train=N_BUNDLED + 1)
    with pytest.raises(ValueError, match="size"):
        load_dataset("mnist", size=0)
    with pytest.raises(ValueError, match="split"):
        load_dataset("mnist", split="val")
    with pytest.raises(ValueError, match="single split"):
        load_dataset("mnist", split="test")


def test_deterministic(mnist: ImageDataset) -> None:
    again = load_dataset("mnist")
    assert torch.equal(again.images, mnist.images) and torch.equal(again.labels, mnist.labels)


def test_provenance_matches_files(provenance: dict) -> None:
    expected_licences = {"mnist": "CC BY-SA 3.0", "fashion-mnist": "MIT"}
    for name in BUNDLED:
        entry = provenance["datasets"][name]
        path = resources.files("patchmosaic.data").joinpath("bundled", entry["file"])
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        assert entry["num_images"] == N_BUNDLED
        assert entry["npm"]["package"] == name and entry["npm"]["version"]
        assert entry["npm"]["licence"] == "MIT"
        assert entry["dataset"]["licence"] == expected_licences[name]
        assert "seed" in entry["subset"] and "rule" in entry["subset"]
        with np.load(str(path)) as z:
            assert z["images"].dtype == np.uint8 and z["images"].shape == (N_BUNDLED, 28, 28)


def test_corrupt_bundled_file_is_detected(monkeypatch: pytest.MonkeyPatch, provenance: dict) -> None:
    wrong = json.loads(json.dumps(provenance))
    wrong["datasets"]["mnist"]["sha256"] = "0" * 64
    monkeypatch.setattr(pmdata, "_bundled_provenance", lambda: wrong)
    with pytest.raises(ValueError, match="sha256"):
        load_dataset("mnist")


def test_image_dataset_validates() -> None:
    images = torch.zeros(3, 1, 4, 4)
    with pytest.raises(ValueError, match="float32"):
        ImageDataset("x", images.double(), None, None)
    with pytest.raises(ValueError, match="labels"):
        ImageDataset("x", images, torch.zeros(2, dtype=torch.int64), None)
    with pytest.raises(ValueError, match="classes"):
        ImageDataset("x", images, torch.tensor([0, 1, 2]), ("a", "b"))
    assert "images=[3, 1, 4, 4]" in repr(ImageDataset("x", images, None, None))


def test_torchvision_spec() -> None:
    with pytest.raises(ValueError, match="unknown torchvision dataset"):
        load_dataset("torchvision:svhn")
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed; the missing-extra message cannot be checked")
    with pytest.raises(ImportError, match=r"pip install patchmosaic\[download\]"):
        load_dataset("torchvision:mnist")


def test_module_does_not_import_torchvision() -> None:
    source = resources.files("patchmosaic.data").joinpath("__init__.py").read_text()
    top_level = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert not any("torchvision" in line for line in top_level)
