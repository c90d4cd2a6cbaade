"""The ELS machine computed with the cost structure of the paper's released code.

Used only as the speed baseline in ``bench_els.py`` (and checked against
:class:`patchmosaic.ScoreMachine` in ``tests/test_released_baseline.py`` so the
comparison is of the same machine). Written from a description of the
released modules' algorithm (Kamb & Ganguli 2412.20292, released code,
``utils/idealscore.py``), not from their source. Each step below names the
released step it mirrors.

Logits are ``(a <x_p, t_m> - a^2 |t_m|^2 / 2) / s2`` with ``a = sqrt(abar)``,
``s2 = 1 - abar`` (the ``|x_p|^2`` term is common to a pixel's candidates and
cancels in its softmax).

Zero padding (``LocalEquivBordersScoreModule``):

1. *Interior pixels* (at least r = k // 2 from every edge) are explained by
   interior training patches only. Released: the training batch's interior
   patches become conv2d filters and ONE ``F.conv2d`` of the unpadded noisy
   image scores every interior pixel against every (training image, interior
   centre) at once. Here: the same ``F.conv2d``, ``[B, n * NP, H-2r, W-2r]``.
2. *Edge pixels* (within r of one edge, interior along it) at distance d from
   that edge are explained by training patches at the same distance d from
   the same edge, interior along it. Released: one branch per edge, the
   zero-padded strip of the noisy image at distance d scored against the
   training strips at distance d. Here: one batched product per edge over all
   d (``[r, B * L', D] @ [r, D, n * L']``); the four edges are the top edge of
   the image rotated by 0, 90, 180 and 270 degrees (one code path, not four
   copies).
3. *Corner pixels* (within r of two edges) are explained only by the training
   patch at the same position. Released: one branch per corner. Here: one
   batched product per corner over its r x r pixels (``[r^2, B, D] @ [r^2, D, n]``),
   the corners being the top-left corner of the four rotations.

Circular padding (``LocalEquivScoreModule``):

1. The dictionary is the training batch's patches that do not wrap around the
   border (centres at least r from every edge; ``wrap_training_patches=True``
   takes every circularly padded patch instead, an extension for the tests).
2. Released: the dictionary patches become conv2d filters and ONE ``F.conv2d``
   of the circularly padded noisy image scores every pixel against every
   dictionary patch. Here: the same ``F.conv2d``, ``[B, n * NP, H, W]``.

Both paddings, every region: the softmax over the region's candidates and the
weighted sum of their centre pixels, with training images streamed in batches
of ``batch_images`` (the released code uses 64 or 256) and the batches combined
by a running log-sum-exp (exact, and at least as economical as keeping every
batch's logits). The elementwise work is kept minimal so that the baseline is
not slowed by our choices: conv2d returns the logits themselves (filters
scaled by ``a / s2``, the ``|t|^2`` term as its bias), they are shifted and
exponentiated in place, and one contraction with ``[centre, 1]`` gives the
weighted sum and the normaliser.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _RunningSoftmax:
    """Softmax-weighted mean of centre pixels, streamed over candidate batches.

    One state per image region; ``G`` independent groups of candidates (e.g.
    one per edge distance), each shared by ``B`` queries at ``S`` positions.
    """

    def __init__(self) -> None:
        self.max: torch.Tensor | None = None  # [G, B, 1, S]
        self.acc: torch.Tensor | None = None  # [G, B, C + 1, S]: weighted sum and normaliser

    def add(self, logits: torch.Tensor, centres: torch.Tensor) -> None:
        """Fold in ``logits [G, B, M, S]`` (overwritten) of candidates with ``centres [G, M, C]``.

        Two in-place passes (shift, exp) and two reads (max, contraction) of the logits.
        """
        batch_max = logits.amax(2, keepdim=True)  # [G, B, 1, S]
        new_max = batch_max if self.max is None else torch.maximum(self.max, batch_max)
        w = logits.sub_(new_max).exp_()  # [G, B, M, S]
        values = torch.cat([centres, centres.new_ones(centres.shape[:-1] + (1,))], dim=-1)  # [G, M, C + 1]
        acc = torch.einsum("gbms,gmc->gbcs", w, values)  # [G, B, C + 1, S]
        if self.max is not None:
            acc += self.acc * torch.exp(self.max - new_max)
        self.max, self.acc = new_max, acc

    def mean(self) -> torch.Tensor:
        """``[G, B, C, S]``."""
        return self.acc[:, :, :-1] / self.acc[:, :, -1:]


def _interior_patches(images: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches that do not cross the border, as conv2d filters, and their centre pixels.

    Returns:
        ``filters [n * NP, C, k, k]`` and ``centres [n * NP, C]``, ordered (image, row, column).
    """
    n, C, H, W = images.shape
    r = k // 2
    cols = F.unfold(images, k)  # [n, C*k*k, NP], NP = (H-2r)(W-2r)
    filters = cols.permute(0, 2, 1).reshape(-1, C, k, k)  # [n NP, C, k, k]
    centres = images[:, :, r : H - r, r : W - r].permute(0, 2, 3, 1).reshape(-1, C)  # [n NP, C]
    return filters, centres


def _conv_logits(query: torch.Tensor, filters: torch.Tensor, a: float, s2: float) -> torch.Tensor:
    """ELS logits of every query position against every filter: ``[1, B, n NP, S]``.

    The conv2d returns the logits directly: filters scaled by ``a / s2`` and the
    ``-a^2 |t|^2 / (2 s2)`` term as the convolution's bias.
    """
    norms = filters.square().sum((1, 2, 3))  # [n NP]
    logits = F.conv2d(query, filters * (a / s2), bias=norms * (-0.5 * a * a / s2))  # [B, n NP, H', W']
    return logits.flatten(2)[None]  # [1, B, n NP, S]


def _top_edge(x_t: torch.Tensor, imgs: torch.Tensor, r: int, a: float, s2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and centres of the top edge: rows d < r, columns interior along the edge.

    Returns:
        ``logits [r, B, n (W-2r), W-2r]`` (group d) and ``centres [r, n (W-2r), C]``.
    """
    k = 2 * r + 1
    B, C, _, W = x_t.shape
    n = imgs.shape[0]

    def strips(t: torch.Tensor) -> torch.Tensor:  # [m, C, H, W] -> [r, m, W-2r, C k k]
        padded = F.pad(t, (0, 0, r, r))  # [m, C, H+2r, W], zeros above and below
        win = padded[:, :, : r + 2 * r].unfold(2, k, 1).unfold(3, k, 1)  # [m, C, r, W-2r, k, k]
        return win.permute(2, 0, 3, 1, 4, 5).flatten(3)  # [r, m, W-2r, C k k]

    q = strips(x_t).flatten(1, 2)  # [r, B (W-2r), D]
    keys = strips(imgs).flatten(1, 2)  # [r, n (W-2r), D]
    dots = torch.bmm(q, keys.transpose(1, 2))  # [r, B (W-2r), n (W-2r)]
    logits = (a * dots - (0.5 * a * a) * keys.square().sum(-1)[:, None, :]) / s2
    logits = logits.view(r, B, W - 2 * r, n * (W - 2 * r)).transpose(2, 3)  # [r, B, M, S]
    centres = imgs[:, :, :r, r : W - r].permute(2, 0, 3, 1).reshape(r, -1, C)  # [r, n (W-2r), C]
    return logits, centres


def _top_left_corner(
    x_t: torch.Tensor, imgs: torch.Tensor, r: int, a: float, s2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and centres of the top-left r x r corner (candidate: the same position only).

    Returns:
        ``logits [r r, B, n, 1]`` and ``centres [r r, n, C]``.
    """
    k = 2 * r + 1
    C = x_t.shape[1]

    def patches(t: torch.Tensor) -> torch.Tensor:  # [m, C, H, W] -> [r r, m, C k k]
        padded = F.pad(t[:, :, : 2 * r, : 2 * r], (r, 0, r, 0))  # [m, C, 3r, 3r], zeros above and left
        win = padded.unfold(2, k, 1).unfold(3, k, 1)  # [m, C, r, r, k, k]
        return win.permute(2, 3, 0, 1, 4, 5).flatten(3).flatten(0, 1)  # [r r, m, D]

    q, keys = patches(x_t), patches(imgs)  # [r r, B, D], [r r, n, D]
    dots = torch.bmm(q, keys.transpose(1, 2))  # [r r, B, n]
    logits = (a * dots - (0.5 * a * a) * keys.square().sum(-1)[:, None, :]) / s2
    centres = imgs[:, :, :r, :r].permute(2, 3, 0, 1).reshape(r * r, -1, C)  # [r r, n, C]
    return logits[..., None], centres


@torch.no_grad()
def released_els(
    x_t: torch.Tensor,
    train: torch.Tensor,
    alpha_bar: float,
    patch_size: int,
    padding: str = "zeros",
    *,
    wrap_training_patches: bool = False,
    batch_images: int = 256,
) -> torch.Tensor:
    """ELS posterior mean with the released code's algorithm (see the module docstring).

    Args:
        x_t: ``[B, C, H, W]`` noisy images, ``sqrt(abar) x0 + sqrt(1 - abar) eps``.
        train: ``[N, C, H, W]`` training images.
        alpha_bar: Signal fraction in (0, 1).
        patch_size: Odd k with ``k <= min(H, W)``.
        padding: ``"zeros"`` or ``"circular"``.
        wrap_training_patches: Circular only: also use patches that wrap around
            the border (the released dictionary does not).
        batch_images: Training images per streamed batch (released: 64 or 256).

    Returns:
        ``[B, C, H, W]`` in the dtype of ``x_t``.
    """
    B, C, H, W = x_t.shape
    r = patch_size // 2
    if patch_size % 2 != 1 or patch_size > min(H, W):
        raise ValueError(f"patch size must be odd and at most {min(H, W)}, got {patch_size}")
    if padding not in ("zeros", "circular"):
        raise ValueError(f"unknown padding {padding!r}")
    a, s2 = alpha_bar**0.5, 1.0 - alpha_bar
    out = torch.empty_like(x_t)
    if padding == "circular":
        query = F.pad(x_t, (r, r, r, r), mode="circular")  # [B, C, H+2r, W+2r]
        state = _RunningSoftmax()
        for start in range(0, train.shape[0], batch_images):
            imgs = train[start : start + batch_images].to(x_t.dtype)  # [n, C, H, W]
            if wrap_training_patches:
                imgs = F.pad(imgs, (r, r, r, r), mode="circular")  # every centre becomes interior
            filters, centres = _interior_patches(imgs, patch_size)  # dictionary
            state.add(_conv_logits(query, filters, a, s2), centres[None])
        return state.mean()[0].view(B, C, H, W)
    if wrap_training_patches:
        raise ValueError("wrap_training_patches applies to circular padding only")
    # Zero padding: interior by one conv2d, then 4 edges and 4 corners, each the
    # top edge / top-left corner of a rotation of the images.
    pixel = torch.arange(H * W).view(1, 1, H, W)  # original flat index of each pixel
    interior = _RunningSoftmax()
    edges = [_RunningSoftmax() for _ in range(4)] if r else []
    corners = [_RunningSoftmax() for _ in range(4)] if r else []
    rotated_x = [torch.rot90(x_t, turn, (2, 3)) for turn in range(len(edges))]
    for start in range(0, train.shape[0], batch_images):
        imgs = train[start : start + batch_images].to(x_t.dtype)  # [n, C, H, W]
        filters, centres = _interior_patches(imgs, patch_size)
        interior.add(_conv_logits(x_t, filters, a, s2), centres[None])
        for turn, (edge, corner) in enumerate(zip(edges, corners)):
            rot = torch.rot90(imgs, turn, (2, 3))  # [n, C, H', W']
            edge.add(*_top_edge(rotated_x[turn], rot, r, a, s2))
            corner.add(*_top_left_corner(rotated_x[turn], rot, r, a, s2))
    flat = out.view(B, C, H * W)
    flat[:, :, pixel[0, 0, r : H - r, r : W - r].flatten()] = interior.mean()[0]  # [B, C, S]
    for turn, (edge, corner) in enumerate(zip(edges, corners)):
        where = torch.rot90(pixel, turn, (2, 3))[0, 0]  # [H', W'] original index at each rotated pixel
        Wr = where.shape[1]
        flat[:, :, where[:r, r : Wr - r].flatten()] = edge.mean().permute(1, 2, 0, 3).flatten(2)  # [B, C, r (W'-2r)]
        flat[:, :, where[:r, :r].flatten()] = corner.mean()[..., 0].permute(1, 2, 0)  # [B, C, r r]
    return out
