"""What every command shares: error conventions, --out, --seeds, --threads and --device, dtypes."""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from patchmosaic.data import ImageDataset
from patchmosaic.denoisers import DEFAULT_CHUNK_ELEMENTS
from patchmosaic.pretrained import (
    LABEL_RULE,
    METRICS_FILE,
    SCHEDULE_FILE,
    TrainingSet,
    resolve_schedule_spec,
)
from patchmosaic.runs import (
    BATCH_DIR,
    CONFIG_FILE,
    ResumeError,
    SampleRun,
    check_run_dir,
    load_samples,
    parse_seeds,
    sample_file,
    undo_new_dir_on_failure,
)
from patchmosaic.schedules import PatchSchedule, ValueSchedule

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



PATCH_MACHINES = ("els", "ls")
MODEL_HELP = (
    "Trained network: a checkpoint file, a run directory holding model.pt, 'pretrained:<name>', a bare "
    "pretrained name (see `patchmosaic pretrained`), or 'diffusers:DIR' (a saved diffusers UNet2DModel with its "
    "DDPM/DDIM scheduler_config.json; safetensors only; needs the diffusers extra)."
)
CALIBRATE_FILES = (SCHEDULE_FILE, CONFIG_FILE)
COMPARE_FILES = ("leaderboard.json", "leaderboard.md", "per_step.png", "comparison.png", "samples_<name>.npz")
EVALUATE_FILES = (METRICS_FILE, "scatter.png", "comparison.png", "samples_network.npz", "samples_<machine>.npz",
                  "samples_ideal.npz")


# ------------------------------------------------------------------ shared


def check_out_flag(
    path: Path,
    overwrite: bool,
    files: tuple[str, ...],
    *,
    resume: bool = False,
    samples: tuple[str, ...] | None = None,
) -> Path:
    """:func:`patchmosaic.runs.check_run_dir` as a usage error (exit 2) naming ``--out``; nothing is created.

    Every command with ``--out`` checks it with this, before any work.

    Args:
        samples: For commands writing one ``samples_<name>.npz`` per compared
            denoiser (evaluate, compare): the names this run writes. With
            ``--overwrite``, any other ``samples_*.npz`` in ``path`` is an earlier
            run's (other denoisers) that this run would leave beside its own, where
            ``report`` would show it as current: refused, naming the files (nothing
            is moved or deleted).
    """
    if resume and overwrite:
        raise click.BadParameter("--resume continues the run in --out and --overwrite replaces it; pass one",
                                 param_hint="'--resume'")
    try:
        checked = check_run_dir(path, overwrite=overwrite, files=files, resume=resume)
    except FileNotFoundError as err:
        raise click.BadParameter(str(err), param_hint="'--resume'") from err
    except FileExistsError as err:
        raise click.BadParameter(str(err), param_hint="'--out'") from err
    if samples is not None and checked.is_dir():
        written = {sample_file(name) for name in samples}
        stale = sorted(p.name for p in checked.glob(sample_file("*")) if p.name not in written)
        if stale:
            raise click.BadParameter(
                f"{checked} holds {', '.join(stale)} from an earlier run, of denoisers this run does not write "
                f"(it writes the samples of {', '.join(samples)}); --overwrite replaces only this run's files, so they "
                "would stay beside the new ones and read as current. Move or delete them, or choose another --out",
                param_hint="'--out'",
            )
    return checked


REUSE_HELP = (
    "A previous `patchmosaic sample` run of a score machine whose samples replace that machine's run here; its "
    "config must match (dataset, n_train, size, padding, schedule, steps, grid, sampler, float32, labels) and its "
    "seeds must include --seeds. Repeatable."
)


def load_reused_samples(
    run_dirs: Sequence[Path],
    *,
    allowed: tuple[str, ...],
    data: ImageDataset,
    ts: TrainingSet,
    patch_sizes: dict[str, list[int]],
    seeds: list[int],
    labels: list[int] | None,
    steps: int,
    sampler: str = "euler",
    grid: str = "cosine",
) -> dict[str, tuple[np.ndarray, Path]]:
    """Samples of previous ``sample`` runs for ``seeds``, after checking that each config matches (``--reuse``).

    Args:
        run_dirs: The ``--reuse`` directories, at most one per machine.
        allowed: The machine names the command would run (a run of another machine is refused).
        patch_sizes: ``ls``/``els`` -> the sizes that machine uses here at each step, lowest noise first (as
            ``sample`` records them).
        steps, sampler, grid: The sampler protocol of the command.

    Returns:
        ``machine name -> ([S, C, H, W] images in the order of seeds, its directory)``.

    Raises:
        click.BadParameter: Listing every mismatch of a directory, or naming a machine reused twice.
    """
    reused: dict[str, tuple[np.ndarray, Path]] = {}
    for run_dir in run_dirs:
        name, images = _reused_run(run_dir, allowed=allowed, data=data, ts=ts, patch_sizes=patch_sizes, seeds=seeds,
                                   labels=labels, steps=steps, sampler=sampler, grid=grid)
        if name in reused:
            raise click.BadParameter(f"two --reuse directories hold {name} samples", param_hint="'--reuse'")
        reused[name] = (images, run_dir)
    return reused


def _reused_run(run_dir: Path, *, allowed: tuple[str, ...], data: ImageDataset, ts: TrainingSet,
                patch_sizes: dict[str, list[int]], seeds: list[int], labels: list[int] | None, steps: int,
                sampler: str, grid: str) -> tuple[str, np.ndarray]:
    """One ``--reuse`` directory of :func:`load_reused_samples`: ``(machine name, images)``."""
    hint = "'--reuse'"
    cfg_path = run_dir / CONFIG_FILE
    if not cfg_path.is_file():
        raise click.BadParameter(f"{run_dir} has no {CONFIG_FILE}: not a `patchmosaic sample` run directory", param_hint=hint)
    cfg = json.loads(cfg_path.read_text())
    kind = cfg.get("machine")
    if cfg.get("model") is not None or kind not in allowed:
        what = "'network'" if cfg.get("model") is not None or kind is None else repr(kind)
        raise click.BadParameter(f"{run_dir} holds {what} samples; --reuse here takes a `sample` run of "
                                 f"{' or '.join(allowed)}", param_hint=hint)
    if cfg.get("status", "complete") != "complete":
        raise click.BadParameter(f"{run_dir} is an unfinished sample run (status {cfg.get('status')!r}); finish it "
                                 "with `sample --resume` first", param_hint=hint)
    size = "native" if ts.image_size is None else ts.image_size
    expected: dict[str, Any] = {"dataset_name": data.name, "n_train": len(data), "size": size, "steps": steps,
                                "dtype": "float32"}
    for key, value in (("sampler", sampler), ("grid", grid)):
        if key in cfg:  # runs before these were recorded used euler on the cosine grid
            expected[key] = value
    if kind != "ideal":  # the ideal machine does not depend on padding or a schedule
        expected["padding"] = ts.padding
        if kind in ("ls", "els"):
            expected["patch_sizes"] = patch_sizes.get(kind)
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
        raise click.BadParameter(f"{run_dir} does not match this run: " + "; ".join(problems), param_hint=hint)
    return kind, archive["images"][rows]


def parse_seeds_flag(spec: str) -> list[int]:
    """:func:`patchmosaic.runs.parse_seeds` as a ``--seeds`` usage error (exit 2); every command uses this."""
    try:
        return parse_seeds(spec)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="'--seeds'") from err


def parse_schedule_flag(spec: str, flag: str = "--patch-sizes") -> PatchSchedule:
    """:meth:`PatchSchedule.parse` of a schedule flag (preset, list, file, ``pretrained:<name>``) as a usage error."""
    try:
        return PatchSchedule.parse(resolve_schedule_spec(spec))
    except (ValueError, FileNotFoundError) as err:
        raise click.BadParameter(str(err), param_hint=f"'{flag}'") from err


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



def set_threads(threads: int | None) -> None:
    """``--threads``: torch's intra-op threads for this command (None: torch's default)."""
    if threads is not None:
        torch.set_num_threads(threads)


def resolve_device(spec: str) -> torch.device:
    """``--device`` (``cpu``, ``cuda``, ``cuda:1``) as a torch device, or a usage error; never a silent fallback."""
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as err:
        raise click.BadParameter(f"{spec!r} is not a torch device (cpu, cuda, cuda:1)", param_hint="'--device'") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise click.BadParameter(
                f"--device {spec}: CUDA is not available here (torch {torch.__version__}, "
                f"{'no CUDA build' if torch.version.cuda is None else 'no visible GPU'}); use --device cpu",
                param_hint="'--device'",
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise click.BadParameter(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) visible",
                                     param_hint="'--device'")
    elif device.type != "cpu":
        raise click.BadParameter(f"--device {spec}: only cpu and cuda devices are supported", param_hint="'--device'")
    return device


def training_set_options(fn: Callable[..., None]) -> Callable[..., None]:
    """``--dataset``/``--n-train``: the machines' training set, for a network that records none (diffusers:DIR)."""
    fn = click.option("--n-train", type=click.IntRange(min=1), default=None,
                      help="With --dataset: its first N images.  [default: all]")(fn)
    return click.option("--dataset", default=None,
                        help="Training set of the closed-form denoisers, for a network that records none "
                        "(diffusers:DIR): a load_dataset spec (mnist, cifar10, a .npz ...). Refused for this "
                        "toolkit's checkpoints (they record theirs).")(fn)


def comparison_options(fn: Callable[..., None]) -> Callable[..., None]:
    """The options of the commands that compare denoisers with a network (``evaluate``, ``compare``)."""
    options = (
        click.option("--batch-size", type=click.IntRange(min=1), default=10, show_default=True,
                     help="Seeds per sampler call."),
        click.option("--bootstrap-resamples", type=click.IntRange(min=1), default=10_000, show_default=True,
                     help="Bootstrap resamples for the 95% intervals."),
        click.option("--bootstrap-seed", type=click.IntRange(min=0), default=0, show_default=True,
                     help="numpy default_rng seed of the bootstrap."),
        click.option("--comparison-rows", type=click.IntRange(min=1), default=8, show_default=True,
                     help="Seeds (rows) shown in comparison.png."),
        click.option("--chunk-elements", type=click.IntRange(min=1), default=DEFAULT_CHUNK_ELEMENTS,
                     show_default=True, help="Memory bound of the score machines: elements of one streamed logit "
                     "block."),
    )
    for option in reversed(options):
        fn = option(fn)
    return training_set_options(fn)


def workers_option(fn: Callable[..., None]) -> Callable[..., None]:
    """``--workers``: score machines split each batch between CPU threads (:func:`resolve_workers`)."""
    return click.option("--workers", type=click.IntRange(min=1), default=None, help=(
        "Score machines on the CPU: split each batch of seeds over this many threads, each with one torch "
        "thread (README, 'Workers': the demo 1.45x faster than with two torch threads on a 2-core CPU).  "
        "[default: the torch thread count on the CPU (--threads or torch's choice), 1 on CUDA or with "
        "--distributed]"))(fn)


def resolve_workers(workers: int | None, device: torch.device, *, distributed: bool = False) -> int:
    """``--workers``, or its default: torch's thread count on the CPU, 1 on CUDA or with ``--distributed``."""
    if workers is None:
        return torch.get_num_threads() if device.type == "cpu" and not distributed else 1
    if workers > 1 and device.type != "cpu":
        raise click.BadParameter(f"splits batches between CPU threads; --device {device} runs one stream",
                                 param_hint="'--workers'")
    if workers > 1 and distributed:
        raise click.BadParameter("cannot be combined with --distributed (each worker would all-reduce on its own)",
                                 param_hint="'--workers'")
    return workers


def refuse_workers(workers: int | None, denoiser: str) -> None:
    """A usage error for ``--workers`` above 1 with a denoiser that is not a score machine."""
    if workers is not None and workers > 1:
        raise click.BadParameter(f"splits a score machine's batches; it does not apply to --denoiser {denoiser}",
                                 param_hint="'--workers'")


def compute_options(fn: Callable[..., None]) -> Callable[..., None]:
    """``--device`` and ``--threads``, the options of every command that computes."""
    fn = click.option("--threads", type=click.IntRange(min=1), default=None,
                      help="Torch CPU threads for this command.  [default: torch's choice]")(fn)
    return click.option("--device", default="cpu", show_default=True,
                        help="Torch device of the computation: cpu, cuda or cuda:N (no silent fallback).")(fn)


class NumberOrSchedule(click.ParamType):
    """A number, or a sigma-keyed schedule file of that parameter (``calibrate --denoiser ...``'s schedule.json)."""

    name = "NUMBER|FILE"

    def __init__(self, parameter: str) -> None:
        self.parameter = parameter

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float | ValueSchedule:
        if isinstance(value, (float, int, ValueSchedule)) and not isinstance(value, bool):
            return value
        try:
            return float(str(value))
        except ValueError:
            pass
        try:
            return ValueSchedule.load(str(value), self.parameter)
        except (ValueError, OSError) as err:
            self.fail(f"{value!r} is neither a number nor a {self.parameter} schedule file: {err}", param, ctx)


def recordable(params: dict[str, Any]) -> dict[str, Any]:
    """Parameters as JSON: a value schedule as its record (parameter, values, sigmas, source)."""
    return {k: v.to_dict() if isinstance(v, ValueSchedule) else v for k, v in params.items()}


# Denoiser parameters of the closed-form family (patchmosaic.denoisers.registry): (flag, keyword, type, help).
# Only flags given on the command line reach build_denoiser, so the registry's defaults apply otherwise.
FAMILY_PARAMS = (
    ("--k", "k", click.INT, "topk, knn: nearest training images used exactly."),
    ("--samples", "samples", click.INT, "knn: importance samples of the tail per query."),
    ("--rank", "rank", click.INT, "wiener: top eigenpairs kept."),
    ("--threshold", "threshold", NumberOrSchedule("threshold"),
     "data-locality: mask threshold in (0, 1], or a threshold(sigma) schedule.json from `calibrate --denoiser "
     "data-locality`; default: the published value for a bundled dataset (0.005 MNIST/Fashion-MNIST)."),
    ("--temperature", "temperature", click.FLOAT, "data-locality: softmax temperature."),
    ("--patch-size", "patch_size", click.INT, "pspc: window side P (default: the published CIFAR-10 schedule)."),
    ("--std", "std", NumberOrSchedule("std"),
     "smoothed: smoothing std in the VE units of x, or a std(sigma) schedule.json from `calibrate --denoiser "
     "smoothed`."),
    ("--draws", "draws", click.INT, "smoothed: perturbations averaged per call."),
    ("--base", "base", click.STRING, "smoothed: registry name of the smoothed denoiser (default ideal)."),
    ("--denoiser-seed", "seed", click.INT, "smoothed, knn: seed of the per-call generators (default 0)."),
)


def family_options(fn: Callable[..., None]) -> Callable[..., None]:
    """The closed-form family's parameter flags (:data:`FAMILY_PARAMS`) and ``--flips``."""
    for flag, keyword, kind, help_text in reversed(FAMILY_PARAMS):
        fn = click.option(flag, keyword, type=kind, default=None, help=help_text)(fn)
    return click.option("--flips", is_flag=True, default=None, help="pspc: also use mirrored training images.")(fn)


def family_params(params: dict, dataset_name: str, name: str) -> dict:
    """The family flags given on the command line as ``build_denoiser`` keywords (published threshold filled in)."""
    from patchmosaic.denoisers.data_locality import DATA_LOCALITY_THRESHOLDS

    given = {keyword: params[keyword] for _, keyword, _, _ in FAMILY_PARAMS if params.get(keyword) is not None}
    if params.get("flips") is not None:
        given["flips"] = params["flips"]
    key = dataset_name.lower()
    if name == "data-locality" and "threshold" not in given and key in DATA_LOCALITY_THRESHOLDS:
        given["threshold"] = DATA_LOCALITY_THRESHOLDS[key]
    return given



def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


