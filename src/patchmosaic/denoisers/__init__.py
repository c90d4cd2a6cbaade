"""Denoisers: every method behind one protocol ``D(x, sigma) -> x0_hat`` (VE form).

* :mod:`~patchmosaic.denoisers.base` -- the protocol and its input checks;
* :mod:`~patchmosaic.denoisers.score_machines` -- the patch machines of Kamb &
  Ganguli (IS, ES, LS, ELS) on the shared streaming engine;
* :mod:`~patchmosaic.denoisers.network` -- trained eps-prediction networks.
"""

from patchmosaic.denoisers.base import Denoiser, check_images, sigma_vector
from patchmosaic.denoisers.network import EpsDenoiser
from patchmosaic.denoisers.score_machines import (
    DEFAULT_CHUNK_ELEMENTS,
    KINDS,
    EquivariantLocalScoreMachine,
    EquivariantScoreMachine,
    IdealScoreMachine,
    LocalScoreMachine,
    MachineDenoiser,
    ScoreMachine,
    check_machine_options,
)

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "KINDS",
    "Denoiser",
    "EpsDenoiser",
    "EquivariantLocalScoreMachine",
    "EquivariantScoreMachine",
    "IdealScoreMachine",
    "LocalScoreMachine",
    "MachineDenoiser",
    "ScoreMachine",
    "check_images",
    "check_machine_options",
    "sigma_vector",
]
