"""Which training positions q may explain a query pixel p, and how patches pad.

Every patch machine of Kamb & Ganguli (2412.20292, Sec. 3) is a softmax over
candidates (training image i, patch centre q) for each query pixel p. The
machines differ only in the admissible set Q(p) and in how patches that cross
the image border are padded. Both factor over the two image axes, so a
:class:`Geometry` is a pair of per-axis descriptions.

Per axis, the admissible pairs are a union of *blocks*: a block says "every
query position in P may be explained by every candidate position in Q".
Blocks of equal shape are stacked into an :class:`AxisBlocks` so that the
engine handles all of them with one batched matrix product:

==========================  ===============================================
machine, padding            blocks on an axis of length L, radius r = k//2
==========================  ===============================================
LS (any padding)            L blocks ({p}, {p})
ELS circular                one block (all p, all q)
ELS circular, no wrap       one block (all p, q in [r, L-1-r])
ELS zeros                   one block (p, q in [r, L-1-r]) for the interior
                            and 2r blocks ({p}, {p}) for p within r of an edge
==========================  ===============================================

Zero padding pads both query and training patches with zeros; because an edge
pixel is only explained by the same position on that axis, the padded terms
are zero on both sides and drop out of the distance.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

__all__ = ["AxisBlocks", "Geometry", "make_geometry", "PATCH_KINDS", "PADDINGS", "scatter_pixels"]

PATCH_KINDS = ("ls", "els")
PADDINGS = ("zeros", "circular")


@dataclass(frozen=True)
class AxisBlocks:
    """A stack of ``nb`` equally shaped blocks on one axis.

    Attributes:
        P: ``[nb, n_p]`` query positions of each block.
        Q: ``[nb, n_q]`` candidate positions that may explain every query in that block.
    """

    P: torch.Tensor
    Q: torch.Tensor

    def index(self, which: str) -> slice | torch.Tensor:
        """Index for ``P`` or ``Q`` along the axis: a slice for a single contiguous
        block (so selecting it is a view), else the ``[nb, n]`` position tensor."""
        pos = self.P if which == "P" else self.Q
        if pos.shape[0] == 1 and bool((pos[0] == torch.arange(pos[0, 0], pos[0, 0] + pos.shape[1])).all()):
            return slice(int(pos[0, 0]), int(pos[0, 0]) + pos.shape[1])
        return pos

    def runs(self, which: str) -> list[tuple[int, int, int]] | None:
        """``P`` or ``Q`` as runs of blocks that are slices of the axis: ``(b0, b1, p0)`` for blocks
        ``b0 <= b < b1`` whose positions are ``p0 + (b - b0) + j`` (one position per block) or
        ``p0 + j`` (a single block of consecutive positions); None when the stack is no union of such runs.

        E.g. the 2r edge blocks of zero padding are two runs, one per edge.
        """
        pos = (self.P if which == "P" else self.Q).tolist()
        if len(pos[0]) > 1:  # each block a run of its own, if its positions are consecutive
            if any(row != list(range(row[0], row[0] + len(row))) for row in pos):
                return None
            return [(b, b + 1, row[0]) for b, row in enumerate(pos)]
        runs = []
        for b, (p,) in enumerate(pos):
            if runs and p == runs[-1][2] + b - runs[-1][0]:
                runs[-1] = (runs[-1][0], b + 1, runs[-1][2])
            else:
                runs.append((b, b + 1, p))
        return runs


@dataclass(frozen=True)
class Geometry:
    """Admissible (p, q) pairs on a ``height x width`` grid and the patch padding.

    A query pixel ``(p_y, p_x)`` may be explained by ``(q_y, q_x)`` iff ``p_y``
    and ``q_y`` share a row block and ``p_x`` and ``q_x`` share a column block.

    Attributes:
        rows: Row-axis blocks.
        cols: Column-axis blocks.
        radius: Patch radius ``r = k // 2``.
        padding: ``"zeros"`` or ``"circular"``: how patches are read across the border.
    """

    rows: tuple[AxisBlocks, ...]
    cols: tuple[AxisBlocks, ...]
    radius: int
    padding: str

    def groups(self) -> list[tuple[AxisBlocks, AxisBlocks]]:
        """All (row stack, column stack) pairs; each is one batched product in the engine."""
        return list(itertools.product(self.rows, self.cols))


def _diagonal(positions: list[int]) -> AxisBlocks:
    """Blocks ({p}, {p}) for each p: the candidate must sit at the query's own position."""
    idx = torch.tensor(positions, dtype=torch.long)[:, None]  # [nb, 1]
    return AxisBlocks(P=idx, Q=idx)


def _dense(p: range, q: range) -> AxisBlocks:
    """One block: every position in ``p`` may be explained by every position in ``q``."""
    return AxisBlocks(
        P=torch.tensor(list(p), dtype=torch.long)[None],  # [1, n_p]
        Q=torch.tensor(list(q), dtype=torch.long)[None],  # [1, n_q]
    )


def _axis(kind: str, padding: str, length: int, radius: int, wrap: bool) -> tuple[AxisBlocks, ...]:
    """Blocks for one axis of the given length (see the module table)."""
    if kind == "ls":
        return (_diagonal(list(range(length))),)
    interior = range(radius, length - radius)  # centres whose patch stays inside
    if padding == "circular":
        if wrap:
            return (_dense(range(length), range(length)),)
        if len(interior) == 0:
            raise ValueError(
                f"patch size {2 * radius + 1} leaves no non-wrapping training patch on an axis "
                f"of length {length} (wrap_training_patches=False needs k <= {length})"
            )
        return (_dense(range(length), interior),)
    edges = [p for p in range(length) if p < radius or p > length - 1 - radius]
    blocks = []
    if len(interior) > 0:
        blocks.append(_dense(interior, interior))
    if edges:
        blocks.append(_diagonal(edges))
    return tuple(blocks)


def make_geometry(
    kind: str, padding: str, height: int, width: int, patch_size: int, *, wrap: bool = True
) -> Geometry:
    """Build the geometry of a patch machine.

    Args:
        kind: ``"ls"`` (local score) or ``"els"`` (equivariant local score).
        padding: ``"zeros"`` (boundary-broken) or ``"circular"`` (torus).
        height: Image height H.
        width: Image width W.
        patch_size: Odd patch size k.
        wrap: Circular ELS only: allow training patches that wrap around the border.
    """
    if kind not in PATCH_KINDS:
        raise ValueError(f"unknown patch machine kind {kind!r}; expected one of {PATCH_KINDS}")
    if padding not in PADDINGS:
        raise ValueError(f"unknown padding {padding!r}; expected one of {PADDINGS}")
    radius = patch_size // 2
    if padding == "zeros" and patch_size > min(height, width):
        raise ValueError(
            f"patch size {patch_size} is larger than the {height}x{width} image (zero padding: at most "
            f"{min(height, width) if min(height, width) % 2 else min(height, width) - 1})"
        )
    if padding == "circular" and radius > min(height, width) - 1:
        raise ValueError(
            f"patch size {patch_size} is too large for circular padding of a {height}x{width} "
            f"image (at most {2 * min(height, width) - 1})"
        )
    return Geometry(
        rows=_axis(kind, padding, height, radius, wrap),
        cols=_axis(kind, padding, width, radius, wrap),
        radius=radius,
        padding=padding,
    )


def scatter_pixels(out: torch.Tensor, res: torch.Tensor, rows: AxisBlocks, cols: AxisBlocks) -> None:
    """Write one group's per-query results to their pixels.

    Args:
        out: ``[B, H, W, *F]`` destination (written in place; may be a view).
        res: ``[nbr * nbc, B * npr * npc, *F]``, query rows ordered (block, sample,
            row position, column position) as the engine lays them out.
        rows: Row blocks of the group (their ``P`` are the query rows).
        cols: Column blocks of the group.
    """
    nbr, npr = rows.P.shape
    nbc, npc = cols.P.shape
    B, F = out.shape[0], res.shape[2:]
    res = res.reshape(nbr, nbc, B, npr, npc, *F)
    P_r = rows.P.to(out.device)[:, :, None, None]  # [nbr, npr, 1, 1]
    P_c = cols.P.to(out.device)[None, None]  # [1, 1, nbc, npc]
    out[:, P_r, P_c] = res.permute(2, 0, 3, 1, 4, *range(5, res.ndim))  # [B, nbr, npr, nbc, npc, *F]
