"""``patchmosaic sample``: a denoiser driven by a sampler on a sigma grid, one sample per seed."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import torch
from click.core import ParameterSource
from tqdm import tqdm

from patchmosaic.cli.common import (
    DTYPES,
    FAMILY_PARAMS,
    LIBRARY_ERRORS,
    ImageSize,
    check_out_flag,
    compute_options,
    family_options,
    family_params,
    open_sample_run,
    parse_schedule_flag,
    parse_seeds_flag,
    recordable,
    refuse_workers,
    report_kept_samples,
    resolve_device,
    resolve_workers,
    set_threads,
    undo_new_out_on_failure,
    workers_option,
)
from patchmosaic.cli.network import resolve_like, run_network_sample
from patchmosaic.data import BUNDLED, ImageDataset, load_dataset
from patchmosaic.denoisers import (
    DEFAULT_CHUNK_ELEMENTS,
    KINDS,
    ScoreMachine,
    check_machine_options,
)
from patchmosaic.denoisers.registry import DENOISERS, build_denoiser
from patchmosaic.denoisers.score_machines import KERNEL_PRECISIONS, KERNELS, PATCH_KINDS
from patchmosaic.geometry import PADDINGS
from patchmosaic.pretrained import LABEL_RULE, labels_for_seeds
from patchmosaic.provenance import ProvenanceRecorder
from patchmosaic.runs import (
    BATCH_DIR,
    CONFIG_FILE,
    GRID_FILE,
    PROVENANCE_FILE,
    SAMPLES_FILE,
    SamplingSetup,
    sample_settings,
)
from patchmosaic.samplers import SAMPLERS, denoiser_calls, sample_seeds
from patchmosaic.schedules import GRIDS, PRESETS, PatchSchedule

DENOISER_NAMES = (*KINDS, *(name for name in DENOISERS if name not in KINDS))


@click.command("sample")
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
    "--denoiser",
    "--machine",
    "machine",
    type=click.Choice(DENOISER_NAMES),
    default="els",
    show_default=True,
    help="Denoiser (--machine is an alias). Score machines: ideal (memorises), es (equivariant, circular only), "
    "ls (local), els (equivariant local). The closed-form family (README table; parameters below): wiener, "
    "data-locality, pspc, smoothed, topk, knn, nearest.",
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
    help="Locality schedule k(sigma), required for ls/els, refused for ideal/es, optional for pspc: a preset "
    f"({', '.join(PRESETS)}; keyed by sigma, so any --grid and --steps), odd sizes lowest noise first "
    "('3,3,5,...': n sizes keyed to the n-step cosine grid), a schedule JSON file (or a directory holding "
    "schedule.json), or 'pretrained:<name>' (that model's calibrated schedule).  "
    "[default: none; with --like: the model's schedule.json]",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Sampler steps n (the grid has n + 1 sigmas; heun makes 2n - 1 denoiser calls).",
)
@click.option(
    "--sampler",
    type=click.Choice(tuple(SAMPLERS)),
    default="euler",
    show_default=True,
    help="euler: deterministic DDIM (the paper's); heun: EDM's 2nd-order method; ancestral: DDPM-style, its "
    "fresh noise drawn from each seed's generator.",
)
@click.option(
    "--grid",
    type=click.Choice(tuple(GRIDS)),
    default="cosine",
    show_default=True,
    help="Sigma grid: cosine (the paper's t_i = i/n), karras (EDM, sigma 80 -> 0.002, rho 7), vp-linear / "
    "vp-linear-trailing (DDPM linear betas as diffusers' DDIMScheduler spaces them).",
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
@click.option("--kernel", type=click.Choice(KERNELS), default="auto", show_default=True, help=(
    "LS/ELS without --provenance: 'triton' streams through the fused one-pass GPU kernel (float32 "
    "CUDA; pip install 'patchmosaic[gpu]'), 'torch' through the engine, 'auto' takes the kernel for "
    "float32 on CUDA when Triton is installed (README, 'Fused GPU kernel': 1.82x the engine on one H200). "
    "ELS on the CPU (float32): 'numba' streams every call through the compiled window-sum kernel at "
    "every patch size, with --provenance statistics too (top candidates stay on the engine); 'auto' "
    "does so from k = 7 up (README, 'Window-sum kernel')."))
@click.option("--kernel-precision", type=click.Choice(KERNEL_PRECISIONS), default="tf32x3", show_default=True, help=(
    "Products of the fused kernel: tf32x3 (split-precision tensor-core products) or ieee (float32 "
    "multiply-adds); both within the float32 engine's error against float64 (README)."))
@workers_option
@click.option(
    "--distributed",
    is_flag=True,
    help="Shard a score machine's training set over the processes started by torchrun (gloo on CPU): "
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
@family_options
@compute_options
def sample_command(**params: Any) -> None:
    """Sample images from a denoiser (a score machine, a closed-form method or a trained network).

    Writes grid.png, samples.npz (images [B, C, H, W] in [-1, 1], seeds, labels)
    and config.json (the resolved configuration) into --out.

    \b
    The initial noise of seed s depends on s only (patchmosaic.noise_for_seed),
    so any other model can be run from the same seeds:
      x_1 = torch.randn((C,H,W), generator=torch.Generator('cpu').manual_seed(s))
    and the sampler starts from x = x_1 * sqrt(1 + sigma_max^2) on any grid.

    \b
    Example (the demo):
      patchmosaic sample --dataset mnist --n-train 1000 --machine els \\
        --padding zeros --patch-sizes mnist-resnet-zeros --seeds 0-7 --out runs/els-mnist
    \b
    A published schedule on EDM's grid with Heun:
      patchmosaic sample --machine els --patch-sizes mnist-resnet-zeros --grid karras --steps 18 \\
        --sampler heun --n-train 1000 --seeds 0-7 --out runs/els-heun
    """
    ctx = click.get_current_context()
    explicit = {
        p.name for p in ctx.command.params
        if p.name and ctx.get_parameter_source(p.name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    }
    req = SampleRequest.from_params(params)
    set_threads(req.threads)
    device = resolve_device(req.device)
    model, like = params["model"], params["like"]
    try:
        if model is not None and like is not None:
            raise click.BadParameter("--model and --like exclude each other", param_hint="'--model'")
        if model is not None and req.provenance_top is not None:
            raise click.BadParameter("--provenance records a machine's source patches; it does not apply to --model",
                                     param_hint="'--provenance'")
        if model is not None and req.distributed:
            raise click.BadParameter("--distributed shards a machine's training set; it does not apply to --model",
                                     param_hint="'--distributed'")
        if model is not None:
            run_network_sample(spec=model, explicit=explicit, steps=req.steps, seed_spec=req.seeds,
                               label=req.label, out=req.out, overwrite=req.overwrite, resume=req.resume,
                               batch_size=req.batch_size, dtype=req.dtype, sampler=req.sampler, grid=req.grid,
                               device=device)
            return
        if like is not None:
            resolved = resolve_like(like, machine=req.kind, explicit=explicit, patch_sizes=req.patch_sizes,
                                    label=req.label)
            req = dataclasses.replace(
                req, **{k: resolved[k] for k in ("dataset", "n_train", "size", "padding", "patch_sizes")},
                steps=req.steps if "steps" in explicit else resolved["steps"],
                label_classes=0 if req.label is not None else resolved["num_classes"],
                extra_config=resolved["record"],
            )
        _run_sample(req, device)
    except LIBRARY_ERRORS as err:
        raise click.ClickException(str(err)) from err


@dataclass(frozen=True)
class SampleRequest:
    """The resolved flags of ``patchmosaic sample`` (one field per flag; see ``--help``)."""

    dataset: str  # --dataset
    n_train: int | None  # --n-train (None: all)
    size: int | None  # --size (None: native)
    kind: str  # --denoiser / --machine
    padding: str  # --padding (score machines)
    patch_sizes: str | None  # --patch-sizes spec
    steps: int  # --steps
    sampler: str  # --sampler
    grid: str  # --grid
    seeds: str  # --seeds spec
    label: int | None  # --label
    out: Path  # --out
    overwrite: bool  # --overwrite
    resume: bool  # --resume
    batch_size: int  # --batch-size
    dtype: str  # --dtype
    wrap: bool  # --wrap-training-patches
    chunk_elements: int  # --chunk-elements
    kernel: str  # --kernel
    kernel_precision: str  # --kernel-precision
    distributed: bool  # --distributed
    provenance_top: int | None  # --provenance-top with --provenance, else None
    device: str  # --device
    threads: int | None  # --threads
    workers: int | None  # --workers (None: chosen by device and --distributed)
    family: dict[str, Any] = field(default_factory=dict)  # the closed-form family's flags, as given
    label_classes: int = 0  # --like a conditional model: label = seed % classes
    extra_config: dict[str, Any] = field(default_factory=dict)  # recorded as is (--like)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "SampleRequest":
        return cls(
            dataset=params["dataset"], n_train=params["n_train"], size=params["size"], kind=params["machine"],
            padding=params["padding"], patch_sizes=params["patch_sizes"], steps=params["steps"],
            sampler=params["sampler"], grid=params["grid"], seeds=params["seeds"], label=params["label"],
            out=params["out"], overwrite=params["overwrite"], resume=params["resume"],
            batch_size=params["batch_size"], dtype=params["dtype"], wrap=params["wrap_training_patches"],
            chunk_elements=params["chunk_elements"], kernel=params["kernel"],
            kernel_precision=params["kernel_precision"], distributed=params["distributed"],
            provenance_top=params["provenance_top"] if params["provenance"] else None,
            device=params["device"], threads=params["threads"], workers=params["workers"],
            family={k: params[k] for k in (*(kw for _, kw, _, _ in FAMILY_PARAMS), "flips") if params[k] is not None},
        )

    @property
    def is_machine(self) -> bool:
        """A score machine (IS, ES, LS, ELS) rather than a closed-form family denoiser."""
        return self.kind in KINDS


def _resolve_schedule(kind: str, padding: str, spec: str | None, steps: int, wrap: bool) -> PatchSchedule | None:
    """Validate the denoiser/padding/schedule flags together; parse the schedule."""
    if kind not in KINDS:  # the closed-form family: only pspc takes a (sigma-keyed) window schedule
        if spec is not None and kind != "pspc":
            raise click.BadParameter(f"--denoiser {kind} has no patch schedule; drop --patch-sizes",
                                     param_hint="'--patch-sizes'")
        if spec is None:
            return None
        return parse_schedule_flag(spec)
    try:
        check_machine_options(kind, padding, wrap)  # the one check of kind x padding x wrap
    except ValueError as err:
        hint = "'--no-wrap-training-patches'" if "wrap" in str(err) else "'--padding'"
        raise click.BadParameter(str(err), param_hint=hint) from err
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
    return parse_schedule_flag(spec)


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


def _progress_callback(bar: tqdm, schedule: PatchSchedule | None) -> Callable[[dict], None]:
    """A sampler callback that advances ``bar`` by one step and shows sigma and k."""

    def callback(info: dict) -> None:
        k = None if schedule is None else schedule.size_at(info["sigma"])
        bar.set_postfix({"sigma": f"{info['sigma']:.3g}", "k": "-" if k is None else k}, refresh=False)
        bar.update(1)

    return callback


def _build_denoiser(req: SampleRequest, data: Any, schedule: PatchSchedule | None, torch_dtype: torch.dtype,
                    device: torch.device) -> Any:
    """The denoiser ``D(x, sigma)`` the flags describe, with its locality schedule bound (labels per batch)."""
    if req.is_machine:
        machine = ScoreMachine(
            data.images.to(torch_dtype),  # [N, C, H, W]
            kind=req.kind, padding=req.padding, labels=data.labels, wrap_training_patches=req.wrap,
            chunk_elements=req.chunk_elements, distributed=req.distributed, device=device,
            kernel=req.kernel, kernel_precision=req.kernel_precision,
            workers=resolve_workers(req.workers, device, distributed=req.distributed),
        )
        try:
            return machine.bind(patch_sizes=schedule)
        except ValueError as err:  # a size the machine's geometry cannot take on these images
            raise click.BadParameter(str(err), param_hint="'--patch-sizes'") from err
    if req.distributed:
        raise click.BadParameter(f"--distributed shards a score machine; it does not apply to --denoiser {req.kind}",
                                 param_hint="'--distributed'")
    refuse_workers(req.workers, req.kind)
    params = family_params(req.family, data.name, req.kind)
    if schedule is not None:
        if "patch_size" in params:
            raise click.BadParameter("pass --patch-size or --patch-sizes, not both", param_hint="'--patch-size'")
        params["patch_size"] = schedule
    try:
        return build_denoiser(req.kind, data.images.to(device=device, dtype=torch_dtype), labels=data.labels, **params)
    except ValueError as err:  # a parameter out of range or missing: the flags are wrong
        raise click.BadParameter(str(err), param_hint="'--denoiser'") from err


def _compute_record(req: SampleRequest, denoiser: Any, device: torch.device) -> dict[str, Any]:
    """Where the run computed (for its timings; a resumed run may change it): device, torch threads and,
    for score machines, workers and kernel (the one the machine's calls take; for ELS on the CPU also the
    patch sizes whose calls take the window-sum kernel, except a --provenance run's last call, which
    records top candidates on the engine)."""
    record: dict[str, Any] = {"device": str(device), "threads": torch.get_num_threads()}
    if req.is_machine:
        machine = denoiser.machine
        fused = (req.kind in PATCH_KINDS and req.provenance_top is None
                 and machine.uses_fused_kernel(device, DTYPES[req.dtype]))
        record.update(workers=machine.workers, kernel="triton" if fused else "torch",
                      kernel_precision=req.kernel_precision if fused else None)
        schedule = getattr(denoiser, "patch_sizes", None)
        if not fused and schedule is not None:
            track = None if req.provenance_top is None else 0
            window = [k for k in sorted(set(schedule.sizes))
                      if machine.uses_window_kernel(device, DTYPES[req.dtype], k, track)]
            if window:
                record.update(kernel="numba", window_kernel_sizes=window)
    return record


def _check_kernel(req: SampleRequest, device: torch.device) -> None:
    """``--kernel triton`` only where the fused kernel runs: LS/ELS without provenance, float32 on CUDA
    (or CPU under ``TRITON_INTERPRET=1``), Triton installed; ``--kernel numba`` only for ELS in float32
    on the CPU."""
    if req.kernel == "numba":
        if req.kind != "els":
            raise click.BadParameter(f"the window-sum kernel runs the ELS machine, not --denoiser {req.kind}",
                                     param_hint="'--kernel'")
        if device.type != "cpu" or req.dtype != "float32":
            raise click.BadParameter(f"the window-sum kernel runs float32 on the CPU, got --dtype {req.dtype} on "
                                     f"--device {device}", param_hint="'--kernel'")
        return
    if req.kernel != "triton":
        return
    if req.kind not in PATCH_KINDS:
        raise click.BadParameter(f"the fused kernel runs the LS and ELS machines, not --denoiser {req.kind}",
                                 param_hint="'--kernel'")
    if req.provenance_top is not None:
        raise click.BadParameter("--provenance records statistics and top candidates on the engine: "
                                 "use --kernel auto or torch", param_hint="'--kernel'")
    from patchmosaic.kernels import (  # imports triton, when installed
        TRITON_AVAILABLE,
        triton_usable,
    )

    if not TRITON_AVAILABLE:
        raise click.BadParameter("needs the triton package: pip install 'patchmosaic[gpu]'", param_hint="'--kernel'")
    if not triton_usable(device, DTYPES[req.dtype]):
        raise click.BadParameter(f"the fused kernel runs float32 on CUDA, got --dtype {req.dtype} on "
                                 f"--device {device}", param_hint="'--kernel'")


def _run_sample(req: SampleRequest, device: torch.device) -> None:
    """Body of ``patchmosaic sample`` for score machines and the closed-form family.

    ``req.label_classes > 0`` (``--like`` a conditional model) labels each seed with
    :func:`~patchmosaic.pretrained.label_for_seed` instead of one ``label``.
    """
    # 1. Cheap validation of the flags, then the output directory: no work yet.
    seeds = parse_seeds_flag(req.seeds)
    if req.provenance_top is not None and not (
        req.is_machine or getattr(DENOISERS[req.kind].build, "reports_provenance", False)
    ):
        raise click.BadParameter(
            f"--provenance records where each pixel came from: score machines, pspc and data-locality; "
            f"not --denoiser {req.kind}", param_hint="'--provenance'")
    if req.is_machine and req.family:
        raise click.BadParameter(f"{', '.join(sorted(req.family))} apply to the closed-form family, not to "
                                 f"--denoiser {req.kind}", param_hint="'--denoiser'")
    _check_kernel(req, device)
    schedule = _resolve_schedule(req.kind, req.padding, req.patch_sizes, req.steps, req.wrap)
    sigmas = SamplingSetup(req.steps, req.sampler, req.grid).sigmas  # [steps + 1], descending, last 0
    calls = denoiser_calls(req.sampler, sigmas)
    writes = (GRID_FILE, SAMPLES_FILE, CONFIG_FILE) + ((PROVENANCE_FILE,) if req.provenance_top is not None else ())
    check_out_flag(req.out, req.overwrite, writes, resume=req.resume)
    rank = _init_distributed() if req.distributed else 0

    # 2. Data and denoiser; the machine's geometry checks every patch size (fails before sampling).
    data = load_dataset(req.dataset, n_train=req.n_train, size=req.size)
    label_name = _check_label(data, req.label)
    seed_labels = labels_for_seeds(seeds, req.label_classes) if req.label_classes else None
    for c in sorted(set(seed_labels or [])):
        _check_label(data, c)
    torch_dtype = DTYPES[req.dtype]
    C, H, W = data.images.shape[1:]
    denoiser = _build_denoiser(req, data, schedule, torch_dtype, device)
    labels = seed_labels if seed_labels is not None else (None if req.label is None else [req.label] * len(seeds))
    label_of = dict(zip(seeds, labels)) if labels is not None else None
    extra_config = dict(req.extra_config)
    if req.provenance_top is not None:
        extra_config["provenance"] = {
            "file": PROVENANCE_FILE, "top": req.provenance_top,
            "contents": "top source patches per pixel at the final denoiser call; N_eff and entropy at every call"}
    settings = sample_settings(SamplingSetup(req.steps, req.sampler, req.grid, req.dtype), record={
        "dataset": req.dataset,
        "dataset_name": data.name,
        "n_train": len(data),
        "size": "native" if req.size is None else req.size,
        "image_shape": [C, H, W],
        "classes": None if data.classes is None else list(data.classes),
        "machine": req.kind,
        "denoiser_params": recordable(family_params(req.family, data.name, req.kind)) if not req.is_machine else None,
        "padding": req.padding if req.is_machine else None,
        "wrap_training_patches": req.wrap if (req.kind == "els" and req.padding == "circular") else None,
        "patch_sizes": None if schedule is None else list(schedule.on_grid(sigmas))[::-1],
        "patch_schedule": None if schedule is None else {"sizes": list(schedule.sizes), "sigmas": list(schedule.sigmas)},
        "patch_sizes_source": None if schedule is None else schedule.name,
        "patch_sizes_spec": req.patch_sizes,
        "label": req.label,
        "label_name": label_name,
        "chunk_elements": req.chunk_elements if req.is_machine else None,
        "compute": _compute_record(req, denoiser, device),
        **({"labels": seed_labels, "label_rule": LABEL_RULE} if seed_labels is not None else {}),
        **extra_config,
    })
    run = open_sample_run(req.out, seeds, settings, provenance_top=req.provenance_top, resume=req.resume,
                          writer=rank == 0)

    # 3. Sample the pending seeds in batches (each seed's noise depends on the seed only);
    #    every finished batch is on disk at once, so an interruption loses nothing finished.
    pending = run.pending
    recorders: dict[int, ProvenanceRecorder] = {}

    def wrap(bound: Any) -> Any:  # same sampler, through a recording denoiser
        if req.provenance_top is None:
            return bound
        recorder = ProvenanceRecorder(bound, steps=calls, top=req.provenance_top)
        recorders[id(recorder)] = recorder
        return recorder

    def on_batch(batch: list[int], images: torch.Tensor, bound: Any) -> None:
        prov = recorders.pop(id(bound)).arrays() if req.provenance_top is not None else None
        run.add_batch(batch, images, None if label_of is None else [label_of[s] for s in batch], prov)

    n_batches = -(-len(pending) // req.batch_size)
    start = time.perf_counter()
    with tqdm(total=(len(sigmas) - 1) * n_batches, desc="sampling", unit="step", file=sys.stderr,
              dynamic_ncols=True, disable=rank != 0) as bar, report_kept_samples(run, req.out):
        sample_seeds(
            denoiser, pending, (C, H, W), sigmas=sigmas, sampler=req.sampler,
            labels=None if label_of is None else [label_of[s] for s in pending], batch_size=req.batch_size,
            dtype=torch_dtype, device=device, wrap=wrap, callback=_progress_callback(bar, schedule), on_batch=on_batch,
        )
    wall = time.perf_counter() - start
    if req.distributed:
        import torch.distributed as dist

        world = dist.get_world_size()
        dist.destroy_process_group()
        if rank != 0:  # every rank holds the merged result; rank 0 writes it
            return
        run.settings["distributed"] = {"backend": "gloo", "world_size": world}

    # 4. Outputs, in the order of --seeds.
    click.echo(f"wrote {run.finish(batch_size=req.batch_size, wall=wall)}")
    if req.provenance_top is not None:
        click.echo(f"wrote provenance (top {req.provenance_top} source patches per pixel) to "
                   f"{req.out / PROVENANCE_FILE}")
