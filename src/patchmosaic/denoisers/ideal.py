"""The exact ideal denoiser in the VE/EDM protocol: a thin wrapper of the IS score machine.

``ScoreMachine(train, kind="ideal").denoise(x_t, abar)`` is the VP-form posterior
mean (Kamb & Ganguli 2412.20292, Eq. 6-9). With ``x = x_t / sqrt(abar)`` and
``abar = 1 / (1 + sigma^2)`` it is the softmax over whole training images with
logits ``-|x - X_k|^2 / (2 sigma^2)``:

    D_ideal(x, sigma) = machine.denoise(x * sqrt(abar), abar),   abar = 1 / (1 + sigma^2).

Precision: the machine forms ``1 - abar`` in the query dtype; for float32 at
``sigma < ~0.01`` that difference loses digits (``1 - abar = sigma^2 / (1 + sigma^2)``
rounds at 6e-8 absolute), so use float64 queries for exact low-noise comparisons.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from patchmosaic.denoisers.base import check_query, sigma_vector
from patchmosaic.machines import DEFAULT_CHUNK_ELEMENTS, ScoreMachine

__all__ = ["Ideal"]


class Ideal:
    """``D(x, sigma, label=None)``: the memorising (ideal) posterior mean, softmax over all N images.

    Args:
        train: ``[N, C, H, W]`` training images.
        labels: Optional ``[N]`` integer labels for ``label=`` conditioning.
        chunk_elements: Memory bound of the machine's streamed chunks.
    """

    def __init__(
        self,
        train: torch.Tensor | np.ndarray,
        *,
        labels: torch.Tensor | np.ndarray | Sequence[int] | None = None,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> None:
        self.machine = ScoreMachine(train, kind="ideal", labels=labels, chunk_elements=chunk_elements)

    def __repr__(self) -> str:
        return f"Ideal({self.machine!r})"

    def __call__(
        self, x: torch.Tensor, sigma: float | torch.Tensor, *, label: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Posterior mean ``[B, C, H, W]`` (in ``x``'s dtype) of the ideal denoiser at ``sigma``."""
        check_query(x, self.machine.image_shape)
        s = sigma_vector(sigma, x)  # [B]
        abar = 1.0 / (1.0 + s.square())  # [B]
        return self.machine.denoise(x * abar.sqrt()[:, None, None, None], abar, label=label)  # [B, C, H, W]
