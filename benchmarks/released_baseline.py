"""Our implementation of the ELS algorithm as the paper's released code runs it.

Used only as the speed baseline in ``bench_els.py`` (and checked against
:class:`patchmosaic.ScoreMachine` in the tests so the comparison is fair).
Its structure follows the released code:

* training images are processed in batches of 256;
* every patch of the batch becomes a conv2d filter, so one ``F.conv2d`` of the
  padded query gives ``<x_patch(p), patch_j>`` for all pixels p and patches j;
* the weighted centre pixels are formed by broadcasting into a
  ``[B, NP, C, H, W]`` tensor and summing over the patch axis NP;
* boundary handling is a mask over (patch, pixel) pairs.

Batches are combined with a running max (log-sum-exp), which is at least as
economical as the released code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pad(images: torch.Tensor, r: int, padding: str) -> torch.Tensor:
    return F.pad(images, (r, r, r, r), mode="circular" if padding == "circular" else "constant")


def _allowed(q: torch.Tensor, length: int, r: int, padding: str) -> torch.Tensor:
    """``[NP, L]``: may a patch centred at q (per patch) explain pixel p (per column)?"""
    p = torch.arange(length)
    if padding == "circular":
        return torch.ones(q.shape[0], length, dtype=torch.bool)
    p_edge = (p < r) | (p > length - 1 - r)  # [L]
    q_interior = (q >= r) & (q <= length - 1 - r)  # [NP]
    return torch.where(p_edge[None, :], q[:, None] == p[None, :], q_interior[:, None])


@torch.no_grad()
def released_els(
    x_t: torch.Tensor,
    train: torch.Tensor,
    alpha_bar: float,
    patch_size: int,
    padding: str = "zeros",
    *,
    wrap_training_patches: bool = True,
    batch_images: int = 256,
) -> torch.Tensor:
    """ELS posterior mean, released-code style. ``x_t [B, C, H, W]``, ``train [N, C, H, W]``."""
    B, C, H, W = x_t.shape
    r = patch_size // 2
    a, s2 = alpha_bar**0.5, 1.0 - alpha_bar
    x_pad = _pad(x_t, r, padding)  # [B, C, H+2r, W+2r]
    qy, qx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    keep = torch.ones(H, W, dtype=torch.bool)
    if padding == "circular" and not wrap_training_patches:
        keep = (qy >= r) & (qy < H - r) & (qx >= r) & (qx < W - r)
    qy, qx = qy[keep], qx[keep]  # [P] candidate centres per image
    run_max = torch.full((B, 1, H, W), float("-inf"), dtype=x_t.dtype)
    num = torch.zeros(B, C, H, W, dtype=x_t.dtype)
    den = torch.zeros(B, 1, H, W, dtype=x_t.dtype)
    for start in range(0, train.shape[0], batch_images):
        imgs = train[start : start + batch_images].to(x_t.dtype)  # [n, C, H, W]
        n = imgs.shape[0]
        cols = F.unfold(_pad(imgs, r, padding), patch_size)  # [n, C*k*k, H*W]
        cols = cols[:, :, keep.flatten()]  # [n, C*k*k, P]
        filters = cols.permute(0, 2, 1).reshape(-1, C, patch_size, patch_size)  # [NP, C, k, k]
        centres = imgs[:, :, keep].permute(0, 2, 1).reshape(-1, C)  # [NP, C]
        dots = F.conv2d(x_pad, filters)  # [B, NP, H, W]
        norms = filters.square().sum((1, 2, 3))  # [NP]
        logits = (2 * a * dots - a * a * norms[None, :, None, None]) / (2 * s2)  # [B, NP, H, W]
        allowed = (
            _allowed(qy.repeat(n), H, r, padding)[:, :, None] & _allowed(qx.repeat(n), W, r, padding)[:, None, :]
        )  # [NP, H, W]
        logits = logits.masked_fill(~allowed[None], float("-inf"))
        new_max = torch.maximum(run_max, logits.amax(1, keepdim=True))  # [B, 1, H, W]
        w = torch.exp(logits - new_max)  # [B, NP, H, W]
        rescale = torch.exp(run_max - new_max)
        num = num * rescale + (w[:, :, None] * centres[None, :, :, None, None]).sum(1)  # [B, NP, C, H, W]
        den = den * rescale + w.sum(1, keepdim=True)
        run_max = new_max
    return num / den
