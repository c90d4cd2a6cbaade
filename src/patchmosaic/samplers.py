"""Samplers: pure functions of a denoiser ``D(x, sigma)`` and a sigma grid.

Every sampler has the form ``sample_x(denoiser, x, sigmas, *, callback=None)``
(k-diffusion's convention): ``x`` ``[B, C, H, W]`` is the initial state already
scaled to ``sigmas[0]`` (``x = sigmas[0] * noise`` in the VE form, or
``noise * sqrt(1 + sigmas[0]^2)`` for a VP start ``x_1 = noise``), ``sigmas`` a
descending 1-D grid (:mod:`patchmosaic.schedules`), and the result is ``x`` at
``sigmas[-1]``: when ``sigmas[-1] == 0`` that is the final x0 estimate, the
denoiser's output at the last nonzero sigma. Samplers only ever call
``denoiser(x, sigma)`` with ``sigma`` a ``[B]`` tensor in x's dtype; they know
nothing about machines, networks, patch sizes or labels.

:func:`sample` is the paper's sampler (Kamb & Ganguli 2412.20292, App. B):
deterministic DDIM on the cosine grid ``t_i = i / n`` from the VP noise
``x_1``, which is :func:`sample_euler` on :func:`~patchmosaic.schedules.sigmas_cosine`.

The initial noise of seed ``s`` (:func:`noise_for_seed`) is a documented
function of ``s`` alone, so any model can be run from the same seeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from patchmosaic.denoisers.base import Denoiser, bind_label
from patchmosaic.schedules import CosineSchedule, PatchSchedule, sigmas_cosine

__all__ = [
    "NOISE_RULE",
    "SAMPLERS",
    "denoiser_calls",
    "initial_state",
    "noise_for_seed",
    "noise_for_seeds",
    "sample",
    "sample_ancestral",
    "sample_euler",
    "sample_heun",
    "sample_seeds",
]

NOISE_RULE = "x_1 = torch.randn((C, H, W), generator=torch.Generator('cpu').manual_seed(seed), dtype=torch.float32)"

# callback(info) after each step, info = {"i": step index from 0, "sigma": float, "sigma_next": float,
# "x": the updated x (at sigma_next), "denoised": the denoiser's x0 estimate at (x, sigma)}.
Callback = Callable[[dict[str, Any]], None]


def noise_for_seed(seed: int, shape: Sequence[int], *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The initial noise of seed ``s``: a documented, model-independent function of ``s``.

    ``torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s), dtype=float32)``,
    then cast to ``dtype``. Any model run from the same seed starts from the same x_1.

    Args:
        seed: Integer seed in ``0 .. 2**63 - 1``.
        shape: ``(C, H, W)`` of one image.

    Returns:
        ``[C, H, W]`` noise on the CPU.
    """
    if not 0 <= seed < 2**63:
        raise ValueError(f"seeds must lie in 0 .. 2**63 - 1, got {seed}")
    g = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32).to(dtype)


def noise_for_seeds(seeds: Sequence[int], shape: Sequence[int], *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stack :func:`noise_for_seed` for each seed: ``[len(seeds), C, H, W]``."""
    return torch.stack([noise_for_seed(s, shape, dtype=dtype) for s in seeds])


def initial_state(noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The VP prior sample ``x_1 = noise`` in VE variables at ``sigmas[0]``: ``noise * sqrt(1 + sigma_0^2)``.

    Every sampler run from a seed starts here, on any grid, so a seed names the
    same initial noise for every model (for sigma_0 = 80 the factor is 80.006).
    """
    return noise * math.sqrt(1.0 + float(sigmas[0]) ** 2)


def _check_grid(x: torch.Tensor, sigmas: torch.Tensor) -> list[float]:
    if x.ndim != 4:
        raise ValueError(f"x must have shape [B, C, H, W], got {tuple(x.shape)}")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D grid of at least 2 noise levels, got shape {tuple(sigmas.shape)}")
    if not torch.isfinite(sigmas).all() or bool((sigmas < 0).any()) or bool((sigmas[:-1] == 0).any()):
        raise ValueError(f"sigmas must be finite and positive (only the last may be 0), got {sigmas.tolist()}")
    if bool((sigmas[1:] >= sigmas[:-1]).any()):
        raise ValueError(f"sigmas must be strictly descending, got {sigmas.tolist()}")
    return sigmas.tolist()


def _denoise(denoiser: Denoiser, x: torch.Tensor, sigma: float) -> torch.Tensor:
    return denoiser(x, x.new_full((x.shape[0],), sigma))  # [B, C, H, W]


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None
) -> torch.Tensor:
    """Euler steps of the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma``.

    ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (x_i - D(x_i, sigma_i)) / sigma_i``
    (Karras et al. 2022, Alg. 1 with first-order steps). This *is* deterministic
    DDIM (Song et al. 2021, Eq. 12): in VE variables DDIM moves to
    ``x0_hat + sigma_{i+1} eps_hat`` with ``eps_hat = (x_i - x0_hat) / sigma_i``,
    the same expression. The step to ``sigma = 0`` returns ``D(x, sigma_last)``.

    Args:
        denoiser: ``D(x, sigma) -> x0_hat``.
        x: ``[B, C, H, W]`` state at ``sigmas[0]``.
        sigmas: Descending grid, e.g. :func:`~patchmosaic.schedules.sigmas_karras`.
        callback: See :data:`Callback`.

    Returns:
        ``[B, C, H, W]`` state at ``sigmas[-1]``.
    """
    grid = _check_grid(x, sigmas)
    for i, (s, s_next) in enumerate(zip(grid, grid[1:])):
        denoised = _denoise(denoiser, x, s)  # [B, C, H, W]
        x = denoised if s_next == 0 else x + (s_next - s) * (x - denoised) / s
        if callback is not None:
            callback({"i": i, "sigma": s, "sigma_next": s_next, "x": x, "denoised": denoised})
    return x


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback | None = None
) -> torch.Tensor:
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Alg. 1, no churn).

    ``d_i = (x_i - D(x_i, sigma_i)) / sigma_i``, Euler predictor
    ``x' = x_i + (sigma_{i+1} - sigma_i) d_i``, and, where ``sigma_{i+1} > 0``, the
    trapezoidal corrector ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (d_i + d') / 2``
    with ``d' = (x' - D(x', sigma_{i+1})) / sigma_{i+1}``. The step to 0 is Euler
    (2n - 1 denoiser calls for n steps ending at 0).

    Args/Returns: As for :func:`sample_euler`.
    """
    grid = _check_grid(x, sigmas)
    for i, (s, s_next) in enumerate(zip(grid, grid[1:])):
        denoised = _denoise(denoiser, x, s)  # [B, C, H, W]
        d = (x - denoised) / s
        x_pred = x + (s_next - s) * d
        if s_next > 0:
            d_next = (x_pred - _denoise(denoiser, x_pred, s_next)) / s_next
            x = x + (s_next - s) * (d + d_next) / 2
        else:
            x = denoised
        if callback is not None:
            callback({"i": i, "sigma": s, "sigma_next": s_next, "x": x, "denoised": denoised})
    return x


@torch.no_grad()
def sample_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | Sequence[torch.Generator],
    callback: Callback | None = None,
) -> torch.Tensor:
    """Ancestral (DDPM-style) sampling: a deterministic step down, then fresh noise back up.

    From ``sigma_i`` to ``sigma_{i+1}`` the posterior of the forward process adds
    ``sigma_up = sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2)`` of new
    noise after an Euler step to ``sigma_down = sqrt(sigma_{i+1}^2 - sigma_up^2)``
    (Ho et al. 2020 in VE variables; k-diffusion's ``sample_euler_ancestral``, eta = 1).

    Args:
        generator: Source of the fresh noise: one CPU generator for the batch, or
            one per row (row b draws ``[C, H, W]`` from ``generator[b]``, so a
            sample does not depend on its batch). Noise is drawn in float32 on the
            CPU and moved to x's device and dtype: reproducible on any device.
        Others: As for :func:`sample_euler`.
    """
    grid = _check_grid(x, sigmas)
    for i, (s, s_next) in enumerate(zip(grid, grid[1:])):
        denoised = _denoise(denoiser, x, s)  # [B, C, H, W]
        sigma_up = math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
        sigma_down = math.sqrt(s_next**2 - sigma_up**2)
        x = x + (sigma_down - s) * (x - denoised) / s
        if s_next > 0:
            if isinstance(generator, torch.Generator):
                z = torch.randn(x.shape, generator=generator, dtype=torch.float32)  # [B, C, H, W]
            else:
                z = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float32) for g in generator])
            x = x + sigma_up * z.to(device=x.device, dtype=x.dtype)
        else:
            x = denoised
        if callback is not None:
            callback({"i": i, "sigma": s, "sigma_next": s_next, "x": x, "denoised": denoised})
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "ancestral": sample_ancestral,
}


def denoiser_calls(sampler: str, sigmas: torch.Tensor) -> int:
    """How many times ``sampler`` calls the denoiser on the grid ``sigmas``."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    n = len(sigmas) - 1
    if sampler == "heun":
        return 2 * n - (1 if float(sigmas[-1]) == 0 else 0)
    return n


@torch.no_grad()
def sample(
    denoiser: Any,
    noise: torch.Tensor,
    *,
    steps: int = 20,
    patch_sizes: PatchSchedule | Sequence[int] | str | None = None,
    label: int | torch.Tensor | None = None,
    schedule: CosineSchedule | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """The paper's sampler: deterministic DDIM from the VP noise ``x_1`` on ``t_i = i / steps``.

    Equivalent to ``sample_euler(D, noise * sqrt(1 + sigma_1^2), sigmas_cosine(steps, schedule))``
    (the VP state ``x_1`` is ``x / sqrt(1 + sigma^2)`` in VE variables).

    Args:
        denoiser: ``D(x, sigma) -> x0_hat``. If ``patch_sizes`` or ``label`` are given
            it must offer ``bind(patch_sizes=, label=, schedule=)`` (a
            :class:`patchmosaic.ScoreMachine` does; a network offers ``bind(label=)``).
        noise: ``[B, C, H, W]`` initial VP state at t = 1 (see :func:`noise_for_seeds`).
        steps: Number of denoiser calls.
        patch_sizes: Locality schedule (a sigma-keyed :class:`PatchSchedule`, preset
            name or file, or sizes lowest noise first, keyed to this grid).
        label: Class conditioning forwarded to ``bind``.
        schedule: Noise schedule of the time grid (default: the paper's cosine).
        callback: See :data:`Callback`.

    Returns:
        ``[B, C, H, W]`` sample (the x0 estimate of the last step).
    """
    if noise.ndim != 4:
        raise ValueError(f"noise must have shape [B, C, H, W], got {tuple(noise.shape)}")
    schedule = CosineSchedule() if schedule is None else schedule
    if patch_sizes is not None or label is not None:
        bind = getattr(denoiser, "bind", None)
        if bind is None:
            raise TypeError(
                f"{type(denoiser).__name__} has no bind(); pass patch_sizes/label to the "
                "denoiser itself, not to sample()"
            )
        kwargs: dict[str, Any] = {"label": label}
        if patch_sizes is not None:
            kwargs.update(patch_sizes=patch_sizes, schedule=schedule)
        denoiser = bind(**kwargs)
    sigmas = sigmas_cosine(steps, schedule)  # [steps + 1], descending, last 0
    return sample_euler(denoiser, initial_state(noise, sigmas), sigmas, callback=callback)


def seed_generator(seed: int, shape: Sequence[int]) -> torch.Generator:
    """The CPU generator of seed ``s`` after drawing its initial noise (:func:`noise_for_seed`).

    Stochastic samplers continue drawing from it, so a seed's whole trajectory
    depends on that seed alone.
    """
    g = torch.Generator("cpu").manual_seed(int(seed))
    torch.randn(tuple(shape), generator=g, dtype=torch.float32)
    return g


@torch.no_grad()
def sample_seeds(
    denoiser: Any,
    seeds: Sequence[int],
    shape: Sequence[int],
    *,
    sigmas: torch.Tensor,
    sampler: str = "euler",
    labels: Sequence[int] | None = None,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    wrap: Callable[[Any], Any] | None = None,
    callback: Callback | None = None,
    on_batch: Callable[[list[int], torch.Tensor, Any], None] | None = None,
) -> torch.Tensor:
    """Sample one image per seed, in batches: the one seed-batching loop of the toolkit.

    Seed s starts from ``initial_state(noise_for_seed(s), sigmas)``; the
    ancestral sampler draws its fresh noise from :func:`seed_generator` (s), so
    every sample depends on its seed only, not on the batching.

    Args:
        denoiser: ``D(x, sigma)``; with ``labels`` each batch binds its ``[b]`` labels
            (:func:`~patchmosaic.denoisers.base.bind_label`: ``bind(label=)``, or ``label=`` at call time).
        seeds: One sample per seed.
        shape: ``(C, H, W)``.
        sigmas: The grid (:mod:`patchmosaic.schedules`).
        sampler: A name of :data:`SAMPLERS`.
        labels: The class of each seed, or None.
        batch_size: Seeds per sampler run.
        dtype, device: Of the state x (the noise is drawn in float32 on the CPU).
        wrap: Applied to each batch's (bound) denoiser before sampling, e.g. a
            :class:`~patchmosaic.provenance.ProvenanceRecorder` factory.
        callback: Per-step sampler callback.
        on_batch: Called as ``on_batch(batch_seeds, images [b, C, H, W], wrapped)`` after each batch.

    Returns:
        ``[S, C, H, W]`` samples on the CPU, in the order of ``seeds``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    if labels is not None and len(labels) != len(seeds):
        raise ValueError(f"{len(labels)} labels for {len(seeds)} seeds")
    out = []
    for i in range(0, len(seeds), batch_size):
        batch = [int(s) for s in seeds[i : i + batch_size]]
        bound = denoiser
        if labels is not None:
            bound = bind_label(denoiser, torch.tensor([int(c) for c in labels[i : i + batch_size]]))  # [b]
        if wrap is not None:
            bound = wrap(bound)
        noise = noise_for_seeds(batch, shape, dtype=dtype).to(device)  # [b, C, H, W]
        x = initial_state(noise, sigmas)
        kwargs: dict[str, Any] = {"callback": callback}
        if sampler == "ancestral":
            kwargs["generator"] = [seed_generator(s, shape) for s in batch]
        images = SAMPLERS[sampler](bound, x, sigmas, **kwargs).cpu()  # [b, C, H, W]
        if on_batch is not None:
            on_batch(batch, images, bound)
        out.append(images)
    return torch.cat(out)  # [S, C, H, W]
