"""The Wiener (Gaussian) denoiser: the posterior mean under the training set's moments.

If ``x0 ~ N(mu, Sigma)`` and ``x = x0 + sigma * eps``, then

    E[x0 | x] = mu + Sigma (Sigma + sigma^2 I)^-1 (x - mu)
              = mu + U diag(lambda / (lambda + sigma^2)) U^T (x - mu)

with ``Sigma = U diag(lambda) U^T``. With ``mu`` and ``Sigma`` the empirical moments
of the training images (all channels and pixels coupled) this is the linear
denoiser that the "Gaussian" analyses of diffusion models compare to (e.g. Wang &
Vastola 2303.02490; Lukoianov et al. 2509.09672, Sec. 3, whose data-locality mask
is read off the same matrix ``W = Sigma (Sigma + sigma^2 I)^-1``, see
:mod:`patchmosaic.denoisers.data_locality`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from patchmosaic.denoisers.base import (
    TrainingSet,
    TrainingSetDenoiser,
    check_positive_int,
)

__all__ = ["GaussianMoments", "Wiener"]


@contextmanager
def _single_threaded() -> Iterator[None]:
    """Run the block with one intra-op thread, restoring the caller's setting.

    The threaded LAPACK symmetric eigensolver collapses on a loaded machine:
    a 1000 x 1000 float64 ``eigh`` took 0.22 s on one thread and 20.9 s on two
    (2 shared cores, load 8), so the one-off decomposition runs single-threaded.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class GaussianMoments:
    """Mean and eigendecomposition of the covariance of a set of images (float64).

    Attributes:
        mu: ``[n]`` mean image, flattened.
        U: ``[n, r]`` orthonormal eigenvectors of Sigma, largest eigenvalue first.
        lam: ``[r]`` their eigenvalues (descending, >= 0). Eigenvalues not kept
            are zero (up to rounding) or cut by ``rank``.
    """

    mu: torch.Tensor
    U: torch.Tensor
    lam: torch.Tensor

    @classmethod
    def fit(cls, images: torch.Tensor, rank: int | None = None) -> GaussianMoments:
        """Moments of ``images [N, C, H, W]``: ``mu = mean_k X_k``, ``Sigma = (1/N) sum_k (X_k - mu)(X_k - mu)^T``.

        When ``N < n`` the eigenpairs come from the ``N x N`` Gram matrix
        ``G = Xc Xc^T`` of ``Xc = (X - mu) / sqrt(N)``: ``G v = l v`` gives
        ``Sigma (Xc^T v) = l (Xc^T v)``, so ``U = Xc^T V diag(l)^-1/2``. Sigma has
        rank <= N - 1, and the eigenvalues below ``max(lam) * n * 1e-15`` (zero up
        to rounding; their gain ``lam / (lam + sigma^2)`` is zero) are dropped.

        Args:
            images: ``[N, C, H, W]`` training images.
            rank: Keep only the top ``rank`` eigenpairs (``None``: all nonzero).
        """
        N = images.shape[0]
        X = images.reshape(N, -1).to(torch.float64)  # [N, n]
        n = X.shape[1]
        mu = X.mean(0)  # [n]
        Xc = (X - mu) / np.sqrt(N)  # [N, n]
        with _single_threaded():
            lam, V = torch.linalg.eigh(Xc @ Xc.T if N < n else Xc.T @ Xc)  # [min(N, n)] ascending, eigenvectors
        lam, V = lam.flip(0), V.flip(1)  # descending
        keep = lam > lam[0].clamp(min=0) * n * 1e-15 if lam[0] > 0 else torch.zeros_like(lam, dtype=torch.bool)
        if rank is not None:
            keep[rank:] = False
        lam, V = lam[keep], V[:, keep]  # [r], [., r]
        U = Xc.T @ V / lam.sqrt() if N < n else V  # [n, r]
        return cls(mu=mu, U=U, lam=lam)

    def gain(self, sigma: torch.Tensor) -> torch.Tensor:
        """``lambda / (lambda + sigma^2)`` for each row: ``[B, r]``."""
        return self.lam / (self.lam + sigma.to(torch.float64)[:, None] ** 2)

    def W(self, sigma: float) -> torch.Tensor:
        """``Sigma (Sigma + sigma^2 I)^-1 = U diag(gain) U^T`` as a dense ``[n, n]`` float64 matrix."""
        g = self.lam / (self.lam + float(sigma) ** 2)  # [r]
        return (self.U * g) @ self.U.T  # [n, n]


class Wiener(TrainingSetDenoiser):
    """Posterior mean under the Gaussian with the training set's mean and covariance.

    ``D(x, sigma) = mu + U_r diag(lambda_r / (lambda_r + sigma^2)) U_r^T (x - mu)``
    (see the module docstring). The eigendecomposition is computed once (per
    class when labels are used) in float64 and cast to the query dtype. Cost
    per call: ``4 B n r`` flops (two ``[B, n] x [n, r]`` products).

    Args:
        train: ``[N, C, H, W]`` training images.
        rank: Keep the top ``r`` eigenpairs (1 <= r <= n); ``None`` keeps all
            nonzero ones (exact). Zero eigenvalues carry zero gain, so a rank
            above the number of nonzero eigenvalues equals ``None``.
        labels: Optional ``[N]`` integer labels; ``label=`` at call time then uses
            the moments of that class's images.
    """

    def __init__(
        self,
        train: torch.Tensor | np.ndarray,
        *,
        rank: int | None = None,
        labels: torch.Tensor | np.ndarray | Sequence[int] | None = None,
    ) -> None:
        self.train = TrainingSet(train, labels)
        n = self.train.dim
        self.rank = None if rank is None else check_positive_int(rank, "rank", maximum=n, what_max=" (n = C*H*W)")
        self._moments: dict[int | None, GaussianMoments] = {}
        self._cast: dict[tuple[int | None, torch.dtype, torch.device], tuple[torch.Tensor, ...]] = {}

    def __repr__(self) -> str:
        return f"Wiener(N={self.train.num}, image={self.train.image_shape}, rank={self.rank})"

    def moments(self, cls: int | None = None) -> GaussianMoments:
        """The float64 moments of class ``cls`` (all images for None), computed once."""
        if cls not in self._moments:
            self._moments[cls] = GaussianMoments.fit(self.train.images_of(cls), self.rank)
        return self._moments[cls]

    def _denoise_class(self, x: torch.Tensor, sigma: torch.Tensor, cls: int | None) -> torch.Tensor:
        m = self.moments(cls)
        key = (cls, x.dtype, x.device)
        if key not in self._cast:
            self._cast[key] = (m.mu.to(x), m.U.to(x))
        mu, U = self._cast[key]  # [n], [n, r]
        g = m.gain(sigma).to(x)  # [B, r]
        xc = x.reshape(x.shape[0], -1) - mu  # [B, n]
        return (mu + ((xc @ U) * g) @ U.T).reshape(x.shape)  # [B, C, H, W]
