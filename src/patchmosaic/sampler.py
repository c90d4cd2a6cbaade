"""Deterministic DDIM reverse process (Song et al. 2021; Kamb & Ganguli App. B).

The sampler only ever calls a denoiser ``D(x_t, t) -> x0_hat``: score machines
(:meth:`patchmosaic.ScoreMachine.bind`) and trained networks plug in alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from patchmosaic.schedules import CosineSchedule, PatchSchedule, time_grid

__all__ = ["NOISE_RULE", "Denoiser", "sample", "noise_for_seed", "noise_for_seeds"]

NOISE_RULE = "x_1 = torch.randn((C, H, W), generator=torch.Generator('cpu').manual_seed(seed), dtype=torch.float32)"


class Denoiser(Protocol):
    """``D(x_t, t) -> x0_hat`` with ``x_t [B, C, H, W]`` and a scalar time ``t`` in (0, 1]."""

    def __call__(self, x_t: torch.Tensor, t: float) -> torch.Tensor: ...


def noise_for_seed(seed: int, shape: Sequence[int], *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The initial noise of seed ``s``: a documented, model-independent function of ``s``.

    ``torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s), dtype=float32)``,
    then cast to ``dtype``. Any model run from the same seed starts from the same x_1.

    Args:
        seed: Non-negative integer seed.
        shape: ``(C, H, W)`` of one image.

    Returns:
        ``[C, H, W]`` noise on the CPU.
    """
    if seed < 0:
        raise ValueError(f"seeds must be non-negative, got {seed}")
    g = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32).to(dtype)


def noise_for_seeds(seeds: Sequence[int], shape: Sequence[int], *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stack :func:`noise_for_seed` for each seed: ``[len(seeds), C, H, W]``."""
    return torch.stack([noise_for_seed(s, shape, dtype=dtype) for s in seeds])


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    *,
    steps: int = 20,
    patch_sizes: PatchSchedule | Sequence[int] | str | None = None,
    label: int | torch.Tensor | None = None,
    schedule: CosineSchedule = CosineSchedule(),
    callback: Callable[[int, float, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run deterministic DDIM from t = 1 to t = 0 on the grid ``t_i = i / steps``.

    Each step (i = steps, ..., 1) estimates ``x0 = D(x_t, t_i)``, the implied
    noise ``eps = (x_t - sqrt(abar_i) x0) / sqrt(1 - abar_i)``, and moves to
    ``x_{t_{i-1}} = sqrt(abar_{i-1}) x0 + sqrt(1 - abar_{i-1}) eps``. At
    ``t_0 = 0``, ``abar = 1``, so the result is the last x0 estimate.

    Args:
        denoiser: Any ``D(x_t, t) -> x0_hat``. If ``patch_sizes`` or ``label`` are
            given it must offer ``bind(patch_sizes=, label=, steps=)`` (a
            :class:`patchmosaic.ScoreMachine` does): the sampler binds them and then
            only calls the bound denoiser.
        noise: ``[B, C, H, W]`` initial x at t = 1 (see :func:`noise_for_seeds`).
        steps: Number of denoiser calls.
        patch_sizes: Locality schedule, lowest noise first (``sizes[i-1]`` at t = i/steps).
        label: Class conditioning forwarded to ``bind``.
        schedule: Noise schedule abar(t); must match the denoiser's.
        callback: Called as ``callback(i, t_i, x_next, x0_hat)`` after each step, where
            ``x0_hat = D(x_{t_i}, t_i)`` and ``x_next`` is the updated ``x_{t_{i-1}}``
            (not the input the denoiser saw).

    Returns:
        ``[B, C, H, W]`` sample at t = 0.
    """
    if noise.ndim != 4:
        raise ValueError(f"noise must have shape [B, C, H, W], got {tuple(noise.shape)}")
    if patch_sizes is not None or label is not None:
        bind = getattr(denoiser, "bind", None)
        if bind is None:
            raise TypeError(
                f"{type(denoiser).__name__} has no bind(); pass patch_sizes/label to the "
                "denoiser itself, not to sample()"
            )
        denoiser = bind(patch_sizes=patch_sizes, label=label, steps=steps)
    ts = time_grid(steps)  # [steps + 1], 1 -> 0
    abar = schedule.alpha_bar(ts).tolist()
    x = noise
    for j in range(steps):
        i = steps - j
        t, ab, ab_next = float(ts[j]), abar[j], abar[j + 1]
        x0 = denoiser(x, t)  # [B, C, H, W]
        eps = (x - ab**0.5 * x0) / (1.0 - ab) ** 0.5
        x = ab_next**0.5 * x0 + max(0.0, 1.0 - ab_next) ** 0.5 * eps
        if callback is not None:
            callback(i, t, x, x0)
    return x
