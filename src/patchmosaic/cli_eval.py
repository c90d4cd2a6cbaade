"""``patchmosaic calibrate``, ``evaluate`` and ``pretrained``; the network side of ``sample``.

* ``calibrate`` (:mod:`patchmosaic.calibration`): the patch size per step that
  best matches a trained network along its own DDIM trajectory; writes
  ``schedule.json`` (accepted by ``sample --patch-sizes``) and ``config.json``.
* ``evaluate`` (:mod:`patchmosaic.evaluation`): network vs ELS (with a
  schedule) vs IS from the same seeds; writes ``metrics.json``,
  ``scatter.png``, ``comparison.png`` and ``samples_<name>.npz``.
* ``pretrained`` (:mod:`patchmosaic.pretrained`): lists, and publishes, the
  pretrained models.

The machine always uses the network's training subset (dataset, n_train,
image size from the checkpoint's training config) and its padding; class-
conditional models label seed s as ``s % num_classes`` (:func:`label_for_seed`).
These commands are registered into the main group by :mod:`patchmosaic.cli`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from tqdm import tqdm

from patchmosaic.calibration import (
    METRICS,
    calibrate,
    check_candidates,
    parse_candidates,
)
from patchmosaic.checkpoints import load_checkpoint
from patchmosaic.data import ImageDataset
from patchmosaic.evaluation import evaluate, run_sampler, save_comparison, save_scatter
from patchmosaic.denoisers import DEFAULT_CHUNK_ELEMENTS, EpsDenoiser, ScoreMachine
from patchmosaic.models import ModelConfig, config_to_dict
from patchmosaic.pretrained import (
    LABEL_RULE,
    METRICS_FILE,
    PRETRAINED_ENV,
    SCHEDULE_FILE,
    ModelSource,
    TrainingSet,
    available_pretrained,
    labels_for_seeds,
    pretrained_dir,
    pretrained_root,
    publish_pretrained,
    resolve_model,
    resolve_schedule_spec,
    training_set,
)
from patchmosaic.runs import (
    BATCH_DIR,
    CONFIG_FILE,
    GRID_FILE,
    SAMPLES_FILE,
    ResumeError,
    SampleRun,
    check_run_dir,
    load_samples,
    parse_seeds,
    sample_settings,
    save_samples,
    undo_new_dir_on_failure,
    write_config,
)
from patchmosaic.samplers import NOISE_RULE, noise_for_seeds
from patchmosaic.schedules import PatchSchedule, sigmas_cosine

__all__ = [
    "calibrate_command",
    "check_out_flag",
    "evaluate_command",
    "open_sample_run",
    "parse_seeds_flag",
    "pretrained_group",
    "report_kept_samples",
    "resolve_like",
    "run_network_sample",
    "undo_new_out_on_failure",
]

LIBRARY_ERRORS = (ValueError, OSError, ImportError)
PATCH_MACHINES = ("els", "ls")
MODEL_HELP = (
    "Trained network: a checkpoint file, a run directory holding model.pt, 'pretrained:<name>' or a bare "
    "pretrained name (see `patchmosaic pretrained`)."
)
CALIBRATE_FILES = (SCHEDULE_FILE, CONFIG_FILE)
EVALUATE_FILES = (METRICS_FILE, "scatter.png", "comparison.png", "samples_network.npz", "samples_<machine>.npz",
                  "samples_ideal.npz")


# ------------------------------------------------------------------ shared


def check_out_flag(path: Path, overwrite: bool, files: tuple[str, ...], *, resume: bool = False) -> Path:
    """:func:`patchmosaic.runs.check_run_dir` as a usage error (exit 2) naming ``--out``; nothing is created.

    Every command with ``--out`` checks it with this, before any work.
    """
    if resume and overwrite:
        raise click.BadParameter("--resume continues the run in --out and --overwrite replaces it; pass one",
                                 param_hint="'--resume'")
    try:
        return check_run_dir(path, overwrite=overwrite, files=files, resume=resume)
    except FileNotFoundError as err:
        raise click.BadParameter(str(err), param_hint="'--resume'") from err
    except FileExistsError as err:
        raise click.BadParameter(str(err), param_hint="'--out'") from err


def parse_seeds_flag(spec: str) -> list[int]:
    """:func:`patchmosaic.runs.parse_seeds` as a ``--seeds`` usage error (exit 2); every command uses this."""
    try:
        return parse_seeds(spec)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="'--seeds'") from err


def undo_new_out_on_failure(
    files: tuple[str, ...] = (), keep_if: str | None = None
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorate a command so that a failure removes the ``--out`` it created (:func:`undo_new_dir_on_failure`)."""

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(command)
        def wrapper(*args: Any, **params: Any) -> None:
            with undo_new_dir_on_failure(params["out"], files=files, keep_if=keep_if):
                command(*args, **params)

        return wrapper

    return decorate


def open_sample_run(out: Path, seeds: list[int], settings: dict, **kwargs: object) -> SampleRun:
    """:class:`SampleRun` with a failed ``--resume`` as a usage error; writes the starting config.json."""
    try:
        run = SampleRun(out, seeds, settings, **kwargs)  # type: ignore[arg-type]
    except ResumeError as err:
        raise click.BadParameter(str(err), param_hint="'--resume'") from err
    if run.resume and run.done:
        click.echo(f"resuming {out}: {len(run.done)} of {len(seeds)} seeds already sampled, "
                   f"{len(run.pending)} to go", err=True)
    run.start()
    return run


@contextlib.contextmanager
def report_kept_samples(run: SampleRun, out: Path) -> Iterator[None]:
    """On an interruption or error, say how many finished samples are kept and how to continue."""
    try:
        yield
    except BaseException:
        if run.writer and run.done:
            click.echo(f"\n{len(run.done)} finished samples are kept in {out}/{BATCH_DIR}; continue with the same "
                       "command and --resume", err=True)
        raise


class LoadedModel:
    """A resolved ``--model``: the network as a denoiser, its configs and training set."""

    def __init__(self, spec: str) -> None:
        self.source: ModelSource = resolve_model(spec)
        model, config, meta = load_checkpoint(self.source.checkpoint)
        self.config: ModelConfig = config
        self.meta: dict[str, Any] = meta
        self.denoiser = EpsDenoiser(model)
        self.num_classes = int(config.num_classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.config.in_channels, self.config.image_size, self.config.image_size)

    def training_set(self) -> TrainingSet:
        return training_set(self.config, self.meta["train_config"], where=f"checkpoint {self.source.checkpoint}")

    def labels(self, seeds: list[int]) -> list[int] | None:
        return labels_for_seeds(seeds, self.num_classes)

    def record(self) -> dict[str, Any]:
        """What a run's config records about the model."""
        return {
            "model": self.source.describe(),
            "model_checkpoint": str(self.source.checkpoint),
            "model_config": config_to_dict(self.config),
            "model_step": int(self.meta["step"]),
            "train_config": self.meta["train_config"],
        }


def _machine_for(model: LoadedModel, kind: str, chunk_elements: int) -> tuple[ScoreMachine, ImageDataset, TrainingSet]:
    """A score machine on the network's exact training subset, with the network's padding."""
    ts = model.training_set()
    data = ts.load()
    if tuple(data.images.shape[1:]) != model.shape:
        raise ValueError(
            f"the training set {ts.dataset!r} (n_train={ts.n_train}) loads as {list(data.images.shape[1:])} images "
            f"but the network expects {list(model.shape)}"
        )
    if model.num_classes and data.labels is None:
        raise ValueError(f"the model is class-conditional but its training set {ts.dataset!r} has no labels")
    machine = ScoreMachine(
        data.images, kind=kind, padding=ts.padding, labels=data.labels if model.num_classes else None,
        chunk_elements=chunk_elements,
    )
    return machine, data, ts


def _threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------ sample --model / --like

# Flags of `sample` that describe a machine and so cannot be combined with --model.
MACHINE_FLAGS = ("dataset", "n_train", "size", "machine", "padding", "patch_sizes", "wrap_training_patches",
                 "chunk_elements")
# Flags that --like sets from the model (--patch-sizes and --steps may still be given).
LIKE_FLAGS = ("dataset", "n_train", "size", "padding")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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
    clashes = [_flag(n) for n in LIKE_FLAGS if n in explicit]
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
    if patch_sizes is None:
        if not model.source.schedule_path.is_file():
            raise click.BadParameter(
                f"model {model.source.describe()} has no {SCHEDULE_FILE} in {model.source.directory}; "
                "calibrate it (`patchmosaic calibrate`) or pass --patch-sizes",
                param_hint="'--like'",
            )
        patch_sizes = str(model.source.schedule_path)
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
) -> None:
    """Body of ``patchmosaic sample --model``: the network through the same seeds, files and config."""
    clashes = [_flag(n) for n in MACHINE_FLAGS if n in explicit]
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
    settings = sample_settings(steps=steps, dtype=dtype, record={
        "denoiser": "network",
        **model.record(),
        "machine": None,
        "image_shape": list(model.shape),
        "label": label,
        "labels": labels,
        "label_rule": None if labels is None else (f"--label {label}" if label is not None else LABEL_RULE),
    })
    run = open_sample_run(out, seeds, settings, resume=resume)
    batches = run.batches(batch_size)
    start = time.perf_counter()
    with tqdm(total=steps * len(batches), desc="sampling", unit="call", file=sys.stderr,
              dynamic_ncols=True) as bar, report_kept_samples(run, out):
        for batch in batches:  # each finished batch is on disk at once
            batch_labels = None if label_of is None else [label_of[s] for s in batch]
            images = run_sampler(model.denoiser, batch, model.shape, sigmas=sigmas_cosine(steps), labels=batch_labels,
                                 batch_size=len(batch), dtype=torch_dtype, bar=bar)  # [b, C, H, W]
            run.add_batch(batch, images, batch_labels)
    wall = time.perf_counter() - start
    click.echo(f"wrote {run.finish(batch_size=batch_size, wall=wall, noun='network samples')}")


# ------------------------------------------------------------------ calibrate


@click.command("calibrate")
@click.option("--model", "model_spec", required=True, help=MODEL_HELP)
@click.option("--machine", type=click.Choice(PATCH_MACHINES), default="els", show_default=True,
              help="Patch machine whose patch size is calibrated (on the network's training subset and padding).")
@click.option("--candidates", default="3,5,7,9,11,13,15,17,19,21", show_default=True,
              help="Odd patch sizes to try: a list '3,5,7' or odd ranges '3-31' (= 3,5,...,31). "
              "Sizes the machine does not allow are an error.")
@click.option("--seeds", default="0-9", show_default=True,
              help="Seeds of the network trajectories (all in one batch per machine call); "
              "conditional models use label = seed % num_classes.")
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True,
              help="DDIM steps; the schedule gets one size per step.")
@click.option("--metric", type=click.Choice(METRICS), default="cosine", show_default=True,
              help="Match between the network's and a machine's x0 estimate at the same x_t: cosine similarity "
              "(higher wins) or L2 distance (lower wins).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for schedule.json and config.json; must be new or empty unless --overwrite.")
@click.option("--overwrite", is_flag=True, default=False,
              help="Reuse a non-empty --out: replace schedule.json and config.json, keep every other file.")
@click.option("--chunk-elements", type=click.IntRange(min=1), default=DEFAULT_CHUNK_ELEMENTS, show_default=True,
              help="Memory bound of the machine: elements of one streamed logit block.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch.set_num_threads for this run.  [default: torch's]")
def calibrate_command(
    model_spec: str,
    machine: str,
    candidates: str,
    seeds: str,
    steps: int,
    metric: str,
    out: Path,
    overwrite: bool,
    chunk_elements: int,
    threads: int | None,
) -> None:
    """Calibrate a locality schedule k(t) against a trained network.

    The network drives deterministic DDIM from each seed's noise; at every step
    t = i/steps each candidate machine denoises the network's current x_t and
    the candidate whose x0 estimate best matches the network's wins. The
    schedule takes the median over seeds per step, rounded down to a candidate
    (with odd candidates 3,5,7,...: the lower odd size when the median falls
    between two), and stores it lowest noise first: the size chosen at t = i/steps
    is entry i-1, the entry `sample --patch-sizes FILE` uses at that time.

    Every candidate costs one full machine call per step (no work is shared
    across sizes); the reported cost ratio is the time of all candidate calls
    over the time of the chosen size's calls.

    \b
    Example:
      patchmosaic calibrate --model runs/train-mnist --machine els \\
        --candidates 3-21 --seeds 0-9 --out runs/calibrate-mnist
      patchmosaic sample --patch-sizes runs/calibrate-mnist/schedule.json ...
    """
    try:
        _threads(threads)
        cands = _parse_candidates(candidates)
        seed_list = parse_seeds_flag(seeds)
        out = check_out_flag(out, overwrite, CALIBRATE_FILES)
        model = LoadedModel(model_spec)
        score_machine, data, ts = _machine_for(model, machine, chunk_elements)
        try:
            cands = check_candidates(score_machine, cands)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="'--candidates'") from err
        labels = model.labels(seed_list)
        noise = noise_for_seeds(seed_list, model.shape)  # [S, C, H, W]
        start = time.perf_counter()
        with tqdm(total=steps, desc="calibrating", unit="step", file=sys.stderr, dynamic_ncols=True) as bar:

            def progress(i: int, sigma: float, k: int) -> None:
                bar.set_postfix({"sigma": f"{sigma:.3g}", "k": k}, refresh=False)
                bar.update(1)

            result = calibrate(
                model.denoiser, score_machine, noise, candidates=cands, steps=steps, metric=metric,
                label=None if labels is None else torch.tensor(labels), seeds=seed_list, progress=progress,
            )
        wall = time.perf_counter() - start
        with undo_new_dir_on_failure(out, files=CALIBRATE_FILES):  # no half-written --out on a failed write
            out.mkdir(parents=True, exist_ok=True)
            settings = {
                **model.record(),
                "machine": machine,
                "training_set": {**ts.to_dict(), "dataset_name": data.name, "n_images": len(data)},
                "label_rule": None if labels is None else LABEL_RULE,
                "steps": steps,
                "threads": torch.get_num_threads(),
                "wall_time_s": round(wall, 3),
            }
            result.extra.update({"model": model.source.describe(), "machine": machine,
                                 "training_set": settings["training_set"], "wall_time_s": round(wall, 3),
                                 "threads": torch.get_num_threads()})
            result.save(out / SCHEDULE_FILE)
            write_config(out / CONFIG_FILE, {**settings, "candidates": list(cands), "metric": metric, "seeds": seed_list,
                                             "patch_sizes": list(result.schedule.sizes),
                                             "files": {"schedule": SCHEDULE_FILE, "config": CONFIG_FILE}})
    except LIBRARY_ERRORS as err:
        raise click.ClickException(str(err)) from err
    cost = result.cost()
    click.echo(f"calibrated schedule (lowest noise first, entry i-1 at t = i/{steps}): "
               f"{','.join(map(str, result.schedule.sizes))}")
    click.echo(
        f"{len(seed_list)} seeds x {len(cands)} candidates x {steps} steps in {wall:.1f} s; cost = "
        f"{cost['total_ratio']:.1f} x one machine call at the chosen k per step "
        f"({cost['candidate_seconds_total']:.1f} s of candidate calls vs {cost['chosen_k_seconds_total']:.1f} s; "
        "each candidate is a full machine call, nothing shared across k)"
    )
    click.echo(f"wrote {out / SCHEDULE_FILE} and {out / CONFIG_FILE}")


def _parse_candidates(spec: str) -> tuple[int, ...]:
    try:
        return parse_candidates(spec)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="'--candidates'") from err


# ------------------------------------------------------------------ evaluate


def _load_reuse(
    run_dir: Path,
    *,
    machine: str,
    data: ImageDataset,
    ts: TrainingSet,
    schedule: PatchSchedule,
    seeds: list[int],
    labels: list[int] | None,
) -> tuple[str, np.ndarray]:
    """Samples of a previous ``sample`` run for ``seeds``, after checking its config matches.

    Returns:
        ``(machine name, [S, C, H, W] images in the order of seeds)``.

    Raises:
        click.BadParameter: Listing every mismatch.
    """
    hint = "'--reuse'"
    cfg_path = run_dir / CONFIG_FILE
    if not cfg_path.is_file():
        raise click.BadParameter(f"{run_dir} has no {CONFIG_FILE}: not a `patchmosaic sample` run directory", param_hint=hint)
    cfg = json.loads(cfg_path.read_text())
    kind = cfg.get("machine")
    if kind not in (machine, "ideal"):
        raise click.BadParameter(
            f"{run_dir} holds {'network' if kind is None else kind!r} samples; --reuse takes a --machine {machine} "
            "or --machine ideal sample run",
            param_hint=hint,
        )
    size = "native" if ts.image_size is None else ts.image_size
    expected: dict[str, Any] = {"dataset_name": data.name, "n_train": len(data), "size": size,
                                "steps": len(schedule), "dtype": "float32"}
    if kind != "ideal":  # the ideal machine does not depend on padding or a schedule
        expected.update({"padding": ts.padding, "patch_sizes": list(schedule.sizes)})
        if ts.padding == "circular":
            expected["wrap_training_patches"] = True
    problems = [f"{k} is {cfg.get(k)!r}, expected {v!r}" for k, v in expected.items() if cfg.get(k) != v]
    archive = load_samples(run_dir)
    have = {int(s): i for i, s in enumerate(archive["seeds"].tolist())}
    missing = [s for s in seeds if s not in have]
    if missing:
        problems.append(f"seeds {missing[:10]}{' ...' if len(missing) > 10 else ''} are missing "
                        f"({len(missing)} of {len(seeds)})")
    if not problems:
        rows = [have[s] for s in seeds]
        got = archive.get("labels")
        if labels is None and got is not None:
            problems.append("its samples are class-conditional but the model is unconditional")
        elif labels is not None:
            if got is None:
                problems.append(f"its samples are unconditional but the model is conditional ({LABEL_RULE})")
            elif got[rows].tolist() != labels:
                problems.append(f"its labels differ from {LABEL_RULE} (e.g. seed {seeds[0]}: "
                                f"{int(got[rows[0]])} vs {labels[0]})")
    if problems:
        raise click.BadParameter(f"{run_dir} does not match this evaluation: " + "; ".join(problems), param_hint=hint)
    return kind, archive["images"][rows]


@click.command("evaluate")
@click.option("--model", "model_spec", required=True, help=MODEL_HELP)
@click.option("--machine", type=click.Choice(PATCH_MACHINES), default="els", show_default=True,
              help="Patch machine run with --patch-sizes (the ideal machine IS always runs as the memorising baseline).")
@click.option("--patch-sizes", default=None,
              help="Locality schedule: a schedule.json (from calibrate), its directory, 'pretrained:<name>', a preset "
              "or a list.  [default: the model's own schedule.json]")
@click.option("--seeds", default="0-99", show_default=True,
              help="Seeds; network and machines start from the same noise; conditional: label = seed % num_classes.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for metrics.json, scatter.png, comparison.png and samples_*.npz; new or empty unless "
              "--overwrite.")
@click.option("--overwrite", is_flag=True, default=False,
              help="Reuse a non-empty --out: replace the files this command writes, keep every other file.")
@click.option("--reuse", "reuse_dirs", type=click.Path(file_okay=False, exists=True, path_type=Path), multiple=True,
              help="A previous `sample` run (--machine els or ideal) whose samples replace that machine's run; its "
              "config must match (dataset, n_train, size, padding, schedule, steps, float32, labels) and its seeds "
              "must include --seeds. Repeatable.")
@click.option("--batch-size", type=click.IntRange(min=1), default=10, show_default=True,
              help="Seeds per sampler call.")
@click.option("--bootstrap-resamples", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Bootstrap resamples for the 95% intervals of the medians.")
@click.option("--bootstrap-seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="numpy default_rng seed of the bootstrap.")
@click.option("--comparison-rows", type=click.IntRange(min=1), default=8, show_default=True,
              help="Seeds (rows) shown in comparison.png.")
@click.option("--chunk-elements", type=click.IntRange(min=1), default=DEFAULT_CHUNK_ELEMENTS, show_default=True,
              help="Memory bound of the machines: elements of one streamed logit block.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch.set_num_threads for this run.  [default: torch's]")
def evaluate_command(
    model_spec: str,
    machine: str,
    patch_sizes: str | None,
    seeds: str,
    out: Path,
    overwrite: bool,
    reuse_dirs: tuple[Path, ...],
    batch_size: int,
    bootstrap_resamples: int,
    bootstrap_seed: int,
    comparison_rows: int,
    chunk_elements: int,
    threads: int | None,
) -> None:
    """Compare a trained network with the ELS machine (and the ideal machine IS), seed by seed.

    For each seed the network, ELS (with the schedule) and IS run DDIM from
    the same noise, on the network's training subset and padding. Per seed:
    the Pearson r of the final images (the number the paper's code reports as
    "r^2"), its square r^2, and R^2 = 1 - SS_res/SS_tot with the network as
    reference. Aggregates: medians with 95% bootstrap intervals, and the
    fraction of seeds where ELS beats IS on r.

    \b
    Example:
      patchmosaic evaluate --model runs/train-mnist --machine els \\
        --patch-sizes runs/calibrate-mnist/schedule.json --seeds 0-99 --out runs/eval-mnist
    """
    try:
        _threads(threads)
        seed_list = parse_seeds_flag(seeds)
        out = check_out_flag(out, overwrite, EVALUATE_FILES)
        model = LoadedModel(model_spec)
        spec = patch_sizes
        if spec is None:
            if not model.source.schedule_path.is_file():
                raise click.BadParameter(
                    f"model {model.source.describe()} has no {SCHEDULE_FILE} in {model.source.directory}; "
                    "pass --patch-sizes (e.g. the schedule.json of `patchmosaic calibrate`)",
                    param_hint="'--patch-sizes'",
                )
            spec = str(model.source.schedule_path)
        try:
            schedule = PatchSchedule.parse(resolve_schedule_spec(spec))
        except (ValueError, FileNotFoundError) as err:
            raise click.BadParameter(str(err), param_hint="'--patch-sizes'") from err
        patch_machine, data, ts = _machine_for(model, machine, chunk_elements)
        baseline = ScoreMachine(data.images, kind="ideal", padding=ts.padding,
                                labels=data.labels if model.num_classes else None, chunk_elements=chunk_elements)
        patch_machine.bind(patch_sizes=schedule)  # validates every size before any work
        labels = model.labels(seed_list)
        reuse: dict[str, np.ndarray] = {}
        for d in reuse_dirs:
            name, images = _load_reuse(d, machine=machine, data=data, ts=ts, schedule=schedule, seeds=seed_list,
                                       labels=labels)
            if name in reuse:
                raise click.BadParameter(f"two --reuse directories hold {name} samples", param_hint="'--reuse'")
            reuse[name] = images
        start = time.perf_counter()
        result = evaluate(
            model.denoiser, patch_machine, baseline, seed_list, model.shape, patch_sizes=schedule, labels=labels,
            names=(machine, "ideal"), train_images=data.images, reuse=reuse, batch_size=batch_size,
            resamples=bootstrap_resamples, bootstrap_seed=bootstrap_seed,
        )
        wall = time.perf_counter() - start
        written = (METRICS_FILE, "scatter.png", "comparison.png", *(f"samples_{n}.npz" for n in result.images))
        with undo_new_dir_on_failure(out, files=written):  # no half-written --out on a failed write
            out.mkdir(parents=True, exist_ok=True)
            files = {"metrics": METRICS_FILE, "scatter": "scatter.png", "comparison": "comparison.png"}
            for name, images in result.images.items():
                files[f"samples_{name}"] = f"samples_{name}.npz"
                save_samples(out / f"samples_{name}.npz", images, seed_list, labels)
            summary = result.summary
            per = {row["seed"]: row for row in summary["per_seed"]}
            save_scatter(out / "scatter.png", [per[s][f"pearson_r_{machine}"] for s in seed_list],
                         [per[s]["pearson_r_ideal"] for s in seed_list], machine=machine.upper(), baseline="IS")
            nearest = data.images.numpy()[[per[s]["nearest_train_index"] for s in seed_list]]  # [S, C, H, W]
            save_comparison(out / "comparison.png",
                            [("network", result.images["network"]), (machine.upper(), result.images[machine]),
                             ("IS", result.images["ideal"]), ("nearest train", nearest)],
                            seed_list, labels=labels, rows=comparison_rows)
            config = {
                **model.record(),
                "machine": machine,
                "baseline": "ideal",
                "training_set": {**ts.to_dict(), "dataset_name": data.name, "n_images": len(data)},
                "patch_sizes": list(schedule.sizes),
                "patch_sizes_source": schedule.name,
                "steps": len(schedule),
                "seeds": seed_list,
                "labels": labels,
                "label_rule": None if labels is None else LABEL_RULE,
                "reuse": {name: str(d) for d, name in zip(reuse_dirs, reuse)},
                "batch_size": batch_size,
                "threads": torch.get_num_threads(),
                "noise_rule": NOISE_RULE,
                "metrics": {
                    "pearson_r": "Pearson correlation of the flattened final images (reported as 'r^2' by the paper's code)",
                    "r_squared": "pearson_r ** 2",
                    "R2": "1 - SS_res / SS_tot, network as the reference",
                    "aggregate": f"median over seeds, percentile bootstrap 95% interval ({bootstrap_resamples} resamples, "
                    f"numpy default_rng({bootstrap_seed}))",
                    "nearest_train": "L2-nearest training image to the network's sample (whole training subset)",
                },
                "wall_time_s": round(wall, 3),
                "seconds_per_seed": {k: None if v is None else round(v, 4) for k, v in result.seconds_per_seed.items()},
                "files": files,
            }
            payload = {"config": config, **summary}
            write_config(out / METRICS_FILE, payload)
    except LIBRARY_ERRORS as err:
        raise click.ClickException(str(err)) from err
    agg = summary["aggregates"]
    click.echo(f"{len(seed_list)} seeds, schedule {','.join(map(str, schedule.sizes))}, {wall:.1f} s")
    for name, label in ((machine, machine.upper()), ("ideal", "IS")):
        a = agg[name]
        click.echo(
            f"  {label:>5}: median r = {a['pearson_r']['median']:.3f} [{a['pearson_r']['ci_low']:.3f}, "
            f"{a['pearson_r']['ci_high']:.3f}], r^2 = {a['r_squared']['median']:.3f}, "
            f"R^2 = {a['R2']['median']:.3f} [{a['R2']['ci_low']:.3f}, {a['R2']['ci_high']:.3f}]"
        )
    frac = summary["fraction_machine_beats_baseline"]
    click.echo(f"  {machine.upper()} beats IS on {frac['wins']}/{frac['n']} seeds ({frac['fraction']:.0%})")
    click.echo(f"wrote {out}/ ({', '.join(files.values())})")


# ------------------------------------------------------------------ pretrained


def _describe(name: str) -> str:
    """One line per pretrained model: training set, schedule, headline metrics (or why they are unreadable)."""
    parts = [name]
    try:
        d = pretrained_dir(name)
    except (ValueError, OSError) as err:
        return f"{name} | unusable: {err}"
    try:
        _, config, meta = load_checkpoint(d)
        ts = training_set(config, meta["train_config"])
        cond = f", {ts.num_classes}-class conditional" if ts.num_classes else ""
        parts.append(f"{config_to_dict(config)['arch']} on {ts.dataset} (n_train={ts.n_train}), "
                     f"padding {ts.padding}{cond}")
    except (ValueError, OSError) as err:
        parts.append(f"unreadable: {err}")
    if (d / SCHEDULE_FILE).is_file():
        try:
            parts.append("schedule " + ",".join(map(str, PatchSchedule.load(d / SCHEDULE_FILE).sizes)))
        except ValueError as err:
            parts.append(f"unreadable {d / SCHEDULE_FILE}: {err}")
    else:
        parts.append(f"no {SCHEDULE_FILE}")
    if (d / METRICS_FILE).is_file():
        try:
            agg = json.loads((d / METRICS_FILE).read_text())["aggregates"]
            rs = [f"{n} r={float(agg[n]['pearson_r']['median']):.3f}" for n in ("els", "ideal") if n in agg]
        except (ValueError, KeyError, TypeError) as err:
            parts.append(f"unreadable {d / METRICS_FILE} ({type(err).__name__}: {err})")
        else:
            if rs:
                parts.append("median " + ", ".join(rs))
    return " | ".join(parts)


@click.group("pretrained", invoke_without_command=True)
@click.pass_context
def pretrained_group(ctx: click.Context) -> None:
    """List the pretrained models (also: `pretrained list`); `pretrained publish` adds one.

    Models live in src/patchmosaic/pretrained/<name>/ (model.pt, config.json,
    schedule.json, metrics.json), or under $PATCHMOSAIC_PRETRAINED_DIR when set.
    Use them as --model pretrained:<name>, --patch-sizes pretrained:<name>
    (its calibrated schedule) and sample --like pretrained:<name>.
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_command)


@pretrained_group.command("list")
def list_command() -> None:
    """Print the available pretrained models, one per line."""
    names = available_pretrained()
    if not names:
        click.echo(f"no pretrained models in {pretrained_root()} (set ${PRETRAINED_ENV} to use another directory)")
        return
    for name in names:
        click.echo(_describe(name))


@pretrained_group.command("publish")
@click.argument("name")
@click.option("--run", "run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Training run directory (model.pt, config.json).")
@click.option("--schedule", type=click.Path(exists=True, path_type=Path), required=True,
              help="schedule.json from `patchmosaic calibrate` (or its directory).")
@click.option("--metrics", type=click.Path(exists=True, path_type=Path), default=None,
              help="metrics.json from `patchmosaic evaluate` (or its directory).  [default: none]")
@click.option("--overwrite", is_flag=True, default=False, help="Replace an existing model of that name.")
def publish_command(name: str, run_dir: Path, schedule: Path, metrics: Path | None, overwrite: bool) -> None:
    """Assemble pretrained/NAME/: sampling-only model.pt, config.json, schedule.json, metrics.json."""
    try:
        dest = publish_pretrained(name, run_dir, schedule=schedule, metrics=metrics, overwrite=overwrite)
    except LIBRARY_ERRORS as err:
        raise click.ClickException(str(err)) from err
    sizes = {p.name: p.stat().st_size for p in sorted(dest.iterdir())}
    click.echo(f"published {name} to {dest}/ (" + ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in sizes.items()) + ")")

