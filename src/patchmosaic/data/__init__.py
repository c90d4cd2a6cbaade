"""Training sets for the score machines: bundled offline data and on-disk formats.

:func:`load_dataset` turns a spec string into an :class:`ImageDataset` of float32
images [N, C, H, W] in [-1, 1]:

* ``"mnist"``, ``"fashion-mnist"`` (alias ``"fashion"``): 10,000-image sets
  bundled with the package (see ``bundled/provenance.json`` and
  ``scripts/build_bundled_data.py``), stored in a seeded class-stratified order
  so that the first n images are class balanced.
* a path: a directory of IDX files, a CIFAR-10 ``cifar-10-batches-py``
  directory, an image folder, or an ``.npz`` file (see :mod:`.formats`).
* ``"torchvision:mnist"``, ``"torchvision:fashion-mnist"``,
  ``"torchvision:cifar10"``: the full datasets, downloaded by torchvision into
  ``~/.cache/patchmosaic`` (needs ``pip install patchmosaic[download]``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from patchmosaic.data.formats import (
    CIFAR10_TEST_BATCH,
    CIFAR10_TRAIN_BATCHES,
    image_folder_classes,
    read_cifar10,
    read_idx,
    read_image_folder,
    read_npz,
)

__all__ = [
    "BUNDLED",
    "CIFAR10_CLASSES",
    "FASHION_MNIST_CLASSES",
    "MNIST_CLASSES",
    "ImageDataset",
    "load_dataset",
]

BUNDLED = ("mnist", "fashion-mnist")
_ALIASES = {"mnist": "mnist", "fashion-mnist": "fashion-mnist", "fashion": "fashion-mnist"}
TORCHVISION = ("mnist", "fashion-mnist", "cifar10")
SPLITS = ("train", "test")

MNIST_CLASSES = tuple(str(d) for d in range(10))
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_CLASSES = {"mnist": MNIST_CLASSES, "fashion-mnist": FASHION_MNIST_CLASSES, "cifar10": CIFAR10_CLASSES}

CACHE_DIR = Path.home() / ".cache" / "patchmosaic"


def _check_count(n: int, total: int, what: str) -> None:
    """Raise unless ``1 <= n <= total`` for an integer ``n``."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ValueError(f"{what} must be an integer, got {n!r}")
    if not 1 <= n <= total:
        raise ValueError(f"{what} must be in 1..{total} (the dataset size), got {n}")


@dataclass(frozen=True, eq=False, repr=False)
class ImageDataset:
    """A labelled or unlabelled set of training images for a score machine."""

    name: str  # "mnist", "fashion-mnist", "torchvision:cifar10" or the path it was read from
    images: torch.Tensor  # [N, C, H, W] float32 in [-1, 1]
    labels: torch.Tensor | None  # [N] int64 class indices, or None
    classes: tuple[str, ...] | None  # classes[label] is the class name, or None

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != torch.float32 or len(self.images) == 0:
            raise ValueError(
                f"{self.name}: images must be a non-empty float32 [N, C, H, W] tensor, "
                f"got {self.images.dtype} {list(self.images.shape)}"
            )
        if self.labels is not None:
            if self.labels.shape != (len(self.images),) or self.labels.dtype != torch.int64:
                raise ValueError(
                    f"{self.name}: labels must be int64 [{len(self.images)}], "
                    f"got {self.labels.dtype} {list(self.labels.shape)}"
                )
            if self.classes is not None and int(self.labels.max()) >= len(self.classes):
                raise ValueError(f"{self.name}: label {int(self.labels.max())} but only {len(self.classes)} classes")

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        n_classes = "unlabelled" if self.labels is None else f"{len(self.classes or ())} classes"
        return f"ImageDataset(name={self.name!r}, images={list(self.images.shape)}, {n_classes})"

    def subset(self, n: int) -> ImageDataset:
        """The first ``n`` images (bundled sets are stored class balanced per prefix).

        Args:
            n: Number of images to keep, ``1 <= n <= len(self)``.

        Returns:
            A dataset sharing storage with this one (views, no copy).

        Raises:
            ValueError: If ``n`` is not an integer in ``1..len(self)``.
        """
        _check_count(n, len(self), "subset size n")
        labels = None if self.labels is None else self.labels[:n]  # [n]
        return ImageDataset(self.name, self.images[:n], labels, self.classes)  # [n, C, H, W]


def load_dataset(
    spec: str | os.PathLike[str], *, n_train: int | None = None, size: int | None = 32, split: str = "train"
) -> ImageDataset:
    """Load a training set as float32 images in [-1, 1].

    Spec resolution, first match wins:
        1. ``"mnist"``, ``"fashion-mnist"``, ``"fashion"``: bundled data
           (single split; ``split`` must be ``"train"``).
        2. ``"torchvision:<name>"`` with name in ``mnist``, ``fashion-mnist``
           (alias ``fashion``), ``cifar10``: downloaded into ``~/.cache/patchmosaic``.
        3. A path. A ``.npz`` file is read with :func:`~.formats.read_npz`. A
           directory holding ``train-images-idx3-ubyte[.gz]`` (or ``t10k-`` for
           ``split="test"``) is read as IDX, with the matching ``*-labels-idx1-ubyte``
           file if present; one holding ``data_batch_1`` or ``test_batch`` as
           CIFAR-10; otherwise one holding images as an image folder. (A local
           directory called ``mnist`` must be given as ``./mnist``.)

    Processing: ``n_train`` keeps the first ``n_train`` images (as
    :meth:`ImageDataset.subset`); images are then resized to ``size`` x
    ``size`` by bilinear interpolation (``F.interpolate(..., mode="bilinear",
    align_corners=False, antialias=False)``, the paper's 28 -> 32 MNIST resize)
    unless ``size`` is ``None`` or already equal, and scaled by
    ``x / 127.5 - 1`` from uint8 to [-1, 1].

    Args:
        spec: Bundled name, ``torchvision:<name>`` or a path (str or ``os.PathLike``).
        n_train: Keep only the first ``n_train`` images (``None``: all).
        size: Output side length, or ``None`` to keep the stored size.
        split: ``"train"`` or ``"test"`` (IDX, CIFAR-10 and torchvision only).

    Returns:
        The dataset; ``images`` float32 [N, C, size, size].

    Raises:
        FileNotFoundError: If a path spec does not exist.
        ValueError: On an unknown split, an unsupported split for the source, a
            bad ``n_train`` or ``size``, non-square images with a ``size``, a
            path that matches no format, or a corrupt input.
        ImportError: For a ``torchvision:`` spec without torchvision installed.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be a positive integer or None, got {size!r}")

    spec = os.fspath(spec)
    key = spec.lower()
    if key in _ALIASES:
        if split != "train":
            raise ValueError(f"the bundled {_ALIASES[key]!r} set has a single split; use split='train'")
        name = _ALIASES[key]
        images, labels = _read_bundled(name)
        classes = _CLASSES[name]
    elif key.startswith("torchvision:"):
        name = spec
        dataset = key.removeprefix("torchvision:")
        images, labels, classes = _download_torchvision(_ALIASES.get(dataset, dataset), split)
    else:
        name = spec
        images, labels, classes = _read_path(Path(spec).expanduser(), split)

    if n_train is not None:
        _check_count(n_train, len(images), "n_train")
        images = images[:n_train]  # [n, C, H, W]
        labels = None if labels is None else labels[:n_train]  # [n]
    return ImageDataset(
        name=name,
        images=_to_unit_range(torch.from_numpy(np.ascontiguousarray(images)), size, name),
        labels=None if labels is None else torch.from_numpy(labels.astype(np.int64)),
        classes=classes,
    )


def _to_unit_range(images: torch.Tensor, size: int | None, name: str) -> torch.Tensor:
    """Resize uint8 images [N, C, H, W] bilinearly and map them to [-1, 1] float32."""
    x = images.to(torch.float32)  # [N, C, H, W] in [0, 255]
    height, width = x.shape[-2:]
    if size is not None and (height, width) != (size, size):
        if height != width:
            raise ValueError(
                f"{name}: images are {height}x{width}, not square; resizing to {size}x{size} would distort "
                "them, so crop them first or keep the stored size (--size native on the command line, "
                "size=None in load_dataset)"
            )
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)  # [N, C, s, s]
    return x / 127.5 - 1.0  # [N, C, s, s] in [-1, 1]


# ------------------------------------------------------------------- bundled


def _bundled_provenance() -> dict:
    """The parsed ``bundled/provenance.json``."""
    return json.loads(resources.files(__name__).joinpath("bundled", "provenance.json").read_text())


def _read_bundled(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a bundled npz after checking its sha256 against ``provenance.json``."""
    entry = _bundled_provenance()["datasets"][name]
    resource = resources.files(__name__).joinpath("bundled", entry["file"])
    with resources.as_file(resource) as path:
        if not path.is_file():
            raise FileNotFoundError(
                f"bundled data file missing: {path}; rebuild it with `python scripts/build_bundled_data.py`"
            )
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != entry["sha256"]:
            raise ValueError(
                f"{path}: sha256 {digest} differs from provenance.json ({entry['sha256']}); the file is "
                "corrupt (e.g. a Git LFS pointer) or was rebuilt without its provenance"
            )
        images, labels = read_npz(path)  # [N, 1, 28, 28], [N]
    if labels is None:
        raise ValueError(f"bundled {name!r} has no labels")
    return images, labels


# --------------------------------------------------------------------- paths


def _first_existing(directory: Path, names: list[str]) -> Path | None:
    """The first of ``names`` that is a file in ``directory``."""
    return next((directory / n for n in names if (directory / n).is_file()), None)


def _read_path(path: Path, split: str) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...] | None]:
    """Auto-detect the on-disk format of ``path`` and read it."""
    if not path.exists():
        raise FileNotFoundError(
            f"dataset path not found: {path} (bundled names are {BUNDLED + ('fashion',)}; "
            f"downloads are 'torchvision:{{{','.join(TORCHVISION)}}}')"
        )
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise ValueError(f"{path}: unsupported dataset file; expected an .npz file or a dataset directory")
        _require_train_split(path, "an .npz file", split)
        images, labels = read_npz(path)
        return images, labels, None

    prefix = "train" if split == "train" else "t10k"
    idx_images = _first_existing(path, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images-idx3-ubyte.gz"])
    if idx_images is not None:
        idx_labels = _first_existing(path, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels-idx1-ubyte.gz"])
        images, labels = read_idx(idx_images, idx_labels)
        return images, labels, None
    if any((path / n).is_file() for n in (CIFAR10_TRAIN_BATCHES[0], CIFAR10_TEST_BATCH)):
        images, labels = read_cifar10(path, split)
        return images, labels, CIFAR10_CLASSES
    if any((path / n).is_file() for n in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")) or any(
        path.glob("*-images-idx3-ubyte.gz")
    ):
        raise FileNotFoundError(f"{path}: no {prefix}-images-idx3-ubyte[.gz] file for split {split!r}")
    _require_train_split(path, "an image folder", split)
    try:
        classes = image_folder_classes(path)
    except ValueError as err:
        raise ValueError(
            f"{path}: not a recognised dataset directory (no IDX train-/t10k-images-idx3-ubyte[.gz], "
            f"no CIFAR-10 data_batch_1/test_batch, and as an image folder: {err})"
        ) from err
    images, labels = read_image_folder(path)
    return images, labels, classes


def _require_train_split(path: Path, kind: str, split: str) -> None:
    """Sources with a single split only accept ``split="train"``."""
    if split != "train":
        raise ValueError(f"{path}: {kind} has a single split; use split='train'")


# ---------------------------------------------------------------- torchvision


def _download_torchvision(
    dataset: str, split: str
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Download a full dataset with torchvision into ``~/.cache/patchmosaic``.

    Returns:
        ``images`` uint8 [N, C, H, W], ``labels`` int64 [N] and the class names.
    """
    if dataset not in TORCHVISION:
        raise ValueError(f"unknown torchvision dataset {dataset!r}; choose from {TORCHVISION}")
    try:
        import torchvision.datasets as tvd  # optional extra, imported only here
    except ImportError as err:
        raise ImportError(
            "torchvision: datasets need torchvision; install it with `pip install patchmosaic[download]`"
        ) from err
    root = CACHE_DIR / "torchvision"
    train = split == "train"
    if dataset == "cifar10":
        ds = tvd.CIFAR10(root=str(root), train=train, download=True)
        images = np.asarray(ds.data, dtype=np.uint8).transpose(0, 3, 1, 2)  # [N, 32, 32, 3] -> [N, 3, 32, 32]
    else:
        cls = tvd.MNIST if dataset == "mnist" else tvd.FashionMNIST
        ds = cls(root=str(root), train=train, download=True)
        images = ds.data.numpy().astype(np.uint8)[:, None]  # [N, 1, 28, 28]
    labels = np.asarray(ds.targets, dtype=np.int64)  # [N]
    return np.ascontiguousarray(images), labels, _CLASSES[dataset]
