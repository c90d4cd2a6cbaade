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
the files a run writes. :class:`SampleRun` writes every finished batch at once
(``batches/``, each file renamed into place), so an interrupted run keeps its
finished samples and ``sample --resume`` continues it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from patchmosaic import __version__

__all__ = [
    "BATCH_DIR",
    "CONFIG_FILE",
    "DERIVED_FILES",
    "EXPLAIN_FIGURES",
    "EXPLAIN_FILE",
    "GRID_FILE",
    "MAX_SEEDS",
    "PROVENANCE_FILE",
    "RESUME_FREE_KEYS",
    "ResumeError",
    "SEED_LIMIT",
    "SampleRun",
    "SamplingSetup",
    "SAMPLES_FILE",
    "check_run_dir",
    "undo_new_dir_on_failure",
    "load_provenance",
    "load_samples",
    "format_seeds",
    "sample_file",
    "parse_seeds",
    "prepare_run_dir",
    "save_grid",
    "sample_settings",
    "save_provenance",
    "save_samples",
    "split_provenance",
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
BATCH_DIR = "batches"  # finished batches of a sample run in progress (SampleRun)
# Config keys a resumed sample run may change: none of them changes any seed's sample.
RESUME_FREE_KEYS = ("seeds", "labels", "batch_size", "wall_time_s", "seconds_per_sample", "timestamp", "command",
                    "status", "resumed", "distributed", "compute")
# Files computed from a run's samples; they go stale if the samples are replaced.
DERIVED_FILES = (PROVENANCE_FILE, EXPLAIN_FILE, *EXPLAIN_FIGURES.values())

# Seeds are stored as int64 (samples.npz) and seed torch's generator: 0 <= seed < 2**63.
SEED_LIMIT = 2**63
# At most this many seeds per command: a typo like 0-100000000 is an error, not a 10^8-sample run.
MAX_SEEDS = 100_000
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
            seed of :data:`SEED_LIMIT` (2**63) or more, a reversed range (``5-3``),
            more than :data:`MAX_SEEDS` seeds (checked before any list is built)
            or a seed that occurs more than once.
    """
    if not spec.strip():
        raise ValueError("empty seed list; give seeds like '0-7', '0,3,5' or '0-3,10,12-13'")
    ranges: list[tuple[int, int]] = []
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
        if max(start, stop) >= SEED_LIMIT:
            raise ValueError(
                f"seed {max(start, stop)} in {spec!r} is too large: seeds must be below 2**63 = {SEED_LIMIT} "
                "(they are stored as int64 and seed torch's random generator)"
            )
        if stop < start:
            raise ValueError(f"reversed seed range {item.strip()!r} in {spec!r}; write it as '{stop}-{start}'")
        ranges.append((start, stop))
    count = sum(stop - start + 1 for start, stop in ranges)
    if count > MAX_SEEDS:
        raise ValueError(
            f"seed list {spec!r} asks for {count:,} seeds; at most {MAX_SEEDS:,} per run "
            "(split larger jobs into several runs with disjoint seed ranges)"
        )
    seeds = [s for start, stop in ranges for s in range(start, stop + 1)]
    counts: dict[int, int] = {}
    for s in seeds:
        counts[s] = counts.get(s, 0) + 1
    duplicates = sorted(s for s, c in counts.items() if c > 1)
    if duplicates:
        raise ValueError(f"seed list {spec!r} repeats seed(s) {duplicates}; each seed may occur once")
    return seeds


def sample_file(name: str) -> str:
    """``samples_<name>.npz``: the final samples of one denoiser in an evaluate or compare directory."""
    return f"samples_{name}.npz"


def format_seeds(seeds: Sequence[int]) -> str:
    """``[0, 1, 2, 3, 5]`` as ``"0-3, 5 (5)"``: :func:`parse_seeds`'s ranges (order kept), then the count."""
    parts: list[str] = []
    i = 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(str(seeds[i]) if i == j else f"{seeds[i]}-{seeds[j]}")
        i = j + 1
    return ", ".join(parts) + f" ({len(seeds)})"


def check_run_dir(
    path: str | Path,
    *,
    overwrite: bool,
    files: Sequence[str] = (GRID_FILE, SAMPLES_FILE, CONFIG_FILE),
    resume: bool = False,
) -> Path:
    """Check, without creating anything, that ``path`` may be used as an output directory.

    Args:
        path: The directory (need not exist).
        overwrite: Allow an existing non-empty directory; only ``files`` will be replaced.
        files: The files the command writes (named in the messages).
        resume: Continue the sample run in ``path`` (:class:`SampleRun`): it must
            hold that run's ``config.json``; the other checks are those of ``overwrite``.

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
    if resume and not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"nothing to resume: {path} holds no {CONFIG_FILE} of a sample run")
    interrupted = SAMPLES_FILE in files and (path / BATCH_DIR).is_dir() and not resume
    if path.is_dir() and not (overwrite or resume) and any(path.iterdir()):
        hint = " (it holds an interrupted sample run: pass --resume to continue it)" if interrupted else ""
        raise FileExistsError(
            f"output directory {path} exists and is not empty{hint}; pass --overwrite to replace the files this "
            f"command writes ({', '.join(files)}; nothing else is touched) or choose another --out"
        )
    if overwrite and interrupted:
        raise FileExistsError(
            f"{path} holds the finished batches of an interrupted sample run ({path / BATCH_DIR}); --overwrite would "
            "mix them into this run. Pass --resume to continue that run, or move or delete that directory first"
        )
    if (overwrite or resume) and path.is_dir() and SAMPLES_FILE in files:
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


@contextlib.contextmanager
def undo_new_dir_on_failure(
    path: str | Path, *, files: Sequence[str] = (), keep_if: str | None = None
) -> Iterator[Path]:
    """On an exception, remove an output directory that this block created, if nothing else is in it.

    A directory that existed before the block is never touched. If ``path`` (and
    possibly some of its parents) did not exist, then on failure the block's own
    ``files`` in it are deleted (unless ``keep_if`` exists there, e.g. a resumable
    checkpoint), then each directory the block created is removed if it is empty
    (``rmdir``: never a recursive delete), so a failed command leaves no empty or
    half-written ``--out`` behind. The exception propagates.

    Args:
        path: The output directory (need not exist yet).
        files: Names, inside ``path``, of the files the block writes.
        keep_if: A file name inside ``path``; if it exists on failure, nothing is deleted.
    """
    path = Path(path)
    created: list[Path] = []  # deepest first: path, then the missing parents
    probe = path
    while not probe.exists() and probe != probe.parent:
        created.append(probe)
        probe = probe.parent
    try:
        yield path
    except BaseException:
        if created and not (keep_if is not None and (path / keep_if).exists()):
            for name in files:
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    (path / name).unlink()
            for directory in created:
                try:
                    directory.rmdir()  # only if empty
                except OSError:
                    break
        raise


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
    except Exception as err:  # zipfile.BadZipFile, OSError, ValueError, EOFError, ...: one clear error naming the file
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
    _atomic(Path(path), lambda tmp: tmp.write_text(text + "\n"))
    return payload


@dataclass(frozen=True)
class SamplingSetup:
    """How a run's samples were drawn: the part of ``config.json`` every sampling run shares.

    Written by :meth:`to_config` (through :func:`sample_settings`) and read back by
    :meth:`from_config`, the one place that knows these keys (runs written before
    samplers and grids existed read as deterministic DDIM on the cosine grid).
    """

    steps: int  # sampler steps n; the grid has n + 1 sigmas
    sampler: str = "euler"  # a name of patchmosaic.samplers.SAMPLERS
    grid: str = "cosine"  # a name of patchmosaic.schedules.GRIDS
    dtype: str = "float32"  # of the noise, the state and the denoiser's arithmetic

    @property
    def sigmas(self) -> torch.Tensor:
        """The run's sigma grid, ``[steps + 1]`` float64, descending, last 0."""
        from patchmosaic.schedules import make_grid

        return make_grid(self.grid, self.steps)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "float64" else torch.float32

    def to_config(self) -> dict:
        """The keys this setup writes into ``config.json``."""
        from patchmosaic.samplers import NOISE_RULE
        from patchmosaic.schedules import CosineSchedule

        cosine = self.grid == "cosine"
        return {
            "steps": self.steps,
            "sampler": self.sampler,
            "grid": self.grid,
            "sigmas": [float(x) for x in self.sigmas],
            "time_grid": "t_i = i / steps, i = steps..1 (the paper's DDIM grid)" if cosine else None,
            "noise_schedule": f"cosine, alpha_bar(t) = cos^2((t / (1 + s)) pi / 2), s = {CosineSchedule().s}"
            if cosine else None,
            "dtype": self.dtype,
            "noise_rule": NOISE_RULE + ", then cast to --dtype; x starts at noise * sqrt(1 + sigmas[0]^2)",
        }

    @classmethod
    def from_config(cls, config: dict, where: str | Path = "config.json") -> "SamplingSetup":
        """Read a run's setup back (ValueError naming ``where`` on a malformed config)."""
        try:
            setup = cls(steps=int(config["steps"]), sampler=str(config.get("sampler", "euler")),
                        grid=str(config.get("grid", "cosine")), dtype=str(config.get("dtype", "float32")))
            recorded = config.get("sigmas")
            if recorded is not None and not torch.allclose(torch.tensor(recorded, dtype=torch.float64), setup.sigmas):
                raise ValueError(f"its sigmas do not match its {setup.grid} grid of {setup.steps} steps")
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: not a sampling run's configuration ({err})") from err
        return setup


def sample_settings(setup: SamplingSetup, record: dict) -> dict:
    """The configuration a sampling run records: its :class:`SamplingSetup` and its denoiser's ``record``.

    Together with the versions :func:`write_config` adds, these settings
    determine each seed's sample; :class:`SampleRun` compares them on ``--resume``.
    """
    return {
        **setup.to_config(),
        "files": {"grid": GRID_FILE, "samples": SAMPLES_FILE, "config": CONFIG_FILE},
        **record,
    }


class ResumeError(ValueError):
    """A ``--resume`` that cannot continue the run in its directory (the message says why)."""


class SampleRun:
    """A sampling run directory written batch by batch, so an interrupted run loses nothing.

    :meth:`start` writes ``config.json`` (``"status": "incomplete"``) before any
    sampling; each finished batch goes to ``batches/batch-s<first>-n<count>.npz``
    (:func:`save_samples` format, plus ``.provenance.npz`` with provenance), each
    written to a temporary file and renamed into place. :meth:`finish` writes
    ``samples.npz``, ``grid.png`` (and ``provenance.npz``) in the order of the
    seeds, then the final ``config.json`` (``"status": "complete"``), and only
    then removes the batch files it wrote. With ``resume`` the finished seeds of
    the directory (its ``samples.npz`` and ``batches/``) are kept and skipped,
    after checking that the directory's configuration equals this run's except
    for :data:`RESUME_FREE_KEYS`.

    Args:
        run_dir: The run directory.
        seeds: The run's seeds, in output order.
        settings: The resolved configuration (:func:`sample_settings`), JSON-like.
        provenance_top: ``m`` when provenance is recorded, else ``None``.
        resume: Continue the run in ``run_dir``.
        writer: Whether this process writes (False on ranks > 0 of a sharded run).
    """

    def __init__(
        self,
        run_dir: str | Path,
        seeds: Sequence[int],
        settings: dict,
        *,
        provenance_top: int | None = None,
        resume: bool = False,
        writer: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.seeds = list(seeds)
        self.settings = json.loads(json.dumps(settings))  # tuples -> lists, as read back from config.json
        self.provenance_top = provenance_top
        self.resume = resume
        self.writer = writer
        self.done: dict[int, dict] = {}  # seed -> {"image": [C, H, W], "label": int | None, "provenance": row}
        self.sampled = 0  # seeds sampled by this process (add_batch)
        if resume:
            self._load_finished()

    # -------------------------------------------------------------- resume

    def _differences(self, saved: dict) -> list[str]:
        now = {**self.settings, "patchmosaic_version": __version__, "torch_version": torch.__version__}
        keys = sorted((set(saved) | set(now)) - set(RESUME_FREE_KEYS))
        return [f"{k}: {saved.get(k)!r} in the run, {now.get(k)!r} now" for k in keys if saved.get(k) != now.get(k)]

    def _load_finished(self) -> None:
        config_path = self.run_dir / CONFIG_FILE
        if not config_path.is_file():
            raise ResumeError(f"nothing to resume in {self.run_dir}: it has no {CONFIG_FILE} of a sample run")
        try:
            saved = json.loads(config_path.read_text())
        except (OSError, ValueError) as err:
            raise ResumeError(f"cannot resume {self.run_dir}: {config_path} is not readable JSON ({err})") from err
        if not isinstance(saved, dict):
            raise ResumeError(f"cannot resume {self.run_dir}: {config_path} does not hold a JSON object")
        diffs = self._differences(saved)
        if diffs:
            raise ResumeError(
                f"cannot resume {self.run_dir}: its configuration differs from this command's in "
                f"{len(diffs)} key(s): {'; '.join(diffs)}. Only --seeds (adding seeds) and --batch-size may change; "
                "rerun with the run's flags (see its config.json) or choose another --out"
            )
        parts = []
        if (self.run_dir / SAMPLES_FILE).is_file():
            parts.append((self.run_dir / SAMPLES_FILE, self.run_dir / PROVENANCE_FILE))
        batch_dir = self.run_dir / BATCH_DIR
        if batch_dir.is_dir():
            parts += [(p, p.with_name(p.name.removesuffix(".npz") + ".provenance.npz"))
                      for p in sorted(batch_dir.glob("batch-*.npz")) if not p.name.endswith(".provenance.npz")]
        for samples_path, prov_path in parts:
            archive = load_samples(samples_path)
            rows = None
            if self.provenance_top is not None:
                if not prov_path.is_file():
                    raise ResumeError(f"cannot resume {self.run_dir}: {samples_path} has no provenance ({prov_path})")
                prov = load_provenance(prov_path)
                if prov["seeds"].tolist() != archive["seeds"].tolist():
                    raise ResumeError(f"cannot resume {self.run_dir}: {prov_path} and {samples_path} hold other seeds")
                rows = split_provenance(prov)
            for i, seed in enumerate(archive["seeds"].tolist()):
                label = None if "labels" not in archive else int(archive["labels"][i])
                self.done[int(seed)] = {"image": archive["images"][i], "label": label,
                                        "provenance": None if rows is None else rows[i]}
        extra = [s for s in self.done if s not in set(self.seeds)]
        if extra:
            raise ResumeError(
                f"cannot resume {self.run_dir}: it holds samples of seeds not in --seeds "
                f"({_seed_list_text(sorted(extra))}); --seeds must include every seed of the run, so nothing is dropped"
            )

    @property
    def pending(self) -> list[int]:
        """The seeds still to sample, in output order."""
        return [s for s in self.seeds if s not in self.done]

    def batches(self, batch_size: int) -> list[list[int]]:
        """The pending seeds in batches of ``batch_size``."""
        pending = self.pending
        return [pending[i : i + batch_size] for i in range(0, len(pending), batch_size)]

    # --------------------------------------------------------------- write

    def start(self) -> None:
        """Write ``config.json`` with ``"status": "incomplete"`` (before any sampling)."""
        if self.writer:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_config(self.run_dir / CONFIG_FILE, {**self.settings, "seeds": self.seeds, "status": "incomplete"})

    def add_batch(
        self,
        seeds: Sequence[int],
        images: torch.Tensor | np.ndarray,
        labels: Sequence[int] | None,
        provenance: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Record a finished batch, on disk at once (atomic rename), so an interruption keeps it."""
        arr = _as_numpy_images(images).astype(np.float32)  # [b, C, H, W]
        self.sampled += len(seeds)
        rows = None
        if provenance is not None:
            rows = split_provenance(provenance)
        for i, seed in enumerate(seeds):
            self.done[int(seed)] = {"image": arr[i], "label": None if labels is None else int(labels[i]),
                                    "provenance": None if rows is None else rows[i]}
        if not self.writer:
            return
        batch_dir = self.run_dir / BATCH_DIR
        batch_dir.mkdir(exist_ok=True)
        stem = f"batch-s{int(seeds[0])}-n{len(seeds)}"
        if provenance is not None:  # provenance first: a batch counts as done once its samples file exists
            path = batch_dir / f"{stem}.provenance.npz"
            _atomic(path, lambda tmp: save_provenance(tmp, [provenance], seeds, self.provenance_top))
        path = batch_dir / f"{stem}.npz"
        _atomic(path, lambda tmp: save_samples(tmp, arr, seeds, labels))

    def finish(self, *, batch_size: int, wall: float, noun: str = "samples") -> str:
        """Write the run's files in seed order, then remove its batch files; returns a summary line."""
        sampled = self.sampled
        if not self.writer:
            return ""
        missing = self.pending
        if missing:
            raise ValueError(f"{len(missing)} seeds were not sampled ({_seed_list_text(missing)})")
        rows = [self.done[s] for s in self.seeds]
        images = np.stack([r["image"] for r in rows])  # [B, C, H, W]
        labels = None if rows[0]["label"] is None else [r["label"] for r in rows]
        _atomic(self.run_dir / SAMPLES_FILE, lambda tmp: save_samples(tmp, images, self.seeds, labels))
        _atomic(self.run_dir / GRID_FILE, lambda tmp: save_grid(images, tmp))
        if self.provenance_top is not None:
            records = [r["provenance"] for r in rows]
            _atomic(self.run_dir / PROVENANCE_FILE,
                    lambda tmp: save_provenance(tmp, records, self.seeds, self.provenance_top))
        write_config(self.run_dir / CONFIG_FILE, {
            **self.settings,
            "seeds": self.seeds,
            "batch_size": batch_size,
            "wall_time_s": round(wall, 3),
            "seconds_per_sample": round(wall / sampled, 4) if sampled else None,
            "status": "complete",
            "resumed": {"kept": len(self.seeds) - sampled, "sampled": sampled} if self.resume else None,
        })
        batch_dir = self.run_dir / BATCH_DIR
        if batch_dir.is_dir():  # the batches are in samples.npz now; remove only our own batch files
            for path in batch_dir.glob("batch-s*-n*.npz"):
                path.unlink()
            with contextlib.suppress(OSError):
                batch_dir.rmdir()
        kept = f", {len(self.seeds) - sampled} kept from the interrupted run" if self.resume else ""
        speed = f", {wall / sampled:.2f} s/sample" if sampled else ""
        return (
            f"{len(self.seeds)} {noun} to {self.run_dir}/ ({GRID_FILE}, {SAMPLES_FILE}, {CONFIG_FILE}{kept}) "
            f"in {wall:.1f} s{speed}"
        )


def _seed_list_text(seeds: Sequence[int], shown: int = 10) -> str:
    head = ", ".join(map(str, seeds[:shown]))
    return head + (f", ... ({len(seeds)} in all)" if len(seeds) > shown else "")


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary name next to ``path``, then rename it onto ``path``."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # same suffix: numpy keeps the name
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


# ------------------------------------------------------------------ provenance files

_BATCHED = ("index", "source", "weight", "count")  # [B, ...]
_STEPPED = ("n_eff", "entropy")  # [S, B, ...]


def split_provenance(record: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """One record per sample (batch size 1) of a batch record or a loaded ``provenance.npz``.

    :func:`save_provenance` of the rows, in any order, writes those samples' provenance.
    """
    n = record["index"].shape[0]
    rows = []
    for b in range(n):
        row = {name: record[name][b : b + 1] for name in _BATCHED}  # [1, ...]
        row.update({name: record[name][:, b : b + 1] for name in _STEPPED})  # [S, 1, ...]
        row["sigma"], row["step_patch_sizes"] = record["sigma"], record["step_patch_sizes"]
        rows.append(row)
    return rows


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
    except Exception as err:  # zipfile.BadZipFile, OSError, ValueError, EOFError, ...: one clear error naming the file
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
