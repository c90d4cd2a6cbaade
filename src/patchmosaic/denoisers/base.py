"""The denoiser protocol shared by every method and network (k-diffusion / EDM form).

A denoiser is any callable ``D(x, sigma) -> x0_hat``:

* ``x`` ``[B, C, H, W]`` float tensor, ``x = x0 + sigma * eps`` (variance exploding);
* ``sigma`` ``[B]`` float tensor of noise levels, every entry finite and > 0
  (:func:`sigma_vector` also accepts a Python float);
* the result ``[B, C, H, W]`` estimates ``E[x0 | x]`` in the dtype and on the device of ``x``.

Samplers (:mod:`patchmosaic.samplers`) only ever call ``D(x, sigma)``; locality
schedules, labels and noise schedules are bound into the denoiser beforehand
(e.g. :meth:`patchmosaic.ScoreMachine.bind`). The paper's VP form is a change of
variables (:mod:`patchmosaic.schedules`): ``D(x_t / sqrt(abar), sigma(abar))`` is
the VP posterior mean ``E[x0 | x_t]``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["Denoiser", "check_images", "sigma_vector"]


@runtime_checkable
class Denoiser(Protocol):
    """``D(x, sigma) -> x0_hat`` with ``x [B, C, H, W]`` and ``sigma [B]`` (VE form)."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...


def sigma_vector(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """``sigma`` as a ``[B]`` tensor in the dtype and on the device of ``x``, checked.

    Raises:
        ValueError: Wrong shape, or an entry that is not finite and positive.
    """
    B = x.shape[0]
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if s.ndim == 0:
        s = s.expand(B)
    if s.shape != (B,):
        raise ValueError(f"sigma must be a float or a [B] = [{B}] tensor, got shape {tuple(s.shape)}")
    if not (torch.isfinite(s) & (s > 0)).all():
        raise ValueError(f"sigma must be finite and > 0 (sigma = 0 is noiseless: no denoising), got {s.tolist()}")
    return s.contiguous()


def check_images(x: object, shape: tuple[int, int, int], what: str = "x") -> None:
    """Check that ``x`` is a finite float32/float64 ``[B, *shape]`` tensor; raise ValueError naming the problem.

    Args:
        x: The query batch.
        shape: ``(C, H, W)`` the denoiser expects.
        what: The argument's name in messages.
    """
    if not torch.is_tensor(x):
        raise ValueError(f"{what} must be a torch tensor, got {type(x).__name__}")
    C, H, W = shape
    if x.ndim == 3:
        raise ValueError(
            f"{what} has shape {tuple(x.shape)}: missing batch dimension, expected "
            f"[B, {C}, {H}, {W}] (use {what}[None] for one image)"
        )
    if x.ndim != 4:
        raise ValueError(f"{what} must have shape [B, C, H, W], got {tuple(x.shape)}")
    if x.shape[1] != C:
        raise ValueError(f"{what} has {x.shape[1]} channels but the training images have {C}")
    if tuple(x.shape[2:]) != (H, W):
        raise ValueError(f"{what} is {x.shape[2]}x{x.shape[3]} but the training images are {H}x{W}")
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"{what} is {x.dtype}: closed-form denoisers compute in float32 or float64 (lower "
            "precision makes the 1/sigma^2-scaled logits wrong at low noise)"
        )
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or infinite values")
