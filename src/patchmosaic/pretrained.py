"""Pretrained networks shipped with the package, and how a model names its training set.

A pretrained model is a directory ``<root>/<name>/`` holding

* ``model.pt``: a sampling-only checkpoint (:func:`export_sampling_checkpoint`;
  loads with :func:`patchmosaic.checkpoints.load_denoiser`);
* ``config.json``: the training run's resolved configuration;
* ``schedule.json``: the locality schedule k(t) calibrated against the network
  (:mod:`patchmosaic.calibration`, readable by :meth:`PatchSchedule.load`);
* ``metrics.json``: its evaluation against the machines (:mod:`patchmosaic.evaluation`).

The root is ``src/patchmosaic/pretrained/`` (package data; the repository root
has a ``pretrained`` symlink to it), or the directory named by the environment
variable :data:`PRETRAINED_ENV` when it is set.

The root's ``MANIFEST.json`` (:data:`MANIFEST_FILE`) records the sha256 of every
file of every model; each lookup of a model by name checks its files against it
(:func:`verify_pretrained`) and refuses a damaged or modified file by name.
:func:`publish_pretrained` updates the manifest. A root without a manifest (e.g.
hand-assembled) is used unverified; the checkpoints carry their own tensor checksum.

Model specs (``--model``, ``--like``) resolve, first match wins, as
``pretrained:<name>``; an existing checkpoint file or run directory; a bare
pretrained name. Schedule specs accept ``pretrained:<name>`` (that model's
``schedule.json``) and a directory holding ``schedule.json``, on top of what
:meth:`PatchSchedule.parse` accepts (a bare name there is one of the paper's presets).

Class-conditional runs label seed ``s`` with :func:`label_for_seed`
(``s % num_classes``), for networks and machines alike, so the same seed gets
the same class everywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patchmosaic.checkpoints import (
    CHECKPOINT_FILE,
    load_checkpoint,
    resolve_checkpoint_path,
    save_checkpoint,
)
from patchmosaic.data import ImageDataset, load_dataset
from patchmosaic.models import ModelConfig

__all__ = [
    "LABEL_RULE",
    "MANIFEST_FILE",
    "LEADERBOARD_FILE",
    "METRICS_FILE",
    "PREFIX",
    "PRETRAINED_ENV",
    "SCHEDULE_FILE",
    "ModelSource",
    "TrainingSet",
    "available_pretrained",
    "export_sampling_checkpoint",
    "label_for_seed",
    "labels_for_seeds",
    "pretrained_dir",
    "pretrained_root",
    "publish_pretrained",
    "resolve_model",
    "resolve_schedule_spec",
    "training_set",
    "verify_pretrained",
    "write_manifest",
]

PRETRAINED_ENV = "PATCHMOSAIC_PRETRAINED_DIR"  # overrides the package's pretrained/ directory
PREFIX = "pretrained:"
SCHEDULE_FILE = "schedule.json"
METRICS_FILE = "metrics.json"
LEADERBOARD_FILE = "leaderboard.json"  # `patchmosaic compare` of every denoiser against the model
TRAIN_CONFIG_FILE = "config.json"
MANIFEST_FILE = "MANIFEST.json"  # in the root: sha256 of every model file
MODEL_FILES = (CHECKPOINT_FILE, TRAIN_CONFIG_FILE, SCHEDULE_FILE, METRICS_FILE, LEADERBOARD_FILE)
LABEL_RULE = "label = seed % num_classes"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


# ------------------------------------------------------------------ labels


def label_for_seed(seed: int, num_classes: int) -> int | None:
    """The class a conditional run gives seed ``seed``: ``seed % num_classes``.

    Networks, machines, calibration and evaluation all use this rule, so a
    seed's sample is conditioned on the same class everywhere.

    Args:
        seed: Non-negative seed.
        num_classes: Classes of the model; 0 means unconditional.

    Returns:
        The class index, or ``None`` for an unconditional model.
    """
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise ValueError(f"seeds must be non-negative integers, got {seed!r}")
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    return None if num_classes == 0 else int(seed) % int(num_classes)


def labels_for_seeds(seeds: Sequence[int], num_classes: int) -> list[int] | None:
    """:func:`label_for_seed` for every seed; ``None`` for an unconditional model."""
    if num_classes == 0:
        return None
    return [label_for_seed(s, num_classes) for s in seeds]  # type: ignore[misc]


# ------------------------------------------------------------ name lookup


def pretrained_root() -> Path:
    """``$PATCHMOSAIC_PRETRAINED_DIR`` if set, else the package's ``pretrained/`` directory."""
    override = os.environ.get(PRETRAINED_ENV)
    return Path(override) if override else Path(__file__).resolve().parent / "pretrained"


def available_pretrained(root: str | Path | None = None) -> list[str]:
    """Names of the pretrained models under ``root`` (those with a ``model.pt``), sorted."""
    root = pretrained_root() if root is None else Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / CHECKPOINT_FILE).is_file())


def pretrained_dir(name: str, root: str | Path | None = None) -> Path:
    """The directory of pretrained model ``name``.

    Raises:
        FileNotFoundError: Naming the available models if ``name`` is not one.
    """
    root = pretrained_root() if root is None else Path(root)
    path = root / name
    if not _NAME.match(name) or not (path / CHECKPOINT_FILE).is_file():
        names = available_pretrained(root)
        listed = ", ".join(names) if names else "none"
        raise FileNotFoundError(f"unknown pretrained model {name!r} in {root}; available: {listed}")
    verify_pretrained(name, root)
    return path


# ---------------------------------------------------------------- manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(root: str | Path | None = None) -> Path:
    """Write ``<root>/MANIFEST.json``: the sha256 of every file of every model under ``root``."""
    root = pretrained_root() if root is None else Path(root)
    files = {
        f"{name}/{f}": _sha256(root / name / f)
        for name in available_pretrained(root)
        for f in MODEL_FILES
        if (root / name / f).is_file()
    }
    payload = {"about": "sha256 of each file of the pretrained models, paths relative to this directory; "
                        "checked by patchmosaic.pretrained.verify_pretrained on every lookup",
               "files": files}
    path = root / MANIFEST_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def verify_pretrained(name: str, root: str | Path | None = None) -> None:
    """Check the files of pretrained model ``name`` against the root's manifest.

    Raises:
        ValueError: Naming the file, if a file of the model is not in the manifest,
            its sha256 differs, or the manifest is unreadable. Without a manifest
            nothing is checked.
    """
    root = pretrained_root() if root is None else Path(root)
    manifest = root / MANIFEST_FILE
    if not manifest.is_file():
        return
    try:
        recorded = json.loads(manifest.read_text())["files"]
        if not isinstance(recorded, dict):
            raise TypeError("'files' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"pretrained manifest {manifest} is unreadable ({type(err).__name__}: {err})") from err
    for f in MODEL_FILES:
        path = root / name / f
        key = f"{name}/{f}"
        if not path.is_file():  # a missing file is reported by whatever needs it (e.g. "has no schedule.json")
            continue
        if key not in recorded:
            raise ValueError(f"pretrained model {name!r}: {path} is not listed in {manifest}; republish the model "
                             "(patchmosaic pretrained publish) or restore the directory")
        actual = _sha256(path)
        if actual != recorded[key]:
            raise ValueError(
                f"pretrained model {name!r}: {path} is damaged or modified: its sha256 is {actual}, the manifest "
                f"{manifest} records {recorded[key]}. Reinstall patchmosaic (or restore the file)"
            )


@dataclass(frozen=True)
class ModelSource:
    """Where a ``--model`` spec points."""

    spec: str  # as given
    checkpoint: Path  # the model.pt file
    directory: Path  # the folder holding it (pretrained or run directory)
    name: str | None  # the pretrained name, or None for a path

    @property
    def schedule_path(self) -> Path:
        """``schedule.json`` next to the checkpoint (may not exist)."""
        return self.directory / SCHEDULE_FILE

    def describe(self) -> str:
        return f"{PREFIX}{self.name}" if self.name else str(self.checkpoint)


def resolve_model(spec: str) -> ModelSource:
    """Resolve ``pretrained:<name>``, a checkpoint file, a run directory or a bare pretrained name.

    Raises:
        FileNotFoundError: If the spec is none of these (lists the pretrained names).
    """
    spec = str(spec).strip()
    if spec.startswith(PREFIX):
        name = spec.removeprefix(PREFIX)
        directory = pretrained_dir(name)
        return ModelSource(spec, directory / CHECKPOINT_FILE, directory, name)
    path = Path(spec).expanduser()
    if path.exists():
        ckpt = resolve_checkpoint_path(path)
        return ModelSource(spec, ckpt, ckpt.parent, None)
    if _NAME.match(spec) and spec in available_pretrained():
        directory = pretrained_dir(spec)
        return ModelSource(spec, directory / CHECKPOINT_FILE, directory, spec)
    names = available_pretrained()
    raise FileNotFoundError(
        f"model {spec!r} is neither a checkpoint file, a run directory holding {CHECKPOINT_FILE}, nor a "
        f"pretrained name (available in {pretrained_root()}: {', '.join(names) if names else 'none'})"
    )


def resolve_schedule_spec(spec: str) -> str:
    """Map ``pretrained:<name>`` and directories to their ``schedule.json``; pass other specs through.

    Raises:
        FileNotFoundError: For an unknown pretrained name, or a model without ``schedule.json``.
    """
    spec = str(spec).strip()
    if spec.startswith(PREFIX):
        directory = pretrained_dir(spec.removeprefix(PREFIX))
        path = directory / SCHEDULE_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"pretrained model {spec.removeprefix(PREFIX)!r} has no {SCHEDULE_FILE} in {directory} "
                "(calibrate it with `patchmosaic calibrate`)"
            )
        return str(path)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / SCHEDULE_FILE).is_file():
            raise FileNotFoundError(f"directory {path} has no {SCHEDULE_FILE}")
        return str(path / SCHEDULE_FILE)
    return spec


# ----------------------------------------------------------- training sets


@dataclass(frozen=True)
class TrainingSet:
    """The exact training subset and geometry a network was trained with."""

    dataset: str  # load_dataset spec of the training run
    n_train: int | None  # first n_train images (None: all)
    image_size: int | None  # side the images were resized to (None: stored size)
    padding: str  # the network's convolution padding: the machine's padding
    num_classes: int  # > 0: class-conditional (labels via label_for_seed)

    def load(self) -> ImageDataset:
        """The training images ``[N, C, H, W]`` in [-1, 1] (and labels), as the network saw them."""
        return load_dataset(self.dataset, n_train=self.n_train, size=self.image_size)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "n_train": self.n_train,
            "image_size": self.image_size,
            "padding": self.padding,
            "num_classes": self.num_classes,
        }


def training_set(config: ModelConfig, train_config: dict[str, Any] | None, where: str = "checkpoint") -> TrainingSet:
    """The :class:`TrainingSet` of a network from its model and training configs.

    Raises:
        ValueError: If the checkpoint has no training config (the machine's data would be unknown).
    """
    if not train_config:
        raise ValueError(
            f"{where} has no train_config, so its training set (dataset, n_train) is unknown; "
            "machines must use the network's training subset"
        )
    return TrainingSet(
        dataset=str(train_config["dataset"]),
        n_train=train_config.get("n_train"),
        image_size=train_config.get("image_size"),
        padding=config.padding_mode,
        num_classes=int(config.num_classes),
    )


# ------------------------------------------------------------------ export


def export_sampling_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Write a sampling-only copy of a checkpoint (no optimizer, no raw weights).

    The sampling weights (the EMA weights of a training run) become the
    ``state_dict``; ``step`` and ``train_config`` are kept, so the copy loads
    with :func:`~patchmosaic.checkpoints.load_denoiser` and still names its
    training set. Written atomically.

    Args:
        src: A checkpoint file or a run directory holding ``model.pt``.
        dst: The file to write.
    """
    model, config, meta = load_checkpoint(src)
    extra = {"exported_from": str(meta["path"])}
    if "train_seconds" in meta["extra"]:
        extra["train_seconds"] = meta["extra"]["train_seconds"]
    save_checkpoint(dst, model, config, step=int(meta["step"]), train_config=meta["train_config"], extra=extra)
    return Path(dst)


def publish_pretrained(
    name: str,
    run_dir: str | Path | None,
    *,
    schedule: str | Path | None = None,
    metrics: str | Path | None = None,
    leaderboard: str | Path | None = None,
    root: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Assemble ``<root>/<name>/`` from a training run, a schedule file, an evaluation and a comparison.

    Args:
        name: Lower-case name (letters, digits, ``.``, ``_``, ``-``).
        run_dir: Training run directory holding ``model.pt`` and ``config.json``; None updates an existing
            model: its checkpoint and config stay, the files given here replace or join the others
            (needs ``overwrite``).
        schedule: ``schedule.json`` written by ``patchmosaic calibrate`` (or its run directory); required
            for a new model.
        metrics: ``metrics.json`` written by ``patchmosaic evaluate`` (or its run directory).
        leaderboard: ``leaderboard.json`` written by ``patchmosaic compare`` (or its run directory).
        root: Destination root (default :func:`pretrained_root`).
        overwrite: Replace an existing model of that name (or, without ``run_dir``, its given files).

    Returns:
        The model's directory.
    """
    if not _NAME.match(name):
        raise ValueError(f"pretrained names use lower-case letters, digits, '.', '_' and '-'; got {name!r}")
    dest = (pretrained_root() if root is None else Path(root)) / name
    sources: dict[str, Path] = {}
    ckpt = None
    if run_dir is not None:
        if schedule is None:
            raise ValueError(f"cannot publish {name!r}: a new model needs its schedule.json")
        ckpt = resolve_checkpoint_path(Path(run_dir))
        sources[TRAIN_CONFIG_FILE] = ckpt.parent / TRAIN_CONFIG_FILE
    elif not (dest / CHECKPOINT_FILE).is_file():
        raise FileNotFoundError(f"cannot update {name!r}: {dest / CHECKPOINT_FILE} not found (publish it from its "
                                "training run first)")
    if schedule is not None:
        sources[SCHEDULE_FILE] = Path(resolve_schedule_spec(str(schedule)))
    for target, given in ((METRICS_FILE, metrics), (LEADERBOARD_FILE, leaderboard)):
        if given is not None:
            path = Path(given)
            sources[target] = path / target if path.is_dir() else path
    if not sources:
        raise ValueError(f"nothing to publish for {name!r}: give a run, a schedule, metrics or a leaderboard")
    for what, path in sources.items():
        if not path.is_file():
            raise FileNotFoundError(f"cannot publish {name!r}: {what} source {path} not found")
    if run_dir is None and not overwrite:
        raise FileExistsError(f"updating {dest} replaces its {', '.join(sources)}; pass overwrite")
    if run_dir is not None and dest.exists() and any(dest.iterdir()) and not overwrite:
        raise FileExistsError(f"pretrained model directory {dest} exists and is not empty; pass overwrite")
    dest.mkdir(parents=True, exist_ok=True)
    if ckpt is not None:
        export_sampling_checkpoint(ckpt, dest / CHECKPOINT_FILE)
    for target, path in sources.items():
        shutil.copyfile(path, dest / target)
    write_manifest(dest.parent)
    return dest
