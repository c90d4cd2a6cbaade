"""Readers of on-disk formats (patchmosaic.data.formats) and path auto-detection in load_dataset.

Every test writes its own tiny files under tmp_path.
"""

from __future__ import annotations

import collections
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from patchmosaic.data import CIFAR10_CLASSES, load_dataset
from patchmosaic.data.formats import (
    image_folder_classes,
    read_cifar10,
    read_idx,
    read_idx_array,
    read_image_folder,
    read_npz,
)

# ---------------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """Serialize an array as IDX: 0x0000, type byte, ndim byte, big-endian dims, big-endian data."""
    dtype = {0x08: ">u1", 0x0B: ">i2"}[type_code]
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(dtype).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = False, type_code: int = 0x08) -> Path:
    data = idx_bytes(array, type_code)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def random_uint8(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def write_cifar_batch(path: Path, images: np.ndarray, labels: list[int]) -> None:
    """images uint8 [n, 3, 32, 32] -> official layout b'data' [n, 3072] (R plane, G plane, B plane)."""
    batch = {b"batch_label": b"fake", b"data": images.reshape(len(images), -1), b"labels": labels}
    path.write_bytes(pickle.dumps(batch, protocol=2))


# -------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    images = random_uint8((5, 4, 3))  # [N, H, W], non-square to catch transposes
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    suffix = ".gz" if gz else ""
    img_path = write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images, gz)
    lab_path = write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, gz)
    got_images, got_labels = read_idx(img_path, lab_path)
    assert got_images.dtype == np.uint8 and got_images.shape == (5, 1, 4, 3)
    np.testing.assert_array_equal(got_images[:, 0], images)
    assert got_labels is not None and got_labels.dtype == np.int64
    np.testing.assert_array_equal(got_labels, labels)


def test_read_idx_without_labels(tmp_path: Path) -> None:
    images, labels = read_idx(write_idx(tmp_path / "imgs", random_uint8((2, 3, 3))))
    assert images.shape == (2, 1, 3, 3) and labels is None


def test_read_idx_array_other_types(tmp_path: Path) -> None:
    array = np.array([[-2, 300], [7, -32000]], dtype=np.int16)
    got = read_idx_array(write_idx(tmp_path / "shorts", array, type_code=0x0B))
    assert got.dtype == np.int16
    np.testing.assert_array_equal(got, array)


def test_read_idx_gzip_detected_by_content(tmp_path: Path) -> None:
    images = random_uint8((2, 3, 3))
    got, _ = read_idx(write_idx(tmp_path / "no-gz-suffix", images, gz=True))
    np.testing.assert_array_equal(got[:, 0], images)


def test_read_idx_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad"
    path.write_bytes(b"\x01\x02\x08\x03" + bytes(100))
    with pytest.raises(ValueError, match="magic"):
        read_idx(path)


def test_read_idx_truncated(tmp_path: Path) -> None:
    path = tmp_path / "trunc"
    path.write_bytes(idx_bytes(random_uint8((3, 4, 4)))[:-5])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def test_read_idx_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "trunc"
    path.write_bytes(idx_bytes(random_uint8((3, 4, 4)))[:9])
    with pytest.raises(ValueError, match="truncated IDX header"):
        read_idx(path)


def test_read_idx_trailing_bytes(tmp_path: Path) -> None:
    path = tmp_path / "long"
    path.write_bytes(idx_bytes(random_uint8((3, 4, 4))) + b"\x00")
    with pytest.raises(ValueError, match="trailing"):
        read_idx(path)


def test_read_idx_truncated_gzip(tmp_path: Path) -> None:
    path = tmp_path / "imgs.gz"
    path.write_bytes(gzip.compress(idx_bytes(random_uint8((3, 4, 4))))[:-10])
    with pytest.raises(ValueError, match="gzip"):
        read_idx(path)


def test_read_idx_label_count_mismatch(tmp_path: Path) -> None:
    img_path = write_idx(tmp_path / "imgs", random_uint8((3, 2, 2)))
    lab_path = write_idx(tmp_path / "labs", np.arange(4, dtype=np.uint8))
    with pytest.raises(ValueError, match="4 labels for 3 images"):
        read_idx(img_path, lab_path)


def test_read_idx_labels_file_as_images(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="idx3-ubyte"):
        read_idx(write_idx(tmp_path / "labs", np.arange(4, dtype=np.uint8)))


def test_read_idx_empty(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        read_idx(write_idx(tmp_path / "imgs", np.zeros((0, 28, 28), dtype=np.uint8)))


def test_read_idx_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope-idx3-ubyte"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        read_idx(missing)


# --------------------------------------------------------------------- CIFAR-10


@pytest.fixture()
def cifar_dir(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """Two 3-image training batches and a 2-image test batch."""
    images = random_uint8((8, 3, 32, 32), seed=1)
    labels = np.array([0, 9, 2, 3, 4, 5, 6, 7])
    write_cifar_batch(tmp_path / "data_batch_1", images[:3], labels[:3].tolist())
    write_cifar_batch(tmp_path / "data_batch_2", images[3:6], labels[3:6].tolist())
    write_cifar_batch(tmp_path / "test_batch", images[6:], labels[6:].tolist())
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"x"]}))
    return tmp_path, images, labels


def test_read_cifar10_train_and_test(cifar_dir: tuple[Path, np.ndarray, np.ndarray]) -> None:
    directory, images, labels = cifar_dir
    train_images, train_labels = read_cifar10(directory)
    assert train_images.shape == (6, 3, 32, 32) and train_images.dtype == np.uint8
    np.testing.assert_array_equal(train_images, images[:6])
    np.testing.assert_array_equal(train_labels, labels[:6])
    assert train_labels.dtype == np.int64
    test_images, test_labels = read_cifar10(directory, split="test")
    np.testing.assert_array_equal(test_images, images[6:])
    np.testing.assert_array_equal(test_labels, labels[6:])


def test_read_cifar10_channel_layout(tmp_path: Path) -> None:
    row = np.concatenate([np.full(1024, 10), np.full(1024, 20), np.full(1024, 30)]).astype(np.uint8)
    row[1] = 99  # red plane, row 0, column 1
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": row[None], b"labels": [1]}))
    images, _ = read_cifar10(tmp_path)
    assert images[0, :, 5, 5].tolist() == [10, 20, 30]
    assert images[0, 0, 0, 1] == 99


def test_read_cifar10_numpy1_era_pickle(tmp_path: Path) -> None:
    """The official batches name numpy.core.multiarray (numpy 1.x); that must still load."""
    data = random_uint8((2, 3072), seed=8)
    raw = pickle.dumps({b"data": data, b"labels": [4, 2]}, protocol=0)
    (tmp_path / "data_batch_1").write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    images, labels = read_cifar10(tmp_path)
    np.testing.assert_array_equal(images.reshape(2, -1), data)
    assert labels.tolist() == [4, 2]


def test_read_cifar10_batch_gap(tmp_path: Path) -> None:
    for name in ("data_batch_1", "data_batch_3"):
        write_cifar_batch(tmp_path / name, random_uint8((1, 3, 32, 32)), [0])
    with pytest.raises(ValueError, match="gap"):
        read_cifar10(tmp_path)


def test_read_cifar10_refuses_foreign_globals(tmp_path: Path) -> None:
    batch = collections.OrderedDict({b"data": random_uint8((1, 3072)), b"labels": [0]})
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(batch))
    with pytest.raises(ValueError, match="refusing to load global collections.OrderedDict"):
        read_cifar10(tmp_path)


def test_read_cifar10_corrupt_and_malformed(tmp_path: Path) -> None:
    (tmp_path / "data_batch_1").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="data_batch_1"):
        read_cifar10(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match="3072"):
        read_cifar10(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}))
    with pytest.raises(ValueError, match="labels"):
        read_cifar10(tmp_path)


def test_read_cifar10_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        read_cifar10(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        read_cifar10(tmp_path)
    with pytest.raises(FileNotFoundError, match="test_batch"):
        read_cifar10(tmp_path, split="test")
    with pytest.raises(ValueError, match="split"):
        read_cifar10(tmp_path, split="val")


# ------------------------------------------------------------------ image folder


def save_image(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_read_image_folder_with_classes(tmp_path: Path) -> None:
    gray = random_uint8((3, 5, 4), seed=2)  # [N, H, W], W != H to catch transposes
    save_image(tmp_path / "dog" / "b.png", gray[0])
    save_image(tmp_path / "cat" / "x.png", gray[1])
    save_image(tmp_path / "dog" / "a.png", gray[2])
    (tmp_path / "dog" / "notes.txt").write_text("ignored: not an image suffix")
    images, labels = read_image_folder(tmp_path)
    assert images.shape == (3, 1, 5, 4) and images.dtype == np.uint8
    # sorted by relative path: cat/x.png, dog/a.png, dog/b.png
    np.testing.assert_array_equal(images[:, 0], gray[[1, 2, 0]])
    assert labels is not None and labels.tolist() == [0, 1, 1] and labels.dtype == np.int64
    assert image_folder_classes(tmp_path) == ("cat", "dog")


def test_read_image_folder_nested_below_class(tmp_path: Path) -> None:
    save_image(tmp_path / "b" / "deep" / "1.png", random_uint8((4, 4)))
    save_image(tmp_path / "a" / "2.png", random_uint8((4, 4)))
    _, labels = read_image_folder(tmp_path)
    assert labels is not None and labels.tolist() == [0, 1]


def test_read_image_folder_flat_unlabelled_rgb_promotion(tmp_path: Path) -> None:
    gray = random_uint8((6, 6), seed=3)
    rgb = random_uint8((6, 6, 3), seed=4)
    save_image(tmp_path / "0.png", gray)
    save_image(tmp_path / "1.PNG", rgb)
    images, labels = read_image_folder(tmp_path)
    assert labels is None and images.shape == (2, 3, 6, 6)
    np.testing.assert_array_equal(images[0], np.stack([gray] * 3))  # mode L replicated into RGB
    np.testing.assert_array_equal(images[1], rgb.transpose(2, 0, 1))


def test_read_image_folder_jpeg(tmp_path: Path) -> None:
    save_image(tmp_path / "a.jpg", np.full((8, 8, 3), 128, np.uint8))
    save_image(tmp_path / "b.jpeg", np.full((8, 8, 3), 64, np.uint8))
    images, _ = read_image_folder(tmp_path)
    assert images.shape == (2, 3, 8, 8)
    assert abs(int(images[0].mean()) - 128) <= 2 and abs(int(images[1].mean()) - 64) <= 2


def test_read_image_folder_mixed_sizes(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png", random_uint8((4, 4)))
    save_image(tmp_path / "b.png", random_uint8((5, 4)))
    with pytest.raises(ValueError, match=r"b\.png.*differs"):
        read_image_folder(tmp_path)


def test_read_image_folder_empty(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no .*images found"):
        read_image_folder(tmp_path)
    (tmp_path / "readme.txt").write_text("hi")
    (tmp_path / "sub").mkdir()
    with pytest.raises(ValueError, match="no .*images found"):
        read_image_folder(tmp_path)


def test_read_image_folder_root_and_subfolders(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png", random_uint8((4, 4)))
    save_image(tmp_path / "cls" / "b.png", random_uint8((4, 4)))
    with pytest.raises(ValueError, match="both directly"):
        read_image_folder(tmp_path)


def test_read_image_folder_corrupt_and_16bit(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="broken.png"):
        read_image_folder(tmp_path)
    (tmp_path / "broken.png").unlink()
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(ValueError, match="deep.png.*mode"):
        read_image_folder(tmp_path)


def test_read_image_folder_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        read_image_folder(tmp_path / "nope")


# -------------------------------------------------------------------------- npz

GRAY = random_uint8((3, 4, 5), seed=5)  # [N, H, W]
RGB = random_uint8((3, 3, 4, 5), seed=6)  # [N, C, H, W]


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (GRAY, GRAY[:, None]),  # [N, H, W]
        (GRAY[:, None], GRAY[:, None]),  # [N, 1, H, W]
        (GRAY[..., None], GRAY[:, None]),  # [N, H, W, 1]
        (RGB, RGB),  # [N, 3, H, W]
        (RGB.transpose(0, 2, 3, 1), RGB),  # [N, H, W, 3]
        (GRAY.astype(np.float32) / 255.0, GRAY[:, None]),  # float in [0, 1]
        (GRAY.astype(np.float64) / 127.5 - 1.0, GRAY[:, None]),  # float in [-1, 1]
        (GRAY.astype(np.int64), GRAY[:, None]),  # integer 0..255
    ],
    ids=["NHW", "N1HW", "NHW1", "N3HW", "NHW3", "float01", "float-11", "int64"],
)
def test_read_npz_layouts(tmp_path: Path, stored: np.ndarray, expected: np.ndarray) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, images=stored, labels=np.array([2, 0, 1]))
    images, labels = read_npz(path)
    assert images.dtype == np.uint8 and images.flags.c_contiguous
    np.testing.assert_array_equal(images, expected)
    assert labels is not None and labels.dtype == np.int64 and labels.tolist() == [2, 0, 1]


def test_read_npz_without_labels(tmp_path: Path) -> None:
    np.savez_compressed(tmp_path / "d.npz", images=GRAY)
    _, labels = read_npz(tmp_path / "d.npz")
    assert labels is None


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"x": GRAY}, "no 'images'"),
        ({"images": GRAY[0, 0]}, "3-D or 4-D"),
        ({"images": np.zeros((0, 4, 4), np.uint8)}, "non-empty"),
        ({"images": np.zeros((2, 4, 4, 2), np.uint8)}, r"shape \[2, 4, 4, 2\]"),
        ({"images": np.full((2, 4, 4), 1.5)}, r"\[0, 1\] or \[-1, 1\]"),
        ({"images": np.full((2, 4, 4), np.nan)}, "NaN"),
        ({"images": np.full((2, 4, 4), 300)}, "0..255"),
        ({"images": np.ones((2, 4, 4), bool)}, "dtype bool"),
        ({"images": GRAY, "labels": np.arange(2)}, "2 labels for 3 images"),
        ({"images": GRAY, "labels": np.ones(3) / 2}, "integer"),
        ({"images": GRAY, "labels": np.array([0, -1, 2])}, "negative"),
    ],
)
def test_read_npz_errors(tmp_path: Path, arrays: dict[str, np.ndarray], match: str) -> None:
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        read_npz(tmp_path / "d.npz")


def test_read_npz_not_an_archive(tmp_path: Path) -> None:
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 definitely truncated")
    with pytest.raises(ValueError, match="junk.npz"):
        read_npz(tmp_path / "junk.npz")
    np.save(tmp_path / "single.npy", GRAY)
    (tmp_path / "single.npy").rename(tmp_path / "single.npz")
    with pytest.raises(ValueError, match="single .npy"):
        read_npz(tmp_path / "single.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        read_npz(tmp_path / "missing.npz")


# ------------------------------------------------------ load_dataset on paths


def test_load_dataset_idx_dir_resizes_and_scales(tmp_path: Path) -> None:
    images = random_uint8((4, 28, 28), seed=7)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([1, 2, 3, 4], np.uint8), gz=True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images[:2])
    ds = load_dataset(str(tmp_path))
    assert ds.images.shape == (4, 1, 32, 32) and ds.images.dtype == torch.float32
    expected = F.interpolate(
        torch.from_numpy(images[:, None]).float(), size=(32, 32), mode="bilinear", align_corners=False, antialias=False
    ) / 127.5 - 1.0
    torch.testing.assert_close(ds.images, expected)
    assert ds.labels is not None and ds.labels.tolist() == [1, 2, 3, 4] and ds.classes is None
    raw = load_dataset(str(tmp_path), size=None)
    torch.testing.assert_close(raw.images[:, 0], torch.from_numpy(images).float() / 127.5 - 1.0)
    test = load_dataset(str(tmp_path), split="test", size=None)
    assert len(test) == 2 and test.labels is None


def test_load_dataset_cifar_dir(cifar_dir: tuple[Path, np.ndarray, np.ndarray]) -> None:
    directory, images, _ = cifar_dir
    ds = load_dataset(str(directory), n_train=4)
    assert ds.images.shape == (4, 3, 32, 32) and ds.classes == CIFAR10_CLASSES
    torch.testing.assert_close(ds.images, torch.from_numpy(images[:4]).float() / 127.5 - 1.0)
    assert len(load_dataset(str(directory), split="test")) == 2


def test_load_dataset_image_folder_and_npz(tmp_path: Path) -> None:
    save_image(tmp_path / "folder" / "b" / "0.png", np.zeros((8, 8), np.uint8))
    save_image(tmp_path / "folder" / "a" / "0.png", np.full((8, 8), 255, np.uint8))
    ds = load_dataset(str(tmp_path / "folder"), size=16)
    assert ds.images.shape == (2, 1, 16, 16) and ds.classes == ("a", "b")
    assert ds.images[0].eq(1.0).all() and ds.images[1].eq(-1.0).all()
    np.savez(tmp_path / "d.npz", images=RGB.transpose(0, 2, 3, 1))
    ds = load_dataset(tmp_path / "d.npz", size=None)  # os.PathLike is accepted too
    assert ds.images.shape == (3, 3, 4, 5) and ds.labels is None


def test_load_dataset_path_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        load_dataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a recognised dataset directory"):
        load_dataset(str(tmp_path / "empty"))
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(ValueError, match="unsupported dataset file"):
        load_dataset(str(tmp_path / "x.csv"))
    (tmp_path / "idx").mkdir()
    write_idx(tmp_path / "idx" / "train-images-idx3-ubyte", random_uint8((2, 4, 4)))
    with pytest.raises(FileNotFoundError, match="t10k-images"):
        load_dataset(str(tmp_path / "idx"), split="test")
    save_image(tmp_path / "wide" / "0.png", np.zeros((4, 6), np.uint8))
    with pytest.raises(ValueError, match="not square"):
        load_dataset(str(tmp_path / "wide"))
    assert load_dataset(str(tmp_path / "wide"), size=None).images.shape == (1, 1, 4, 6)
    with pytest.raises(ValueError, match="single split"):
        load_dataset(str(tmp_path / "wide"), split="test", size=None)
