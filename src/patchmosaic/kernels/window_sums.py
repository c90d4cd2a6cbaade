"""Compiled CPU kernel (Numba) for the ELS machine: logits from shared window sums.

Every block of an ELS geometry (:mod:`patchmosaic.geometry`) asks for every
query pixel ``p`` of one rectangle ``P`` against every training patch centred
in one rectangle ``Q`` of every training image (zero padding: the interior
against the interior, and each row or column within r of an edge against the
same row or column; circular padding: every pixel against every admissible
centre). The engine (:class:`patchmosaic.engine.SoftmaxMean`) forms each logit
with one product of ``D = C k^2`` multiply-adds. For a fixed displacement
``d = q - p`` the products of all pixels share their terms:

    <x_p, t_{p + d}> = sum_{u in window(p)} X(u) T(u + d),

a k x k window sum of one product image ``X(u) T(u + d)`` (``X``, ``T`` the
padded query and training images). This kernel slides that window: per
displacement it keeps the column sums of the k rows under the current query
row (adding the row that enters and subtracting the row that leaves), then
slides along the row the same way. Over all displacements of an
``n x n`` rectangle that costs ``(k + 2 n) / n`` row updates per pair and
axis (about 11 multiply-adds per pair at k = 15 on the 18 x 18 interior of
a 32 x 32 image, against ``D = 225`` for the product).

Lanes are training images: the chunk is laid out ``[n / L, C, H + 2r,
W + 2r, L]`` with ``L = LANES`` images innermost, so every inner loop is a
vector loop over images; every sample and displacement sweeps one lane block
(256 padded 46 x 46 grey images at k = 15: 2.2 MB) while it is in cache.

Per query row the kernel keeps the state of
:class:`patchmosaic.engine.SoftmaxMean` in base 2: a reference ``m`` (the
maximum logit of the first lane block it sees), the normaliser
``s = sum 2^(l - m)``, the weighted sums of the values and, for posterior
statistics, ``sum 2^(2 (l - m))`` and ``sum 2^(l - m) (l - m)``. A lane block
is exponentiated on the current reference in one fused loop; one whose
weights sum beyond ``2^20`` is redone on its own maximum (the state rescaled),
so no weight exceeds ``2^20`` and no sum overflows.

Accuracy (float32 only; float64 runs the engine):

* ``2^x`` is ``2^n`` (exact, built in the exponent bits) times a degree-7
  Taylor polynomial of ``e^(f ln 2)`` on ``|f| <= 1/2``: truncation below
  ``5e-9``, measured relative error ``6e-8`` (float32 rounding).
* Exponents are clamped to ``[-126, 127]``: a candidate more than 126 bits
  (87.3 nats) below the reference weighs ``2^-126`` instead of less, inside
  the engine's float32 floor (``EXP_FLOOR``, -80 nats), so its bound (skipped
  or floored candidates move results by at most ``M e^floor`` relative) holds.
* The sliding sums add and subtract products in another order than one dot
  product; ``tests/test_window_kernel.py`` holds the machine to its float64
  reference (every kind of group, with statistics) within the float32
  engine's tolerance.

:class:`WindowGroups` streams a call's chunks through every group and returns
each group's partial state in the engine's units (``ref`` in nats,
``acc = [weighted values, normaliser]``, ``sq``, ``xl``), which
:meth:`SoftmaxMean.merge` combines exactly. A block of one row (an edge row
of zero padding) has one row displacement; a block of one pixel costs ``D``
multiply-adds per pair, as the product does.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba
import numpy as np
import torch
import torch.nn.functional as F
from numba import types
from numba.extending import intrinsic

from patchmosaic.engine import pad_images, patch_sq_norms

__all__ = ["LANES", "WindowGroups", "WindowState"]

# Training images per lane block (the innermost, vectorised axis). Per (pixel, displacement) the kernel
# pays a fixed cost (a block's reference check, four sums reduced across lanes), so wide blocks win: on
# MNIST (8 samples, 1,008 images, one thread) a dense group took 1.67 / 1.23 / 0.99 / 0.95 s at k = 15 and
# 4.0 / 3.0 / 2.3 / 2.1 s at k = 9 with 64 / 128 / 256 / 512 lanes. The block is read from L2/L3 by
# every sample and displacement; 256 keeps it at 1-2 MB for 32 x 32 grey images.
LANES = 256

_F = np.float32
_LN2 = _F(math.log(2.0))
_P2, _P3, _P4, _P5, _P6, _P7 = (_F(1.0 / math.factorial(i)) for i in range(2, 8))
_ONE, _HALF = _F(1.0), _F(0.5)
_LO, _HI = _F(-126.0), _F(127.0)  # exponent clamp: 2^-126 is float32's smallest normal number
_REDO = _F(2.0**20)  # a lane block whose weights sum beyond this is redone on its own maximum
_NEG = _F(-3.0e38)
# Fast-math without nnan/ninf: the kernel compares with -inf (empty rows) and catches sums that overflowed.
_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


@intrinsic
def _bits_to_float32(typingctx, bits):  # noqa: ARG001 (numba's intrinsic signature)
    """Reinterpret an int32's bits as a float32 (``2^n`` from ``(n + 127) << 23``)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):  # noqa: ARG001
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return sig, codegen


@numba.njit(fastmath=_FASTMATH, inline="always", cache=True)
def _exp2(x):
    """``2^x`` in float32 for ``x`` clamped to [-126, 127] (relative error ~6e-8)."""
    x = min(max(x, _LO), _HI)
    n = np.floor(x + _HALF)
    f = (x - n) * _LN2
    p = _ONE + f * (_ONE + f * (_P2 + f * (_P3 + f * (_P4 + f * (_P5 + f * (_P6 + f * _P7))))))
    return p * _bits_to_float32((np.int32(n) + np.int32(127)) << np.int32(23))


@numba.njit(fastmath=_FASTMATH, inline="always", cache=True)
def _weigh(Hs, nr, v0, sc, bi, ref, w, nl):  # noqa: N803
    """One lane block's weights ``w = 2^(l - ref)`` (logits ``l = sc Hs + bi nr``, base 2), in one vector
    loop with their sum, their sum against the first channel's values ``v0``, ``sum w^2`` and
    ``sum w (l - ref)``."""
    s, a, sq, xl = _F(0.0), _F(0.0), _F(0.0), _F(0.0)
    for lane in range(nl):
        x = sc * Hs[lane] + bi * nr[lane] - ref
        e = _exp2(x)
        w[lane] = e
        s += e
        a += e * v0[lane]
        sq += e * e
        xl += e * x
    return s, a, sq, xl


@numba.njit(fastmath=_FASTMATH, inline="always", cache=True)
def _block_max(Hs, nr, sc, bi, ref, nl):  # noqa: N803
    """The largest ``l - ref`` of one lane block (logits ``l = sc Hs + bi nr``, base 2)."""
    top = _NEG
    for lane in range(nl):
        x = sc * Hs[lane] + bi * nr[lane] - ref
        top = x if x > top else top
    return top


@numba.njit(fastmath=_FASTMATH, nogil=True, cache=True)
def _sweep(X, T, NRM, VAL, scale, bias, P, Q, r, n_images, M, S, ACC, SQ, XL):  # noqa: N803 (math names)
    """Fold every lane block of one chunk into the running state (see the module docstring).

    X ``[B, C, H + 2r, W + 2r]`` padded queries; T ``[nb, C, H + 2r, W + 2r, L]``, NRM ``[nb, H, W, L]``
    (|patch|^2 at each centre) and VAL ``[nb, C, H, W, L]`` the chunk in lane blocks; scale, bias ``[B]``
    in base 2; P, Q ``[G, 4]``: ``(row0, rows, col0, cols)`` of each block's query and centre rectangles
    (every block of a group has the same numbers of query rows and columns); the state arrays M, S, SQ, XL
    ``[G, B, P rows, P cols]`` and ACC ``[G, B, P rows, P cols, C]`` are updated in place.
    """
    B, C = X.shape[0], X.shape[1]
    L = T.shape[4]
    k = 2 * r + 1
    V = np.empty((P[0, 3] + 2 * r, L), np.float32)  # column sums of the k rows under the current query row
    Hs = np.empty(L, np.float32)  # the window sum of the current pixel
    w = np.empty(L, np.float32)
    for blk in range(T.shape[0]):
        nl = min(L, n_images - blk * L)
        Tb, Nb, Vb = T[blk], NRM[blk], VAL[blk]
        for g in range(P.shape[0]):
            pr0, npr, pc0, npc = P[g, 0], P[g, 1], P[g, 2], P[g, 3]
            qr0, nqr, qc0, nqc = Q[g, 0], Q[g, 1], Q[g, 2], Q[g, 3]
            for b in range(B):
                sc, bi = np.float32(scale[b]), np.float32(bias[b])
                for di in range(qr0 - (pr0 + npr - 1), qr0 + nqr - pr0):
                    a0, a1 = max(pr0, qr0 - di), min(pr0 + npr, qr0 + nqr - di)  # query rows with a centre
                    for dj in range(qc0 - (pc0 + npc - 1), qc0 + nqc - pc0):
                        c0, c1 = max(pc0, qc0 - dj), min(pc0 + npc, qc0 + nqc - dj)
                        for v in range(c1 - c0 + 2 * r):  # padded column c0 + v; row a0's window is rows a0..a0+2r
                            Vv = V[v]
                            for lane in range(nl):
                                Vv[lane] = 0
                            for u in range(a0, a0 + k):
                                for c in range(C):
                                    xv = X[b, c, u, c0 + v]
                                    tr = Tb[c, u + di, c0 + v + dj]
                                    for lane in range(nl):
                                        Vv[lane] += xv * tr[lane]
                        for i in range(a0, a1):
                            if i > a0:  # row i + 2r enters the window, row i - 1 leaves it
                                for v in range(c1 - c0 + 2 * r):
                                    Vv = V[v]
                                    for c in range(C):
                                        xa, xs = X[b, c, i + 2 * r, c0 + v], X[b, c, i - 1, c0 + v]
                                        ta = Tb[c, i + 2 * r + di, c0 + v + dj]
                                        ts = Tb[c, i - 1 + di, c0 + v + dj]
                                        for lane in range(nl):
                                            Vv[lane] += xa * ta[lane] - xs * ts[lane]
                            for lane in range(nl):
                                Hs[lane] = 0
                            for v in range(k):
                                Vv = V[v]
                                for lane in range(nl):
                                    Hs[lane] += Vv[lane]
                            for j in range(c0, c1):
                                if j > c0:
                                    Va, Vs = V[j - c0 + 2 * r], V[j - c0 - 1]
                                    for lane in range(nl):
                                        Hs[lane] += Va[lane] - Vs[lane]
                                nr, v0 = Nb[i + di, j + dj], Vb[0, i + di, j + dj]
                                pi, pj = i - pr0, j - pc0
                                m = M[g, b, pi, pj]
                                if m == -np.inf:  # the row's first lane block: its maximum is the reference
                                    m = np.float64(_block_max(Hs, nr, sc, bi, _F(0.0), nl))
                                    M[g, b, pi, pj] = m
                                m32 = np.float32(m)
                                s, a, sq, xl = _weigh(Hs, nr, v0, sc, bi, m32, w, nl)
                                if not s <= _REDO:  # a logit far above the reference (or an overflow): rebase
                                    d = _block_max(Hs, nr, sc, bi, m32, nl)
                                    f = 2.0 ** (-np.float64(d))
                                    s_old = S[g, b, pi, pj]
                                    S[g, b, pi, pj] = s_old * f
                                    for c in range(C):
                                        ACC[g, b, pi, pj, c] *= f
                                    SQ[g, b, pi, pj] *= f * f
                                    XL[g, b, pi, pj] = f * (XL[g, b, pi, pj] - d * s_old)
                                    m += np.float64(d)
                                    M[g, b, pi, pj] = m
                                    m32 = np.float32(m)
                                    s, a, sq, xl = _weigh(Hs, nr, v0, sc, bi, m32, w, nl)
                                S[g, b, pi, pj] += np.float64(s)
                                ACC[g, b, pi, pj, 0] += np.float64(a)
                                SQ[g, b, pi, pj] += np.float64(sq)
                                XL[g, b, pi, pj] += np.float64(xl)
                                for c in range(1, C):
                                    vr = Vb[c, i + di, j + dj]
                                    ac = _F(0.0)
                                    for lane in range(nl):
                                        ac += w[lane] * vr[lane]
                                    ACC[g, b, pi, pj, c] += np.float64(ac)


class WindowState(NamedTuple):
    """A group's partial state in the engine's units, rows ordered as the engine's (block, sample, row,
    column): ``ref [G, R]`` (nats), ``acc [G, R, C + 1]`` (weighted values and normaliser on ``ref``),
    ``sq`` and ``xl [G, R]``."""

    ref: torch.Tensor
    acc: torch.Tensor
    sq: torch.Tensor
    xl: torch.Tensor


def _lane_blocks(t: torch.Tensor, width: int) -> np.ndarray:
    """``[n, ...]`` -> ``[ceil(n / width), ..., width]`` (images innermost; the last block zero-filled)."""
    n = t.shape[0]
    nb = -(-n // width)
    lanes = t.movedim(0, -1)
    if nb * width != n:
        lanes = F.pad(lanes, (0, nb * width - n))
    return lanes.reshape(lanes.shape[:-1] + (nb, width)).movedim(-2, 0).contiguous().numpy()


def _runs(pos: torch.Tensor, what: str) -> np.ndarray:
    """``[nb, 2]``: ``(first, count)`` of each block of ``pos [nb, n]``, whose positions must be consecutive."""
    first = pos[:, :1]
    if not bool((pos == first + torch.arange(pos.shape[1])).all()):
        raise ValueError(f"the window-sum kernel needs {what} in blocks of consecutive positions")
    return np.stack([first[:, 0].numpy(), np.full(pos.shape[0], pos.shape[1])], axis=1).astype(np.int64)


class WindowGroups:
    """The running states of ELS geometry groups over every chunk of a call, one compiled sweep per chunk.

    Args:
        x_t: ``[B, C, H, W]`` float32 CPU queries.
        coeffs: ``(scale [B], bias [B])``: ``logit = scale <x, key> + bias |key|^2`` (nats).
        groups: ``(rows, cols)`` :class:`patchmosaic.geometry.AxisBlocks` per group; every block's
            query and centre positions consecutive on each axis (true of every ELS geometry).
        radius: Patch radius r (k = 2r + 1).
        padding: ``"zeros"`` or ``"circular"``: how windows extend past the image.
    """

    def __init__(self, x_t: torch.Tensor, coeffs: tuple[torch.Tensor, torch.Tensor], groups: list,
                 radius: int, padding: str):
        if x_t.dtype != torch.float32 or x_t.device.type != "cpu":
            raise ValueError(f"the window-sum kernel runs float32 on the CPU, got {x_t.dtype} on {x_t.device}")
        self.radius, self.padding = radius, padding
        B, C = x_t.shape[:2]
        log2e = 1.0 / math.log(2.0)
        scale, bias = coeffs
        self.scale = (scale.double() * log2e).contiguous().numpy()
        self.bias = (bias.double() * log2e).contiguous().numpy()
        self.X = pad_images(x_t, radius, padding).contiguous().numpy()
        self.lanes = LANES
        self.groups = []  # per group: P, Q [G, 4] and its state arrays
        for rows, cols in groups:
            pr, qr = _runs(rows.P, "query rows"), _runs(rows.Q, "centre rows")
            pc, qc = _runs(cols.P, "query columns"), _runs(cols.Q, "centre columns")
            nbr, nbc = pr.shape[0], pc.shape[0]
            # blocks ordered (row block, column block), as the engine's group queries
            P = np.concatenate([np.repeat(pr, nbc, axis=0), np.tile(pc, (nbr, 1))], axis=1)
            Q = np.concatenate([np.repeat(qr, nbc, axis=0), np.tile(qc, (nbr, 1))], axis=1)
            shape = (nbr * nbc, B, int(pr[0, 1]), int(pc[0, 1]))
            state = (np.full(shape, -np.inf), np.zeros(shape), np.zeros(shape + (C,)), np.zeros(shape),
                     np.zeros(shape))  # M, S, ACC, SQ, XL in float64
            pairs = B * int((P[:, 1] * P[:, 3] * Q[:, 1] * Q[:, 3]).sum())  # per training image
            self.groups.append((np.ascontiguousarray(P), np.ascontiguousarray(Q), state, pairs))
        self.pairs = [0] * len(self.groups)  # (query row, candidate) pairs folded in, per group
        self._pending: torch.Tensor | None = None  # images waiting for a full lane block

    def update(self, chunk: torch.Tensor) -> None:
        """Fold one chunk ``[n, C, H, W]`` of training images into every group's state.

        Images are swept in whole lane blocks: up to ``lanes - 1`` of them wait for the next chunk
        (or :meth:`states`), so chunks of any size fill the vector lanes.
        """
        if self._pending is not None:
            chunk = torch.cat([self._pending, chunk])
        full = chunk.shape[0] // self.lanes * self.lanes
        self._pending = chunk[full:].clone() if full < chunk.shape[0] else None
        if full:
            self._sweep(chunk[:full])

    def _sweep(self, images: torch.Tensor) -> None:
        r, L = self.radius, self.lanes
        T = _lane_blocks(pad_images(images, r, self.padding), L)
        NRM = _lane_blocks(patch_sq_norms(images, r, self.padding), L)  # |patch|^2 at each centre
        VAL = _lane_blocks(images, L)
        for i, (P, Q, state, pairs) in enumerate(self.groups):
            _sweep(self.X, T, NRM, VAL, self.scale, self.bias, P, Q, r, images.shape[0], *state)
            self.pairs[i] += pairs * images.shape[0]

    def states(self) -> list[WindowState]:
        """Each group's partial state in the engine's units (rows with no candidate: ``ref = -inf``,
        ``acc = 0``), after sweeping the images still waiting for a full lane block."""
        if self._pending is not None:
            self._sweep(self._pending)
            self._pending = None
        ln2 = math.log(2.0)
        out = []
        for _, _, (M, S, ACC, SQ, XL), _ in self.groups:
            G = M.shape[0]
            S_ = torch.from_numpy(S).reshape(G, -1)
            acc = torch.cat([torch.from_numpy(ACC).reshape(G, S_.shape[1], -1), S_[..., None]], dim=-1)
            out.append(WindowState(*(t.float() for t in (torch.from_numpy(M).reshape(G, -1) * ln2, acc,
                                                          torch.from_numpy(SQ).reshape(G, -1),
                                                          torch.from_numpy(XL).reshape(G, -1) * ln2))))
        return out
