"""Provenance of the image-mixture denoisers of the family (DataLocality, PatchComposite).

Both output, at every pixel p, a convex combination of training pixels at the
same location (of a mirrored image for PSPC's flips):

    D(x)[p] = sum_k omega_k(p) X_k[p],    omega_k(p) >= 0,  sum_k omega_k(p) = 1.

* PatchComposite (PSPC-Square): ``omega_k(p) = (1 / |W_p|) sum_{w containing p}
  softmax_k(logit_w[k])``, the window posteriors averaged over the windows that
  contain p; exact for every channel.
* DataLocality: ``omega_k(p)`` is the coordinate posterior ``softmax_k(logit[k, j])``
  of the pixel's coordinate j (C = 1); for C > 1 each channel has its own
  posterior and omega is their mean over channels (then ``D(x)[c, p]`` is not
  ``sum_k omega_k(p) X_k[c, p]``; the provenance still says which images fed p).

:class:`PixelMixtureTally` turns chunks of ``omega`` into the same
:class:`~patchmosaic.provenance.Provenance` the score machines report (the top
entries per pixel, ``N_eff = 1 / sum omega^2`` and the entropy), so ``sample
--provenance``, ``explain`` and ``report`` work for these denoisers too. The
weights need the per-pixel (or per-window) normaliser first, so provenance costs
two streams over the training set (one for the normaliser, one for the weights).
"""

from __future__ import annotations

import torch

from patchmosaic.provenance import Provenance

__all__ = ["PixelMixtureTally"]


class PixelMixtureTally:
    """Streaming top-m, ``sum omega^2`` and ``-sum omega log omega`` of per-pixel image weights.

    Args:
        batch, height, width: ``B, H, W`` of the queries.
        top: Entries kept per pixel (0: only N_eff and entropy).
        like: A tensor whose dtype and device the tallies take.
    """

    def __init__(self, batch: int, height: int, width: int, top: int, like: torch.Tensor) -> None:
        self.B, self.H, self.W, self.m = batch, height, width, top
        self.sq = like.new_zeros(batch, height, width)  # sum omega^2
        self.ent = like.new_zeros(batch, height, width)  # -sum omega log omega
        self.weight = like.new_zeros(batch, height, width, top)  # [B, H, W, m], descending
        self.index = torch.full((batch, height, width, top), -1, dtype=torch.long, device=like.device)
        self.flipped = torch.zeros((batch, height, width, top), dtype=torch.bool, device=like.device)

    def add(self, omega: torch.Tensor, ids: torch.Tensor, flipped: torch.Tensor | None = None) -> None:
        """Fold in one chunk of candidates.

        Args:
            omega: ``[B, k, H, W]`` normalised weights of k candidate images at every pixel.
            ids: ``[k]`` global training-image index of each candidate.
            flipped: ``[k]`` bool, candidate is the horizontal mirror of its image (None: none is).
        """
        w = omega.permute(0, 2, 3, 1)  # [B, H, W, k]
        self.sq += w.square().sum(-1)
        self.ent -= torch.where(w > 0, w * w.clamp_min(1e-300).log(), torch.zeros_like(w)).sum(-1)
        if self.m == 0:
            return
        k = w.shape[-1]
        flipped = torch.zeros(k, dtype=torch.bool, device=ids.device) if flipped is None else flipped
        best, pos = w.topk(min(self.m, k), dim=-1)  # [B, H, W, m'] each
        weight = torch.cat([self.weight, best], dim=-1)  # [B, H, W, m + m']
        index = torch.cat([self.index, ids.to(pos.device)[pos]], dim=-1)
        flip = torch.cat([self.flipped, flipped.to(pos.device)[pos]], dim=-1)
        self.weight, keep = weight.topk(self.m, dim=-1)  # [B, H, W, m]
        self.index = index.gather(-1, keep)
        self.flipped = flip.gather(-1, keep)

    def result(self) -> Provenance:
        """The :class:`Provenance` of the tallied candidates (source ``(y, x)``, or ``(y, W - 1 - x)`` if mirrored)."""
        B, H, W, m = self.B, self.H, self.W, self.m
        real = self.weight > 0  # [B, H, W, m]
        index = torch.where(real, self.index, -1)
        y = torch.arange(H, device=index.device)[None, :, None, None].expand(B, H, W, m)
        x = torch.arange(W, device=index.device)[None, None, :, None].expand(B, H, W, m)
        x = torch.where(self.flipped, W - 1 - x, x)
        source = torch.where(real[..., None], torch.stack([y, x], dim=-1), 0)  # [B, H, W, m, 2]
        return Provenance(
            index=index, source=source, weight=self.weight, count=real.to(self.weight.dtype),
            n_eff=1.0 / self.sq.clamp_min(1e-300), entropy=self.ent.clamp_min(0.0),
        )
