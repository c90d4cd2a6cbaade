"""Every patch size of one ELS call in one stream: nested windows share their products.

Calibration (:mod:`patchmosaic.calibration`) needs the ELS machine at every
candidate size k_1 < ... < k_K for the same noisy batch. The logit of a query
patch x against a training patch X at size k is

    logit_k = scale <x, X>_k + bias |X|^2_k,

and the k x k window is the (k - 2) x (k - 2) window plus a ring, so with the
features of the largest window ordered ring by ring (ring 0 is the whole
k_1 x k_1 window, ring i the annulus between k_{i-1} and k_i),

    logit_{k_i} = logit_{k_{i-1}} + scale <x, X>_ring_i + bias |X|^2_ring_i :

one running sum, one matrix product per ring, and the softmax of size k_i is
read off after ring i. The matrix products of all sizes together cost one
product at the largest size instead of one per size.

Which pairs a size admits changes with k: with zero padding a query pixel in
the interior (at least r from every edge) sees the interior training patches,
and both sets shrink as r grows; without wrapping, circular padding's
candidates shrink the same way. These *dense* pairs are nested
(``interior(k_i) x interior(k_i)`` contains ``interior(k_j) x interior(k_j)``
for j > i), so query pixels and candidate positions are ordered by their
depth (the largest size whose dense block holds them) and every ring's
product covers a prefix of the rows and a prefix of the candidates. The other
pairs (pixels within r of an edge, matched at the same distance from it) are
few and come from the machine's per-size path.

Constant training patches are not collapsed here (that is a per-size
optimisation of the single-size path); every candidate is streamed, so the
result equals the single-size machine up to float rounding.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from patchmosaic.engine import SoftmaxMean, augment_values, pad_images, patch_windows
from patchmosaic.geometry import AxisBlocks

__all__ = ["NESTED_FROM", "NESTED_TILE", "axis_depth", "nested_dense_means", "ring_order"]

# Elements of one tile of the running logit sum (measured on MNIST, one thread:
# 2^18 and 2^22 were 4-8% slower than 2^20).
NESTED_TILE = 1 << 20

# Sizes below this one are computed one at a time by the single-size path: at
# small k the products are cheap, and that path collapses constant training
# patches (59% of MNIST's 3 x 3 patches), which the shared stream cannot (a
# patch constant at k may not be at k + 2). Measured on MNIST (300 images, 4
# queries, sigma 1, one thread; `benchmarks/bench_nested.py split`): sizes
# 3..21 in one stream took 1.08x (zeros) and 0.70x (circular) the time of the
# ten single-size calls; 7..21 took 0.83x and 0.59x. Circular: streaming 7..21
# plus single calls at 3 and 5 is 47.9 s against 56.3 s for all in the stream;
# starting at 9 or 11 gains another 3% there (46.5 s, 46.3 s), too little to
# move the split.
NESTED_FROM = 7


def ring_order(channels: int, radii: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
    """Feature order of the largest window, ring by ring.

    Args:
        channels: C.
        radii: Ascending patch radii r_1 < ... < r_K.

    Returns:
        ``(perm, ends)``: ``perm [C K^2]`` indexes a flattened ``[C, K, K]``
        window (``K = 2 r_K + 1``) so that ring i's features are
        ``perm[ends[i - 1]:ends[i]]`` (``ends[-1] = C K^2``); ring 0 is the
        whole window of radius r_1, ring i the positions with Chebyshev radius
        in ``(r_{i-1}, r_i]``. Within a ring: channel, then row, then column.
    """
    R = radii[-1]
    K = 2 * R + 1
    d = torch.arange(K) - R
    cheb = torch.maximum(d.abs()[:, None], d.abs()[None, :]).flatten()  # [K^2]
    perm, ends, lo = [], [], -1
    for r in radii:
        ring = torch.nonzero((cheb > lo) & (cheb <= r)).flatten()  # [n_ring] positions in the window
        idx = (torch.arange(channels)[:, None] * K * K + ring[None, :]).flatten()  # channel-major
        perm.append(idx)
        ends.append((ends[-1] if ends else 0) + idx.numel())
        lo = r
    return torch.cat(perm), ends


def axis_depth(blocks: Sequence[AxisBlocks], which: str, length: int) -> torch.Tensor:
    """Per position of one axis, the index of the largest size whose dense block contains it.

    Args:
        blocks: One single-block :class:`AxisBlocks` per size, ascending; their
            ``P`` (``which="P"``) or ``Q`` sets must be nested (shrinking).
        which: ``"P"`` (query positions) or ``"Q"`` (candidate positions).
        length: Axis length.

    Returns:
        ``[length]`` long: depth i >= 0, or -1 for positions in no dense block.
    """
    depth = torch.full((length,), -1, dtype=torch.long)
    previous: set[int] | None = None
    for i, b in enumerate(blocks):
        pos = (b.P if which == "P" else b.Q)[0].tolist()
        if previous is not None and not set(pos) <= previous:
            raise ValueError("nested_dense_means needs dense blocks that shrink as the patch grows")
        previous = set(pos)
        depth[pos] = i
    return depth


def _sorted_pixels(depth_y: torch.Tensor, depth_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixels with a 2-D depth ``min(depth_y, depth_x) >= 0``, deepest first: ``(ys, xs, depth)``."""
    d = torch.minimum(depth_y[:, None], depth_x[None, :]).flatten()  # [H W]
    keep = torch.nonzero(d >= 0).flatten()
    order = keep[torch.argsort(d[keep], descending=True, stable=True)]
    W = depth_x.shape[0]
    return order // W, order % W, d[order]


def _prefix_counts(depth: torch.Tensor, levels: int) -> list[int]:
    """``n_i`` = number of leading entries of a descending ``depth`` with depth >= i, for each level i."""
    return [int((depth >= i).sum()) for i in range(levels)]


def nested_dense_means(
    x: torch.Tensor,
    coeffs: tuple[torch.Tensor, torch.Tensor],
    chunks: Iterable[torch.Tensor],
    rows: Sequence[AxisBlocks],
    cols: Sequence[AxisBlocks],
    radii: Sequence[int],
    padding: str,
    out: torch.Tensor,
    *,
    tile: int = NESTED_TILE,
) -> list[SoftmaxMean]:
    """Softmax means of the dense (query block x candidate block) pairs of every size, in one stream.

    The running sum of a tile of (query rows x candidates) is kept shifted by
    each size's running reference: ring i's product carries one more column
    (the old shift minus the new reference, against a row of ones), so the sum
    after ring i is already ``logit_{k_i} - ref_i`` and the softmax reads it
    with one clamp, one exp and the weighted sum, as :meth:`SoftmaxMean.update` does.

    Args:
        x: ``[B, C, H, W]`` queries (noisy images).
        coeffs: ``scale [B]``, ``bias [B]``: ``logit = scale <x, X> + bias |X|^2``.
        chunks: Training images ``[n, C, H, W]`` in chunks (dtype and device of ``x``).
        rows, cols: Per size (ascending) the single dense block of the row and column axis.
        radii: Ascending patch radii, one per size.
        padding: ``"zeros"`` or ``"circular"`` (how windows read across the border).
        out: ``[K, B, C, H, W]``: each size's means are written at its dense pixels.
        tile: Elements of one (query rows x candidates) tile of the running sum.

    Returns:
        The per-size states (already written to ``out``; returned for inspection).
    """
    B, C, H, W = x.shape
    K, R = len(radii), radii[-1]
    Kw = 2 * R + 1
    perm, ends = ring_order(C, radii)
    starts = [0] + ends[:-1]
    width = [b - a for a, b in zip(starts, ends)]  # features per ring
    offset = [a + 2 * i for i, a in enumerate(starts)]  # ring i's columns: features, |X|^2 slot, shift slot
    total = ends[-1] + 2 * K
    scale, bias = coeffs
    dev = x.device
    qy, qx, qdepth = _sorted_pixels(axis_depth(rows, "P", H), axis_depth(cols, "P", W))
    cy, cx, cdepth = _sorted_pixels(axis_depth(rows, "Q", H), axis_depth(cols, "Q", W))
    n_rows = [B * n for n in _prefix_counts(qdepth, K)]  # query rows (pixel, sample) of each size
    n_pos = _prefix_counts(cdepth, K)  # candidate positions of each size

    # Queries [rows, total]: per ring [scale * x_ring, bias, shift slot]; rows ordered (pixel, sample).
    win = patch_windows(x, R, padding)[:, :, qy.to(dev), qx.to(dev)]  # [B, C, P, Kw, Kw]
    feats = win.permute(2, 0, 1, 3, 4).reshape(-1, C * Kw * Kw)[:, perm.to(dev)]  # [P B, D], ring order
    queries = x.new_zeros(feats.shape[0], total)
    row_scale = scale.repeat(qy.numel())[:, None]
    for i in range(K):
        o = offset[i]
        torch.mul(feats[:, starts[i] : ends[i]], row_scale, out=queries[:, o : o + width[i]])
        queries[:, o + width[i]] = bias.repeat(qy.numel())
    del feats, win

    # Gather map of the keys' transposed layout [total, Pq n]: row f of candidate (position p, image)
    # reads the padded image at base(p) + delta(f); the two slot rows of each ring read a zero row.
    Hp, Wp = H + 2 * R, W + 2 * R
    c, rem = perm // (Kw * Kw), perm % (Kw * Kw)
    delta = c * Hp * Wp + (rem // Kw) * Wp + rem % Kw  # [D]
    base = cy * Wp + cx  # [Pq]
    zero_row = C * Hp * Wp
    index = torch.full((total, cy.numel()), zero_row, dtype=torch.long)
    for i in range(K):
        index[offset[i] : offset[i] + width[i]] = base[None, :] + delta[starts[i] : ends[i], None]
    index = index.flatten().to(dev)
    # key rows of the centre pixel, per channel (in ring 0, whose columns start at offset 0)
    centre = torch.nonzero(rem[: ends[0]] == R * Kw + R).flatten().tolist()

    states = [SoftmaxMean.for_logits(n, C, dtype=x.dtype, device=dev, max_logits=tile) for n in n_rows]
    work = x.new_empty(tile)
    for chunk in chunks:
        n = chunk.shape[0]
        padded = pad_images(chunk, R, padding).reshape(n, -1)  # [n, C Hp Wp]
        flat_t = torch.cat([padded.T, padded.new_zeros(1, n)])  # [C Hp Wp + 1, n]
        keys = flat_t.index_select(0, index).view(total, -1)  # [total, M], candidates (position, image)
        M = keys.shape[1]
        for i in range(K):
            o = offset[i]
            keys[o + width[i]] = keys[o : o + width[i]].square().sum(0)
            keys[o + width[i] + 1] = 1.0
        values = augment_values(keys[centre].T.contiguous())[None]  # [1, M, C + 1]
        m_pos = [n * p for p in n_pos]  # candidates of each size in this chunk (a prefix)
        m_tile = min(M, max(256, tile // 64))
        r_tile = max(1, tile // m_tile)
        if work.numel() < r_tile * m_tile:  # a tile budget under one row of m_tile candidates
            work = x.new_empty(r_tile * m_tile)
        for a in range(0, n_rows[0], r_tile):
            b = min(n_rows[0], a + r_tile)
            for m0 in range(0, M, m_tile):
                m1 = min(M, m0 + m_tile)
                cum = work[: (b - a) * (m1 - m0)].view(b - a, m1 - m0)
                shift = torch.zeros(b - a, dtype=x.dtype, device=dev)
                for i in range(K):
                    r_i, m_i = min(b, n_rows[i]) - a, min(m1, m_pos[i]) - m0
                    if r_i <= 0 or m_i <= 0:
                        break
                    o, w = offset[i], width[i]
                    ref = states[i].ref[0, a : a + r_i]
                    target = torch.where(torch.isinf(ref), torch.zeros_like(ref), ref)
                    queries[a : a + r_i, o + w + 1] = shift[:r_i] - target
                    shift[:r_i] = target
                    q, kt = queries[a : a + r_i, o : o + w + 2], keys[o : o + w + 2, m0 : m0 + m_i]
                    if i == 0:
                        torch.mm(q, kt, out=cum)
                    else:
                        cum[:r_i, :m_i].addmm_(q, kt)
                    states[i].fold(slice(a, a + r_i), cum[:r_i, :m_i][None], values[:, m0 : m0 + m_i],
                                   target[None])
    for i, state in enumerate(states):
        P = n_rows[i] // B
        mean = state.mean()[0].view(P, B, C)  # rows (pixel, sample)
        out[i][:, :, qy[:P].to(dev), qx[:P].to(dev)] = mean.permute(1, 2, 0)  # [B, C, P]
    return states
