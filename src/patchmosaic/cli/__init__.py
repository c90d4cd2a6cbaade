"""The ``patchmosaic`` command line: configuration lives here, at the edge.

One module per command (``sample``, ``train``, ``calibrate``, ``evaluate``, ``compare``,
``pretrained``, ``explain``, ``report``, ``probe``), shared flag handling in
:mod:`patchmosaic.cli.common` and the trained-network side in
:mod:`patchmosaic.cli.network`. Conventions: usage errors (bad flags or values,
a non-empty ``--out`` without ``--overwrite``) exit 2, runtime errors (damaged
files, failures while working) exit 1, both as ``Error: ...`` without a traceback.
"""

from __future__ import annotations

import click

from patchmosaic import __version__

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="patchmosaic")
def main() -> None:
    """Training-free score machines of Kamb & Ganguli (arXiv 2412.20292)."""




def _register() -> None:
    """Attach every command's module (imported here, so no command module imports another)."""
    from patchmosaic.cli.calibrate import calibrate_command
    from patchmosaic.cli.compare import compare_command
    from patchmosaic.cli.evaluate import evaluate_command
    from patchmosaic.cli.explain import explain_command
    from patchmosaic.cli.pretrained import pretrained_group
    from patchmosaic.cli.probe import probe_command
    from patchmosaic.cli.report import report_command
    from patchmosaic.cli.sample import sample_command
    from patchmosaic.cli.train import train

    for command in (sample_command, train, calibrate_command, evaluate_command, compare_command, pretrained_group,
                    explain_command, report_command, probe_command):
        main.add_command(command)


_register()
