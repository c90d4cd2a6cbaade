"""How far is a denoiser from the exact ideal one? Relative L2 error on forward-noised images.

For each noise level sigma and each query image ``x0`` (training images, and
held-out images the denoisers never saw), ``x = x0 + sigma * eps`` and

    err(x0, sigma) = |D(x, sigma) - D_ideal(x, sigma)| / |D_ideal(x, sigma)|

(L2 over all pixels and channels); the probe reports the mean over the images of
each set. The noise of sigma number ``i`` is ``torch.randn(queries.shape,
generator=call_generator(seed, i))`` (float32 on the CPU, one draw for the whole
set), so every denoiser is probed on the same noisy inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from patchmosaic.denoisers.base import call_generator

__all__ = ["ProbeResult", "probe"]

Denoiser = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class ProbeResult:
    """Mean relative L2 error against the ideal denoiser, per sigma."""

    sigmas: tuple[float, ...]  # noise levels, as given
    train_error: tuple[float, ...]  # mean over the training queries, one per sigma
    heldout_error: tuple[float, ...]  # mean over the held-out queries (NaN when none were given)
    train_queries: int  # number of training queries
    heldout_queries: int  # number of held-out queries

    def table(self) -> str:
        """The result as an aligned text table."""
        lines = [f"{'sigma':>10} {'train rel. L2':>14} {'held-out rel. L2':>17}"]
        for s, a, b in zip(self.sigmas, self.train_error, self.heldout_error):
            lines.append(f"{s:>10.4g} {a:>14.4e} {b:>17.4e}")
        lines.append(f"(mean over {self.train_queries} training and {self.heldout_queries} held-out queries)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dictionary."""
        return {
            "sigmas": list(self.sigmas),
            "train_rel_l2": list(self.train_error),
            "heldout_rel_l2": list(self.heldout_error),
            "train_queries": self.train_queries,
            "heldout_queries": self.heldout_queries,
            "error": "mean over images of |D(x) - D_ideal(x)| / |D_ideal(x)|, x = x0 + sigma * eps",
        }


def _relative_errors(
    denoiser: Denoiser, ideal: Denoiser, x0: torch.Tensor, sigma: float, eps: torch.Tensor, batch_size: int
) -> torch.Tensor:
    errs = []
    for start in range(0, x0.shape[0], batch_size):
        x = x0[start : start + batch_size] + sigma * eps[start : start + batch_size]  # [b, C, H, W]
        ref = ideal(x, sigma)  # [b, C, H, W]
        out = denoiser(x, sigma)  # [b, C, H, W]
        errs.append((out - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1))  # [b]
    return torch.cat(errs)


def probe(
    denoiser: Denoiser,
    ideal: Denoiser,
    train_queries: torch.Tensor,
    heldout_queries: torch.Tensor | None,
    sigmas: Sequence[float],
    *,
    seed: int = 0,
    batch_size: int = 16,
) -> ProbeResult:
    """Relative L2 error of ``denoiser`` against ``ideal`` (module docstring).

    Args:
        denoiser: ``D(x, sigma) -> x0_hat`` to probe.
        ideal: The exact ideal denoiser on the same training set
            (:class:`patchmosaic.denoisers.ideal.Ideal`).
        train_queries: ``[Q, C, H, W]`` clean images from the training set.
        heldout_queries: ``[Q', C, H, W]`` clean images not in it, or None.
        sigmas: Noise levels (> 0).
        seed: Seed of the noise (one generator per sigma index).
        batch_size: Queries per denoiser call.

    Returns:
        The per-sigma mean errors.
    """
    if len(sigmas) == 0 or any(not (float(s) > 0 and float(s) < float("inf")) for s in sigmas):
        raise ValueError(f"sigmas must be a non-empty list of finite values > 0, got {list(sigmas)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    sets = [train_queries] + ([] if heldout_queries is None else [heldout_queries])
    for t in sets:
        if t.ndim != 4 or t.shape[0] == 0:
            raise ValueError(f"query images must be a non-empty [Q, C, H, W] tensor, got {tuple(t.shape)}")
    means: list[list[float]] = [[], []]
    for i, s in enumerate(sigmas):
        g = call_generator(seed, i)
        for j, x0 in enumerate(sets):
            eps = torch.randn(x0.shape, generator=g).to(x0)  # [Q, C, H, W]
            means[j].append(float(_relative_errors(denoiser, ideal, x0, float(s), eps, batch_size).mean()))
    if heldout_queries is None:
        means[1] = [float("nan")] * len(sigmas)
    return ProbeResult(
        sigmas=tuple(float(s) for s in sigmas),
        train_error=tuple(means[0]),
        heldout_error=tuple(means[1]),
        train_queries=train_queries.shape[0],
        heldout_queries=0 if heldout_queries is None else heldout_queries.shape[0],
    )
