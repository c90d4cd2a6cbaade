"""Denoisers: every method behind one protocol ``D(x, sigma) -> x0_hat`` (VE form).

* :mod:`~patchmosaic.denoisers.base` -- the protocol, its input checks and the
  shared training set;
* :mod:`~patchmosaic.denoisers.score_machines` -- the patch machines of Kamb &
  Ganguli (IS, ES, LS, ELS) on the shared streaming engine;
* :mod:`~patchmosaic.denoisers.network` -- trained eps-prediction networks;
* the field's other closed-form denoisers: :mod:`~patchmosaic.denoisers.wiener`
  (Gaussian posterior mean), :mod:`~patchmosaic.denoisers.data_locality`
  (Lukoianov et al. 2509.09672), :mod:`~patchmosaic.denoisers.patch_composite`
  (PSPC-Square, Niedoba et al. 2411.19339), :mod:`~patchmosaic.denoisers.smoothed`
  (Scarvelis et al. 2310.12395), :mod:`~patchmosaic.denoisers.neighbours`
  (top-k, k-NN importance sampling (Niedoba et al. 2402.08018), nearest image);
* :mod:`~patchmosaic.denoisers.registry` -- build any of them by name.
"""

from patchmosaic.denoisers.base import Denoiser, TrainingSet, check_images, sigma_vector
from patchmosaic.denoisers.data_locality import DATA_LOCALITY_THRESHOLDS, DataLocality
from patchmosaic.denoisers.neighbours import KNNImportance, Nearest, TopK
from patchmosaic.denoisers.network import EpsDenoiser
from patchmosaic.denoisers.patch_composite import PatchComposite
from patchmosaic.denoisers.registry import DENOISERS, build_denoiser
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
from patchmosaic.denoisers.smoothed import Smoothed
from patchmosaic.denoisers.wiener import Wiener

__all__ = [
    "DATA_LOCALITY_THRESHOLDS",
    "DEFAULT_CHUNK_ELEMENTS",
    "DENOISERS",
    "KINDS",
    "DataLocality",
    "Denoiser",
    "EpsDenoiser",
    "EquivariantLocalScoreMachine",
    "EquivariantScoreMachine",
    "IdealScoreMachine",
    "KNNImportance",
    "LocalScoreMachine",
    "MachineDenoiser",
    "Nearest",
    "PatchComposite",
    "ScoreMachine",
    "Smoothed",
    "TopK",
    "TrainingSet",
    "Wiener",
    "build_denoiser",
    "check_images",
    "check_machine_options",
    "sigma_vector",
]
