"""The ``patchmosaic`` command line: configuration lives here, at the edge.

``patchmosaic sample`` resolves and validates every flag (cheap checks first,
then the output directory, before any data is loaded), builds a
:class:`~patchmosaic.ScoreMachine`, runs :func:`~patchmosaic.sample` over the
seeds in batches, and writes ``grid.png``, ``samples.npz`` and ``config.json``
(see :mod:`patchmosaic.runs`). Library errors (``ValueError``; ``OSError``
such as ``FileNotFoundError`` and ``FileExistsError``; ``ImportError``) become
``Error: ...`` messages with a non-zero exit status and no traceback.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import click
import torch
from click.core import ParameterSource
from tqdm import tqdm

from patchmosaic import __version__
from patchmosaic.cli_eval import (
    check_out_flag,
    open_sample_run,
    parse_seeds_flag,
    report_kept_samples,
    undo_new_out_on_failure,
)
from patchmosaic.data import BUNDLED, ImageDataset, load_dataset
from patchmosaic.denoisers import DEFAULT_CHUNK_ELEMENTS, KINDS, MachineDenoiser, ScoreMachine
from patchmosaic.geometry import PADDINGS
from patchmosaic.provenance import ProvenanceRecorder
from patchmosaic.pretrained import LABEL_RULE, labels_for_seeds, resolve_schedule_spec
from patchmosaic.runs import (
    CONFIG_FILE,
    GRID_FILE,
    PROVENANCE_FILE,
    SAMPLES_FILE,
    BATCH_DIR,
    sample_settings,
)
from patchmosaic.samplers import noise_for_seeds, sample
from patchmosaic.schedules import PRESETS, CosineSchedule, PatchSchedule, sigmas_cosine

__all__ = ["main"]


DTYPES = {"float32": torch.float32, "float64": torch.float64}

# Errors the library raises for bad inputs (ValueError; FileNotFoundError, FileExistsError
# and e.g. PermissionError are OSErrors; ImportError for a missing optional extra):
# the CLI reports them as "Error: ..." without a traceback.
LIBRARY_ERRORS = (ValueError, OSError, ImportError)


class ImageSize(click.ParamType):
    """A positive integer side length, or ``native`` to keep the stored size."""

    name = "INTEGER|native"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int | None:
        if value is None or isinstance(value, int) and not isinstance(value, bool):
            size = value
        elif str(value).strip().lower() == "native":
            return None
        else:
            try:
                size = int(str(value))
            except ValueError:
                self.fail(f"{value!r} is neither a positive integer nor 'native'", param, ctx)
        if size is not None and size < 1:
            self.fail(f"size must be a positive integer or 'native', got {size}", param, ctx)
        return size


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="patchmosaic")
def main() -> None:
    """Training-free score machines of Kamb & Ganguli (arXiv 2412.20292)."""


@main.command("sample")
@undo_new_out_on_failure(files=(CONFIG_FILE,), keep_if=BATCH_DIR)  # finished batches stay for --resume
@click.option(
    "--model",
    default=None,
    help="Sample a trained network instead of a machine: a checkpoint file, a run directory holding model.pt, "
    "'pretrained:<name>' or a bare pretrained name. Same seeds, noise and files as the machines; conditional "
    "models use label = seed % num_classes unless --label.  [default: none]",
)
@click.option(
    "--like",
    default=None,
    help="Run --machine els on a network's setting: the dataset, exact training subset, size and padding of "
    "MODEL (same forms as --model), its classes (label = seed % num_classes) and its calibrated schedule.json "
    "(unless --patch-sizes).  [default: none]",
)
@click.option(
    "--dataset",
    default="mnist",
    show_default=True,
    help=f"Training set: a bundled name ({', '.join(BUNDLED)}), 'torchvision:mnist|fashion-mnist|cifar10', "
    "or a path (.npz file, IDX or CIFAR-10 directory, image folder).",
)
@click.option(
    "--n-train",
    type=click.IntRange(min=1),
    default=None,
    help="Use the first N training images (bundled sets are class balanced in every prefix). "
    "[default: all images; the demo uses 1000]",
)
@click.option(
    "--size",
    type=ImageSize(),
    default="32",
    show_default=True,
    help="Resize training images to SIZE x SIZE (bilinear; MNIST 28 -> 32 as in the paper), "
    "or 'native' to keep the stored size.",
)
@click.option(
    "--machine",
    type=click.Choice(KINDS),
    default="els",
    show_default=True,
    help="Score machine: ideal (memorises), es (equivariant, circular only), ls (local), els (equivariant local).",
)
@click.option(
    "--padding",
    type=click.Choice(PADDINGS),
    default="zeros",
    show_default=True,
    help="Boundary handling of patches (es needs circular).",
)
@click.option(
    "--patch-sizes",
    default=None,
    help="Locality schedule k(t), required for ls/els and refused for ideal/es: a preset "
    f"({', '.join(PRESETS)}), odd sizes lowest noise first ('3,3,5,...': entry i-1 is used at "
    "t = i/steps), a schedule JSON file (or a directory holding schedule.json), or 'pretrained:<name>' "
    "(that model's calibrated schedule).  [default: none; with --like: the model's schedule.json]",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="DDIM steps (denoiser calls); must equal the number of patch sizes.",
)
@click.option(
    "--seeds",
    default="0-7",
    show_default=True,
    help="Seeds, e.g. '0-7', '0,3,5' or '0-3,10,12-13' (ranges inclusive); one sample per seed, "
    "its initial noise as below.",
)
@click.option(
    "--label",
    type=click.IntRange(min=0),
    default=None,
    help="Condition every sample on this class index (needs a labelled dataset): the machine only uses that "
    "class's training images. Expect a weak effect with ELS at small patch sizes: its posterior at each pixel "
    "is over small patches from anywhere in every training image, and small patches of different classes look "
    "alike (strokes, edges, background), so removing the other classes barely changes the candidates. LS "
    "(position-bound patches), the ideal machine and ELS at large patch sizes respond much more (on 1,000 MNIST "
    "digits, conditional vs unconditional sample r: ELS 0.88, ELS k=15 0.62, LS 0.64, ideal 0.42; "
    "benchmarks/label_effect.py).  [default: unconditional]",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Run directory for grid.png, samples.npz and config.json; must be new or empty unless --overwrite.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    default=False,
    show_default=True,
    help="Reuse a non-empty --out: replace grid.png, samples.npz and config.json, keep every other file.",
)
@click.option(
    "--resume",
    is_flag=True,
    default=False,
    help="Continue an interrupted run in --out: keep its finished samples (finished batches are written as they "
    "complete, to --out/batches/) and sample only the missing seeds. The other flags must match the run's "
    "config.json (the differing keys are named); --seeds may add seeds and --batch-size may change.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Seeds per sampler call; each sample depends only on its seed (up to float rounding).",
)
@click.option(
    "--dtype",
    type=click.Choice(tuple(DTYPES)),
    default="float32",
    show_default=True,
    help="Floating type of the training images, the noise and the machine's arithmetic.",
)
@click.option(
    "--wrap-training-patches/--no-wrap-training-patches",
    default=True,
    show_default=True,
    help="Circular ELS only: allow training patches that wrap around the border "
    "(--no-wrap-training-patches matches the paper's released code).",
)
@click.option(
    "--chunk-elements",
    type=click.IntRange(min=1),
    default=DEFAULT_CHUNK_ELEMENTS,
    show_default=True,
    help="Memory bound: elements of one streamed logit block (2**22 float32 = 16 MiB).",
)
@click.option(
    "--distributed",
    is_flag=True,
    help="Shard the training set over the processes started by torchrun (gloo on CPU): "
    "each rank streams 1/world of the images and the partials are all-reduced; rank 0 "
    "writes the outputs. Example: torchrun --nproc_per_node 2 -m patchmosaic sample ... --distributed",
)
@click.option(
    "--provenance",
    is_flag=True,
    help="Also record where each pixel came from (machines only), in provenance.npz: the top "
    "--provenance-top source patches per pixel at the final step (training image, patch centre, weight) "
    "and N_eff and entropy maps at every step, from the same streaming pass. Read by 'patchmosaic explain' "
    "and 'patchmosaic report'.",
)
@click.option(
    "--provenance-top",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Source patches kept per pixel with --provenance.",
)
def sample_command(
    model: str | None,
    like: str | None,
    dataset: str,
    n_train: int | None,
    size: int | None,
    machine: str,
    padding: str,
    patch_sizes: str | None,
    steps: int,
    seeds: str,
    label: int | None,
    out: Path,
    overwrite: bool,
    resume: bool,
    batch_size: int,
    dtype: str,
    wrap_training_patches: bool,
    chunk_elements: int,
    distributed: bool,
    provenance: bool,
    provenance_top: int,
) -> None:
    """Sample images from a score machine with deterministic DDIM.

    Writes grid.png, samples.npz (images [B, C, H, W] in [-1, 1], seeds, labels)
    and config.json (the resolved configuration) into --out.

    \b
    The initial noise of seed s depends on s only (patchmosaic.noise_for_seed),
    so any other model can be run from the same seeds:
      x_1 = torch.randn((C,H,W), generator=torch.Generator('cpu').manual_seed(s))

    \b
    Example (the demo):
      patchmosaic sample --dataset mnist --n-train 1000 --machine els \\
        --padding zeros --patch-sizes mnist-resnet-zeros --seeds 0-7 --out runs/els-mnist
    """
    ctx = click.get_current_context()
    explicit = {
        p.name for p in ctx.command.params
        if p.name and ctx.get_parameter_source(p.name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    }
    label_classes = 0
    extra_config: dict = {}
    try:
        if model is not None and like is not None:
            raise click.BadParameter("--model and --like exclude each other", param_hint="'--model'")
        if model is not None and provenance:
            raise click.BadParameter("--provenance records a machine's source patches; it does not apply to --model",
                                     param_hint="'--provenance'")
        if model is not None and distributed:
            raise click.BadParameter("--distributed shards a machine's training set; it does not apply to --model",
                                     param_hint="'--distributed'")
        if model is not None:
            from patchmosaic.cli_eval import run_network_sample

            run_network_sample(spec=model, explicit=explicit, steps=steps, seed_spec=seeds, label=label, out=out,
                               overwrite=overwrite, resume=resume, batch_size=batch_size, dtype=dtype)
            return
        if like is not None:
            from patchmosaic.cli_eval import resolve_like

            resolved = resolve_like(like, machine=machine, explicit=explicit, patch_sizes=patch_sizes, label=label)
            dataset, n_train, size, padding = (resolved[k] for k in ("dataset", "n_train", "size", "padding"))
            patch_sizes = resolved["patch_sizes"]
            if "steps" not in explicit:
                steps = resolved["steps"]
            if label is None:
                label_classes = resolved["num_classes"]
            extra_config = resolved["record"]
        _run_sample(
            dataset=dataset,
            n_train=n_train,
            size=size,
            kind=machine,
            padding=padding,
            patch_sizes=patch_sizes,
            steps=steps,
            seed_spec=seeds,
            label=label,
            out=out,
            overwrite=overwrite,
            resume=resume,
            batch_size=batch_size,
            dtype=dtype,
            wrap=wrap_training_patches,
            chunk_elements=chunk_elements,
            label_classes=label_classes,
            extra_config=extra_config,
            distributed=distributed,
            provenance_top=provenance_top if provenance else None,
        )
    except LIBRARY_ERRORS as err:
        raise click.ClickException(str(err)) from err


def _resolve_schedule(kind: str, padding: str, spec: str | None, steps: int, wrap: bool) -> PatchSchedule | None:
    """Validate the machine/padding/schedule flags together; parse the schedule."""
    if kind == "es" and padding != "circular":
        raise click.BadParameter(
            "the equivariant machine (es) is defined for circular padding only; pass --padding circular",
            param_hint="'--padding'",
        )
    if not wrap and not (kind == "els" and padding == "circular"):
        raise click.BadParameter(
            f"--no-wrap-training-patches only applies to --machine els --padding circular "
            f"(got --machine {kind} --padding {padding})",
            param_hint="'--no-wrap-training-patches'",
        )
    if kind in ("ideal", "es"):
        if spec is not None:
            raise click.BadParameter(
                f"--machine {kind} has no patches; drop --patch-sizes", param_hint="'--patch-sizes'"
            )
        return None
    if spec is None:
        raise click.BadParameter(
            f"--machine {kind} needs a locality schedule: a preset such as mnist-resnet-zeros, "
            "a list like 3,5,7 or a schedule JSON file",
            param_hint="'--patch-sizes'",
        )
    try:
        schedule = PatchSchedule.parse(resolve_schedule_spec(spec))
    except (ValueError, FileNotFoundError) as err:
        raise click.BadParameter(str(err), param_hint="'--patch-sizes'") from err
    return schedule


def _check_label(data: ImageDataset, label: int | None) -> str | None:
    """Check that ``label`` is a class present in ``data``; return its name if known."""
    if label is None:
        return None
    if data.labels is None:
        raise click.BadParameter(
            f"dataset {data.name!r} has no labels, so it cannot be class-conditioned",
            param_hint="'--label'",
        )
    present = sorted(set(data.labels.tolist()))
    if label not in present:
        names = "" if data.classes is None else " (" + ", ".join(f"{c}={data.classes[c]}" for c in present) + ")"
        raise click.BadParameter(
            f"class {label} does not occur in the {len(data)} training images; present: {present}{names}",
            param_hint="'--label'",
        )
    return None if data.classes is None else data.classes[label]


def _init_distributed() -> int:
    """Join the torchrun process group (gloo); returns this process's rank."""
    import os

    import torch.distributed as dist

    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise click.UsageError(
            f"--distributed needs the environment torchrun sets ({', '.join(missing)} missing): "
            "torchrun --nproc_per_node N -m patchmosaic sample ... --distributed"
        )
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank()


def _progress_callback(bar: tqdm, denoiser: MachineDenoiser) -> Callable[[dict], None]:
    """A sampler callback that advances ``bar`` by one step and shows sigma and k."""

    def callback(info: dict) -> None:
        k = denoiser.patch_size_at(info["sigma"])
        bar.set_postfix({"sigma": f"{info['sigma']:.3g}", "k": "-" if k is None else k}, refresh=False)
        bar.update(1)

    return callback


def _run_sample(
    *,
    dataset: str,
    n_train: int | None,
    size: int | None,
    kind: str,
    padding: str,
    patch_sizes: str | None,
    steps: int,
    seed_spec: str,
    label: int | None,
    out: Path,
    overwrite: bool,
    resume: bool,
    batch_size: int,
    dtype: str,
    wrap: bool,
    chunk_elements: int,
    label_classes: int = 0,
    extra_config: dict | None = None,
    distributed: bool = False,
    provenance_top: int | None = None,
) -> None:
    """Body of ``patchmosaic sample``; flags are as documented on the command.

    ``label_classes > 0`` (``--like`` a conditional model) labels each seed with
    :func:`~patchmosaic.pretrained.label_for_seed` instead of one ``label``.
    """
    # 1. Cheap validation of the flags, then the output directory: no work yet.
    seeds = parse_seeds_flag(seed_spec)
    schedule = _resolve_schedule(kind, padding, patch_sizes, steps, wrap)
    writes = (GRID_FILE, SAMPLES_FILE, CONFIG_FILE) + ((PROVENANCE_FILE,) if provenance_top is not None else ())
    check_out_flag(out, overwrite, writes, resume=resume)
    rank = _init_distributed() if distributed else 0

    # 2. Data, machine and the geometry of every patch size (fails before sampling).
    data = load_dataset(dataset, n_train=n_train, size=size)
    label_name = _check_label(data, label)
    seed_labels = labels_for_seeds(seeds, label_classes) if label_classes else None
    for c in sorted(set(seed_labels or [])):
        _check_label(data, c)
    torch_dtype = DTYPES[dtype]
    C, H, W = data.images.shape[1:]
    score_machine = ScoreMachine(
        data.images.to(torch_dtype),  # [N, C, H, W]
        kind=kind,
        padding=padding,
        labels=data.labels,
        wrap_training_patches=wrap,
        chunk_elements=chunk_elements,
        distributed=distributed,
    )
    noise_schedule = CosineSchedule()
    denoiser = score_machine.bind(patch_sizes=schedule, label=label, schedule=noise_schedule)
    labels = seed_labels if seed_labels is not None else (None if label is None else [label] * len(seeds))
    label_of = dict(zip(seeds, labels)) if labels is not None else None
    if provenance_top is not None:
        extra_config = {**(extra_config or {}), "provenance": {
            "file": PROVENANCE_FILE, "top": provenance_top,
            "contents": "top source patches per pixel at the final step; N_eff and entropy at every step"}}
    settings = sample_settings(steps=steps, dtype=dtype, record={
        "dataset": dataset,
        "dataset_name": data.name,
        "n_train": len(data),
        "size": "native" if size is None else size,
        "image_shape": [C, H, W],
        "classes": None if data.classes is None else list(data.classes),
        "machine": kind,
        "padding": padding,
        "wrap_training_patches": wrap if (kind == "els" and padding == "circular") else None,
        "patch_sizes": None if schedule is None else list(schedule.on_grid(sigmas_cosine(steps, noise_schedule)))[::-1],
        "patch_schedule": None if schedule is None else {"sizes": list(schedule.sizes), "sigmas": list(schedule.sigmas)},
        "patch_sizes_source": None if schedule is None else schedule.name,
        "patch_sizes_spec": patch_sizes,
        "label": label,
        "label_name": label_name,
        "chunk_elements": chunk_elements,
        **({"labels": seed_labels, "label_rule": LABEL_RULE} if seed_labels is not None else {}),
        **(extra_config or {}),
    })
    run = open_sample_run(out, seeds, settings, provenance_top=provenance_top, resume=resume, writer=rank == 0)

    # 3. Sample the pending seeds in batches (each seed's noise depends on the seed only);
    #    every finished batch is on disk at once, so an interruption loses nothing finished.
    batches = run.batches(batch_size)
    start = time.perf_counter()
    with tqdm(total=steps * len(batches), desc="sampling", unit="call", file=sys.stderr, dynamic_ncols=True,
              disable=rank != 0) as bar, report_kept_samples(run, out):
        callback = _progress_callback(bar, denoiser)
        for batch in batches:
            noise = noise_for_seeds(batch, (C, H, W), dtype=torch_dtype)  # [b, C, H, W]
            batch_labels = None if label_of is None else [label_of[s] for s in batch]
            bound = denoiser
            if seed_labels is not None:  # one class per seed: bind this batch's [b] labels
                bound = score_machine.bind(patch_sizes=schedule, label=torch.tensor(batch_labels), schedule=noise_schedule)
            recorder = None
            if provenance_top is not None:  # same sampler, through a recording denoiser
                bound = recorder = ProvenanceRecorder(bound, steps=steps, top=provenance_top)
            images = sample(bound, noise, steps=steps, schedule=noise_schedule, callback=callback)  # [b, C, H, W]
            run.add_batch(batch, images, batch_labels, None if recorder is None else recorder.arrays())
    wall = time.perf_counter() - start
    if distributed:
        import torch.distributed as dist

        world = dist.get_world_size()
        dist.destroy_process_group()
        if rank != 0:  # every rank holds the merged result; rank 0 writes it
            return
        run.settings["distributed"] = {"backend": "gloo", "world_size": world}

    # 4. Outputs, in the order of --seeds.
    click.echo(f"wrote {run.finish(batch_size=batch_size, wall=wall)}")
    if provenance_top is not None:
        click.echo(f"wrote provenance (top {provenance_top} source patches per pixel) to {out / PROVENANCE_FILE}")


def _register() -> None:
    """Attach the commands that live in their own modules."""
    from patchmosaic.cli_eval import calibrate_command, evaluate_command, pretrained_group
    from patchmosaic.cli_explain import explain_command
    from patchmosaic.cli_report import report_command
    from patchmosaic.cli_train import train

    main.add_command(train)
    main.add_command(calibrate_command)
    main.add_command(evaluate_command)
    main.add_command(pretrained_group)
    main.add_command(explain_command)
    main.add_command(report_command)
    main.add_command(__import__("patchmosaic.cli_probe", fromlist=["probe_command"]).probe_command)


_register()
