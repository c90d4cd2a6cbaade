"""``patchmosaic evaluate``: network vs ELS vs IS from the same seeds, per-seed metrics."""

from __future__ import annotations

import time
from pathlib import Path

import click
import torch

from patchmosaic.cli.common import (
    EVALUATE_FILES,
    LIBRARY_ERRORS,
    MODEL_HELP,
    PATCH_MACHINES,
    REUSE_HELP,
    check_out_flag,
    comparison_options,
    compute_options,
    load_reused_samples,
    parse_schedule_flag,
    parse_seeds_flag,
    resolve_device,
    resolve_workers,
    set_threads,
    workers_option,
)
from patchmosaic.cli.network import LoadedModel, machine_for
from patchmosaic.denoisers import ScoreMachine
from patchmosaic.evaluation import evaluate, save_comparison, save_scatter
from patchmosaic.pretrained import (
    LABEL_RULE,
    METRICS_FILE,
)
from patchmosaic.runs import (
    sample_file,
    save_samples,
    undo_new_dir_on_failure,
    write_config,
)
from patchmosaic.samplers import NOISE_RULE
from patchmosaic.schedules import sigmas_cosine


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
              help="Reuse a non-empty --out: replace the files this command writes, keep every other file. "
              "Refused while --out holds samples_<name>.npz of another machine (an earlier evaluate's); move or "
              "delete them first.")
@click.option("--reuse", "reuse_dirs", type=click.Path(file_okay=False, exists=True, path_type=Path), multiple=True,
              help=REUSE_HELP + " Here: a run of --machine or of ideal.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="DDIM steps of the machines on the cosine grid (each uses the schedule's k at its sigma).  "
              "[default: one step per schedule entry, 20 for the paper's]")
@click.option("--network-steps", type=click.IntRange(min=1), default=150, show_default=True,
              help="DDIM steps of the network on the cosine grid (the paper's protocol: 150; the machines take "
              "--steps). --network-steps 20 with 20 machine steps gives both the same grid.")
@comparison_options
@compute_options
@workers_option
def evaluate_command(
    model_spec: str,
    machine: str,
    patch_sizes: str | None,
    seeds: str,
    out: Path,
    overwrite: bool,
    reuse_dirs: tuple[Path, ...],
    dataset: str | None,
    n_train: int | None,
    steps: int | None,
    network_steps: int,
    batch_size: int,
    bootstrap_resamples: int,
    bootstrap_seed: int,
    comparison_rows: int,
    chunk_elements: int,
    threads: int | None,
    device: str,
    workers: int | None,
) -> None:
    """Compare a trained network with the ELS machine (and the ideal machine IS), seed by seed.

    For each seed the network, ELS (with the schedule) and IS run DDIM from
    the same noise, on the network's training subset and padding: the
    machines with one step per schedule entry, the network with
    --network-steps (150, the paper's protocol). Per seed:
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
        set_threads(threads)
        dev = resolve_device(device)
        workers = resolve_workers(workers, dev)
        seed_list = parse_seeds_flag(seeds)
        out = check_out_flag(out, overwrite, EVALUATE_FILES, samples=("network", machine, "ideal"))
        model = LoadedModel(model_spec)
        model.use_training_set(dataset, n_train)
        schedule = parse_schedule_flag(model.schedule_spec(patch_sizes))
        patch_machine, data, ts = machine_for(model, machine, chunk_elements, dev, workers=workers)
        baseline = ScoreMachine(data.images, kind="ideal", padding=ts.padding, device=dev,
                                labels=data.labels if model.num_classes else None, chunk_elements=chunk_elements,
                                workers=workers)
        patch_machine.bind(patch_sizes=schedule)  # validates every size before any work
        steps = len(schedule) if steps is None else steps
        sigmas = sigmas_cosine(steps)
        on_grid = list(schedule.on_grid(sigmas))[::-1]  # the sizes the machine uses, lowest noise first
        labels = model.labels(seed_list)
        reused = load_reused_samples(reuse_dirs, allowed=(machine, "ideal"), data=data, ts=ts,
                                     patch_sizes={machine: on_grid}, seeds=seed_list, labels=labels, steps=steps)
        reuse = {name: images for name, (images, _) in reused.items()}
        start = time.perf_counter()
        result = evaluate(
            model.denoiser, patch_machine, baseline, seed_list, model.shape, patch_sizes=schedule, sigmas=sigmas,
            network_sigmas=sigmas_cosine(network_steps), labels=labels,
            names=(machine, "ideal"), train_images=data.images, reuse=reuse, batch_size=batch_size,
            resamples=bootstrap_resamples, bootstrap_seed=bootstrap_seed, device=dev,
        )
        wall = time.perf_counter() - start
        written = (METRICS_FILE, "scatter.png", "comparison.png", *(sample_file(n) for n in result.images))
        with undo_new_dir_on_failure(out, files=written):  # no half-written --out on a failed write
            out.mkdir(parents=True, exist_ok=True)
            files = {"metrics": METRICS_FILE, "scatter": "scatter.png", "comparison": "comparison.png"}
            for name, images in result.images.items():
                files[f"samples_{name}"] = sample_file(name)
                save_samples(out / sample_file(name), images, seed_list, labels)
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
                "patch_sizes": on_grid,
                "schedule": {"sizes": list(schedule.sizes), "sigmas": list(schedule.sigmas)},
                "patch_sizes_source": schedule.name,
                "steps": steps,
                "network_steps": network_steps,
                "grid": "cosine",
                "seeds": seed_list,
                "labels": labels,
                "label_rule": None if labels is None else LABEL_RULE,
                "reuse": {name: str(d) for name, (_, d) in reused.items()},
                "batch_size": batch_size,
                "threads": torch.get_num_threads(),
                "workers": workers,
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
    click.echo(f"{len(seed_list)} seeds, k {','.join(map(str, on_grid))} (lowest noise first), machines {steps} "
               f"steps, network {network_steps} steps, {wall:.1f} s")
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


