"""``patchmosaic calibrate``: the patch size per noise level that best matches a trained network."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import torch
from tqdm import tqdm

from patchmosaic.calibration import (
    METRICS,
    VALUE_KNOBS,
    calibrate,
    check_candidates,
    parse_candidates,
)
from patchmosaic.cli.common import (
    CALIBRATE_FILES,
    LIBRARY_ERRORS,
    MODEL_HELP,
    PATCH_MACHINES,
    check_out_flag,
    compute_options,
    parse_seeds_flag,
    refuse_workers,
    resolve_device,
    resolve_workers,
    set_threads,
    training_set_options,
    workers_option,
)
from patchmosaic.cli.network import LoadedModel, machine_for
from patchmosaic.data import ImageDataset
from patchmosaic.denoisers import DEFAULT_CHUNK_ELEMENTS, PatchComposite
from patchmosaic.denoisers.registry import DENOISERS, build_denoiser
from patchmosaic.pretrained import (
    LABEL_RULE,
    SCHEDULE_FILE,
    TrainingSet,
)
from patchmosaic.runs import (
    CONFIG_FILE,
    undo_new_dir_on_failure,
    write_config,
)
from patchmosaic.samplers import noise_for_seeds
from patchmosaic.schedules import ValueSchedule

# Denoisers with a real-valued knob, and their default candidates (data-locality's published MNIST/Fashion
# threshold is 0.005, CIFAR-10's 0.05; smoothed: stds in the VE units of x).
VALUE_DENOISERS = ("data-locality", "smoothed")
VALUE_DEFAULTS = {"data-locality": "0.001,0.002,0.005,0.01,0.02,0.05,0.1,0.2",
                  "smoothed": "0,0.05,0.1,0.2,0.3,0.5,1"}


@click.command("calibrate")
@click.option("--model", "model_spec", required=True, help=MODEL_HELP)
@click.option("--denoiser", "--machine", "machine", type=click.Choice((*PATCH_MACHINES, "pspc", *VALUE_DENOISERS)),
              default="els", show_default=True,
              help="Denoiser whose locality knob is calibrated, on the network's training subset (--machine is an "
              "alias): ls/els (patch size k, with the network's padding), pspc (PSPC-Square window side P), "
              "data-locality (its mask threshold) or smoothed (the smoothing std of the ideal denoiser, 8 draws).")
@click.option("--candidates", default=None,
              help="Values to try. Patch sizes (ls, els, pspc): odd sizes '3,5,7' or odd ranges '3-31' (= 3,5,...,31); "
              "sizes the machine does not allow are an error. data-locality: thresholds in (0, 1]; smoothed: stds "
              f">= 0 (comma-separated numbers).  [default: 3-21 for sizes, {VALUE_DEFAULTS['data-locality']} "
              f"for data-locality, {VALUE_DEFAULTS['smoothed']} for smoothed]")
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
@click.option("--separate-calls", is_flag=True, default=False,
              help="ELS: one full machine call per candidate (timed, so the cost ratio against the chosen size is "
              "reported) instead of all candidates in one call that shares nested windows' products.")
@workers_option
@training_set_options
@compute_options
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
    separate_calls: bool,
    dataset: str | None,
    n_train: int | None,
    threads: int | None,
    device: str,
    workers: int | None,
) -> None:
    """Calibrate a locality schedule against a trained network: k(sigma) of ls/els, PSPC's window, a threshold or std.

    The network drives deterministic DDIM from each seed's noise; at every step
    (noise level sigma_i of the cosine grid t = i/steps) each candidate machine
    denoises the network's current x and the candidate whose x0 estimate best
    matches the network's wins. The schedule takes the median over seeds per
    step, rounded down to a candidate (with odd candidates 3,5,7,...: the lower
    odd size when the median falls between two), and stores it keyed by sigma_i,
    lowest noise first (schedule.json: patch_sizes and sigmas), so
    `sample --patch-sizes FILE` uses it at that noise level on any grid.

    ELS computes all candidates of a step in one call (sizes >= 7 in one stream
    over the training set, sharing the products of nested windows; the same
    estimates up to float rounding). With --separate-calls, and for ls and
    pspc, every candidate is one full machine call per step, and the reported
    cost ratio is the time of all candidate calls over the time of the chosen
    size's calls. For data-locality and smoothed the same rule picks a value per
    step (schedule.json: parameter, values and sigmas), which `sample` and
    `compare` take as --threshold FILE / --std FILE.

    \b
    Example:
      patchmosaic calibrate --model runs/train-mnist --machine els \\
        --candidates 3-21 --seeds 0-9 --out runs/calibrate-mnist
      patchmosaic sample --patch-sizes runs/calibrate-mnist/schedule.json ...
    """
    try:
        set_threads(threads)
        dev = resolve_device(device)
        cands = _parse_candidates(candidates, machine)
        seed_list = parse_seeds_flag(seeds)
        out = check_out_flag(out, overwrite, CALIBRATE_FILES)
        model = LoadedModel(model_spec)
        model.use_training_set(dataset, n_train)
        if machine not in PATCH_MACHINES:
            refuse_workers(workers, machine)
        if machine == "pspc":
            score_machine, data, ts = _pspc_for(model, chunk_elements, dev, cands)
        elif machine in VALUE_DENOISERS:
            score_machine, data, ts = _value_denoiser_for(model, machine, dev, cands)
        else:
            score_machine, data, ts = machine_for(model, machine, chunk_elements, dev,
                                                  workers=resolve_workers(workers, dev))
        try:
            cands = check_candidates(score_machine, cands)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="'--candidates'") from err
        labels = model.labels(seed_list)
        noise = noise_for_seeds(seed_list, model.shape).to(dev)  # [S, C, H, W]
        start = time.perf_counter()
        with tqdm(total=steps, desc="calibrating", unit="step", file=sys.stderr, dynamic_ncols=True) as bar:

            def progress(i: int, sigma: float, k: int) -> None:
                bar.set_postfix({"sigma": f"{sigma:.3g}", "k": k}, refresh=False)
                bar.update(1)

            result = calibrate(
                model.denoiser, score_machine, noise, candidates=cands, steps=steps, metric=metric,
                label=None if labels is None else torch.tensor(labels), seeds=seed_list, progress=progress,
                shared=not separate_calls,
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
            chosen = ({result.schedule.parameter: list(result.schedule.values)}
                      if isinstance(result.schedule, ValueSchedule) else {"patch_sizes": list(result.schedule.sizes)})
            write_config(out / CONFIG_FILE, {**settings, "candidates": list(cands), "metric": metric, "seeds": seed_list,
                                             **chosen,
                                             "files": {"schedule": SCHEDULE_FILE, "config": CONFIG_FILE}})
    except LIBRARY_ERRORS as err:
        raise click.ClickException(str(err)) from err
    cost = result.cost()
    what = result.schedule.parameter if isinstance(result.schedule, ValueSchedule) else "schedule"
    click.echo(f"calibrated {what} (lowest noise first, entry i-1 at t = i/{steps}): "
               f"{','.join(f'{v:g}' for v in result.chosen)}")
    if result.shared:
        click.echo(
            f"{len(seed_list)} seeds x {len(cands)} candidates x {steps} steps in {wall:.1f} s; "
            f"{cost['machine_seconds_total']:.1f} s in the machine (all candidates of a step in one call, "
            "nested windows sharing their products)"
        )
    else:
        click.echo(
            f"{len(seed_list)} seeds x {len(cands)} candidates x {steps} steps in {wall:.1f} s; cost = "
            f"{cost['total_ratio']:.1f} x one call at the chosen {what if what != 'schedule' else 'k'} per step "
            f"({cost['candidate_seconds_total']:.1f} s of candidate calls vs {cost['chosen_k_seconds_total']:.1f} s; "
            "each candidate is a full call, nothing shared across candidates)"
        )
    click.echo(f"wrote {out / SCHEDULE_FILE} and {out / CONFIG_FILE}")


def _pspc_for(model: LoadedModel, chunk_elements: int, device: torch.device,
              cands: tuple[int, ...]) -> tuple[PatchComposite, ImageDataset, TrainingSet]:
    """PSPC-Square on the network's training subset (windows stay inside the image: no padding)."""
    data, ts = model.training_data(device)
    _, H, W = model.shape
    if max(cands) > min(H, W):
        raise click.BadParameter(f"window size {max(cands)} does not fit the {H}x{W} images",
                                 param_hint="'--candidates'")
    pspc = PatchComposite(data.images.to(device), patch_size=min(cands), chunk_elements=chunk_elements,
                          labels=data.labels if model.num_classes else None)
    return pspc, data, ts


def _parse_candidates(spec: str | None, machine: str) -> tuple[float, ...]:
    if machine in VALUE_DENOISERS:
        spec = VALUE_DEFAULTS[machine] if spec is None else spec
        try:
            return tuple(float(v) for v in spec.split(","))
        except ValueError as err:
            raise click.BadParameter(f"{machine} candidates are comma-separated numbers, got {spec!r}",
                                     param_hint="'--candidates'") from err
    try:
        return parse_candidates("3-21" if spec is None else spec)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="'--candidates'") from err


def _value_denoiser_for(model: LoadedModel, name: str, device: torch.device,
                        cands: tuple[float, ...]) -> tuple[object, ImageDataset, TrainingSet]:
    """data-locality or smoothed (ideal base, 8 draws, seed 0) on the network's training subset."""
    data, ts = model.training_data(device)
    labels = data.labels if model.num_classes else None
    knob = VALUE_KNOBS[DENOISERS[name].build][0]  # threshold, std
    try:
        denoiser = build_denoiser(name, data.images.to(device), labels=labels, **{knob: cands[0]})
    except ValueError as err:
        raise click.BadParameter(f"{name}: {err}", param_hint="'--candidates'") from err
    return denoiser, data, ts


# ------------------------------------------------------------------ evaluate


