"""Patch-based denoiser composites, PSPC-Square (Niedoba et al., arXiv 2411.19339).

For every window ``w`` of P x P pixels that fits inside the image (top-left
``(y, x)`` with ``y + P <= H``, ``x + P <= W``, all channels, no padding), the
posterior over the same window cut from every training image (and from its
horizontal mirror with ``flips=True``):

    D_w(x) = sum_k softmax_k(-|x_w - X_k,w|^2 / (2 sigma^2)) X_k,w        (the whole window)
    D(x)[p] = mean of D_w(x)[p] over the windows w that contain p.

Computation: the windows are the query groups of the shared streaming engine
(:class:`patchmosaic.engine.SoftmaxMean`): a group of window rows forms ``G``
groups of ``B`` queries, its keys are the same-location windows of a chunk of
training images (``[G, C P P + 2, K]``, augmented with ``|key|^2``), its values
the whole windows, so each (window group, image chunk) is one batched matrix
product. The values are the transposed augmented keys ``[window, |window|^2, 1]``
(a view, no copy; the ``|window|^2`` column is carried and dropped, the trailing
1 gives the normaliser as :func:`patchmosaic.engine.augment_values` does). The
overlapping window means are summed back with ``F.fold``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from patchmosaic.denoisers.base import (
    CHUNK_ELEMENTS,
    TrainingSet,
    TrainingSetDenoiser,
    check_positive_int,
)
from patchmosaic.denoisers.mixture_provenance import PixelMixtureTally
from patchmosaic.engine import SoftmaxMean, augment_queries, exact_float32_matmul
from patchmosaic.provenance import Provenance
from patchmosaic.schedules import PRESETS, PatchSchedule

__all__ = [
    "PatchComposite",
    "pspc_cifar10_schedule",
]

def pspc_cifar10_schedule() -> PatchSchedule:
    """The published PSPC-Square CIFAR-10 schedule as ``k(sigma)`` (the preset ``cifar10-pspc-square``)."""
    return PRESETS["cifar10-pspc-square"]


class PatchComposite(TrainingSetDenoiser):
    """PSPC-Square: average of per-window posteriors over all P x P windows (module docstring).

    Cost per call: ``G (2 D B N')`` flops for the logits plus as many for the
    weighted window sums, with ``G = (H - P + 1)(W - P + 1)`` windows,
    ``D = C P^2``, ``N' = N`` (``2N`` with flips).

    Args:
        train: ``[N, C, H, W]`` training images.
        patch_size: Window side P (1 <= P <= min(H, W)), or a callable
            ``k(sigma) -> int`` (e.g. :func:`pspc_cifar10_schedule`).
        flips: Also use every training image's horizontal mirror.
        labels: Optional ``[N]`` integer labels for ``label=`` conditioning.
        chunk_elements: Bound on the elements of one chunk's keys and logits.
    """

    reports_provenance = True  # with_provenance: per-pixel image weights (mixture_provenance)

    def __init__(
        self,
        train: torch.Tensor | np.ndarray,
        *,
        patch_size: int | Callable[[float], int],
        flips: bool = False,
        labels: torch.Tensor | np.ndarray | Sequence[int] | None = None,
        chunk_elements: int = CHUNK_ELEMENTS,
    ) -> None:
        self.train = TrainingSet(train, labels)
        if flips:  # mirrors after the originals: [2N, C, H, W]
            lab = self.train.labels
            self.train = TrainingSet(
                torch.cat([self.train.images, self.train.images.flip(-1)]), None if lab is None else torch.cat([lab, lab])
            )
        self.flips = bool(flips)
        if not callable(patch_size):
            self._check_size(patch_size)
        self.patch_size = patch_size
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements must be positive, got {chunk_elements}")
        self.chunk_elements = int(chunk_elements)

    def __repr__(self) -> str:
        return (
            f"PatchComposite(N={self.train.num // (2 if self.flips else 1)}, image={self.train.image_shape}, "
            f"patch_size={self.patch_size!r}, flips={self.flips})"
        )

    def _check_size(self, P: object) -> int:
        _, H, W = self.train.image_shape
        return check_positive_int(P, "patch_size", maximum=min(H, W), what_max=f" (the image is {H}x{W})")

    def size_at(self, sigma: float) -> int:
        """Window side P used at ``sigma``."""
        P = self.patch_size(float(sigma)) if callable(self.patch_size) else self.patch_size
        return self._check_size(P)

    def patch_size_at(self, sigma: float) -> int:
        """The window side P at ``sigma`` (the name the samplers' provenance recorder asks for)."""
        return self.size_at(sigma)

    def _window_logits(
        self, x: torch.Tensor, sigma: torch.Tensor, train: torch.Tensor, P: int, K: int
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, logits [B, k, nh, nw])`` of every window for each chunk of k candidate images.

        ``logit_w[k] = (<x_w, X_k,w> - |X_k,w|^2 / 2) / sigma^2`` (``|x_w|^2`` cancels in the
        softmax over k), by box sums of the per-pixel products over each P x P window.
        """
        B = x.shape[0]
        s2 = sigma.square()[:, None, None, None]  # [B, 1, 1, 1]
        for start in range(0, train.shape[0], K):
            Xk = train[start : start + K]  # [k, C, H, W]
            k = Xk.shape[0]
            prod = torch.einsum("bchw,kchw->bkhw", x, Xk)  # [B, k, H, W]
            box = F.avg_pool2d(prod.reshape(B * k, 1, *prod.shape[2:]), P, stride=1, divisor_override=1)
            sq = F.avg_pool2d(Xk.square().sum(1, keepdim=True), P, stride=1, divisor_override=1)  # [k, 1, nh, nw]
            yield start, (box.view(B, k, *box.shape[2:]) - 0.5 * sq[:, 0][None]) / s2  # [B, k, nh, nw]

    def _provenance_class(
        self, x: torch.Tensor, sigma: torch.Tensor, cls: int | None, top: int
    ) -> tuple[torch.Tensor, Provenance]:
        """Per pixel, ``omega_k(p)``: window posteriors averaged over the windows containing p.

        Two streams over the candidates: the per-window log normaliser, then the
        weights, spread back to pixels by a transposed box filter (the adjoint of
        the window sums) and divided by the number of windows containing p; the
        output ``sum_k omega_k(p) X_k[p]`` comes from the second stream.
        """
        train = self.train.subset(x, cls)  # [N', C, H, W] (mirrors after the originals with flips)
        ids = self.train.global_ids(cls).to(x.device)  # [N'] index into the (doubled) training set
        n_orig = self.train.num // (2 if self.flips else 1)
        flipped, ids = ids >= n_orig, ids % n_orig  # [N'] each
        B, C, H, W = x.shape
        out = torch.empty_like(x)  # [B, C, H, W], sum_k omega_k(p) X_k[p]: the denoiser's output
        K = max(1, min(train.shape[0], self.chunk_elements // (B * H * W)))
        parts = []
        for P in sorted({self.size_at(s) for s in sigma.tolist()}):
            rows = torch.tensor([i for i, s in enumerate(sigma.tolist()) if self.size_at(s) == P], device=x.device)
            xs, ss = x[rows], sigma[rows]
            lse = None  # [B_P, nh, nw]
            for _, logits in self._window_logits(xs, ss, train, P, K):
                chunk = logits.logsumexp(1)
                lse = chunk if lse is None else torch.logaddexp(lse, chunk)
            ones = x.new_ones(1, 1, P, P)
            count = F.conv_transpose2d(torch.ones_like(lse[:1, None]), ones)  # [1, 1, H, W]
            tally = PixelMixtureTally(xs.shape[0], H, W, top, x)
            mean = torch.zeros_like(xs)  # [B_P, C, H, W]
            for start, logits in self._window_logits(xs, ss, train, P, K):
                w = (logits - lse[:, None]).exp()  # [B_P, k, nh, nw], window posteriors
                k = w.shape[1]
                omega = F.conv_transpose2d(w.reshape(-1, 1, *w.shape[2:]), ones) / count  # [B_P * k, 1, H, W]
                omega = omega.view(xs.shape[0], k, H, W)
                mean += torch.einsum("bkhw,kchw->bchw", omega, train[start : start + k])
                tally.add(omega, ids[start : start + k], flipped[start : start + k])
            out[rows] = mean
            parts.append((rows, tally.result()))
        return out, Provenance.scatter(parts, B)

    def _denoise_class(self, x: torch.Tensor, sigma: torch.Tensor, cls: int | None) -> torch.Tensor:
        train = self.train.subset(x, cls)  # [N, C, H, W]
        sizes = torch.tensor([self.size_at(s) for s in sigma.tolist()])  # [B]
        if bool((sizes == sizes[0]).all()):  # one window size for the batch
            return self._composite(x, sigma, train, int(sizes[0]))
        out = torch.empty_like(x)  # [B, C, H, W]
        for P in torch.unique(sizes).tolist():
            rows = torch.nonzero(sizes == P).flatten().to(x.device)  # [B_P]
            out[rows] = self._composite(x[rows], sigma[rows], train, int(P))
        return out

    def _composite(self, x: torch.Tensor, sigma: torch.Tensor, train: torch.Tensor, P: int) -> torch.Tensor:
        """All window posteriors at one window size, folded back to an image."""
        B, C, H, W = x.shape
        N = train.shape[0]
        D = C * P * P
        nh, nw = H - P + 1, W - P + 1
        s2 = sigma.square()  # [B]
        scale, bias = 1.0 / s2, -0.5 / s2  # logit = <x_w, X_w> / s2 - |X_w|^2 / (2 s2) (+ const)
        xq = F.unfold(x, P).view(B, D, nh, nw)  # [B, D, nh, nw], D ordered (c, dy, dx)
        tw = train.unfold(2, P, 1).unfold(3, P, 1)  # [N, C, nh, nw, P, P] view
        sq = F.avg_pool2d(train.square().sum(1, keepdim=True), P, stride=1, divisor_override=1)[:, 0]  # [N, nh, nw]
        # image chunk K and window rows per group so that keys [G, D, K] and logits [G, B, K] fit
        K = max(1, min(N, self.chunk_elements // (nw * max(D, B))))
        rows_per_group = max(1, min(nh, self.chunk_elements // (nw * max(D, B) * K)))
        means = x.new_empty(nh, nw, B, D)  # [nh, nw, B, D]
        with exact_float32_matmul():
            for y0 in range(0, nh, rows_per_group):
                ys = slice(y0, min(nh, y0 + rows_per_group))
                G = (ys.stop - ys.start) * nw
                q = xq[:, :, ys].permute(2, 3, 0, 1).reshape(G, B, D)  # [G, B, D]
                # values = keys^T = [window, |window|^2, 1]: the |window|^2 column's mean is unused
                state = SoftmaxMean(augment_queries(q, scale, bias), D + 1, max_logits=self.chunk_elements)
                buffer = x.new_empty(G * (D + 2) * K)  # augmented keys of one chunk
                for start in range(0, N, K):
                    win = tw[start : start + K, :, ys]  # [k, C, gh, nw, P, P]
                    k = win.shape[0]
                    keys = buffer[: G * (D + 2) * k].view(G, D + 2, k)  # [G, D + 2, k] = [key; |key|^2; 1]
                    keys[:, :D].unflatten(0, (-1, nw)).unflatten(2, (C, P, P)).copy_(win.permute(2, 3, 1, 4, 5, 0))
                    keys[:, D] = sq[start : start + k, ys].permute(1, 2, 0).reshape(G, k)  # |window|^2
                    keys[:, D + 1] = 1.0
                    state.update(keys, keys.transpose(1, 2))
                means[ys] = state.mean()[..., :D].view(ys.stop - ys.start, nw, B, D)  # [gh, nw, B, D]
        cols = means.permute(2, 3, 0, 1).reshape(B, D, nh * nw)  # [B, D, L], fold's layout
        total = F.fold(cols, (H, W), P)  # [B, C, H, W], sum over windows containing p
        count = F.fold(torch.ones_like(cols[:1]), (H, W), P)  # [1, C, H, W]
        return total / count
