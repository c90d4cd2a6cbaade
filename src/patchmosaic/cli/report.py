"""``patchmosaic report``: a self-contained HTML page from run directories (:mod:`patchmosaic.report`).

Registered into the main group by :mod:`patchmosaic.cli`.
"""

from __future__ import annotations

from pathlib import Path

import click

from patchmosaic.cli.common import LIBRARY_ERRORS, check_out_flag
from patchmosaic.report import REPORT_FILE, build_report
from patchmosaic.runs import undo_new_dir_on_failure

__all__ = ["report_command"]


@click.command("report")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="RUN_DIR...")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help=f"Directory for {REPORT_FILE}; must be new or empty unless --overwrite.")
@click.option("--overwrite", is_flag=True, default=False,
              help=f"Reuse a non-empty --out: replace {REPORT_FILE}, keep every other file.")
def report_command(run_dirs: tuple[Path, ...], out: Path, overwrite: bool) -> None:
    """Write one self-contained HTML report (--out/index.html) about RUN_DIR...

    For each run directory (of `sample`, `evaluate` or `compare`): its key
    settings, the sample grid, the locality schedule k(t), the evaluation
    figures and tables (metrics.json), the leaderboard and per-step figure
    (leaderboard.json), the `explain` figures and numbers (explain.json), and, with
    provenance.npz (`sample --provenance`), the mosaic explorer: hover over or
    click a pixel of a sample to see the training patches it was built from.
    The page needs no server and no network; open it in a browser.

    \b
    Example:
      patchmosaic report runs/els runs/eval-mnist --out runs/report
    """
    check_out_flag(out, overwrite, (REPORT_FILE,))  # a usage error (exit 2) before any work
    try:
        with undo_new_dir_on_failure(out, files=(REPORT_FILE,)):
            path = build_report(run_dirs, out, overwrite=overwrite)
    except LIBRARY_ERRORS as err:
        raise click.ClickException(str(err)) from err
    runs = f"{len(run_dirs)} run director{'y' if len(run_dirs) == 1 else 'ies'}"
    size = path.stat().st_size / 1024
    click.echo(f"wrote {path} ({size:.0f} KiB, {runs}); open {path.resolve().as_uri()} in a browser")
