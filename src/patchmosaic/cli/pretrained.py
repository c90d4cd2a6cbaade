"""``patchmosaic pretrained``: list and publish the pretrained models."""

from __future__ import annotations

import json
from pathlib import Path

import click

from patchmosaic.checkpoints import load_checkpoint
from patchmosaic.cli.common import LIBRARY_ERRORS
from patchmosaic.models import config_to_dict
from patchmosaic.pretrained import (
    METRICS_FILE,
    PRETRAINED_ENV,
    SCHEDULE_FILE,
    available_pretrained,
    pretrained_dir,
    pretrained_root,
    publish_pretrained,
    training_set,
)
from patchmosaic.schedules import PatchSchedule


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
@click.option("--run", "run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Training run directory (model.pt, config.json).  [required for a new model; without it the "
              "given files are added to the existing model NAME, with --overwrite]")
@click.option("--schedule", type=click.Path(exists=True, path_type=Path), default=None,
              help="schedule.json from `patchmosaic calibrate` (or its directory).  [required for a new model]")
@click.option("--metrics", type=click.Path(exists=True, path_type=Path), default=None,
              help="metrics.json from `patchmosaic evaluate` (or its directory).  [default: none]")
@click.option("--leaderboard", type=click.Path(exists=True, path_type=Path), default=None,
              help="leaderboard.json from `patchmosaic compare` (or its directory).  [default: none]")
@click.option("--overwrite", is_flag=True, default=False,
              help="Replace an existing model of that name (without --run: replace its given files).")
def publish_command(name: str, run_dir: Path | None, schedule: Path | None, metrics: Path | None,
                    leaderboard: Path | None, overwrite: bool) -> None:
    """Assemble pretrained/NAME/: sampling-only model.pt, config.json, schedule.json, metrics.json, leaderboard.json.

    \b
    A new model:      pretrained publish NAME --run RUN --schedule CAL [--metrics EVAL] [--leaderboard CMP]
    Add to a model:   pretrained publish NAME --leaderboard CMP --overwrite
    """
    try:
        dest = publish_pretrained(name, run_dir, schedule=schedule, metrics=metrics, leaderboard=leaderboard,
                                  overwrite=overwrite)
    except LIBRARY_ERRORS as err:
        raise click.ClickException(str(err)) from err
    sizes = {p.name: p.stat().st_size for p in sorted(dest.iterdir())}
    click.echo(f"published {name} to {dest}/ (" + ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in sizes.items()) + ")")
