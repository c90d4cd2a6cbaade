"""Readers for standard on-disk image dataset formats.

Every reader returns ``(images, labels)``: ``images`` is a uint8 numpy array
[N, C, H, W] (C = 1 for grayscale, 3 for RGB) and ``labels`` an int64 numpy
array [N], or ``None`` when the format carries no labels. Conversion to float
tensors, resizing and scaling live in :func:`patchmosaic.data.load_dataset`.

Errors follow one rule: a missing file or directory raises ``FileNotFoundError``
naming the path; a corrupt, truncated, mismatched or empty input raises
``ValueError`` naming the file and the problem. Nothing is silently skipped.
"""

from __future__ import annotations

import gzip
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "CIFAR10_TEST_BATCH",
    "CIFAR10_TRAIN_BATCHES",
    "IMAGE_SUFFIXES",
    "image_folder_classes",
    "read_cifar10",
    "read_idx",
    "read_idx_array",
    "read_image_folder",
    "read_npz",
]

# --------------------------------------------------------------------------- IDX

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_maybe_gzip(path: Path) -> bytes:
    """Read a file's bytes, gunzipping when it starts with the gzip magic."""
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    raw = path.read_bytes()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile: OSError; truncation: EOFError; bad deflate: zlib
        raise ValueError(f"{path}: corrupt or truncated gzip data ({err})") from err


def read_idx_array(path: str | Path) -> np.ndarray:
    """Parse one IDX file (plain or gzip-compressed) into a numpy array.

    The IDX header is two zero bytes, a type byte (0x08 ubyte, 0x09 byte,
    0x0B short, 0x0C int, 0x0D float, 0x0E double), a byte with the number of
    dimensions d, then d big-endian uint32 sizes; the data follow big-endian.
    Gzip is detected from the content, not the file name.

    Args:
        path: An ``*-idx?-ubyte`` file, optionally ``.gz``.

    Returns:
        The array with the file's shape, in native byte order.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: On a bad magic number, an unknown type byte, or a data
            section whose length differs from what the header declares.
    """
    path = Path(path)
    raw = _read_maybe_gzip(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: {len(raw)} bytes is too short for an IDX header")
    zero1, zero2, type_code, ndim = struct.unpack(">BBBB", raw[:4])
    if zero1 != 0 or zero2 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x0000TTDD with type TT in "
            f"{{{', '.join(f'{t:02x}' for t in _IDX_DTYPES)}}} and DD >= 1 dimensions)"
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header_len} for {ndim} dims)")
    shape = struct.unpack(f">{ndim}I", raw[4:header_len])
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header_len
    if actual != expected:
        problem = "truncated" if actual < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: IDX data {problem}: header declares shape {shape} ({expected} bytes), file has {actual}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def read_idx(
    images_path: str | Path, labels_path: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read MNIST-style IDX image (and optionally label) files.

    Args:
        images_path: ``*-images-idx3-ubyte[.gz]``: uint8 [N, H, W].
        labels_path: ``*-labels-idx1-ubyte[.gz]``: uint8 [N], or ``None``.

    Returns:
        ``images`` uint8 [N, 1, H, W] and ``labels`` int64 [N] (or ``None``).

    Raises:
        FileNotFoundError: If a given file does not exist.
        ValueError: On a malformed file, a non-ubyte or wrongly shaped array,
            zero images, or a label count that differs from the image count.
    """
    images = read_idx_array(images_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(
            f"{images_path}: expected an idx3-ubyte image file (uint8 [N, H, W]), "
            f"got {images.dtype} {list(images.shape)}"
        )
    if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise ValueError(f"{images_path}: empty image array {list(images.shape)}")
    labels = None
    if labels_path is not None:
        raw_labels = read_idx_array(labels_path)
        if raw_labels.dtype != np.uint8 or raw_labels.ndim != 1:
            raise ValueError(
                f"{labels_path}: expected an idx1-ubyte label file (uint8 [N]), "
                f"got {raw_labels.dtype} {list(raw_labels.shape)}"
            )
        if len(raw_labels) != len(images):
            raise ValueError(
                f"{labels_path}: {len(raw_labels)} labels for {len(images)} images in {images_path}"
            )
        labels = raw_labels.astype(np.int64)  # [N]
    return images[:, None], labels  # [N, 1, H, W], [N]


# ----------------------------------------------------------------------- CIFAR-10

CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
_CIFAR_SIDE = 32
_CIFAR_ROW = 3 * _CIFAR_SIDE * _CIFAR_SIDE  # 3072 = 1024 R, 1024 G, 1024 B

# The globals a pickled numpy array may reference (numpy 1.x and 2.x names;
# Python 3 pickles of protocol < 3 also spell bytes as _codecs.encode(str, "latin1")).
_CIFAR_PICKLE_GLOBALS = frozenset(
    {
        ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that may only rebuild numpy arrays, dicts, lists and scalars."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Unpickle one CIFAR-10 batch into uint8 [n, 3, 32, 32] and int64 [n]."""
    try:
        with path.open("rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: not a valid CIFAR-10 python batch ({type(err).__name__}: {err})") from err
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = list(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{path}: expected a dict with b'data' and b'labels', got {keys}")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR_ROW:
        desc = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: b'data' must be uint8 [N, {_CIFAR_ROW}], got {desc}")
    labels = np.asarray(batch[b"labels"])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) != len(data):
        raise ValueError(
            f"{path}: b'labels' must be {len(data)} integers, got {labels.dtype} {list(labels.shape)}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels outside 0..9 (min {labels.min()}, max {labels.max()})")
    images = data.reshape(-1, 3, _CIFAR_SIDE, _CIFAR_SIDE)  # [n, 3, 32, 32]
    return images, labels.astype(np.int64)


def read_cifar10(directory: str | Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Read the CIFAR-10 "python version" batches from ``cifar-10-batches-py``.

    The official format is Python pickle. Only files named like the official
    batches are opened (``data_batch_1`` .. ``data_batch_5`` for ``"train"``,
    ``test_batch`` for ``"test"``), and they are unpickled with a restricted
    unpickler that can rebuild numpy arrays and builtin containers but refuses
    every other global, so a tampered batch cannot run code; still, only read
    batches from a source you trust.

    For ``"train"``, the batches present must be ``data_batch_1`` ..
    ``data_batch_k`` with no gap (a full download has k = 5); they are
    concatenated in order.

    Args:
        directory: The ``cifar-10-batches-py`` directory.
        split: ``"train"`` or ``"test"``.

    Returns:
        ``images`` uint8 [N, 3, 32, 32] and ``labels`` int64 [N].

    Raises:
        FileNotFoundError: If the directory or its first batch is missing.
        ValueError: On an unknown split, a gap in the batch numbers, or a
            corrupt or malformed batch.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"CIFAR-10 directory not found: {directory}")
    if split == "train":
        present = [name for name in CIFAR10_TRAIN_BATCHES if (directory / name).is_file()]
        if not present:
            raise FileNotFoundError(f"no CIFAR-10 training batch in {directory} (expected data_batch_1 .. 5)")
        if present != list(CIFAR10_TRAIN_BATCHES[: len(present)]):
            raise ValueError(
                f"{directory}: CIFAR-10 training batches {present} have a gap; expected data_batch_1 .. data_batch_k"
            )
    elif split == "test":
        present = [CIFAR10_TEST_BATCH]
        if not (directory / CIFAR10_TEST_BATCH).is_file():
            raise FileNotFoundError(f"CIFAR-10 test batch not found: {directory / CIFAR10_TEST_BATCH}")
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    batches = [_load_cifar_batch(directory / name) for name in present]
    images = np.concatenate([b[0] for b in batches])  # [N, 3, 32, 32]
    labels = np.concatenate([b[1] for b in batches])  # [N]
    if len(images) == 0:
        raise ValueError(f"{directory}: CIFAR-10 {split} batches hold no images")
    return images, labels


# ------------------------------------------------------------------ image folder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# Pillow modes that map to 8-bit RGB without a scaling choice (alpha is dropped).
_RGB_CONVERTIBLE_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"})


def _scan_image_folder(root: Path) -> tuple[list[Path], tuple[str, ...] | None]:
    """List image files under ``root`` and decide whether subfolders are classes.

    Returns:
        The image paths sorted by their path relative to ``root`` (POSIX string
        order), and the sorted class names (``None`` when unlabelled).
    """
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = sorted(
        (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise ValueError(f"{root}: no {'/'.join(IMAGE_SUFFIXES)} images found (searched recursively)")
    at_root = [p for p in files if p.parent == root]
    nested = [p for p in files if p.parent != root]
    if at_root and nested:
        raise ValueError(
            f"{root}: images sit both directly in the folder ({at_root[0].name}) and in subfolders "
            f"({nested[0].relative_to(root)}); put all of them in class subfolders or none"
        )
    if at_root:
        return files, None
    classes = tuple(sorted({p.relative_to(root).parts[0] for p in files}))
    return files, classes


def image_folder_classes(root: str | Path) -> tuple[str, ...] | None:
    """Class names of an image folder, as :func:`read_image_folder` assigns them.

    Args:
        root: The image folder.

    Returns:
        Sorted names of the immediate subfolders that contain images (label i
        is ``classes[i]``), or ``None`` when all images sit directly in ``root``.
    """
    return _scan_image_folder(Path(root))[1]


def read_image_folder(root: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read every ``.png``/``.jpg``/``.jpeg`` under a folder (recursively).

    Rules:
        * Order: files sorted by their POSIX path relative to ``root``.
        * Labels: if every image sits under an immediate subfolder (at any
          depth below it), the sorted names of those subfolders are the classes
          and an image's label is the index of its top-level subfolder; if every
          image sits directly in ``root``, labels are ``None``; a mix of both
          is an error.
        * Channels: 1 (grayscale) only if every image has Pillow mode ``"L"``;
          otherwise every image is converted to RGB (alpha is dropped, palette
          images are expanded). Modes with more than 8 bits (``"I;16"``,
          ``"I"``, ``"F"``) are rejected.
        * Size: all images must have the same width and height.

    Args:
        root: The image folder.

    Returns:
        ``images`` uint8 [N, C, H, W] with C in {1, 3}, and ``labels`` int64 [N]
        or ``None``.

    Raises:
        FileNotFoundError: If ``root`` is not a directory.
        ValueError: If no image is found, a file cannot be decoded, has an
            unsupported mode or a size different from the first image.
    """
    root = Path(root)
    files, classes = _scan_image_folder(root)
    modes: list[str] = []
    first_size: tuple[int, int] | None = None
    for path in files:  # header-only pass: validate before decoding anything
        try:
            with Image.open(path) as im:
                size, mode = im.size, im.mode
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{path}: cannot read image ({err})") from err
        if mode != "L" and mode not in _RGB_CONVERTIBLE_MODES:
            raise ValueError(f"{path}: unsupported image mode {mode!r} (need 8-bit grayscale, palette or RGB)")
        if first_size is None:
            first_size = size
        elif size != first_size:
            raise ValueError(
                f"{path}: size {size[0]}x{size[1]} differs from {first_size[0]}x{first_size[1]} of {files[0]}; "
                "all images in a folder must have the same size"
            )
        modes.append(mode)
    target_mode = "L" if all(m == "L" for m in modes) else "RGB"
    arrays = []
    for path in files:
        try:
            with Image.open(path) as im:
                arrays.append(np.asarray(im.convert(target_mode), dtype=np.uint8))  # [H, W] or [H, W, 3]
        except OSError as err:  # truncated data surfaces only on decode
            raise ValueError(f"{path}: cannot decode image ({err})") from err
    images = np.stack(arrays)  # [N, H, W] or [N, H, W, 3]
    images = images[:, None] if target_mode == "L" else images.transpose(0, 3, 1, 2)  # [N, C, H, W]
    labels = None
    if classes is not None:
        index = {name: i for i, name in enumerate(classes)}
        labels = np.array([index[p.relative_to(root).parts[0]] for p in files], dtype=np.int64)  # [N]
    return np.ascontiguousarray(images), labels


# ---------------------------------------------------------------------------- npz


def _to_uint8(images: np.ndarray, path: Path) -> np.ndarray:
    """Map an npz image array to uint8 by the rule documented in :func:`read_npz`."""
    if images.dtype == np.uint8:
        return images
    if images.dtype == np.bool_ or not (
        np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)
    ):
        raise ValueError(f"{path}: 'images' has unsupported dtype {images.dtype} (need uint8 or float)")
    lo, hi = images.min(), images.max()
    if np.issubdtype(images.dtype, np.integer):
        if lo < 0 or hi > 255:
            raise ValueError(f"{path}: integer 'images' must lie in 0..255, got [{lo}, {hi}]")
        return images.astype(np.uint8)
    if not np.isfinite(images).all():
        raise ValueError(f"{path}: float 'images' contain NaN or inf")
    if lo >= 0.0 and hi <= 1.0:
        scaled = images.astype(np.float64) * 255.0  # [0, 1] -> [0, 255]
    elif lo >= -1.0 and hi <= 1.0:
        scaled = (images.astype(np.float64) + 1.0) * 127.5  # [-1, 1] -> [0, 255]
    else:
        raise ValueError(f"{path}: float 'images' must lie in [0, 1] or [-1, 1], got [{lo:.4g}, {hi:.4g}]")
    return np.rint(scaled).astype(np.uint8)


def _to_nchw(images: np.ndarray, path: Path) -> np.ndarray:
    """Bring [N, H, W], [N, C, H, W] or [N, H, W, C] (C in {1, 3}) to [N, C, H, W]."""
    if images.ndim == 3:
        return images[:, None]  # [N, 1, H, W]
    if images.ndim == 4 and images.shape[1] in (1, 3):
        return images  # [N, C, H, W]
    if images.ndim == 4 and images.shape[3] in (1, 3):
        return images.transpose(0, 3, 1, 2)  # [N, H, W, C] -> [N, C, H, W]
    raise ValueError(
        f"{path}: 'images' shape {list(images.shape)} is not [N, H, W], [N, C, H, W] or [N, H, W, C] with C in {{1, 3}}"
    )


def read_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read images (and optional labels) from a numpy ``.npz`` archive.

    Keys: ``images`` (required) and ``labels`` (optional, integer [N]); other
    keys are ignored. Pickled object arrays are refused (``allow_pickle=False``).

    Layout rule: a 3-D array is [N, H, W] (grayscale); a 4-D array is
    channels-first [N, C, H, W] when dim 1 is 1 or 3, else channels-last
    [N, H, W, C] when dim 3 is 1 or 3 (channels-first wins if both are).

    Value rule: uint8 is taken as is; other integer dtypes must lie in 0..255;
    float arrays with minimum >= 0 and maximum <= 1 are read as [0, 1] and
    mapped by ``rint(x * 255)``; otherwise float arrays within [-1, 1] are read
    as [-1, 1] and mapped by ``rint((x + 1) * 127.5)``, so floats are quantized
    to 8 bits. (A [-1, 1] array that happens to have no negative value is
    therefore read as [0, 1]; store uint8 to avoid the ambiguity.)

    Args:
        path: The ``.npz`` file.

    Returns:
        ``images`` uint8 [N, C, H, W] and ``labels`` int64 [N] or ``None``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not a valid npz, lacks ``images``, or the
            arrays have an unsupported shape, dtype, range or length.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz file not found: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise ValueError(f"{path}: not a readable .npz archive ({err})") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: holds a single .npy array, not an .npz archive with an 'images' key")
    with archive:
        if "images" not in archive.files:
            raise ValueError(f"{path}: no 'images' array (keys: {sorted(archive.files)})")
        try:
            images = archive["images"]
            labels = archive["labels"] if "labels" in archive.files else None
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
            raise ValueError(f"{path}: corrupt array in .npz archive ({err})") from err
    if images.ndim not in (3, 4) or images.shape[0] == 0 or 0 in images.shape:
        raise ValueError(f"{path}: 'images' must be a non-empty 3-D or 4-D array, got shape {list(images.shape)}")
    images = np.ascontiguousarray(_to_nchw(_to_uint8(images, path), path))  # [N, C, H, W]
    if labels is not None:
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_:
            raise ValueError(f"{path}: 'labels' must be a 1-D integer array, got {labels.dtype} {list(labels.shape)}")
        if len(labels) != len(images):
            raise ValueError(f"{path}: {len(labels)} labels for {len(images)} images")
        if labels.min() < 0:
            raise ValueError(f"{path}: negative label {labels.min()}")
        labels = labels.astype(np.int64)  # [N]
    return images, labels
