"""``patchmosaic compare``: any list of denoisers against a trained network, from the same seeds."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from patchmosaic.cli.common import (
    COMPARE_FILES,
    LIBRARY_ERRORS,
    MODEL_HELP,
    REUSE_HELP,
    check_out_flag,
    comparison_options,
    compute_options,
    family_options,
    family_params,
    load_reused_samples,
    parse_schedule_flag,
    parse_seeds_flag,
    resolve_device,
    resolve_workers,
    set_threads,
    workers_option,
)
from patchmosaic.cli.network import LoadedModel
from patchmosaic.comparison import (
    compare_denoisers,
    leaderboard,
    leaderboard_markdown,
    save_per_step,
)
from patchmosaic.denoisers import KINDS, ScoreMachine, check_machine_options
from patchmosaic.denoisers.registry import DENOISERS, REQUIRED, build_denoiser
from patchmosaic.evaluation import save_comparison
from patchmosaic.pretrained import LABEL_RULE
from patchmosaic.runs import (
    sample_file,
    save_samples,
    undo_new_dir_on_failure,
    write_config,
)
from patchmosaic.samplers import NOISE_RULE, SAMPLERS
from patchmosaic.schedules import GRIDS, PatchSchedule, ValueSchedule, make_grid

__all__ = ["compare_command"]

COMPARE_NAMES = (*KINDS, *(name for name in DENOISERS if name not in KINDS))
DEFAULT_DENOISERS = "els,ls,ideal,wiener,data-locality,pspc,nearest"
LEADERBOARD_JSON, LEADERBOARD_MD = "leaderboard.json", "leaderboard.md"


def _parse_names(spec: str) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in COMPARE_NAMES]
    if not names or unknown:
        raise click.BadParameter(f"unknown denoiser(s) {unknown}; choose from {', '.join(COMPARE_NAMES)}"
                                 if unknown else "name at least one denoiser", param_hint="'--denoisers'")
    if len(set(names)) != len(names):
        raise click.BadParameter(f"a denoiser is listed twice in {spec!r}", param_hint="'--denoisers'")
    return names


def _family_kwargs(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """The family flags ``name`` takes (a smoothed denoiser also passes its base's)."""
    known = {p.name for p in DENOISERS[name].params}
    if name == "smoothed":
        base = given.get("base", "ideal")
        known |= {p.name for p in DENOISERS[base].params} if base in DENOISERS else set()
    return {k: v for k, v in given.items() if k in known}


def _recorded(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The parameters a leaderboard entry records: the given ones, the registry's defaults otherwise."""
    out: dict[str, Any] = {}
    for p in DENOISERS[name].params:
        value = kwargs.get(p.name, p.default)
        if name == "pspc" and p.name == "patch_size" and value is None:
            value = "published CIFAR-10 k(sigma)"
        if isinstance(value, ValueSchedule):
            value = value.to_dict()
        out[p.name] = value if isinstance(value, (int, float, str, bool, dict, type(None))) else str(value)
    out.update({k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in kwargs.items() if k not in out})
    return out


def _machine(name: str, images: torch.Tensor, labels: torch.Tensor | None, p: dict[str, Any], padding: str,
             schedule: PatchSchedule | None, given: dict[str, Any], device: torch.device) -> tuple[Any, dict[str, Any]]:
    """A score machine on the network's training set and padding (ls/els bound to ``schedule``), and its record."""
    try:
        check_machine_options(name, padding, True)
    except ValueError as err:
        raise click.BadParameter(f"{name}: {err} (the network's padding is {padding})", param_hint="'--denoisers'") from err
    machine = ScoreMachine(images, kind=name, padding=padding, labels=labels, chunk_elements=p["chunk_elements"],
                           device=device, workers=p["workers"])
    record: dict[str, Any] = {"padding": padding}
    if name not in ("ls", "els"):
        return machine, record
    try:
        bound = machine.bind(patch_sizes=schedule)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="'--patch-sizes'") from err
    return bound, {**record, "patch_sizes": list(schedule.sizes), "patch_sizes_source": schedule.name}


def _family_denoiser(name: str, images: torch.Tensor, labels: torch.Tensor | None, p: dict[str, Any], padding: str,
                     schedule: PatchSchedule | None, given: dict[str, Any],
                     device: torch.device) -> tuple[Any, dict[str, Any]]:
    """A closed-form family denoiser with the flags it takes (PSPC: or --pspc-patch-sizes), and its record."""
    kwargs = _family_kwargs(name, given)
    pspc_schedule = None
    if name == "pspc" and p["pspc_patch_sizes"] is not None:
        if "patch_size" in kwargs:
            raise click.BadParameter("pass --patch-size or --pspc-patch-sizes, not both",
                                     param_hint="'--pspc-patch-sizes'")
        pspc_schedule = parse_schedule_flag(p["pspc_patch_sizes"], "--pspc-patch-sizes")
        kwargs["patch_size"] = pspc_schedule
    missing = [q.name for q in DENOISERS[name].params if q.default is REQUIRED and q.name not in kwargs]
    if missing:
        raise click.BadParameter(f"{name} needs {', '.join('--' + m.replace('_', '-') for m in missing)} "
                                 "(no published default)", param_hint="'--denoisers'")
    try:
        denoiser = build_denoiser(name, images, labels=labels, **kwargs)
    except ValueError as err:
        raise click.BadParameter(f"{name}: {err}", param_hint="'--denoisers'") from err
    record = _recorded(name, kwargs)
    if pspc_schedule is not None:
        record.update({"patch_size": list(pspc_schedule.sizes), "patch_size_source": pspc_schedule.name})
    return denoiser, record


@click.command("compare")
@click.option("--model", "model_spec", required=True, help=MODEL_HELP)
@click.option("--denoisers", "denoiser_spec", default=DEFAULT_DENOISERS, show_default=True,
              help=f"Comma-separated denoisers compared with the network: {', '.join(COMPARE_NAMES)} (names as in "
              "`sample --denoiser`). ls/els use --patch-sizes; the family takes the flags below (each flag goes to "
              "every listed denoiser that has that parameter; otherwise the registry's published defaults).")
@click.option("--patch-sizes", default=None,
              help="Locality schedule k(sigma) of ls/els: a schedule.json (from calibrate), its directory, "
              "'pretrained:<name>', a preset or a list.  [default: the model's own schedule.json]")
@click.option("--ls-patch-sizes", default=None,
              help="LS's own locality schedule (e.g. the schedule.json of `calibrate --denoiser ls`).  [default: "
              "--patch-sizes]")
@click.option("--pspc-patch-sizes", default=None,
              help="PSPC's window schedule P(sigma): e.g. the schedule.json of `calibrate --denoiser pspc` (or its "
              "directory), a preset or a list.  [default: --patch-size, else the published CIFAR-10 k(sigma)]")
@click.option("--seeds", default="0-99", show_default=True,
              help="Seeds; every denoiser and the network start from the same noise; conditional: label = seed % "
              "num_classes.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Sampler steps of the denoisers.  [default: the schedule's length (20 for the paper's), else 20]")
@click.option("--network-steps", type=click.IntRange(min=1), default=150, show_default=True,
              help="Sampler steps of the network (the paper samples its networks with 150 DDIM steps).")
@click.option("--sampler", type=click.Choice(tuple(SAMPLERS)), default="euler", show_default=True,
              help="Sampler of everyone (euler on the cosine grid = the paper's deterministic DDIM).")
@click.option("--grid", type=click.Choice(tuple(GRIDS)), default="cosine", show_default=True,
              help="Sigma grid of everyone.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for leaderboard.json/.md, per_step.png, comparison.png and samples_<name>.npz; new or "
              "empty unless --overwrite.")
@click.option("--overwrite", is_flag=True, default=False,
              help="Reuse a non-empty --out: replace the files this command writes, keep every other file. "
              "Refused while --out holds samples_<name>.npz of denoisers not in --denoisers (an earlier compare's): "
              "they would sit beside the new ones as if current; move or delete them first.")
@click.option("--reuse", "reuse_dirs", type=click.Path(file_okay=False, exists=True, path_type=Path), multiple=True,
              help=REUSE_HELP + " Here: a run of a score machine in --denoisers (e.g. the ELS samples of an "
              "evaluation). A reused denoiser has final images only: no per-step agreement, no timing.")
@click.option("--single-step/--no-single-step", default=True, show_default=True,
              help="Also evaluate the network at every denoiser's state (one extra network call per step).")
@comparison_options
@family_options
@workers_option
@compute_options
def compare_command(**params: Any) -> None:
    """Compare a trained network with any list of denoisers, seed by seed: a leaderboard.

    Every denoiser and the network run the sampler from the same seeds on the
    same grid (by default the paper's protocol: the network with 150 DDIM
    steps, the denoisers with their schedule's length, both on the cosine
    grid), on the network's training subset and padding. Per denoiser:
    medians over seeds (95% bootstrap intervals) of Pearson r, r^2, R^2,
    ADS's per-image R^2 and MSE, the pooled R^2, and on how many seeds ELS
    beats it; per step, the agreement along each trajectory and at the same x.

    \b
    Example:
      patchmosaic compare --model pretrained:mnist-resnet-zeros --denoisers els,ideal,wiener \\
        --seeds 0-99 --out runs/compare-mnist
    """
    p = params
    try:
        set_threads(p["threads"])
        dev = resolve_device(p["device"])
        p["workers"] = resolve_workers(p["workers"], dev)  # resolved once; a bad --workers fails before any work
        seeds = parse_seeds_flag(p["seeds"])
        names = _parse_names(p["denoiser_spec"])
        out = check_out_flag(p["out"], p["overwrite"], COMPARE_FILES, samples=("network", *names))
        model = LoadedModel(p["model_spec"])
        model.use_training_set(p["dataset"], p["n_train"])
        ts = model.training_set()
        # 1. the locality schedule of ls/els
        schedule = None
        if {"ls", "els"} & set(names):
            schedule = parse_schedule_flag(model.schedule_spec(p["patch_sizes"]))
        schedules = {"els": schedule, "ls": schedule}
        if p["ls_patch_sizes"] is not None:
            if "ls" not in names:
                raise click.BadParameter("--ls-patch-sizes is LS's schedule; ls is not in --denoisers",
                                         param_hint="'--ls-patch-sizes'")
            schedules["ls"] = parse_schedule_flag(p["ls_patch_sizes"], "--ls-patch-sizes")
        if p["pspc_patch_sizes"] is not None and "pspc" not in names:
            raise click.BadParameter("--pspc-patch-sizes is PSPC's window schedule; pspc is not in --denoisers",
                                     param_hint="'--pspc-patch-sizes'")
        if schedule is None and p["patch_sizes"] is not None:
            raise click.BadParameter("--patch-sizes is the schedule of ls/els; neither is in --denoisers",
                                     param_hint="'--patch-sizes'")
        steps = p["steps"] or (len(schedule) if schedule is not None else 20)
        # 2. the training set and every denoiser
        data, ts = model.training_data()
        labels_train = data.labels if model.num_classes else None
        given = family_params(p, data.name, "data-locality" if "data-locality" in names else "")
        family = [n for n in names if n not in KINDS]
        unused = [k for k in given if not any(k in _family_kwargs(n, given) for n in family)]
        if unused:
            raise click.BadParameter(f"{', '.join('--' + k.replace('_', '-') for k in unused)} apply to none of "
                                     f"--denoisers {','.join(names)}", param_hint="'--denoisers'")
        denoisers: dict[str, Any] = {}
        recorded: dict[str, dict[str, Any]] = {}
        for name in names:
            build = _machine if name in KINDS else _family_denoiser
            denoisers[name], recorded[name] = build(name, data.images.to(dev), labels_train, p, ts.padding,
                                                    schedules.get(name), given, dev)
        labels = model.labels(seeds)
        sigmas, network_sigmas = make_grid(p["grid"], steps), make_grid(p["grid"], p["network_steps"])
        if "pspc" in denoisers:  # its window schedule must fit the images at every sigma of the grid
            try:
                [denoisers["pspc"].size_at(float(s)) for s in sigmas[:-1]]
            except ValueError as err:
                raise click.BadParameter(f"pspc: {err} on this grid; pass --patch-size or --pspc-patch-sizes",
                                         param_hint="'--denoisers'") from err
        on_grid = {n: list(sch.on_grid(sigmas))[::-1] for n, sch in schedules.items() if sch is not None}
        reused = load_reused_samples(p["reuse_dirs"], allowed=tuple(n for n in names if n in KINDS), data=data, ts=ts,
                                     patch_sizes=on_grid, seeds=seeds, labels=labels, steps=steps,
                                     sampler=p["sampler"], grid=p["grid"])
        reuse = {name: images for name, (images, _) in reused.items()}
        reused_from = {name: str(d) for name, (_, d) in reused.items()}
        for name, source in reused_from.items():
            recorded[name]["reused_from"] = source
        model.denoiser.model.to(dev)
        # 3. run and compare
        start = time.perf_counter()
        result = compare_denoisers(
            model.denoiser, denoisers, seeds, model.shape, sigmas=sigmas, network_sigmas=network_sigmas,
            sampler=p["sampler"], labels=labels, train_images=data.images, batch_size=p["batch_size"],
            resamples=p["bootstrap_resamples"], bootstrap_seed=p["bootstrap_seed"], single_step=p["single_step"],
            reuse=reuse, device=dev,
        )
        wall = time.perf_counter() - start
        protocol = {"sampler": p["sampler"], "grid": p["grid"], "steps": steps, "network_steps": p["network_steps"]}
        entries = leaderboard(result.summary, recorded, protocol, result.seconds_per_seed)
        protocol_line = (f"Network `{model.source.spec}` sampled with {p['network_steps']} steps, denoisers with "
                         f"{steps} steps ({p['sampler']} sampler, {p['grid']} grid), {len(seeds)} seeds, training "
                         f"set {ts.dataset} (n_train={ts.n_train}, padding {ts.padding}).")
        markdown = leaderboard_markdown(entries, title="Denoisers against the network", protocol_line=protocol_line)
        files = {"leaderboard": LEADERBOARD_JSON, "leaderboard_md": LEADERBOARD_MD, "per_step": "per_step.png",
                 "comparison": "comparison.png",
                 **{f"samples_{n}": sample_file(n) for n in result.images}}
        with undo_new_dir_on_failure(out, files=tuple(files.values())):
            out.mkdir(parents=True, exist_ok=True)
            for name, images in result.images.items():
                save_samples(out / sample_file(name), images, seeds, labels)
            save_per_step(out / "per_step.png", result.per_step,
                          title=f"network {p['network_steps']} steps, denoisers {steps} steps ({p['sampler']}, "
                          f"{p['grid']} grid), {len(seeds)} seeds")
            per = {row["seed"]: row for row in result.summary["per_seed"]}
            nearest = data.images.numpy()[[per[s]["nearest_train_index"] for s in seeds]]  # [S, C, H, W]
            save_comparison(out / "comparison.png",
                            [("network", result.images["network"]), *((n, result.images[n]) for n in names),
                             ("nearest train", nearest)], seeds, labels=labels, rows=p["comparison_rows"])
            config = {
                **model.record(),
                "command": "patchmosaic compare",
                "denoisers": names,
                "denoiser_params": recorded,
                "training_set": {**ts.to_dict(), "dataset_name": data.name, "n_images": len(data)},
                **protocol,
                "sigmas": [float(s) for s in sigmas],
                "network_sigmas": [float(s) for s in network_sigmas],
                "seeds": seeds,
                "labels": labels,
                "label_rule": None if labels is None else LABEL_RULE,
                "noise_rule": NOISE_RULE,
                "reuse": reused_from,
                "batch_size": p["batch_size"],
                "threads": torch.get_num_threads(),
                "workers": p["workers"],
                "device": str(dev),
                "metrics": {
                    "pearson_r": "Pearson correlation of the flattened final images (the paper's code labels it 'r^2')",
                    "r_squared": "pearson_r ** 2",
                    "R2": "1 - SS_res / SS_tot per image, network as the reference",
                    "R2_ads": "1 - SSE / (n * unbiased variance of the network's image) per image (Analytic Diffusion "
                              "Studio); R2_ads_mean is its mean over images",
                    "mse": "mean squared pixel difference per image",
                    "R2_pooled": "1 - sum SS_res / sum (net - mean over all seeds' pixels)^2, bootstrap over seeds",
                    "aggregate": f"median over seeds, percentile bootstrap 95% interval ({p['bootstrap_resamples']} "
                                 f"resamples, numpy default_rng({p['bootstrap_seed']}))",
                    "els_beats_this": "seeds where ELS's Pearson r is strictly greater",
                    "per_step.trajectory": "median r of the denoiser's output at step i vs the network's output at "
                                           "its step of nearest log sigma, each on its own trajectory",
                    "per_step.single_step": "median r of the denoiser's output at step i vs the network at the "
                                            "denoiser's own x_i and sigma_i",
                    "reuse": "denoisers whose final samples came from an earlier run (--reuse): no per-step "
                             "agreement and no timing for them",
                },
                "family_knobs": "each family denoiser's knob is what its parameters record: a schedule where "
                                "--pspc-patch-sizes, --threshold FILE or --std FILE gave one (e.g. calibrated against "
                                "this network), else the published default or the flag's value",
                "wall_time_s": round(wall, 3),
                "files": files,
            }
            payload = {"config": config, "leaderboard": entries, "per_step": result.per_step,
                       "fraction_machine_beats_baseline": result.summary.get("fraction_machine_beats_baseline"),
                       "nearest_train": result.summary["aggregates"].get("nearest_train"),
                       "per_seed": result.summary["per_seed"]}
            write_config(out / LEADERBOARD_JSON, json.loads(json.dumps(payload, default=_nan_to_none)))
            (out / LEADERBOARD_MD).write_text(markdown, encoding="utf-8")
    except LIBRARY_ERRORS as err:
        raise click.ClickException(str(err)) from err
    click.echo(markdown)
    click.echo(f"{wall:.1f} s; wrote {out}/ ({', '.join(files.values())})")


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
