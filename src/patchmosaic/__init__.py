"""patchmosaic: the analytic theory of creativity in convolutional diffusion models.

Training-free score machines (IS, ES, LS, ELS) of Kamb & Ganguli (ICML 2025,
arXiv 2412.20292) and the field's other closed-form denoisers behind one
protocol ``D(x, sigma) -> x0_hat``, the samplers and sigma grids that drive
them, and data/CLI tooling.
"""

__version__ = "0.1.0"  # before the imports: submodules (runs) read it while the package initialises

from patchmosaic.denoisers import (
    KINDS,
    Denoiser,
    EpsDenoiser,
    MachineDenoiser,
    ScoreMachine,
)
from patchmosaic.samplers import (
    noise_for_seed,
    noise_for_seeds,
    sample,
    sample_ancestral,
    sample_euler,
    sample_heun,
)
from patchmosaic.schedules import (
    PRESETS,
    CosineSchedule,
    PatchSchedule,
    sigmas_cosine,
    sigmas_karras,
    sigmas_vp_linear,
    time_grid,
)

__all__ = [
    "KINDS",
    "PRESETS",
    "CosineSchedule",
    "Denoiser",
    "EpsDenoiser",
    "MachineDenoiser",
    "PatchSchedule",
    "ScoreMachine",
    "noise_for_seed",
    "noise_for_seeds",
    "sample",
    "sample_ancestral",
    "sample_euler",
    "sample_heun",
    "sigmas_cosine",
    "sigmas_karras",
    "sigmas_vp_linear",
    "time_grid",
]
