"""Run directories: seed lists, sample archives, image grids and resolved configs.

A sampling run writes three files into its directory:

* ``grid.png`` (:func:`save_grid`): the samples as one upscaled image grid;
* ``samples.npz`` (:func:`save_samples`, read back by :func:`load_samples`):
  ``images`` float32 ``[B, C, H, W]`` in [-1, 1], ``seeds`` int64 ``[B]`` and,
  for class-conditional runs, ``labels`` int64 ``[B]``;
* ``config.json`` (:func:`write_config`): the resolved configuration plus the
  package and torch versions, a timestamp and the command line.

A run directory is never deleted or emptied: :func:`prepare_run_dir` refuses a
non-empty directory unless asked to overwrite, and overwriting only replaces
the files a run writes.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from patchmosaic import __version__

__all__ = [
    "write_sample_run",
    "CONFIG_FILE",
    "DERIVED_FILES",
    "EXPLAIN_FIGURES",
    "EXPLAIN_FILE",
    "GRID_FILE",
    "PROVENANCE_FILE",
    "SAMPLES_FILE",
    "check_run_dir",
    "load_provenance",
    "load_samples",
    "parse_seeds",
    "prepare_run_dir",
    "save_grid",
    "save_provenance",
    "save_samples",
    "to_uint8",
    "write_config",
]

GRID_FILE = "grid.png"
SAMPLES_FILE = "samples.npz"
CONFIG_FILE = "config.json"
PROVENANCE_FILE = "provenance.npz"  # sample --provenance (patchmosaic.provenance)
EXPLAIN_FILE = "explain.json"  # patchmosaic explain (patchmosaic.explain)
EXPLAIN_FIGURES = {
    "mosaic": "explain_mosaic.png",
    "displacement": "explain_displacement.png",
    "n_eff": "explain_neff.png",
}
# Files computed from a run's samples; they go stale if the samples are replaced.
DERIVED_FILES = (PROVENANCE_FILE, EXPLAIN_FILE, *EXPLAIN_FIGURES.values())

# One comma-separated item of a seed list: "7" or "3-9" (whitespace allowed around numbers).
_SEED_ITEM = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_seeds(spec: str) -> list[int]:
    """Parse a seed list such as ``"0-7"``, ``"0,3,5"`` or ``"0-3,10,12-13"``.

    Ranges ``a-b`` are inclusive. The order of the spec is kept (it is the
    order of the samples in the grid and in ``samples.npz``).

    Args:
        spec: Comma-separated non-negative integers and inclusive ranges ``a-b``.

    Returns:
        The seeds, in the order given.

    Raises:
        ValueError: On an empty spec or item, a negative or non-integer seed, a
            reversed range (``5-3``) or a seed that occurs more than once.
    """
    if not spec.strip():
        raise ValueError("empty seed list; give seeds like '0-7', '0,3,5' or '0-3,10,12-13'")
    seeds: list[int] = []
    for item in spec.split(","):
        if not item.strip():
            raise ValueError(f"empty item in seed list {spec!r}; give seeds like '0-7' or '0,3,5'")
        match = _SEED_ITEM.match(item)
        if match is None:
            if item.strip().startswith("-") or re.search(r"-\s*-", item):
                raise ValueError(f"seeds must be non-negative integers, got {item.strip()!r} in {spec!r}")
            raise ValueError(
                f"cannot parse {item.strip()!r} in seed list {spec!r}: expected an integer "
                "like '5' or an inclusive range like '0-7'"
            )
        start = int(match.group(1))
        stop = start if match.group(2) is None else int(match.group(2))
        if stop < start:
            raise ValueError(f"reversed seed range {item.strip()!r} in {spec!r}; write it as '{stop}-{start}'")
        seeds.extend(range(start, stop + 1))
    counts: dict[int, int] = {}
    for s in seeds:
        counts[s] = counts.get(s, 0) + 1
    duplicates = sorted(s for s, c in counts.items() if c > 1)
    if duplicates:
        raise ValueError(f"seed list {spec!r} repeats seed(s) {duplicates}; each seed may occur once")
    return seeds


def check_run_dir(
    path: str | Path, *, overwrite: bool, files: Sequence[str] = (GRID_FILE, SAMPLES_FILE, CONFIG_FILE)
) -> Path:
    """Check, without creating anything, that ``path`` may be used as an output directory.

    Args:
        path: The directory (need not exist).
        overwrite: Allow an existing non-empty directory; only ``files`` will be replaced.
        files: The files the command writes (named in the messages).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        FileExistsError: If ``path`` is an existing file; a non-empty directory
            and ``overwrite`` is false; or, with ``overwrite``, a directory holding
            files derived from earlier samples there (:data:`DERIVED_FILES`) that this
            command would not rewrite, so they would describe other samples.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output path {path} exists and is not a directory; choose another --out")
    if path.is_dir() and not overwrite and any(path.iterdir()):
        raise FileExistsError(
            f"output directory {path} exists and is not empty; pass --overwrite to replace the files this "
            f"command writes ({', '.join(files)}; nothing else is touched) or choose another --out"
        )
    if overwrite and path.is_dir() and SAMPLES_FILE in files:
        stale = [name for name in DERIVED_FILES if name not in files and (path / name).exists()]
        if stale:
            raise FileExistsError(
                f"{path} holds {', '.join(stale)}, derived from the samples an earlier run wrote there; "
                "--overwrite would leave them describing other samples. Move or delete them, or choose another --out"
            )
    return path


def prepare_run_dir(
    path: str | Path, *, overwrite: bool, files: Sequence[str] = (GRID_FILE, SAMPLES_FILE, CONFIG_FILE)
) -> Path:
    """Create a run directory, refusing to reuse a non-empty one unless ``overwrite``.

    With ``overwrite`` nothing is deleted: the run later replaces only the files
    it writes, and any other file in the directory stays.

    Args:
        path: The run directory; parents are created as needed.
        overwrite: Allow an existing non-empty directory.
        files: The files the command writes (as :func:`check_run_dir`).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        FileExistsError: As :func:`check_run_dir`.
    """
    path = check_run_dir(path, overwrite=overwrite, files=files)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _as_numpy_images(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[B, C, H, W]`` float images as a float64 numpy array, validated."""
    arr = images.detach().cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
    if arr.ndim != 4:
        raise ValueError(f"images must have shape [B, C, H, W], got {list(arr.shape)}")
    if arr.shape[0] == 0:
        raise ValueError("images is empty (B = 0)")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"images must be floating point in [-1, 1], got {arr.dtype}")
    if not np.isfinite(arr).all():
        raise ValueError("images contain NaN or infinite values")
    return arr


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] to uint8 display values: clipped, then ``rint((x + 1) * 127.5)``."""
    return np.rint((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def save_grid(
    images: torch.Tensor | np.ndarray,
    path: str | Path,
    *,
    nrow: int = 8,
    scale: int = 4,
    pad_value: float = 1.0,
) -> None:
    """Save images as one PNG grid, upscaled by nearest neighbour.

    Each image is clipped to [-1, 1], mapped to uint8 by ``rint((x + 1) * 127.5)``,
    repeated ``scale`` times along both axes and placed in a grid of ``nrow``
    columns with 1-pixel lines of ``pad_value`` around and between cells, so
    the PNG is ``rows * (H * scale + 1) + 1`` by ``cols * (W * scale + 1) + 1``
    pixels with ``cols = min(nrow, B)`` and ``rows = ceil(B / cols)``.

    Args:
        images: ``[B, C, H, W]`` floats in [-1, 1], ``C`` = 1 (grayscale) or 3 (RGB).
        path: The ``.png`` file to write.
        nrow: Images per grid row.
        scale: Integer nearest-neighbour upscaling factor.
        pad_value: Grid-line value in [-1, 1] (1.0 is white).

    Raises:
        ValueError: On a bad shape, channel count, non-finite values, ``nrow``
            or ``scale`` below 1, or ``pad_value`` outside [-1, 1].
    """
    arr = _as_numpy_images(images)  # [B, C, H, W]
    B, C, H, W = arr.shape
    if C not in (1, 3):
        raise ValueError(f"save_grid needs 1 (grayscale) or 3 (RGB) channels, got C = {C}")
    if nrow < 1 or scale < 1:
        raise ValueError(f"nrow and scale must be positive integers, got nrow={nrow}, scale={scale}")
    if not -1.0 <= pad_value <= 1.0:
        raise ValueError(f"pad_value must lie in [-1, 1], got {pad_value}")
    pixels = to_uint8(arr)  # [B, C, H, W]
    pixels = pixels.repeat(scale, axis=2).repeat(scale, axis=3)  # [B, C, sH, sW]
    cols = min(nrow, B)
    rows = math.ceil(B / cols)
    cell_h, cell_w = H * scale + 1, W * scale + 1
    pad = np.uint8(round((pad_value + 1.0) * 127.5))
    grid = np.full((C, rows * cell_h + 1, cols * cell_w + 1), pad, dtype=np.uint8)  # [C, GH, GW]
    for b in range(B):
        y, x = 1 + (b // cols) * cell_h, 1 + (b % cols) * cell_w
        grid[:, y : y + H * scale, x : x + W * scale] = pixels[b]
    image = Image.fromarray(grid[0], mode="L") if C == 1 else Image.fromarray(grid.transpose(1, 2, 0), mode="RGB")
    image.save(Path(path), format="PNG")


def save_samples(
    path: str | Path,
    images: torch.Tensor | np.ndarray,
    seeds: Sequence[int],
    labels: Sequence[int] | torch.Tensor | np.ndarray | None = None,
) -> None:
    """Write samples and the seeds that produced them to an ``.npz`` archive.

    Keys: ``images`` float32 ``[B, C, H, W]`` as given (in [-1, 1] for the score
    machines; values are not clipped), ``seeds`` int64 ``[B]`` and, if given,
    ``labels`` int64 ``[B]`` (the class each sample was conditioned on).

    Args:
        path: The ``.npz`` file to write (conventionally ``samples.npz``).
        images: ``[B, C, H, W]`` floating samples.
        seeds: ``B`` non-negative seeds; ``seeds[b]`` produced ``images[b]``.
        labels: Optional ``B`` integer class labels.

    Raises:
        ValueError: On a bad shape, non-finite values, or seeds/labels whose
            length differs from ``B``.
    """
    arr = _as_numpy_images(images).astype(np.float32)  # [B, C, H, W]
    seed_arr = np.asarray(list(seeds), dtype=np.int64)  # [B]
    if seed_arr.shape != (arr.shape[0],):
        raise ValueError(f"{len(seed_arr)} seeds for {arr.shape[0]} images")
    if (seed_arr < 0).any():
        raise ValueError(f"seeds must be non-negative, got {seed_arr.tolist()}")
    payload = {"images": arr, "seeds": seed_arr}
    if labels is not None:
        lab = labels.detach().cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
        if lab.shape != (arr.shape[0],) or not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"labels must be {arr.shape[0]} integers, got {lab.dtype} {list(lab.shape)}")
        payload["labels"] = lab.astype(np.int64)  # [B]
    with open(Path(path), "wb") as f:  # a file object, so numpy does not append ".npz"
        np.savez(f, **payload)


def load_samples(path: str | Path) -> dict[str, np.ndarray]:
    """Read an archive written by :func:`save_samples`.

    Args:
        path: The ``.npz`` file, or a run directory holding ``samples.npz``.

    Returns:
        ``{"images": float32 [B, C, H, W], "seeds": int64 [B]}`` plus
        ``"labels": int64 [B]`` when the archive has labels.

    Raises:
        FileNotFoundError: If the file (or ``samples.npz`` in the directory) is missing.
        ValueError: If it is not a readable ``.npz``, lacks ``images`` or
            ``seeds``, or the arrays have the wrong shape or dtype.
    """
    path = Path(path)
    if path.is_dir():
        path = path / SAMPLES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"samples file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            data = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"{path}: not a readable .npz archive ({err})") from err
    missing = [key for key in ("images", "seeds") if key not in data]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing} (keys: {sorted(data)}); expected a samples.npz")
    images, seeds = data["images"], data["seeds"]
    if images.ndim != 4 or images.dtype != np.float32:
        raise ValueError(f"{path}: 'images' must be float32 [B, C, H, W], got {images.dtype} {list(images.shape)}")
    if seeds.shape != (images.shape[0],) or seeds.dtype != np.int64:
        raise ValueError(f"{path}: 'seeds' must be int64 [{images.shape[0]}], got {seeds.dtype} {list(seeds.shape)}")
    out = {"images": images, "seeds": seeds}
    if "labels" in data:
        labels = data["labels"]
        if labels.shape != (images.shape[0],) or labels.dtype != np.int64:
            raise ValueError(
                f"{path}: 'labels' must be int64 [{images.shape[0]}], got {labels.dtype} {list(labels.shape)}"
            )
        out["labels"] = labels
    return out


def write_config(path: str | Path, config: dict, *, argv: Sequence[str] | None = None) -> dict:
    """Write a run's resolved configuration as JSON (sorted keys, indent 2).

    Adds ``patchmosaic_version``, ``torch_version``, ``timestamp`` (local time,
    ISO 8601 with offset) and ``command`` (the shell-quoted command line).

    Args:
        path: The ``.json`` file to write (conventionally ``config.json``).
        config: JSON-serialisable settings; must not use the added keys.
        argv: The command line to record; default ``sys.argv``.

    Returns:
        The dictionary that was written.

    Raises:
        ValueError: If ``config`` uses one of the added keys or is not JSON-serialisable.
    """
    added = {
        "patchmosaic_version": __version__,
        "torch_version": torch.__version__,
        "timestamp": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv if argv is None else argv),
    }
    clash = sorted(set(config) & set(added))
    if clash:
        raise ValueError(f"config keys {clash} are reserved for write_config")
    payload = {**config, **added}
    try:
        text = json.dumps(payload, sort_keys=True, indent=2)
    except TypeError as err:
        raise ValueError(f"config is not JSON-serialisable: {err}") from err
    Path(path).write_text(text + "\n")
    return payload


def write_sample_run(
    run_dir: Path,
    images: torch.Tensor,
    seeds: Sequence[int],
    labels: Sequence[int] | None,
    *,
    steps: int,
    dtype: str,
    batch_size: int,
    wall: float,
    record: dict,
    noun: str = "samples",
) -> str:
    """Write ``grid.png``, ``samples.npz`` and ``config.json`` of a sampling run.

    The config holds the fields every sampling run shares (time grid, noise
    schedule and noise rule, seeds, timing, file names) plus ``record``, the
    denoiser-specific settings.

    Returns:
        A one-line summary: where the files went and the seconds per sample.
    """
    from patchmosaic.samplers import NOISE_RULE
    from patchmosaic.schedules import CosineSchedule

    save_grid(images, run_dir / GRID_FILE)
    save_samples(run_dir / SAMPLES_FILE, images, seeds, labels)
    write_config(
        run_dir / CONFIG_FILE,
        {
            "steps": steps,
            "time_grid": "t_i = i / steps, i = steps..1 (DDIM, deterministic)",
            "noise_schedule": f"cosine, alpha_bar(t) = cos^2((t / (1 + s)) pi / 2), s = {CosineSchedule().s}",
            "seeds": list(seeds),
            "dtype": dtype,
            "batch_size": batch_size,
            "noise_rule": NOISE_RULE + ", then cast to --dtype",
            "wall_time_s": round(wall, 3),
            "seconds_per_sample": round(wall / len(seeds), 4),
            "files": {"grid": GRID_FILE, "samples": SAMPLES_FILE, "config": CONFIG_FILE},
            **record,
        },
    )
    return (
        f"{len(seeds)} {noun} to {run_dir}/ ({GRID_FILE}, {SAMPLES_FILE}, {CONFIG_FILE}) "
        f"in {wall:.1f} s, {wall / len(seeds):.2f} s/sample"
    )


# ------------------------------------------------------------------ provenance files

_BATCHED = ("index", "source", "weight", "count")  # [B, ...]
_STEPPED = ("n_eff", "entropy")  # [S, B, ...]


def save_provenance(path: str | Path, records: Sequence[dict[str, np.ndarray]], seeds: Sequence[int], top: int) -> None:
    """Write the provenance of a sampling run (one record per sampled batch).

    Fields of the ``.npz``: ``seeds [B]``; ``top`` m; ``patch_size`` (k of the final
    step, 0 without patches); ``index [B, H, W, m]`` (training image, -1 empty);
    ``source [B, H, W, m, 2]`` (patch centre q); ``weight [B, H, W, m]``;
    ``count [B, H, W, m]``; ``n_eff``, ``entropy [S, B, H, W]`` per denoiser call;
    ``sigma [S]`` and ``step_patch_sizes [S]`` (highest noise first).
    """
    if not records:
        raise ValueError("no provenance records to save")
    out: dict[str, np.ndarray] = {
        name: np.concatenate([r[name] for r in records], axis=0) for name in _BATCHED
    }
    out.update({name: np.concatenate([r[name] for r in records], axis=1) for name in _STEPPED})
    out["sigma"], out["step_patch_sizes"] = records[0]["sigma"], records[0]["step_patch_sizes"]
    out["seeds"] = np.asarray(list(seeds), dtype=np.int64)
    out["top"] = np.asarray(top, dtype=np.int64)
    out["patch_size"] = np.asarray(int(out["step_patch_sizes"][-1]), dtype=np.int64)
    if out["index"].shape[0] != len(out["seeds"]):
        raise ValueError(f"{out['index'].shape[0]} provenance rows for {len(out['seeds'])} seeds")
    np.savez_compressed(path, **out)


def load_provenance(path: str | Path, *, n_train: int | None = None) -> dict[str, np.ndarray]:
    """Read and check a ``provenance.npz`` written by :func:`save_provenance`.

    Args:
        path: The file.
        n_train: The run's training-set size; when given, image indices must lie in
            ``-1 .. n_train - 1``.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Unreadable, a key missing, or a wrong dtype, shape or range (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no provenance file (run 'patchmosaic sample ... --provenance' to record one)"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"{path}: not a readable provenance file ({err})") from err
    if "sigma" not in data and "t" in data:  # written before the sigma protocol: times on the cosine schedule
        from patchmosaic.schedules import CosineSchedule

        data["sigma"] = CosineSchedule().sigma(np.asarray(data.pop("t"), dtype=np.float64)).numpy()
    kinds = {"index": "i", "source": "i", "count": "i", "seeds": "i", "top": "i", "patch_size": "i",
             "step_patch_sizes": "i", "weight": "f", "n_eff": "f", "entropy": "f", "sigma": "f"}
    missing = [k for k in kinds if k not in data]
    if missing:
        raise ValueError(f"{path}: provenance file lacks {missing} (keys: {sorted(data)})")
    wrong = [f"{k} ({data[k].dtype})" for k, kind in kinds.items() if data[k].dtype.kind not in (kind, "u" if kind == "i" else kind)]
    if wrong:
        raise ValueError(f"{path}: wrong dtypes: {', '.join(wrong)}")
    if data["index"].ndim != 4:
        raise ValueError(f"{path}: index must be [B, H, W, m], got shape {data['index'].shape}")
    B, H, W, m = data["index"].shape
    S = len(data["sigma"])
    checks = {
        "source": (B, H, W, m, 2), "weight": (B, H, W, m), "count": (B, H, W, m), "seeds": (B,),
        "n_eff": (S, B, H, W), "entropy": (S, B, H, W), "sigma": (S,), "step_patch_sizes": (S,),
        "top": (), "patch_size": (),
    }
    for name, shape in checks.items():
        if data[name].shape != shape:
            raise ValueError(f"{path}: {name} has shape {data[name].shape}, expected {shape}")
    if int(data["top"]) != m or S == 0:
        raise ValueError(f"{path}: top = {int(data['top'])} with {m} entries per pixel and {S} steps")
    index = data["index"]
    high = n_train - 1 if n_train is not None else np.iinfo(np.int64).max
    if index.size and (index.min() < -1 or index.max() > high):
        raise ValueError(f"{path}: training image indices must lie in -1..{high}, "
                         f"got {int(index.min())}..{int(index.max())}")
    q = data["source"][index >= 0]  # [U, 2]
    if q.size and (q.min() < 0 or q[:, 0].max() >= H or q[:, 1].max() >= W):
        raise ValueError(f"{path}: patch centres (q_row, q_col) must lie inside the {H}x{W} images")
    return data
