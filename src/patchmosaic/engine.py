"""Streaming softmax-weighted means over training patches: the shared engine.

Every machine computes, for each query row ``b`` (a pixel's noisy patch, or a
whole noisy image), the posterior mean

    x0_hat[b] = sum_m softmax_m(logit[b, m]) * value[m],
    logit[b, m] = -|x[b] - a * key[m]|^2 / (2 s2),   a = sqrt(abar), s2 = 1 - abar

(Kamb & Ganguli 2412.20292, Eq. 6-9). The ``|x[b]|^2`` term is the same for
every candidate of a query and cancels in the softmax, so logits come from one
matrix product of *augmented* vectors:

    query'[b] = [(a / s2) x[b], -a^2 / (2 s2), -ref[b]],   key'[m] = [key[m], |key[m]|^2, 1]
    logit[b, m] - ref[b] = <query'[b], key'[m]>

where ``ref`` is the running log-sum-exp of the row (see :class:`SoftmaxMean`).

No per-candidate difference image is ever formed. Keys are streamed in chunks
and combined with an online log-sum-exp (running max, rescaled weighted sum),
so memory is bounded by the chunk, not by the training set.

Values carry a trailing column of ones, so the same product that forms the
weighted sum also forms the softmax normaliser.

Exponent floor: shifted logits below ``EXP_FLOOR`` (-80 in float32, -100 in
float64) are raised to it before ``exp``. Vectorised ``exp`` falls back to a
slow path for arguments that underflow (27x slower measured here). The shift
is a running log-sum-exp, which never exceeds the final normaliser's log, so a
floored candidate adds at most ``e^floor`` times the final normaliser; with
``M`` candidates the normaliser and the weighted sum move by at most
``M * e^-80`` relative (below 1e-24 for M = 1e10), far under float32 rounding.

Bounded pruning (``SoftmaxMean(..., prune=r)``): a candidate whose shifted
logit is proven below the pruning floor (``PRUNE_FLOOR``: -40 in float32, the
floor of tracked states; -100 in float64) is skipped: each skipped candidate
has weight ``exp(logit - ref) < e^floor`` against a reference that never
exceeds the final normaliser's log, so the normaliser and the weighted sum
move by at most ``M * e^floor`` relative (``e^floor`` per candidate; in float32
``M e^-40``, 4e-9 for M = 1e9 candidates, below float32 rounding). Here and
below ``floor`` is the pruning floor.
The proof is a lower bound on the distance. With ``beta < 0`` the logit is

    logit[b, m] = scale <x, X_m> + beta |X_m|^2 = -|beta| |X_m - u_b|^2 + |beta| |u_b|^2,
    u_b = scale x_b / (2 |beta|)

so ``logit - ref < floor - margin`` wherever

    |X_m - u_b|^2 > T_b = |u_b|^2 - (ref_b + floor - margin) / |beta_b|.

Distances are bounded below in the coordinates ``c(z) = (V_r^T z, |V_o^T z|)``,
where the orthogonal ``V = [V_r, V_o]`` holds the principal axes of the first
bounded chunk's keys (of ``PRUNE_AXES_KEYS`` of them spread over the chunk; ``r``
axes kept; any orthogonal ``V`` gives a valid bound, these a tight one):
``|X - u|^2 = |V_r^T (X - u)|^2 + |V_o^T (X - u)|^2
>= |V_r^T X - V_r^T u|^2 + (|V_o^T X| - |V_o^T u|)^2`` (triangle inequality),
and for points in two axis-aligned boxes of these coordinates it is at least
the squared distance between the boxes. The work is done per (tile, block):
the state orders its query rows by a k-d partition of their coordinates
(``PRUNE_LEVELS`` rounds of splits along the widest coordinate), so that a tile
of ``PRUNE_ROWS`` consecutive rows holds similar patches, and orders each
chunk's keys the same way into blocks of ``PRUNE_KEYS``. A tile skips a block
when the distance between their boxes exceeds ``T_b`` for every row of the
tile, and computes the blocks it needs exactly (runs of consecutive blocks,
copied once). The rows are permuted into tile order for a chunk and back after
it, so outside :meth:`SoftmaxMean.update` the state, its mean and statistics
are in the caller's order. ``T_b`` is raised by ``16 (D + 1)^1.5 eps (|u_b|^2 +
max |X|^2 + |ref_b + floor - margin| / |beta_b|)`` to cover the float rounding of
the coordinates (each within ``D eps |z|``), of the box distance and of
``T_b``'s own terms; ``PRUNE_MARGIN`` (1 nat) covers that of the logits. A
state folds its first ``PRUNE_FIRST_KEYS`` keys in exactly (every row then has
a reference) and stops bounding where its first bounded chunk would skip under
``PRUNE_MIN_FRACTION`` of its pairs, tested first pair by pair on
``PRUNE_SAMPLE`` keys (high noise: little lies below the floor, and the
switch-off costs one small product), then tile by key on the same keys (a
block is skipped only where each of its keys is, so this bounds the fraction
the blocks can skip; at moderate noise pairs lie below the floor that a tile's
box cannot prove, and the switch-off then costs the rows' side only). Either
way the result stays within the bound. With posterior statistics (``track = 0``) the floored terms of ``sq``
and ``xl`` move by at most ``M e^(2 floor)`` and ``M |floor| e^floor``
relative. With top candidates (``track = m > 0``) a skipped candidate must
also lie ``PRUNE_MARGIN`` below the row's current m-th best score (a threshold
that only rises), so it could never have entered the top list: the lists are
the dense pass's, up to the order of exactly tied candidates (duplicate
patches; any order is as arbitrary there) and float rounding of the weights. Measured on MNIST at the published schedule (README, "Bounded
pruning"; ``benchmarks/bench_prune.py``) the tiles skip 26-66% of the pairs at
``sigma <= 0.41`` (k = 3, 5), which run 1.2-2.7x faster, and the bound switches
itself off above.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from patchmosaic.geometry import AxisBlocks

__all__ = [
    "SoftmaxMean",
    "augment_keys",
    "augment_queries",
    "augment_values",
    "block_views",
    "exact_float32_matmul",
    "flat_patches",
    "logit_coefficients",
    "pad_images",
    "patch_sq_norms",
    "patch_windows",
    "select_blocks",
    "window_max",
    "window_sums",
    "ve_logit_coefficients",
]


@contextmanager
def exact_float32_matmul() -> Iterator[None]:
    """Run float32 matrix products at full precision inside the block.

    ``torch.set_float32_matmul_precision("high"/"medium")`` lets float32 GEMMs
    use TF32 or bf16 internally (on CUDA, and on CPUs with bf16 units). The
    logits carry a ``1 / (1 - alpha_bar)`` factor, so at low noise a relative
    error of 1e-3 in ``<x, key>`` shifts logits by far more than 1 and picks
    the wrong patch; the engine therefore pins "highest" for its own products
    and restores the caller's setting afterwards.
    """
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def logit_coefficients(alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients ``(a / s2, -a^2 / (2 s2))`` of the augmented query.

    Args:
        alpha_bar: ``[B]`` signal fractions in (0, 1), in the compute dtype.

    Returns:
        ``scale [B]`` and ``bias [B]`` with ``logit = scale * <x, key> + bias * |key|^2``.
    """
    s2 = 1.0 - alpha_bar  # [B]
    return alpha_bar.sqrt() / s2, -alpha_bar / (2.0 * s2)


def ve_logit_coefficients(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients ``(1 / sigma^2, -1 / (2 sigma^2))`` of the augmented query in the VE form.

    ``-|x - X|^2 / (2 sigma^2) = <x, X> / sigma^2 - |X|^2 / (2 sigma^2) - |x|^2 / (2 sigma^2)``;
    the last term is the same for every candidate and cancels. These equal
    :func:`logit_coefficients` applied to ``x_t = sqrt(abar) x`` with ``abar = 1 / (1 + sigma^2)``.

    Args:
        sigma: ``[B]`` noise levels > 0, in the compute dtype.

    Returns:
        ``scale [B]`` and ``bias [B]``.
    """
    inv = 1.0 / sigma.square()  # [B]
    return inv, -0.5 * inv


def augment_queries(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``[(a / s2) x, -a^2 / (2 s2), 0]`` for each query row.

    The last column is the slot where :class:`SoftmaxMean` writes ``-reference``
    so the matrix product returns logits already shifted by the running
    reference (it pairs with the row of ones in :func:`augment_keys`).

    Args:
        x: ``[G, Bq, D]`` query vectors.
        scale: ``[Bq]`` per-row ``a / s2``.
        bias: ``[Bq]`` per-row ``-a^2 / (2 s2)``.

    Returns:
        ``[G, Bq, D + 2]``.
    """
    G, Bq, _ = x.shape
    return torch.cat(
        [x * scale[None, :, None], bias[None, :, None].expand(G, Bq, 1), x.new_zeros(G, Bq, 1)], dim=-1
    )


def augment_keys(keys_t: torch.Tensor) -> torch.Tensor:
    """``[key; |key|^2; 1]`` in transposed layout: ``[G, D, M]`` -> ``[G, D + 2, M]``."""
    return torch.cat([keys_t, keys_t.square().sum(1, keepdim=True), torch.ones_like(keys_t[:, :1])], dim=1)


def augment_values(values: torch.Tensor) -> torch.Tensor:
    """``[value, 1]``: ``[G, M, V]`` -> ``[G, M, V + 1]`` (the 1 yields the normaliser)."""
    return torch.cat([values, values.new_ones(values.shape[:-1] + (1,))], dim=-1)


def pad_images(images: torch.Tensor, radius: int, padding: str) -> torch.Tensor:
    """Pad ``[n, C, H, W]`` by ``radius`` on each side: zeros or circular wrap."""
    if radius == 0:
        return images
    mode = "circular" if padding == "circular" else "constant"
    return F.pad(images, (radius, radius, radius, radius), mode=mode)


def patch_windows(images: torch.Tensor, radius: int, padding: str) -> torch.Tensor:
    """All k x k patches centred on every pixel, ``k = 2 * radius + 1``, as a view.

    Args:
        images: ``[n, C, H, W]``.
        radius: Patch radius r.
        padding: ``"zeros"`` (outside pixels read as 0) or ``"circular"`` (indices wrap).

    Returns:
        ``[n, C, H, W, k, k]`` strided view (no copy): ``[..., y, x, dy, dx]`` is
        pixel ``(y + dy - r, x + dx - r)``.
    """
    k = 2 * radius + 1
    return pad_images(images, radius, padding).unfold(2, k, 1).unfold(3, k, 1)


def window_sums(t: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Sums of every ``k`` consecutive entries along ``dim`` (valid windows: the length shrinks by k - 1).

    Windows of length 2^j are summed from two of length 2^(j-1) and a window of k
    from those of k's binary digits, so each output costs O(log k) additions
    instead of k (the separable box filter of :func:`patch_sq_norms`).
    """
    out = t.narrow(dim, 0, t.shape[dim] - k + 1).clone() if k & 1 else None  # the 1-wide digit, at offset 0
    offset, span, power = k & 1, 2, t
    while span <= k:
        n = power.shape[dim] - span // 2
        power = power.narrow(dim, 0, n) + power.narrow(dim, span // 2, n)
        if k & span:
            piece = power.narrow(dim, offset, t.shape[dim] - k + 1)
            out = piece.clone() if out is None else out.add_(piece)
            offset += span
        span *= 2
    return out


def window_max(t: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Maxima of every ``k`` consecutive entries along ``dim`` (valid windows), in O(log k) passes:
    windows of 2^j from two of 2^(j-1), and one of k from two overlapping windows of the largest 2^j <= k."""
    span = 1
    while 2 * span <= k:
        n = t.shape[dim] - span
        t = torch.maximum(t.narrow(dim, 0, n), t.narrow(dim, span, n))
        span *= 2
    if span < k:
        n = t.shape[dim] - (k - span)
        t = torch.maximum(t.narrow(dim, 0, n), t.narrow(dim, k - span, n))
    return t


def patch_sq_norms(images: torch.Tensor, radius: int, padding: str) -> torch.Tensor:
    """``|patch|^2`` of every k x k patch (a separable box filter of the squared image, :func:`window_sums`).

    Returns:
        ``[n, H, W]``.
    """
    k = 2 * radius + 1
    sq = pad_images(images.square().sum(1, keepdim=True), radius, padding)  # [n, 1, H+2r, W+2r]
    return window_sums(window_sums(sq, k, 2), k, 3)[:, 0]  # [n, H, W]


def flat_patches(images: torch.Tensor, radius: int, padding: str) -> torch.Tensor:
    """Which k x k patches are constant (every pixel and channel equal).

    Returns:
        ``[n, H, W]`` bool; exact comparisons (maximum == minimum over the patch,
        separable windows of :func:`window_max`).
    """
    k = 2 * radius + 1
    padded = pad_images(images, radius, padding)  # [n, C, H+2r, W+2r]
    hi = window_max(window_max(padded, k, 2), k, 3).amax(1)  # [n, H, W]
    lo = window_max(window_max(-padded, k, 2), k, 3).amax(1)  # [n, H, W], minus the minimum
    return hi == -lo


def block_views(
    t: torch.Tensor, rows: AxisBlocks, cols: AxisBlocks, which: str
) -> list[tuple[slice, slice, torch.Tensor]] | None:
    """:func:`select_blocks` in pieces that are views (no gather): ``(row blocks, column blocks, view)``,
    ``view`` being ``select_blocks(...)[:, :, row blocks, :, column blocks]``; None where a stack is no
    union of runs (:meth:`AxisBlocks.runs`)."""
    r_runs, c_runs = rows.runs(which), cols.runs(which)
    if r_runs is None or c_runs is None:
        return None

    def run(x: torch.Tensor, dim: int, b0: int, b1: int, p0: int, n: int) -> torch.Tensor:
        if n == 1:  # one position per block: the blocks are the slice
            return x.narrow(dim, p0, b1 - b0).unsqueeze(dim + 1)
        return x.narrow(dim, p0, n).unsqueeze(dim)  # one block of n positions

    nr, nc = (rows.P if which == "P" else rows.Q).shape[1], (cols.P if which == "P" else cols.Q).shape[1]
    pieces = []
    for b0, b1, p0 in r_runs:
        by_row = run(t, 2, b0, b1, p0, nr)  # [n, C, b1 - b0, nr, W, ...]
        for c0, c1, q0 in c_runs:
            pieces.append((slice(b0, b1), slice(c0, c1), run(by_row, 4, c0, c1, q0, nc)))
    return pieces


def select_blocks(t: torch.Tensor, rows: AxisBlocks, cols: AxisBlocks, which: str) -> torch.Tensor:
    """Positions of one (row stack, column stack) group from a per-pixel tensor.

    Args:
        t: ``[n, C, H, W, ...]``.
        rows: Row blocks; ``which`` picks their ``"P"`` (queries) or ``"Q"`` (candidates).
        cols: Column blocks.

    Returns:
        ``[n, C, nb_rows, n_rows, nb_cols, n_cols, ...]`` (a view where both
        indices are contiguous ranges).
    """
    r_ix, c_ix = rows.index(which), cols.index(which)
    if isinstance(r_ix, slice) and isinstance(c_ix, slice):
        return t[:, :, r_ix, c_ix].unsqueeze(2).unsqueeze(4)  # [n, C, 1, n_r, 1, n_c, ...], a view
    if isinstance(r_ix, slice):
        return t[:, :, r_ix][:, :, :, c_ix.to(t.device)].unsqueeze(2)  # [n, C, 1, n_r, nb_c, n_c, ...]
    if isinstance(c_ix, slice):
        return t[:, :, :, c_ix][:, :, r_ix.to(t.device)].unsqueeze(4)  # [n, C, nb_r, n_r, 1, n_c, ...]
    # both indexed at once, so only the selected positions are gathered: [n, C, nb_r, n_r, nb_c, n_c, ...]
    return t[:, :, r_ix.to(t.device)[:, :, None, None], c_ix.to(t.device)[None, None]]


EXP_FLOOR = {torch.float32: -80.0, torch.float64: -100.0}


EXP_CAP = {torch.float32: 60.0, torch.float64: 300.0}

# Lower cap while posterior statistics are tracked: sum_m exp(2 (l_m - ref)) over
# up to 2^31 candidates must stay finite in float32 (2 * 30 + 21.5 < 88.7).
EXP_CAP_TRACKED = {torch.float32: 30.0, torch.float64: 300.0}

# Higher exponent floor while statistics are tracked in float32: the squared
# weights (>= e^-80) then stay normal numbers (denormal arithmetic is many times
# slower on x86). The floored terms move the normaliser by at most M e^-40
# relative (4e-9 for M = 1e9 candidates), below float32 rounding (6e-8).
EXP_FLOOR_TRACKED = {torch.float32: -40.0, torch.float64: -100.0}

# Floor of the bounded pruning (module docstring, "Bounded pruning"): a candidate is skipped only where its
# shifted logit is proven below this (minus PRUNE_MARGIN), so the skipped candidates move the normaliser and
# the weighted sum by at most M e^floor relative: in float32 4.2e-18 M (4e-9 for M = 1e9 candidates), below
# float32 rounding (6e-8), as for the tracked floor above. It is independent of the exponent floor, which
# only clamps what is computed (-80 keeps exp off its slow path): pruning at -80 would prove 40 nats more
# than float32 can resolve, and skip fewer candidates.
PRUNE_FLOOR = {torch.float32: -40.0, torch.float64: -100.0}

# Bounded pruning (SoftmaxMean(prune=r); module docstring): a (tile, block) pair is
# skipped only when its bound lies PRUNE_MARGIN nats below the floor (covers the
# logits' float rounding). Tiles hold PRUNE_ROWS query rows and blocks PRUNE_KEYS
# keys, each a cell of a k-d order (similar patches adjacent) of PRUNE_LEVELS
# rounds of splits. One round (a sort along the widest coordinate, the first
# principal one) measured fastest on MNIST (README): a tile then needs one run of
# blocks, computed in place; two or three rounds skip 3-6 points more of the
# pairs but leave ~10 runs per tile to copy, and ran 6-15% slower. A chunk
# of fewer than PRUNE_MIN_BLOCKS blocks is not bounded (too small to pay); a
# state's first PRUNE_FIRST_KEYS keys are folded in exactly to give every row a
# reference; a state stops bounding when its first bounded chunk would skip under
# PRUNE_MIN_FRACTION of its (row, candidate) pairs (high noise: nothing to skip),
# tested first pair by pair on PRUNE_SAMPLE of its keys (before sorting anything), then
# (tile, key) by (tile, key) on the same keys (before the chunk's keys are mapped and sorted).
# The principal axes come from PRUNE_AXES_KEYS keys spread over the first bounded chunk (a D x D
# product over every key cost more than the rest of the bound's set-up).
# Unbounded chunks are folded in blocks of >= PRUNE_DENSE_ROWS rows (or all of them).
PRUNE_MARGIN = 1.0
PRUNE_ROWS = 64
PRUNE_KEYS = 64
PRUNE_LEVELS = 1
PRUNE_MIN_BLOCKS = 8
PRUNE_FIRST_KEYS = 4096
PRUNE_MIN_FRACTION = 0.25
PRUNE_SAMPLE = 256
PRUNE_AXES_KEYS = 8192
PRUNE_DENSE_ROWS = 256

# Blocking on CPU: the passes after a logit block's product (clamp, exp, the weighted sum, the
# statistics) are bound by memory traffic; a block of CPU_BLOCK_BYTES (and the weights beside it when
# statistics are tracked) stays in one core's L2 cache, so those passes read it from there. On this
# 2-core machine (2 MB L2 per core) they took 1.06 ns per logit on 1 MB blocks against 1.69 on 16 MB
# ones (benchmarks/bench_blocks.py), and the demo's steps ran 1.1-1.5x faster (README, "Cache-sized
# logit blocks"). States that track top candidates keep ``max_logits`` blocks
# (their per-block top search costs per call), as do GPU states.
CPU_BLOCK_BYTES = 1 << 20
# Weighted sums of at most THIN_VALUES value columns (patch machines: C + 1) are formed as
# [V + 1, keys] @ [keys, rows] on CPU: the passes after a 1 MB block's product then took 0.89 ns per
# logit instead of 1.06 (benchmarks/bench_blocks.py).
THIN_VALUES = 8

# Top-m search in long rows: one max per segment of this many candidates, then
# an exact top-m among the m segments with the largest maxima.
TOP_SEGMENT = 32

# Exponentials in bits: e^l = 2^(l log2 e). torch's exp2 took 0.61 ns per float32 logit in place where
# exp took 1.12 on a 2-core AVX2 CPU (benchmarks/bench_blocks.py, 2026-12-01), so sweeps form their logits
# in bits by scaling their queries (no extra pass), and fold() scales in the pass that copies. The floor and
# cap are scaled with them (the same bound); the rounding of l log2 e adds at most |l| 2^-24 to a weight's
# relative error (4.8e-6 at the floor of -80, 6e-7 within 10 nats), below the logits' own.
LOG2_E = 1.0 / math.log(2.0)
LN_2 = math.log(2.0)


def kd_order(points: torch.Tensor, cell: int, levels: int) -> torch.Tensor:
    """An order of ``points [n, c]`` whose runs of ``cell`` consecutive points are cells of a k-d partition.

    Each of ``levels`` rounds splits every segment (a run of whole cells) into
    ``fan = ceil(cells^(1/levels))`` runs of about equal cell count along the
    coordinate where the segment is widest (one sort within segments per
    round). Any order is valid for the bound; this one keeps the cells' boxes
    small in the few coordinates of largest spread, which is where the box
    distance comes from (few wide splits beat many binary ones on MNIST patches).

    Returns:
        ``[n]`` permutation (long).
    """
    n, c = points.shape
    device = points.device
    cells = -(-n // cell)
    perm = torch.arange(n, device=device)
    if cells <= 1:
        return perm
    fan = max(2, math.ceil(cells ** (1.0 / levels) - 1e-9))
    if fan >= cells:  # one round that splits into single cells: a sort along the widest coordinate
        dim = int((points.amax(0) - points.amin(0)).argmax())
        return torch.argsort(points[:, dim], stable=True)
    bounds = [0, cells]  # segment j holds cells [bounds[j], bounds[j + 1])
    cell_of = torch.arange(n, device=device) // cell  # [n]
    tiny = torch.finfo(points.dtype).tiny
    for _ in range(levels):
        ns = len(bounds) - 1
        if ns == cells:
            break
        edges = torch.tensor(bounds, device=device)
        seg = torch.repeat_interleave(torch.arange(ns, device=device), edges[1:] - edges[:-1])[cell_of]  # [n]
        p = points[perm]  # [n, c]
        at = seg[:, None].expand(n, c)
        lo = p.new_full((ns, c), math.inf).scatter_reduce(0, at, p, "amin")  # [ns, c]
        width = p.new_full((ns, c), -math.inf).scatter_reduce(0, at, p, "amax") - lo
        dim = width.argmax(1, keepdim=True)  # [ns, 1], the widest coordinate of each segment
        x = p.gather(1, dim[seg])[:, 0] - lo.gather(1, dim)[seg, 0]  # [n]
        frac = (x / width.gather(1, dim)[seg, 0].clamp_min(tiny)).to(torch.float64).clamp(0.0, 1.0)
        perm = perm[torch.argsort(seg.to(torch.float64) + 0.5 * frac, stable=True)]  # sorted within segments
        cuts = [0]
        for a, b in itertools.pairwise(bounds):
            cuts += [a + ((b - a) * j) // fan for j in range(1, fan + 1) if a + ((b - a) * j) // fan > cuts[-1]]
        bounds = cuts
    return perm


def _cell_boxes(coords: torch.Tensor, cell: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-coordinate ``(min, max)`` of each run of ``cell`` rows: ``[G, n, c]`` -> two ``[G, ceil(n / cell), c]``."""
    G, n, c = coords.shape
    cells = -(-n // cell)
    padded = torch.cat([coords, coords[:, -1:].expand(G, cells * cell - n, c)], dim=1)  # last row repeated
    runs = padded.view(G, cells, cell, c)
    return runs.amin(2), runs.amax(2)


def _box_gap2(alo: torch.Tensor, ahi: torch.Tensor, blo: torch.Tensor, bhi: torch.Tensor) -> torch.Tensor:
    """Squared distance between boxes ``a [G, A, c]`` and ``b [G, B, c]`` (0 where they overlap): ``[G, A, B]``."""
    out = alo.new_zeros(alo.shape[0], alo.shape[1], blo.shape[1])
    for d in range(alo.shape[-1]):
        gap = (blo[:, None, :, d] - ahi[:, :, None, d]).clamp_min_(0) + (alo[:, :, None, d] - bhi[:, None, :, d]).clamp_min_(0)
        out.addcmul_(gap, gap)  # at most one of the two terms is positive
    return out


def _rows_in_order(rows: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``rows[g, order[g]]`` for ``rows [G, M, w]`` and ``order [G, M]``: whole rows are copied
    (``index_select``), where ``gather`` would read an index per element."""
    G, M, w = rows.shape
    flat = order if G == 1 else order + torch.arange(G, device=order.device)[:, None] * M
    return rows.reshape(G * M, w).index_select(0, flat.reshape(-1)).view(G, M, w)


def _thin(values: torch.Tensor) -> bool:
    """Whether ``weights @ values`` is better formed as ``(values^T @ weights^T)^T`` (``THIN_VALUES``)."""
    return values.shape[-1] <= THIN_VALUES and values.device.type == "cpu"


def _weighted_sum(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``weights [G, R, M] @ values [G, M, V]``, thin values transposed (:func:`_thin`)."""
    if not _thin(values):
        return torch.bmm(weights, values)
    return torch.bmm(values.transpose(1, 2).contiguous(), weights.transpose(1, 2)).transpose(1, 2)


def _moved_xl(xl: torch.Tensor, norm: torch.Tensor, d: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``sum w (l - ref)`` of a state whose reference moves up by ``d >= 0`` (its weights times ``f = e^-d``):
    ``f (xl - d norm)``, and 0 where ``d = +inf`` (a row that has seen no candidate)."""
    finite = torch.isfinite(d)
    return torch.where(finite, f * (xl - torch.where(finite, d, 0.0) * norm), 0.0)


class SoftmaxMean:
    """Online softmax-weighted mean of values, streamed over chunks of keys.

    The state is a per-row reference ``ref [G, Bq]`` and
    ``acc [G, Bq, V + 1] = sum_m exp(logit_m - ref) [value_m, 1]``. After the
    first chunk, ``ref`` is the running log-sum-exp (so ``acc[..., -1] = 1``)
    and later chunks are shifted by it *inside* the matrix product (the query's
    last column), leaving three passes over the logit block: clamp, exp and
    the weighted sum. A chunk whose logits exceed ``ref`` by more than
    ``EXP_CAP`` (60 in float32: e^60 * 2^31 stays finite) is detected from its
    normaliser (a clamped logit contributes >= e^cap) and redone exactly with
    its own maximum. Partial states of disjoint key sets merge exactly
    (:meth:`merge`).

    A chunk is folded in row block by row block. Each row block sweeps the
    chunk's keys in logit blocks (on CPU of ``CPU_BLOCK_BYTES``, so that the
    passes after the product read the block from cache) on one shift, its
    reference before the chunk, and is rebased once at the end; only a sweep
    whose normaliser reaches ``e^cap`` (a logit may have been capped) is redone
    block by block, each block rebased. States that track top candidates, and
    a row block's first chunk, go block by block.

    Posterior statistics (``track``, optional) come from the same pass. With
    ``track >= 0`` the state also keeps, per row,

        sq = sum_m c_m exp(2 (l_m - ref)),    xl = sum_m c_m exp(l_m - ref) (l_m - ref),

    so that with ``S = acc[..., -1]`` the weights ``w_m = exp(l_m - ref) / S``
    give ``sum w^2 = sq / S^2`` (``N_eff = S^2 / sq``) and the entropy
    ``-sum w log w = log S - xl / S`` (:meth:`posterior_stats`). With
    ``track = m > 0`` it also keeps the m candidates of largest weight (score
    ``l - ref + log c``, candidate id and multiplicity; :meth:`top_candidates`),
    searching a block only in the rows whose best logit beats their current
    m-th best, and in long rows only the m segments of ``TOP_SEGMENT``
    candidates with the largest maxima. ``c_m`` is a candidate's
    multiplicity: 1, or ``counts`` when given (0 marks an absent padding
    candidate, whose value row must be zero).

    Args:
        queries: ``[G, Bq, D + 2]`` augmented queries (:func:`augment_queries`);
            the state owns them and writes the shift into their last column.
        values: Value dimension V (without the normaliser column).
        max_logits: Elements of one logit block at most (rows are blocked to fit);
            on CPU, states without top candidates use blocks of ``CPU_BLOCK_BYTES``
            where those are smaller.
        track: ``None`` (mean only), ``0`` (also N_eff and entropy) or ``m > 0``
            (also the top-m candidates; :meth:`update` then needs ``ids``).
        prune: Rank ``r`` of the distance bound that skips candidates proven
            below the exponent floor (module docstring), 0 for none; with
            ``track > 0`` also below each row's current m-th best, so the top
            lists are those of the dense pass. ``pairs`` and ``skipped`` count the (row,
            candidate) pairs seen and skipped; ``bounded`` counts the pairs of
            the chunks where the bound ran.
    """

    def __init__(
        self, queries: torch.Tensor, values: int, *, max_logits: int = 1 << 22, track: int | None = None,
        prune: int = 0,
    ):
        dtype = queries.dtype
        if dtype not in EXP_FLOOR:
            raise ValueError(
                f"score machines compute in float32 or float64, got {dtype}: lower precision "
                "makes the 1/(1 - alpha_bar)-scaled logits wrong at low noise"
            )
        if track is not None and track < 0:
            raise ValueError(f"track must be None, 0 (statistics) or the number of top candidates, got {track}")
        G, Bq, _ = queries.shape
        device = queries.device
        self.queries = queries
        self.ref = torch.full((G, Bq), float("-inf"), dtype=dtype, device=device)
        self.acc = torch.zeros((G, Bq, values + 1), dtype=dtype, device=device)
        self.floor = EXP_FLOOR[dtype] if track is None else EXP_FLOOR_TRACKED[dtype]
        self.cap = EXP_CAP[dtype] if track is None else EXP_CAP_TRACKED[dtype]
        self.prune_floor = max(self.floor, PRUNE_FLOOR[dtype])  # the bound's floor (PRUNE_FLOOR)
        self.max_logits = max_logits
        self.track = track
        self._workspace = torch.empty(0, dtype=dtype, device=device)
        self._weights = torch.empty(0, dtype=dtype, device=device)  # exp(logits) when tracking
        if track is not None:
            self.sq = torch.zeros((G, Bq), dtype=dtype, device=device)
            self.xl = torch.zeros((G, Bq), dtype=dtype, device=device)
            self.top_score = torch.full((G, Bq, track), float("-inf"), dtype=dtype, device=device)
            self.top_id = torch.full((G, Bq, track), -1, dtype=torch.long, device=device)
            self.top_count = torch.zeros((G, Bq, track), dtype=dtype, device=device)
        if prune < 0:
            raise ValueError(f"prune must be 0 (off) or the rank of the distance bound, got {prune}")
        self.prune = prune
        self.pruning = self.prune > 0  # built to prune (stays True when the bound is switched off)
        self.pairs = 0  # (row, candidate) pairs folded in
        self.skipped = 0  # of which skipped by the bound
        self.bounded = 0  # pairs of the chunks where the bound ran
        self._index: tuple | None = None  # the queries' side of the bound once built (_build_index)

    def update(
        self,
        keys_t: torch.Tensor,
        values: torch.Tensor,
        *,
        ids: torch.Tensor | None = None,
        counts: torch.Tensor | None = None,
    ) -> None:
        """Fold one chunk of candidates into the running state.

        Query rows are processed in blocks so that one logit block holds at most
        ``max_logits`` elements; without pruning each row's arithmetic does not
        depend on the blocking (with it, which candidates a row skips depends on
        its tile, always within the bound of the module docstring).

        Args:
            keys_t: ``[G, D + 2, M]`` augmented keys, transposed (:func:`augment_keys`).
            values: ``[G, M, V + 1]`` augmented values (:func:`augment_values`),
                already multiplied by ``counts`` when those are given.
            ids: ``[G, M]`` integer candidate ids, needed when top candidates are tracked.
            counts: ``[G, M]`` multiplicities of the candidates (statistics only;
                default 1). A zero marks an absent candidate.
        """
        G, Bq, _ = self.queries.shape
        M = keys_t.shape[-1]
        if M == 0:  # e.g. a chunk whose patches were all compacted away
            return
        if self.track and ids is None:
            raise ValueError("this state tracks top candidates: update() needs ids [G, M]")
        self.pairs += G * Bq * M
        if self.prune and counts is None and M >= PRUNE_MIN_BLOCKS * PRUNE_KEYS:
            if self._index is None and bool(torch.isinf(self.ref).any()):  # rows without a reference yet
                m0 = min(M, PRUNE_FIRST_KEYS)
                self._update_dense(keys_t[..., :m0], values[:, :m0], None if ids is None else ids[:, :m0], None)
                keys_t, values, ids = keys_t[..., m0:], values[:, m0:], None if ids is None else ids[:, m0:]
                M -= m0
            if M == 0 or (M >= PRUNE_MIN_BLOCKS * PRUNE_KEYS and self._bounded_update(keys_t, values, ids)):
                return
        self._update_dense(keys_t, values, ids, counts)

    @classmethod
    def for_logits(
        cls, rows: int, values: int, *, dtype: torch.dtype, device: torch.device, max_logits: int = 1 << 22
    ) -> SoftmaxMean:
        """An untracked state of ``rows`` query rows fed with precomputed logits (:meth:`fold`), not keys."""
        return cls(torch.empty((1, rows, 0), dtype=dtype, device=device), values, max_logits=max_logits)

    def fold(self, sl: slice, logits: torch.Tensor, values: torch.Tensor, shift: torch.Tensor) -> None:
        """Fold one block of precomputed logits of rows ``sl`` into the state (untracked states only).

        The same arithmetic as :meth:`update` (floor, cap, exp, weighted sum,
        rebase) on logits the caller formed, e.g. partial sums shared between
        nested windows (:mod:`patchmosaic.nested`). The caller passes them
        shifted by ``shift``, ideally the rows' current reference (so that, as in
        :meth:`update`, no pass is spent on the shift).

        Args:
            sl: Rows of the state.
            logits: ``[G, rows, M]`` logits minus ``shift`` (any strides; not modified).
            values: ``[G, M, V + 1]`` augmented values (:func:`augment_values`).
            shift: ``[G, rows]`` the shift of each row (finite).
        """
        if self.track is not None:
            raise ValueError("fold() feeds untracked states; provenance needs update()")
        G, rows, M = logits.shape
        if M == 0 or rows == 0:
            return
        if self._workspace.numel() < G * rows * M:
            self._workspace = self.acc.new_empty(G * rows * M)
        work = self._workspace[: G * rows * M].view(G, rows, M)
        self.pairs += G * rows * M
        ref = self.ref[:, sl]
        if bool((ref == shift).all()):
            weights = torch.mul(logits, LOG2_E, out=work).clamp_(min=self.floor * LOG2_E, max=self.cap * LOG2_E).exp2_()
            contrib = _weighted_sum(weights, values)  # [G, rows, V + 1]
            if not self._capped(contrib[..., -1]):
                self.acc[:, sl] += contrib
                self._rebase(sl)
                return
        # first block of a row (no reference yet), a shift that is not the reference, or a capped logit
        new_ref = torch.maximum(ref, logits.amax(dim=-1) + shift)  # [G, rows]
        new_ref = torch.where(torch.isinf(new_ref), torch.zeros_like(new_ref), new_ref)
        weights = torch.sub(logits, (new_ref - shift)[..., None], out=work).clamp_(min=self.floor).exp_()
        self._rescale(sl, new_ref - ref)
        self.acc[:, sl].baddbmm_(weights, values)
        self.ref[:, sl] = new_ref
        self._rebase(sl)

    def _reserve(self, n: int) -> None:
        """Make the logit workspace (and the weights buffer when tracking) hold ``n`` elements."""
        if self._workspace.numel() < n:
            self._workspace = self.queries.new_empty(n)
            if self.track is not None:
                self._weights = self.queries.new_empty(n)

    def _update_dense(
        self, keys_t: torch.Tensor, values: torch.Tensor, ids: torch.Tensor | None, counts: torch.Tensor | None
    ) -> None:
        """Every candidate of the chunk, row block by row block (:meth:`_sweep`), in logit blocks of
        at most :meth:`_block` elements.

        Where a block of every key would hold under ``PRUNE_DENSE_ROWS`` rows (large chunks, e.g. a
        pruning state's, whose keys alone fill the machine's budget, or cache-sized blocks), the keys
        are split instead, so the products keep enough rows to run at full speed.
        """
        G, Bq, _ = self.queries.shape
        M = keys_t.shape[-1]
        block = self._block()
        rows, cols = max(1, min(Bq, block // max(1, G * M))), M
        if rows < min(Bq, PRUNE_DENSE_ROWS):
            rows = min(Bq, PRUNE_DENSE_ROWS)
            cols = max(1, block // (G * rows))
        self._reserve(G * rows * min(M, cols))
        for start in range(0, Bq, rows):
            self._sweep(slice(start, min(Bq, start + rows)), keys_t, values, ids, counts, cols)

    def _sweep(
        self, sl: slice, keys_t: torch.Tensor, values: torch.Tensor, ids: torch.Tensor | None,
        counts: torch.Tensor | None, cols: int,
    ) -> None:
        """Rows ``sl`` against every key of the chunk, in logit blocks of ``cols`` keys.

        Untracked rows and rows with statistics only are swept on one shift (their
        reference before the chunk) and rebased once at the end, so that a block costs
        its passes and no per-block bookkeeping; a capped logit anywhere (the sweep's
        normaliser reaches ``e^cap``) redoes the sweep block by block. A sweep of one block
        is still a sweep: its exponentials are ``exp2`` (the block-by-block path's are ``exp``).
        """
        if self.track or counts is not None or bool(torch.isinf(self.ref[:, sl]).any()):
            self._blockwise(sl, keys_t, values, ids, counts, cols)
            return
        M = keys_t.shape[-1]
        self.queries[:, sl, -1] = -self.ref[:, sl]
        G, V1 = values.shape[0], values.shape[-1]
        rows = sl.stop - sl.start
        thin = _thin(values)  # the weighted sums accumulate as [V + 1, rows]
        if thin:
            values_t = values.transpose(1, 2).contiguous()  # [G, V + 1, M]
            acc_t = self.acc.new_zeros((G, V1, rows))
        else:
            acc = self.acc.new_zeros((G, rows, V1))
        stats = self.track is not None
        if stats:
            sq, xl = torch.zeros_like(self.sq[:, sl]), torch.zeros_like(self.xl[:, sl])
        # the sweep's logits in bits, (logit - ref) log2(e), straight out of the product, so that its
        # exponentials are exp2 (``LOG2_E``); statistics convert back once per sweep
        queries = self.queries[:, sl] * LOG2_E
        floor, cap = self.floor * LOG2_E, self.cap * LOG2_E
        for c in range(0, M, cols):
            cs = slice(c, c + cols)
            logits = self._logits(sl, keys_t[..., cs], queries).clamp_(min=floor, max=cap)  # (logits - ref) log2 e
            weights = self._exp(logits, bits=True)
            if thin:
                acc_t.baddbmm_(values_t[..., cs], weights.transpose(1, 2))
            else:
                acc.baddbmm_(weights, values[:, cs])
            if stats:
                sq += torch.linalg.vector_norm(weights, dim=-1).square()
                xl += logits.mul_(weights).sum(-1)
        if thin:
            acc = acc_t.transpose(1, 2)
        if self._capped(acc[..., -1]):  # a logit may have been capped anywhere in the sweep
            self._blockwise(sl, keys_t, values, ids, counts, cols)
            return
        self.acc[:, sl] += acc
        if stats:
            self.sq[:, sl] += sq
            self.xl[:, sl] += xl * LN_2  # sum_m w_m (l_m - ref): bits to nats
        self._rebase(sl)

    def _capped(self, normaliser: torch.Tensor) -> bool:
        """Whether any row's normaliser (weights shifted by its reference) reaches ``e^cap``: a logit of
        the block may have been capped, so the block must be redone with its own maximum."""
        return bool((normaliser >= 0.999 * math.exp(self.cap)).any())

    def _block(self) -> int:
        """Elements of one logit block: ``max_logits``, cache-sized on CPU unless top candidates are tracked."""
        if self.track or self.queries.device.type != "cpu":
            return self.max_logits
        return min(self.max_logits, CPU_BLOCK_BYTES // self.queries.element_size())

    def _blockwise(
        self, sl: slice, keys_t: torch.Tensor, values: torch.Tensor, ids: torch.Tensor | None,
        counts: torch.Tensor | None, cols: int,
    ) -> None:
        """Rows ``sl`` against the chunk's keys, one block of ``cols`` keys at a time, each rebased."""
        for c in range(0, keys_t.shape[-1], cols):
            cs = slice(c, c + cols)
            self._update_rows(sl, keys_t[..., cs], values[:, cs], None if ids is None else ids[:, cs],
                              None if counts is None else counts[:, cs])

    def _coords(self, x: torch.Tensor) -> torch.Tensor:
        """Coordinates of the bound: ``[..., D]`` -> ``[..., c]``, the first ``r`` principal
        coordinates and (for ``r < D``) the norm of the other ``D - r``."""
        V, r = self._index[0], self._index[1]
        p = x @ V  # [..., D], rotated (V orthogonal, columns by descending variance)
        if r >= p.shape[-1]:
            return p
        return torch.cat([p[..., :r], torch.linalg.vector_norm(p[..., r:], dim=-1, keepdim=True)], dim=-1)

    def _build_index(self, keys: torch.Tensor) -> None:
        """The queries' side of the bound: principal axes of ``keys [G, D, M]``, the k-d order of the
        rows and the boxes of their tiles."""
        G, _, D2 = self.queries.shape
        D = D2 - 2
        k64 = keys[..., :: max(1, keys.shape[-1] // PRUNE_AXES_KEYS)].to(torch.float64)  # spread over the chunk
        _, vecs = torch.linalg.eigh(torch.einsum("gdm,gem->de", k64, k64))  # ascending eigenvalues
        self._index = (vecs.flip(1).to(self.queries.dtype), min(self.prune, D))  # V [D, D]; r
        beta = self.queries[..., D]  # [G, Bq]
        ok = beta < 0  # rows with beta >= 0 are never pruned
        inv_beta = torch.where(ok, 1.0 / beta.abs().clamp_min(torch.finfo(beta.dtype).tiny), 0.0)  # 1 / |beta_b|
        u = self.queries[..., :D] * (0.5 * inv_beta)[..., None]  # [G, Bq, D], u_b = scale x_b / (2 |beta_b|)
        coords = self._coords(u)  # [G, Bq, c]
        order = torch.stack([kd_order(coords[g], PRUNE_ROWS, PRUNE_LEVELS) for g in range(G)])  # [G, Bq]
        inverse = torch.argsort(order, dim=1)
        coords = coords.gather(1, order[..., None].expand_as(coords))  # [G, Bq, c], rows in tile order
        lo, hi = _cell_boxes(coords, PRUNE_ROWS)  # [G, tiles, c]
        usq = u.square().sum(-1).gather(1, order)  # [G, Bq]
        self._index += (order, inverse, usq, inv_beta.gather(1, order), ok.gather(1, order), lo, hi)

    def _provable_fraction(self, keys: torch.Tensor) -> float:
        """Fraction of (row, key) pairs below ``floor - margin`` on the sample ``keys [G, D + 2, m]``
        (and on rows spread over the state, to fit ``max_logits``): what even a per-pair bound could skip."""
        G, Bq, _ = self.queries.shape
        rows = slice(None, None, max(1, G * Bq * keys.shape[-1] // self.max_logits))
        finite = torch.isfinite(self.ref[:, rows])  # rows without a reference count as needing every key
        self.queries[:, rows, -1] = torch.where(finite, -self.ref[:, rows], 0.0)
        below = (torch.bmm(self.queries[:, rows], keys) < self.prune_floor - PRUNE_MARGIN) & finite[..., None]
        return float(below.float().mean())

    def _tile_thresholds(self, key_sq: torch.Tensor) -> torch.Tensor:
        """``[G, tiles]``: the largest ``T_b`` of each tile's rows, the squared distance beyond which a
        row's shifted logit lies below ``floor - margin``, raised by the float rounding of the coordinates,
        of ``|u_b|^2`` and of ``(ref + floor - margin) / |beta|`` (module docstring); ``key_sq`` is the
        largest squared coordinate norm of the keys bounded."""
        order, _, usq, inv_beta, ok, tlo, _ = self._index[2:]
        G, tiles = tlo.shape[:2]
        D = self.queries.shape[-1] - 2
        below = torch.full_like(self.ref, self.prune_floor)  # [G, Bq], in the caller's row order
        if self.track:  # nor may a skipped candidate beat a row's current m-th best: top lists stay exact
            below = torch.minimum(below, self.top_score[..., -1])
        lim = (self.ref + below - PRUNE_MARGIN).gather(1, order)  # [G, Bq], tile order
        eps = torch.finfo(self.queries.dtype).eps
        tol = 16 * (D + 1) ** 1.5 * eps * (usq + key_sq + lim.abs() * inv_beta)
        thr = torch.where(ok, usq - lim * inv_beta + tol, float("inf"))  # +inf where ref = -inf
        thr = torch.cat([thr, thr.new_full((G, tiles * PRUNE_ROWS - thr.shape[1]), float("-inf"))], 1)
        return thr.view(G, tiles, PRUNE_ROWS).amax(-1)

    def _permute_rows(self, perm: torch.Tensor) -> None:
        """Reorder every per-row tensor of the state by ``perm [G, Bq]`` (row i <- row perm[:, i])."""
        for name in ("queries", "ref", "acc", "sq", "xl", "top_score", "top_id", "top_count"):
            t = getattr(self, name, None)
            if t is not None:
                setattr(self, name, t.gather(1, perm.view(perm.shape + (1,) * (t.ndim - 2)).expand_as(t)))

    def _bounded_update(self, keys_t: torch.Tensor, values: torch.Tensor, ids: torch.Tensor | None) -> bool:
        """Fold the chunk in tile by tile, skipping the key blocks the bound proves below the floor.

        Keys are put in k-d order of their coordinates (blocks of ``PRUNE_KEYS``);
        the rows, in their own k-d order (tiles of ``PRUNE_ROWS``), are permuted in
        for the chunk and back out after it. A tile skips a block when the squared
        distance between their boxes exceeds every row's ``T_b`` (module docstring).

        Returns:
            False (and folds nothing in) when the state's first bounded chunk would
            skip under ``PRUNE_MIN_FRACTION`` of its pairs; bounding is then off.
        """
        G, D2, M = keys_t.shape
        D = D2 - 2
        Bq = self.queries.shape[1]
        # both switch-off tests of a first bounded chunk look at the same PRUNE_SAMPLE keys spread over it
        sample = keys_t[..., :: max(1, M // PRUNE_SAMPLE)][..., :PRUNE_SAMPLE] if self.bounded == 0 else None
        if sample is not None and self._provable_fraction(sample) < PRUNE_MIN_FRACTION:
            self.prune = 0  # even pair by pair too little lies below the floor (high noise)
            return False
        if self._index is None:
            self._build_index(keys_t[:, :D])
        tlo, thi = self._index[-2:]
        tiles = tlo.shape[1]
        tile_rows = [min(Bq, (t + 1) * PRUNE_ROWS) - t * PRUNE_ROWS for t in range(tiles)]
        rows_t = keys_t.transpose(1, 2)  # [G, M, D + 2] (a view of the machine's rows)
        if sample is not None:  # what the tiles' boxes prove key by key bounds what they prove block by block
            sc = self._coords(sample[:, :D].transpose(1, 2))  # [G, m, c]
            thr = self._tile_thresholds(sc.square().sum(-1).amax())  # [G, tiles]
            point = (_box_gap2(tlo, thi, sc, sc) > thr[..., None]).all(0)  # [tiles, m]
            proven = sum(n * int(c) for n, c in zip(tile_rows, point.sum(1).tolist()))
            if proven < PRUNE_MIN_FRACTION * Bq * sc.shape[1]:
                self.prune = 0  # the boxes cannot prove what lies below the floor pair by pair
                return False
        kc = self._coords(rows_t[..., :D])  # [G, M, c]
        korder = torch.stack([kd_order(kc[g], PRUNE_KEYS, PRUNE_LEVELS) for g in range(G)])  # [G, M]
        kc = kc.gather(1, korder[..., None].expand_as(kc))
        blo, bhi = _cell_boxes(kc, PRUNE_KEYS)  # [G, blocks, c]
        skip = _box_gap2(tlo, thi, blo, bhi) > self._tile_thresholds(kc.square().sum(-1).amax())[..., None]
        need = ~skip.all(0)  # [tiles, blocks]: a tile computes a block when any group needs it
        size = torch.full((need.shape[1],), PRUNE_KEYS, device=need.device)
        size[-1] = M - (need.shape[1] - 1) * PRUNE_KEYS  # [blocks] keys per block
        kept = (need * size).sum(1).tolist()  # [tiles] keys each tile computes
        skipped = G * sum(n * (M - k) for n, k in zip(tile_rows, kept))
        if self.bounded == 0 and skipped < PRUNE_MIN_FRACTION * G * Bq * M:
            self.prune = 0  # nothing to skip here (high noise): stop paying for the bound
            return False
        self.skipped += skipped
        self.bounded += G * Bq * M
        keys_s = _rows_in_order(rows_t, korder).transpose(1, 2)  # [G, D + 2, M], k-d order
        values_s = _rows_in_order(values, korder)  # [G, M, V + 1]
        ids_s = None if ids is None else ids.gather(1, korder)  # [G, M]
        width = max(1, self._block() // (G * PRUNE_ROWS))  # keys per logit block of one tile
        self._reserve(G * PRUNE_ROWS * min(M, width))
        # runs of consecutive needed blocks, as key ranges [a, b) per tile (one copy of each run)
        step = torch.diff(need.to(torch.int8), dim=1, prepend=need.new_zeros(tiles, 1, dtype=torch.int8),
                          append=need.new_zeros(tiles, 1, dtype=torch.int8))  # [tiles, blocks + 1]
        edge_tile, edge_block = (t.tolist() for t in torch.nonzero(step, as_tuple=True))  # starts and ends alternate
        runs: list[list[tuple[int, int]]] = [[] for _ in range(tiles)]
        for j in range(0, len(edge_tile), 2):
            runs[edge_tile[j]].append((edge_block[j] * PRUNE_KEYS, min(M, edge_block[j + 1] * PRUNE_KEYS)))
        order, inverse = self._index[2:4]
        self._permute_rows(order)
        for t in range(tiles):
            if not runs[t]:
                continue
            sl = slice(t * PRUNE_ROWS, t * PRUNE_ROWS + tile_rows[t])
            pieces = [(keys_s[..., a:b], values_s[:, a:b], None if ids_s is None else ids_s[:, a:b]) for a, b in runs[t]]
            if len(pieces) == 1:
                k, v, i = pieces[0]
            else:
                k, v = torch.cat([p[0] for p in pieces], 2), torch.cat([p[1] for p in pieces], 1)
                i = None if ids_s is None else torch.cat([p[2] for p in pieces], 1)
            self._sweep(sl, k, v, i, None, width)
        self._permute_rows(inverse)
        return True

    def _logits(self, sl: slice, keys_t: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """``queries[:, sl] @ keys_t`` (or ``queries`` given for those rows) into the reusable workspace:
        ``[G, rows, M]``."""
        G, M = keys_t.shape[0], keys_t.shape[-1]
        rows = sl.stop - sl.start
        out = self._workspace[: G * rows * M].view(G, rows, M)
        return torch.bmm(self.queries[:, sl] if queries is None else queries, keys_t, out=out)

    def _exp(self, logits: torch.Tensor, bits: bool = False) -> torch.Tensor:
        """``exp(logits)`` (``2^logits`` for logits in ``bits``): in place, or into a second buffer when
        statistics need the logits."""
        out = logits if self.track is None else self._weights[: logits.numel()].view(logits.shape)
        return (torch.exp2 if bits else torch.exp)(logits, out=out)

    def _update_rows(
        self, sl: slice, keys_t: torch.Tensor, values: torch.Tensor, ids: torch.Tensor | None, counts: torch.Tensor | None
    ) -> None:
        if torch.isinf(self.ref[:, sl]).any():  # first chunk: no reference yet
            self._exact_update(sl, keys_t, values, ids, counts)
            return
        self.queries[:, sl, -1] = -self.ref[:, sl]
        logits = self._logits(sl, keys_t)  # [G, rows, M], logits - ref
        top = self._chunk_top(logits, ids, counts, self.top_score[:, sl, -1]) if self.track else None
        weights = self._exp(logits.clamp_(min=self.floor, max=self.cap))  # [G, rows, M]
        contrib = _weighted_sum(weights, values)  # [G, rows, V + 1]
        if self._capped(contrib[..., -1]):  # a logit was capped
            self._exact_update(sl, keys_t, values, ids, counts)
            return
        self.acc[:, sl] += contrib
        if self.track is not None:
            self._accumulate(sl, logits, weights, counts, top)
        self._rebase(sl)

    def _exact_update(
        self, sl: slice, keys_t: torch.Tensor, values: torch.Tensor, ids: torch.Tensor | None, counts: torch.Tensor | None
    ) -> None:
        """Update rows ``sl`` with the chunk's own maximum (four passes over the logits)."""
        self.queries[:, sl, -1] = 0.0
        logits = self._logits(sl, keys_t)  # [G, rows, M]
        if counts is not None:  # absent candidates: weight 0 (e^(+large) * 0 would be NaN), out of the maximum
            logits.masked_fill_(counts[:, None, :] == 0, float("-inf"))
        ref = self.ref[:, sl]
        new_ref = torch.maximum(ref, logits.amax(dim=-1))  # [G, rows]
        new_ref = torch.where(torch.isinf(new_ref), torch.zeros_like(new_ref), new_ref)  # rows with no candidate yet
        logits.sub_(new_ref[..., None])
        if self.track:  # scored after the shift, so log c stays exact; thr on the new reference
            top = self._chunk_top(logits, ids, counts, self.top_score[:, sl, -1] - (new_ref - ref))
        else:
            top = None
        weights = self._exp(logits.clamp_(min=self.floor))  # [G, rows, M]
        self._rescale(sl, new_ref - ref)
        self.acc[:, sl].baddbmm_(weights, values)  # [G, rows, V + 1]
        self.ref[:, sl] = new_ref
        if self.track is not None:
            self._accumulate(sl, logits, weights, counts, top)
        self._rebase(sl)

    def _chunk_top(
        self, logits: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor | None, thr: torch.Tensor
    ) -> tuple[torch.Tensor, ...] | None:
        """The block's candidates that may enter the rows' top lists.

        Only rows whose best logit beats their current m-th best score ``thr
        [G, rows]`` (on the logits' reference) can change; after the first
        chunks these are few, so the top-m search (``topk``, costly per row)
        runs on those rows only.

        Returns:
            ``None`` when no row changes, else ``(g, r, score [K, m], ids [K, m],
            counts [K, m])`` for the K changing rows, score = logit + log c.
        """
        G, R, M = logits.shape
        m = min(self.track, M)
        if counts is not None:  # small blocks (one candidate per constant-patch value): every row
            scores = logits + counts.log()[:, None, :]  # [G, R, M]
            g, r = (t.flatten() for t in torch.meshgrid(
                torch.arange(G, device=logits.device), torch.arange(R, device=logits.device), indexing="ij"))
            score, col = scores[g, r].topk(m, dim=-1)  # [G R, m]
            return g, r, score, ids[g[:, None], col], counts[g[:, None], col].to(score.dtype)
        nseg = M // TOP_SEGMENT
        if nseg < 4 * m:
            g, r = torch.nonzero(logits.amax(-1) > thr, as_tuple=True)  # [K] each
            if g.numel() == 0:
                return None
            score, col = logits[g, r].topk(m, dim=-1)  # [K, m]
            return g, r, score, ids[g[:, None], col], torch.ones_like(score)
        # the m largest lie in the m segments with the largest maxima (topk costs per element); the
        # segments' maxima of every row also give the rows' maxima, and only the chosen segments of the
        # changing rows are read again (no copy of whole rows)
        seg_max = logits[..., : nseg * TOP_SEGMENT].unflatten(-1, (nseg, TOP_SEGMENT)).amax(-1)  # [G, R, nseg]
        row_max = seg_max.amax(-1)
        if nseg * TOP_SEGMENT < M:  # the ragged last segment is always searched
            row_max = torch.maximum(row_max, logits[..., nseg * TOP_SEGMENT :].amax(-1))
        g, r = torch.nonzero(row_max > thr, as_tuple=True)  # [K] each
        if g.numel() == 0:
            return None
        seg = seg_max[g, r].topk(m, dim=-1).indices  # [K, m]
        cols = (seg[..., None] * TOP_SEGMENT + torch.arange(TOP_SEGMENT, device=logits.device)).flatten(1)
        if nseg * TOP_SEGMENT < M:
            tail = torch.arange(nseg * TOP_SEGMENT, M, device=logits.device)
            cols = torch.cat([cols, tail.expand(cols.shape[0], -1)], dim=1)  # [K, m S + tail]
        score, pick = logits[g[:, None], r[:, None], cols].topk(m, dim=-1)  # [K, m]
        col = cols.gather(1, pick)
        return g, r, score, ids[g[:, None], col], torch.ones_like(score)

    def _accumulate(
        self,
        sl: slice,
        logits: torch.Tensor,
        weights: torch.Tensor,
        counts: torch.Tensor | None,
        top: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    ) -> None:
        """Add a block's ``sq``, ``xl`` and top candidates (``logits`` are shifted and clamped; reused)."""
        if counts is None:
            self.sq[:, sl] += torch.linalg.vector_norm(weights, dim=-1).square()
            self.xl[:, sl] += logits.mul_(weights).sum(-1)
        else:
            cw = weights * counts[:, None, :].to(weights.dtype)  # [G, rows, M]
            self.sq[:, sl] += (cw * weights).sum(-1)
            self.xl[:, sl] += (cw * logits).sum(-1)
        if top is not None:
            self._merge_top(sl, top)

    def _merge_top(self, sl: slice, top: tuple[torch.Tensor, ...]) -> None:
        """Merge :meth:`_chunk_top`'s candidates (scored on the current reference) into rows ``sl``."""
        g, r, score, ids, counts = top
        best = self._keep_best(
            torch.cat([self.top_score[:, sl][g, r], score], dim=-1),  # [K, m + m']
            torch.cat([self.top_id[:, sl][g, r], ids], dim=-1),
            torch.cat([self.top_count[:, sl][g, r], counts], dim=-1),
        )
        self.top_score[:, sl][g, r], self.top_id[:, sl][g, r], self.top_count[:, sl][g, r] = best

    def _keep_best(
        self, scores: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``track`` entries of largest score along the last dimension, with their ids and counts."""
        best, pick = scores.topk(self.track, dim=-1)
        return best, ids.gather(-1, pick), counts.gather(-1, pick)

    def _rescale(self, sl: slice, d: torch.Tensor) -> None:
        """Move rows ``sl`` to a reference larger by ``d >= 0`` (``+inf`` where the state was empty)."""
        f = torch.exp(-d)  # [G, rows]
        if self.track is not None:
            self.xl[:, sl] = _moved_xl(self.xl[:, sl], self.acc[:, sl, -1], d, f)
            self.sq[:, sl] *= f * f
            self.top_score[:, sl] -= d[..., None]
        self.acc[:, sl] *= f[..., None]

    def _rebase(self, sl: slice) -> None:
        """Move the reference of rows ``sl`` to their running log-sum-exp (``acc[..., -1] = 1``).

        Rows that have seen only absent candidates (normaliser 0) stay empty (``ref = -inf``).
        """
        norm = self.acc[:, sl, -1].clone()  # [G, rows], >= 1 once a row has a candidate (a copy: acc changes below)
        seen = norm > 0
        norm = torch.where(seen, norm, torch.ones_like(norm))
        d = torch.log(norm)
        self.acc[:, sl] /= norm[..., None]
        self.ref[:, sl] = torch.where(seen, self.ref[:, sl] + d, float("-inf"))
        if self.track is not None:
            self.sq[:, sl] /= norm * norm
            self.xl[:, sl] = self.xl[:, sl] / norm - d
            self.top_score[:, sl] -= d[..., None]

    def merge(
        self, ref: torch.Tensor, acc: torch.Tensor, sq: torch.Tensor | None = None, xl: torch.Tensor | None = None
    ) -> None:
        """Combine with the state ``(ref, acc)`` of a disjoint set of keys (e.g. another shard).

        A state with posterior statistics (``track = 0``) also takes the other side's ``sq`` and ``xl``
        (same units as its own: ``sum w^2`` and ``sum w (l - ref)`` on that side's ``ref``); states with top
        candidates merge with :meth:`all_reduce`.
        """
        if self.track:
            raise ValueError("merge() combines states without top candidates; those merge with all_reduce()")
        if (self.track is None) != (sq is None or xl is None):
            raise ValueError("merge(): posterior statistics (sq, xl) are needed exactly when the state tracks them")
        new_ref = torch.maximum(self.ref, ref)
        shift = torch.where(torch.isneginf(new_ref), 0.0, new_ref)  # rows empty on both sides stay empty, not NaN
        d_self, d_other = shift - self.ref, shift - ref  # each side's move up to the shift (+inf: empty)
        f_self, f_other = torch.exp(-d_self), torch.exp(-d_other)
        if self.track is not None:
            self.xl = (_moved_xl(self.xl, self.acc[..., -1], d_self, f_self)
                       + _moved_xl(xl, acc[..., -1], d_other, f_other))
            self.sq = self.sq * f_self * f_self + sq * f_other * f_other
        self.acc = self.acc * f_self[..., None] + acc * f_other[..., None]
        self.ref = new_ref

    def all_reduce(self, group: object = None) -> None:
        """Merge the states of all ranks in ``group`` (each streamed a disjoint shard).

        ``ref`` becomes the maximum over ranks (MAX all-reduce), each rank rescales
        its ``acc`` (and statistics) to it and the results are summed (SUM
        all-reduce): exactly the state of one pass over the union of the shards.
        Top candidates are gathered from every rank and the best ``track`` kept.
        A rank whose shard held no candidate (``ref = -inf``) contributes zero.
        """
        import torch.distributed as dist

        ref = self.ref.clone()
        dist.all_reduce(ref, op=dist.ReduceOp.MAX, group=group)
        rows = slice(0, ref.shape[1])
        self._rescale(rows, torch.where(torch.isinf(self.ref), float("inf"), ref - self.ref))
        self.ref = ref
        dist.all_reduce(self.acc, op=dist.ReduceOp.SUM, group=group)
        if self.track is None:
            return
        dist.all_reduce(self.sq, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(self.xl, op=dist.ReduceOp.SUM, group=group)
        if self.track:
            world = dist.get_world_size(group)
            parts = []
            for t in (self.top_score, self.top_id, self.top_count):
                gathered = [torch.empty_like(t) for _ in range(world)]
                dist.all_gather(gathered, t.contiguous(), group=group)
                parts.append(torch.cat(gathered, dim=-1))
            self.top_score, self.top_id, self.top_count = self._keep_best(*parts)

    def mean(self) -> torch.Tensor:
        """The softmax-weighted mean ``[G, Bq, V]``."""
        return self.acc[..., :-1] / self.acc[..., -1:]

    def posterior_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N_eff, entropy)``, each ``[G, Bq]``: ``1 / sum w^2`` and ``-sum w log w`` (nats)."""
        if self.track is None:
            raise ValueError("posterior statistics need a state built with track=0 or more")
        S = self.acc[..., -1]
        return S * S / self.sq, torch.log(S) - self.xl / S

    def top_candidates(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(weight, id, count)``, each ``[G, Bq, track]``, by descending weight.

        ``weight`` is the posterior weight of the entry (all ``count`` candidates it
        stands for); empty slots have id -1 and weight 0.
        """
        if not self.track:
            raise ValueError("top candidates need a state built with track > 0")
        weight = torch.exp(self.top_score - torch.log(self.acc[..., -1:]))
        return weight, self.top_id, self.top_count
