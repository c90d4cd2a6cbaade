"""Smoothed closed-form diffusion (Scarvelis, Borde & Solomon, arXiv 2310.12395).

The closed-form (ideal) denoiser memorises; smoothing it over a Gaussian
perturbation of its input generalises. Here any denoiser ``base`` is smoothed by
a Monte-Carlo average over ``draws`` perturbations:

    D(x, sigma) = (1 / draws) sum_{m=1..draws} base(x + std * eps_m, sigma),   eps_m ~ N(0, I)

Units: ``std`` is in the VE units of ``x`` (``x = x0 + sigma * eps``). A
smoothing ``std_VP`` given for the VP input ``x_t = sqrt(abar) x`` converts as
``std_VE = std_VP / sqrt(abar)``, ``abar = 1 / (1 + sigma^2)``.

Randomness: call number ``c`` (0 for the first call after construction or
:meth:`Smoothed.reset`, then 1, 2, ...) draws ``eps`` of shape
``[draws, B, C, H, W]`` with ``torch.randn(..., generator=call_generator(seed, c),
dtype=x.dtype)`` on the CPU (moved to ``x``'s device), so a run is reproducible
from ``seed`` regardless of device and batch contents.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from patchmosaic.denoisers.base import (
    call_generator,
    check_positive_int,
    check_seed,
    sigma_vector,
)
from patchmosaic.schedules import ValueSchedule

__all__ = ["Smoothed"]

Denoiser = Callable[..., torch.Tensor]


class Smoothed:
    """Monte-Carlo Gaussian smoothing of a denoiser's input (module docstring).

    Cost per call: ``draws`` times the cost of ``base`` on a batch of ``B``
    (evaluated as one batch of ``draws * B``).

    Args:
        base: Any ``D(x, sigma, label=None)`` denoiser (``label=`` is forwarded when given).
        std: Smoothing standard deviation (>= 0) in the VE units of x, or a sigma-keyed
            :class:`~patchmosaic.schedules.ValueSchedule` of them (``parameter="std"``, e.g. from
            ``calibrate --denoiser smoothed``): row b is perturbed with ``std(sigma_b)``.
        draws: Number of perturbations (>= 1).
        seed: Seed of the per-call generators (:func:`patchmosaic.denoisers.base.call_generator`).
    """

    def __init__(self, base: Denoiser, *, std: float | ValueSchedule, draws: int, seed: int = 0) -> None:
        if not callable(base):
            raise ValueError(f"base must be a denoiser D(x, sigma), got {type(base).__name__}")
        if isinstance(std, ValueSchedule):
            if std.parameter != "std":
                raise ValueError(f"a schedule of {std.parameter!r} is not a std schedule")
            bad = [v for v in std.values if not v >= 0]
            if bad:
                raise ValueError(f"std values must be >= 0, got {bad} in {std.name}")
        elif isinstance(std, bool) or not isinstance(std, (int, float)) or not (np.isfinite(std) and std >= 0):
            raise ValueError(f"std must be finite and >= 0, got {std!r}")
        self.base = base
        self.std = std if isinstance(std, ValueSchedule) else float(std)
        self.draws = check_positive_int(draws, "draws")
        self.seed = check_seed(seed)
        self.calls = 0

    def __repr__(self) -> str:
        return f"Smoothed({self.base!r}, std={self.std}, draws={self.draws}, seed={self.seed})"

    def reset(self, call: int = 0) -> None:
        """Set the index of the next call (its generator is ``call_generator(seed, call)``)."""
        self.calls = int(call)

    def __call__(
        self, x: torch.Tensor, sigma: float | torch.Tensor, *, label: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Average of ``base`` over ``draws`` Gaussian perturbations of ``x``.

        Args:
            x: ``[B, C, H, W]`` noisy images.
            sigma: Float or ``[B]`` noise levels (> 0).
            label: Forwarded to ``base`` (int or ``[B]``; repeated per draw).

        Returns:
            ``[B, C, H, W]`` in ``x``'s dtype.
        """
        if not torch.is_tensor(x) or x.ndim != 4:
            raise ValueError(f"x must be a [B, C, H, W] tensor, got {getattr(x, 'shape', type(x).__name__)}")
        s = sigma_vector(sigma, x)  # [B]
        B = x.shape[0]
        g = call_generator(self.seed, self.calls)
        self.calls += 1
        eps = torch.randn((self.draws, *x.shape), generator=g, dtype=x.dtype).to(x.device)  # [draws, B, C, H, W]
        if isinstance(self.std, ValueSchedule):
            std = torch.tensor([self.std.value_at(v) for v in s.tolist()], dtype=x.dtype, device=x.device)
            std = std.view(1, B, 1, 1, 1)  # per row
        else:
            std = self.std
        xs = (x[None] + std * eps).reshape(self.draws * B, *x.shape[1:])  # [draws B, C, H, W]
        kwargs = {}
        if label is not None:
            lab = torch.as_tensor(label)
            kwargs["label"] = lab.repeat(self.draws) if lab.ndim == 1 else label  # [draws B] or int
        out = self.base(xs, s.repeat(self.draws), **kwargs)  # [draws B, C, H, W]
        return out.view(self.draws, *x.shape).mean(0)  # [B, C, H, W]
