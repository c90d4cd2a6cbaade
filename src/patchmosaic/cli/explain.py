"""``patchmosaic explain``: creativity and consistency metrics of a recorded run."""

from __future__ import annotations

from pathlib import Path

import click

from patchmosaic.cli.common import compute_options

__all__ = ["explain_command"]


@click.command("explain")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where to write explain.json and the figures.  [default: RUN_DIR]",
)
@click.option(
    "--tolerance",
    type=click.FloatRange(min=0.0),
    default=0.02,
    show_default=True,
    help="Consistency tolerance in image units (images live in [-1, 1], so 0.02 is 1% of the range).",
)
@click.option(
    "--min-weight",
    type=click.FloatRange(min=0.0, max=1.0),
    default=0.01,
    show_default=True,
    help="Posterior weight a pixel's top training patch needs to count as its dominant source in the mosaic "
    "counts (pixels below are 'diffuse', e.g. the zero-padded border where identical edge patches tie).",
)
@click.option(
    "--compare-ideal/--no-compare-ideal",
    default=True,
    show_default=True,
    help="Also sample the ideal (memorising) machine from the run's seeds as the novelty baseline.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Seeds per call of the ideal machine's sampler.")
@click.option("--overwrite", is_flag=True, help="Replace an existing explain.json and its figures (nothing else).")
@compute_options
def explain_command(
    run_dir: Path, out: Path | None, tolerance: float, min_weight: float, compare_ideal: bool, batch_size: int,
    overwrite: bool, device: str, threads: int | None,
) -> None:
    """Explain the samples of RUN_DIR as patch mosaics.

    RUN_DIR must come from 'patchmosaic sample ... --provenance'. Writes
    explain.json (per-seed and median metrics) and explain_mosaic.png,
    explain_displacement.png and explain_neff.png:

    \b
    - mosaic map: the dominant source training image of each pixel, how many
      images cover 90% of the pixels, and how far source patches travel (q - p);
    - novelty: RMS distance of each sample to its nearest training image (also
      over circular shifts), next to the ideal machine's from the same seeds;
    - consistency (t -> 0): the fraction of pixels within --tolerance of the
      centre of their l2-nearest training patch at the final patch size;
    - N_eff and entropy of each pixel's posterior along the reverse process.
    """
    from patchmosaic.cli.common import LIBRARY_ERRORS, resolve_device, set_threads

    set_threads(threads)
    dev = resolve_device(device)
    from patchmosaic.explain import (
        check_explain_out,
        explain_run,
        summary_lines,
        write_explain,
    )
    from patchmosaic.runs import EXPLAIN_FIGURES, EXPLAIN_FILE, undo_new_dir_on_failure

    target = out if out is not None else run_dir
    if target.exists() and not target.is_dir():
        raise click.BadParameter(f"{target} exists and is not a directory", param_hint="'--out'")
    try:
        check_explain_out(target, overwrite=overwrite)  # a usage error (exit 2) before any work
    except FileExistsError as err:
        raise click.BadParameter(str(err), param_hint="'--out'" if out is not None else "'RUN_DIR'") from err
    written = [EXPLAIN_FILE, *EXPLAIN_FIGURES.values()]
    try:
        result = explain_run(run_dir, tolerance=tolerance, min_weight=min_weight, compare_ideal=compare_ideal, device=dev,
                             batch_size=batch_size)
        with undo_new_dir_on_failure(target, files=written):
            write_explain(result, target, overwrite=overwrite)
    except LIBRARY_ERRORS as err:
        raise click.ClickException(str(err)) from err
    for line in summary_lines(result):
        click.echo(line)
    click.echo(f"wrote {target / EXPLAIN_FILE} and {', '.join(EXPLAIN_FIGURES.values())}")
