"""Data-driven locality (Lukoianov et al., arXiv 2509.09672), computed exactly.

The locality pattern of a diffusion model is read off the Wiener filter of the
training data, ``W = Sigma (Sigma + sigma^2 I)^-1`` (:mod:`patchmosaic.denoisers.wiener`):

    Mt[i, j] = W[i, j] / W[i, i]           (divide by 1 where |W[i, i]| < 1e-6)
    M[i, j]  = 1  if |Mt[i, j]| >= threshold * max_{i', j'} |Mt[i', j']|   else 0

(one global maximum over the matrix at that sigma). Output coordinate ``j`` sees
the input coordinates ``{i : M[i, j] = 1}`` and is the posterior mean of a
softmax over all N training images with that masked distance:

    logit[k, j] = -sum_i M[i, j] (x_i - X_k,i)^2 / (2 sigma^2 T)
    D(x)[j]     = sum_k softmax_k(logit[k, j]) X_k,j

Computation (augmented-product form). Expanding the square,
``sum_i M[i,j] (x_i - X_k,i)^2 = (M^T x^2)_j - 2 (M^T (x * X_k))_j + (M^T X_k^2)_j``;
the first term is the same for every k and cancels in the softmax, so for a chunk
of K images one matrix product of the stacked rows ``[x_b * X_k (all b); X_k^2]``
(``[(B + 1) K, n]``) with ``M [n, n]`` gives every logit:

    logit[b, k, j] = ((x_b * X_k) M)_j / (sigma_b^2 T) - (X_k^2 M)_j / (2 sigma_b^2 T)

Chunks of training images are folded in with an online log-sum-exp per
``(b, j)`` (running maximum, rescaled numerator and normaliser); no
``[B, N, n]`` difference tensor is formed, memory is bounded by ``chunk_elements``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from patchmosaic.denoisers.base import CHUNK_ELEMENTS, TrainingSet, TrainingSetDenoiser
from patchmosaic.denoisers.mixture_provenance import PixelMixtureTally
from patchmosaic.denoisers.wiener import GaussianMoments
from patchmosaic.engine import EXP_FLOOR, exact_float32_matmul
from patchmosaic.provenance import Provenance
from patchmosaic.schedules import ValueSchedule

__all__ = ["DATA_LOCALITY_THRESHOLDS", "DataLocality", "locality_mask"]

# Published thresholds (Lukoianov et al. 2509.09672): per dataset, images in [-1, 1].
DATA_LOCALITY_THRESHOLDS = {
    "mnist": 0.005,
    "fashion-mnist": 0.005,
    "cifar10": 0.05,
    "celeba-hq": 0.02,  # at 64 px
    "afhq": 0.02,  # at 64 px
}

# |W[i, i]| below this is treated as zero: that row of Mt is divided by 1 instead.
DIAGONAL_FLOOR = 1e-6

# Masks kept per (class, sigma); one [n, n] bool each (1 MiB at n = 1024).
MASK_CACHE_SIZE = 64


def locality_mask(moments: GaussianMoments, sigma: float, threshold: float) -> torch.Tensor:
    """The binary locality mask ``M [n, n]`` (bool, ``M[i, j]``: input i feeds output j).

    Cost: ``2 n^2 r`` float64 flops for ``W = U diag(g) U^T`` (r = rank of Sigma).
    """
    W = moments.W(sigma)  # [n, n] float64
    d = W.diagonal()  # [n]
    d = torch.where(d.abs() < DIAGONAL_FLOOR, torch.ones_like(d), d)
    Mt = (W / d[:, None]).abs_()  # [n, n], |W[i, j] / W[i, i]|
    return Mt >= threshold * Mt.max()


class DataLocality(TrainingSetDenoiser):
    """Posterior mean with the data-driven locality mask of Lukoianov et al. (2509.09672).

    See the module docstring for the formula. The mask depends on sigma (and on
    the class when ``label=`` is given: the moments of that class's images); it
    is computed once per (class, sigma) value and cached.

    Cost per call: ``2 (B + 1) N n^2`` flops for the masked products (float32 or
    the query dtype), plus, at a sigma not seen before, ``2 n^2 r`` float64 flops
    for the mask. Measured on 2 shared CPU cores, MNIST 32 x 32 (n = 1024),
    N = 1000, B = 8, float32: 0.25-0.35 s per call; the mask 0.46 s at the
    first sigma (with the eigendecomposition), 0.14 s at each new sigma
    (``benchmarks/bench_family.py``; README, "The family of closed-form denoisers").

    Args:
        train: ``[N, C, H, W]`` training images.
        threshold: Mask threshold in (0, 1] relative to ``max |Mt|``; published
            values in :data:`DATA_LOCALITY_THRESHOLDS` (0.005 MNIST/Fashion-MNIST,
            0.05 CIFAR-10, 0.02 CelebA-HQ/AFHQ at 64 px). Or a sigma-keyed
            :class:`~patchmosaic.schedules.ValueSchedule` of thresholds (``parameter="threshold"``,
            e.g. from ``calibrate --denoiser data-locality``).
        temperature: Softmax temperature T > 0 (1: the posterior).
        labels: Optional ``[N]`` integer labels for ``label=`` conditioning.
        chunk_elements: Bound on the elements of one chunk's stacked rows
            ``[(B + 1) K, n]`` (and of its logit block).
    """

    reports_provenance = True  # with_provenance: per-pixel image weights (mixture_provenance)

    def __init__(
        self,
        train: torch.Tensor | np.ndarray,
        *,
        threshold: float | ValueSchedule,
        temperature: float = 1.0,
        labels: torch.Tensor | np.ndarray | Sequence[int] | None = None,
        chunk_elements: int = CHUNK_ELEMENTS,
    ) -> None:
        self.train = TrainingSet(train, labels)
        if isinstance(threshold, ValueSchedule):
            if threshold.parameter != "threshold":
                raise ValueError(f"a schedule of {threshold.parameter!r} is not a threshold schedule")
            bad = [v for v in threshold.values if not 0 < v <= 1]
            if bad:
                raise ValueError(f"thresholds must be in (0, 1], got {bad} in {threshold.name}")
        elif isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            np.isfinite(temperature) and temperature > 0
        ):
            raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements must be positive, got {chunk_elements}")
        self.threshold = threshold if isinstance(threshold, ValueSchedule) else float(threshold)
        self.temperature = float(temperature)
        self.chunk_elements = int(chunk_elements)
        self._moments: dict[int | None, GaussianMoments] = {}
        self._masks: OrderedDict[tuple[int | None, float, float], torch.Tensor] = OrderedDict()

    def __repr__(self) -> str:
        return (
            f"DataLocality(N={self.train.num}, image={self.train.image_shape}, "
            f"threshold={self.threshold}, temperature={self.temperature})"
        )

    def threshold_at(self, sigma: float) -> float:
        """The mask threshold used at ``sigma`` (the constant, or the schedule's value)."""
        return self.threshold.value_at(sigma) if isinstance(self.threshold, ValueSchedule) else self.threshold

    def mask(self, sigma: float, cls: int | None = None) -> torch.Tensor:
        """The locality mask ``M [n, n]`` (bool) at ``sigma`` for class ``cls`` (cached per threshold too).

        Copies (``copy.copy``) share the class moments and this cache, so a calibration's candidate
        thresholds fit each class's moments once.
        """
        threshold = self.threshold_at(float(sigma))
        key = (cls, float(sigma), threshold)
        if key in self._masks:
            self._masks.move_to_end(key)
            return self._masks[key]
        if cls not in self._moments:
            self._moments[cls] = GaussianMoments.fit(self.train.images_of(cls))
        M = locality_mask(self._moments[cls], float(sigma), threshold)  # [n, n]
        self._masks[key] = M
        if len(self._masks) > MASK_CACHE_SIZE:
            self._masks.popitem(last=False)
        return M

    def _denoise_class(self, x: torch.Tensor, sigma: torch.Tensor, cls: int | None) -> torch.Tensor:
        train = self.train.subset(x, cls)  # [N_c, C, H, W]
        values = torch.unique(sigma).tolist()
        if len(values) == 1:  # the sampler's case: one sigma for the batch
            return self._masked_posterior(x, values[0], self.mask(values[0], cls).to(x), train)[0]
        out = torch.empty_like(x)  # [B, C, H, W]
        for value in values:  # one mask per distinct sigma
            rows = torch.nonzero(sigma == value).flatten()  # [B_s]
            out[rows] = self._masked_posterior(x[rows], value, self.mask(value, cls).to(x), train)[0]
        return out

    def _chunk_logits(
        self, x: torch.Tensor, sigma: float, M: torch.Tensor, train: torch.Tensor
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(start, X_k [K, n], logits [B, K, n])`` for each chunk of training images.

        The logits (without the ``(M^T x^2)_j`` term, equal for every k) live in a
        reused buffer: consume each before asking for the next.
        """
        B = x.shape[0]
        N = train.shape[0]
        n = M.shape[0]
        xf = x.reshape(B, 1, n)  # [B, 1, n]
        X = train.reshape(N, n)  # [N, n]
        c = 1.0 / (sigma**2 * self.temperature)
        K = max(1, min(N, self.chunk_elements // ((B + 1) * n)))
        buffer = x.new_empty((B + 1) * K * n)  # the stacked rows of one chunk
        with exact_float32_matmul():
            for start in range(0, N, K):
                Xk = X[start : start + K]  # [K, n]
                k = Xk.shape[0]
                rows = buffer[: (B + 1) * k * n].view(B + 1, k, n)  # [B + 1, K, n]
                torch.mul(xf, Xk, out=rows[:B])  # x_b * X_k
                torch.square(Xk, out=rows[B])  # X_k^2
                prod = (rows.view(-1, n) @ M).view(B + 1, k, n)  # [B + 1, K, n]
                yield start, Xk, prod[:B].mul_(c).sub_(prod[B], alpha=0.5 * c)  # [B, K, n]

    def _masked_posterior(
        self, x: torch.Tensor, sigma: float, M: torch.Tensor, train: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stream the training images in chunks; online log-sum-exp per (b, j).

        Returns:
            ``(x0_hat [B, C, H, W], log normaliser [B, n])`` (the normaliser of the shifted logits).
        """
        B = x.shape[0]
        n = M.shape[0]
        floor = EXP_FLOOR[x.dtype]
        ref = x.new_full((B, n), float("-inf"))  # running log-sum-exp reference
        num = x.new_zeros((B, n))  # sum_k exp(logit - ref) X_k,j
        den = x.new_zeros((B, n))  # sum_k exp(logit - ref)
        for _, Xk, logits in self._chunk_logits(x, sigma, M, train):
            new_ref = torch.maximum(ref, logits.amax(1))  # [B, n]
            w = logits.sub_(new_ref[:, None]).clamp_(min=floor).exp_()  # [B, K, n]
            decay = torch.exp(ref - new_ref)  # [B, n] (0 on the first chunk)
            den = den * decay + w.sum(1)
            num = num * decay + w.mul_(Xk).sum(1)  # sum_k w X_k,j
            ref = new_ref
        return (num / den).reshape(x.shape), ref + den.log()  # [B, C, H, W], [B, n]

    def _provenance_class(
        self, x: torch.Tensor, sigma: torch.Tensor, cls: int | None, top: int
    ) -> tuple[torch.Tensor, Provenance]:
        """Two streams per distinct sigma: the posterior (with its normaliser), then the weights per pixel."""
        train = self.train.subset(x, cls)  # [N_c, C, H, W]
        ids = self.train.global_ids(cls).to(x.device)  # [N_c]
        B, C, H, W = x.shape
        out, parts = torch.empty_like(x), []
        for value in torch.unique(sigma).tolist():
            rows = torch.nonzero(sigma == value).flatten()  # [B_s]
            M = self.mask(value, cls).to(x)
            xs = x[rows]
            out[rows], lse = self._masked_posterior(xs, value, M, train)  # lse [B_s, n]
            tally = PixelMixtureTally(xs.shape[0], H, W, top, x)
            for start, _, logits in self._chunk_logits(xs, value, M, train):
                w = logits.sub_(lse[:, None]).exp_()  # [B_s, K, n], normalised weights
                tally.add(w.view(xs.shape[0], -1, C, H, W).mean(2), ids[start : start + w.shape[1]])  # [B_s, K, H, W]
            parts.append((rows, tally.result()))
        return out, Provenance.scatter(parts, B)
