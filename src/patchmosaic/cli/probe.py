"""``patchmosaic probe``: a closed-form denoiser's relative L2 error against the exact ideal one."""

from __future__ import annotations

import json
from pathlib import Path

import click

from patchmosaic.cli.common import family_options, family_params

__all__ = ["probe_command"]


def _parse_sigmas(ctx: click.Context, param: click.Parameter, value: str) -> tuple[float, ...]:
    try:
        sigmas = tuple(float(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from None
    if not sigmas or any(not (0 < s < float("inf")) for s in sigmas):
        raise click.BadParameter(f"every sigma must be finite and > 0, got {value!r}")
    return sigmas


@click.command("probe")
@click.option("--dataset", default="mnist", show_default=True,
              help="Bundled dataset (mnist, fashion-mnist) or any load_dataset spec.")
@click.option("--n-train", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Training images: the first N of the dataset; held-out queries come right after them.")
@click.option("--denoiser", "name", required=True, help="Registry name: ideal, wiener, data-locality, pspc, "
              "smoothed, topk, knn, nearest.")
@click.option("--sigmas", default="0.1,1,10", show_default=True, callback=_parse_sigmas,
              help="Comma-separated noise levels (VE sigma).")
@click.option("--queries", type=click.IntRange(min=1), default=16, show_default=True,
              help="Query images per set (training and held-out).")
@family_options
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the probe's noise.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Queries per denoiser call.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the result as JSON to this file.  [default: print only]")
def probe_command(
    dataset: str, n_train: int, name: str, sigmas: tuple[float, ...], queries: int,
    seed: int, batch_size: int, out: Path | None, **params: object,
) -> None:
    """Relative L2 error of a denoiser against the exact ideal one, on noised training and held-out images.

    Prints, per sigma, the mean over the queries of |D(x) - D_ideal(x)| / |D_ideal(x)|
    with x = x0 + sigma * eps, for x0 the first --queries training images and for
    the --queries images that follow the training set.
    """
    from patchmosaic.cli.common import LIBRARY_ERRORS
    from patchmosaic.data import load_dataset
    from patchmosaic.denoisers.registry import build_denoiser
    from patchmosaic.denoisers.score_machines import IdealScoreMachine as Ideal
    from patchmosaic.probe import probe

    try:
        data = load_dataset(dataset)
        if n_train + queries > len(data):
            raise ValueError(
                f"--n-train {n_train} plus --queries {queries} held-out images exceed the {len(data)} images of "
                f"{dataset!r}"
            )
        train = data.images[:n_train]  # [N, C, H, W]
        heldout = data.images[n_train : n_train + queries]  # [Q, C, H, W]
        given = family_params(params, data.name, name)
        denoiser = build_denoiser(name, train, **given)
        result = probe(denoiser, Ideal(train), train[:queries], heldout, sigmas, seed=seed, batch_size=batch_size)
    except LIBRARY_ERRORS as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"{name} {given} on {data.name}, N = {n_train}: relative L2 error against the ideal denoiser")
    click.echo(result.table())
    if out is not None:
        payload = {"dataset": data.name, "n_train": n_train, "denoiser": name, "params": given, "seed": seed,
                   **result.to_dict()}
        out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        click.echo(f"wrote {out}")
