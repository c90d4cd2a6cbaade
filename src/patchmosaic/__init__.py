"""patchmosaic: the analytic theory of creativity in convolutional diffusion models.

Training-free score machines (IS, ES, LS, ELS) of Kamb & Ganguli (ICML 2025,
arXiv 2412.20292), the DDIM sampler that drives them, and data/CLI tooling.
"""

__version__ = "0.1.0"  # before the imports: submodules (runs) read it while the package initialises

from patchmosaic.machines import KINDS, MachineDenoiser, ScoreMachine
from patchmosaic.sampler import noise_for_seed, noise_for_seeds, sample
from patchmosaic.schedules import PRESETS, CosineSchedule, PatchSchedule, time_grid

__all__ = [
    "KINDS",
    "PRESETS",
    "CosineSchedule",
    "MachineDenoiser",
    "PatchSchedule",
    "ScoreMachine",
    "noise_for_seed",
    "noise_for_seeds",
    "sample",
    "time_grid",
]
