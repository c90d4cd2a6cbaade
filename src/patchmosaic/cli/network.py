"""Trained networks on the command line: ``--model`` resolution, ``sample --model`` and ``sample --like``."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click
import torch
from tqdm import tqdm

from patchmosaic.checkpoints import load_checkpoint
from patchmosaic.cli.common import (
    check_out_flag,
    flag_name,
    open_sample_run,
    parse_seeds_flag,
    report_kept_samples,
)
from patchmosaic.data import ImageDataset
from patchmosaic.denoisers import EpsDenoiser, ScoreMachine
from patchmosaic.models import ModelConfig, config_to_dict
from patchmosaic.pretrained import (
    LABEL_RULE,
    SCHEDULE_FILE,
    ModelSource,
    TrainingSet,
    labels_for_seeds,
    resolve_model,
    resolve_schedule_spec,
    training_set,
)
from patchmosaic.runs import (
    CONFIG_FILE,
    GRID_FILE,
    SAMPLES_FILE,
    SamplingSetup,
    sample_settings,
)
from patchmosaic.samplers import sample_seeds
from patchmosaic.schedules import PatchSchedule

DIFFUSERS_PREFIX = "diffusers:"


class LoadedModel:
    """A resolved ``--model``: the network as a denoiser, its configs and training set.

    ``diffusers:DIR`` loads a saved diffusers ``UNet2DModel`` and scheduler
    (:func:`patchmosaic.denoisers.external.load_diffusers_unet`); its training set
    is unknown, so commands that build machines pass it with :meth:`use_training_set`.
    """

    def __init__(self, spec: str) -> None:
        spec = str(spec).strip()
        self.external: dict[str, Any] | None = None
        self._given_set: TrainingSet | None = None
        if spec.startswith(DIFFUSERS_PREFIX):
            from patchmosaic.denoisers.external import load_diffusers_unet

            directory = Path(spec.removeprefix(DIFFUSERS_PREFIX)).expanduser()
            self.denoiser, self.external = load_diffusers_unet(directory)
            self.source = ModelSource(spec, directory / "diffusion_pytorch_model.safetensors", directory, None)
            self.config = None
            self.meta = {}
            self.num_classes = 0
            self._shape = tuple(self.external["shape"])
            return
        self.source = resolve_model(spec)
        model, config, meta = load_checkpoint(self.source.checkpoint)
        self.config: ModelConfig | None = config
        self.meta: dict[str, Any] = meta
        self.denoiser = EpsDenoiser(model)
        self.num_classes = int(config.num_classes)
        self._shape = (config.in_channels, config.image_size, config.image_size)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self._shape  # type: ignore[return-value]

    def use_training_set(self, dataset: str | None, n_train: int | None, padding: str = "zeros") -> None:
        """``--dataset/--n-train``: the machines' training set, for a network whose own is unknown (diffusers).

        Raises:
            click.BadParameter: Given for a checkpoint of this toolkit (which records its own),
                or missing for an external network.
        """
        if self.external is None:
            if dataset is not None or n_train is not None:
                raise click.BadParameter(
                    f"model {self.source.describe()} records its own training set; --dataset/--n-train are only "
                    "for external (diffusers:) networks", param_hint="'--dataset'")
            return
        if dataset is None:
            raise click.BadParameter(
                f"the training set of {self.source.spec} is unknown (a diffusers model records none); pass "
                "--dataset (and --n-train) for the closed-form denoisers", param_hint="'--dataset'")
        side = self.shape[1]
        self._given_set = TrainingSet(dataset=dataset, n_train=n_train, image_size=side, padding=padding,
                                      num_classes=0)

    def schedule_spec(self, patch_sizes: str | None, param_hint: str = "'--patch-sizes'") -> str:
        """``patch_sizes`` if given, else the model's calibrated ``schedule.json`` (a usage error if it has none)."""
        if patch_sizes is not None:
            return patch_sizes
        if not self.source.schedule_path.is_file():
            raise click.BadParameter(
                f"model {self.source.describe()} has no {SCHEDULE_FILE} in {self.source.directory}; "
                "calibrate it (`patchmosaic calibrate`) or pass --patch-sizes",
                param_hint=param_hint,
            )
        return str(self.source.schedule_path)

    def training_set(self) -> TrainingSet:
        if self.external is not None:
            if self._given_set is None:
                raise ValueError(f"the training set of {self.source.spec} is unknown; pass --dataset/--n-train")
            return self._given_set
        return training_set(self.config, self.meta["train_config"], where=f"checkpoint {self.source.checkpoint}")

    def training_data(self, device: torch.device | None = None) -> tuple[ImageDataset, TrainingSet]:
        """The network's training subset, loaded and checked against the network (shape; labels when
        class-conditional), with the network moved to ``device`` when given.

        Raises:
            ValueError: If the images do not fit the network or a conditional model's set has no labels.
        """
        ts = self.training_set()
        data = ts.load()
        if tuple(data.images.shape[1:]) != self.shape:
            raise ValueError(
                f"the training set {ts.dataset!r} (n_train={ts.n_train}) loads as {list(data.images.shape[1:])} "
                f"images but the network expects {list(self.shape)}"
            )
        if self.num_classes and data.labels is None:
            raise ValueError(f"the model is class-conditional but its training set {ts.dataset!r} has no labels")
        if device is not None:
            self.denoiser.model.to(device)
        return data, ts

    def labels(self, seeds: list[int]) -> list[int] | None:
        return labels_for_seeds(seeds, self.num_classes)

    def record(self) -> dict[str, Any]:
        """What a run's config records about the model."""
        if self.external is not None:
            return {"model": self.source.spec, "model_checkpoint": str(self.source.checkpoint),
                    "model_kind": "diffusers", "diffusers": self.external,
                    "training_set_given": None if self._given_set is None else self._given_set.to_dict()}
        return {
            "model": self.source.describe(),
            "model_checkpoint": str(self.source.checkpoint),
            "model_config": config_to_dict(self.config),
            "model_step": int(self.meta["step"]),
            "train_config": self.meta["train_config"],
        }


def machine_for(
    model: LoadedModel, kind: str, chunk_elements: int, device: torch.device | None = None, workers: int = 1
) -> tuple[ScoreMachine, ImageDataset, TrainingSet]:
    """A score machine on the network's exact training subset, with the network's padding (both on ``device``)."""
    data, ts = model.training_data(device)
    machine = ScoreMachine(
        data.images, kind=kind, padding=ts.padding, labels=data.labels if model.num_classes else None,
        chunk_elements=chunk_elements, device=device, workers=workers,
    )
    return machine, data, ts



# ------------------------------------------------------------------ sample --model / --like

# Flags of `sample` that describe a machine and so cannot be combined with --model.
MACHINE_FLAGS = ("dataset", "n_train", "size", "machine", "padding", "patch_sizes", "wrap_training_patches",
                 "chunk_elements")
# Flags that --like sets from the model (--patch-sizes and --steps may still be given).
LIKE_FLAGS = ("dataset", "n_train", "size", "padding")


def resolve_like(
    spec: str, *, machine: str, explicit: set[str], patch_sizes: str | None, label: int | None = None
) -> dict[str, Any]:
    """Machine settings of ``sample --like MODEL``: the model's training subset, padding, classes and schedule.

    Args:
        spec: A model spec (see :func:`patchmosaic.pretrained.resolve_model`).
        machine: The ``--machine`` value; must be ``els``.
        explicit: The ``sample`` parameters given on the command line.
        patch_sizes: An explicit ``--patch-sizes`` (overrides the model's ``schedule.json``).
        label: An explicit ``--label`` (one class for every seed; conditional models only).

    Returns:
        ``dataset``, ``n_train``, ``size``, ``padding``, ``patch_sizes`` (a spec),
        ``steps`` (None: take the schedule's), ``num_classes`` and ``record``.
    """
    if machine != "els":
        raise click.BadParameter(
            f"--like calibrates an ELS machine to a network; it does not apply to --machine {machine}",
            param_hint="'--like'",
        )
    clashes = [flag_name(n) for n in LIKE_FLAGS if n in explicit]
    if clashes:
        raise click.BadParameter(
            f"--like takes the dataset, n_train, size and padding from the model; drop {', '.join(clashes)}",
            param_hint="'--like'",
        )
    model = LoadedModel(spec)
    ts = model.training_set()
    if label is not None and not model.num_classes:
        raise click.BadParameter(
            f"model {model.source.describe()} is unconditional, so its ELS machine is too; drop --label",
            param_hint="'--label'",
        )
    patch_sizes = model.schedule_spec(patch_sizes, param_hint="'--like'")
    schedule = PatchSchedule.parse(resolve_schedule_spec(patch_sizes))
    return {
        "dataset": ts.dataset,
        "n_train": ts.n_train,
        "size": ts.image_size,
        "padding": ts.padding,
        "patch_sizes": patch_sizes,
        "steps": len(schedule),
        "num_classes": model.num_classes,
        "record": {"like": model.source.describe(), "like_checkpoint": str(model.source.checkpoint)},
    }


def run_network_sample(
    *,
    spec: str,
    explicit: set[str],
    steps: int,
    seed_spec: str,
    label: int | None,
    out: Path,
    overwrite: bool,
    resume: bool,
    batch_size: int,
    dtype: str,
    sampler: str = "euler",
    grid: str = "cosine",
    device: torch.device | None = None,
) -> None:
    """Body of ``patchmosaic sample --model``: the network through the same seeds, sampler, grid, files and config."""
    clashes = [flag_name(n) for n in MACHINE_FLAGS if n in explicit]
    if clashes:
        raise click.BadParameter(
            f"--model samples a trained network; {', '.join(clashes)} describe a score machine and do not apply",
            param_hint="'--model'",
        )
    seeds = parse_seeds_flag(seed_spec)
    check_out_flag(out, overwrite, (GRID_FILE, SAMPLES_FILE, CONFIG_FILE), resume=resume)
    model = LoadedModel(spec)
    if label is not None:
        if not model.num_classes:
            raise click.BadParameter("the model is unconditional; drop --label", param_hint="'--label'")
        if label >= model.num_classes:
            raise click.BadParameter(f"class {label} is out of range 0..{model.num_classes - 1}", param_hint="'--label'")
        labels = [label] * len(seeds)
    else:
        labels = model.labels(seeds)
    label_of = None if labels is None else dict(zip(seeds, labels))
    torch_dtype = torch.float64 if dtype == "float64" else torch.float32
    setup = SamplingSetup(steps, sampler, grid, dtype)
    sigmas = setup.sigmas  # [steps + 1]
    if device is not None:
        model.denoiser.model.to(device)
    settings = sample_settings(setup, record={
        "denoiser": "network",
        **model.record(),
        "machine": None,
        "image_shape": list(model.shape),
        "label": label,
        "labels": labels,
        "label_rule": None if labels is None else (f"--label {label}" if label is not None else LABEL_RULE),
    })
    run = open_sample_run(out, seeds, settings, resume=resume)
    pending = run.pending
    start = time.perf_counter()
    with tqdm(total=steps * -(-len(pending) // batch_size), desc="sampling", unit="step", file=sys.stderr,
              dynamic_ncols=True) as bar, report_kept_samples(run, out):
        sample_seeds(  # each finished batch is on disk at once
            model.denoiser, pending, model.shape, sigmas=sigmas, sampler=sampler,
            labels=None if label_of is None else [label_of[s] for s in pending], batch_size=batch_size,
            dtype=torch_dtype, device=device or "cpu", callback=lambda info: bar.update(1),
            on_batch=lambda batch, images, _: run.add_batch(
                batch, images, None if label_of is None else [label_of[s] for s in batch]),
        )
    wall = time.perf_counter() - start
    click.echo(f"wrote {run.finish(batch_size=batch_size, wall=wall, noun='network samples')}")


