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
"""

from __future__ import annotations

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
    "exact_float32_matmul",
    "flat_patches",
    "logit_coefficients",
    "pad_images",
    "patch_sq_norms",
    "patch_windows",
    "select_blocks",
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


def patch_sq_norms(images: torch.Tensor, radius: int, padding: str) -> torch.Tensor:
    """``|patch|^2`` of every k x k patch (a box filter of the squared image).

    Returns:
        ``[n, H, W]``.
    """
    k = 2 * radius + 1
    sq = pad_images(images.square().sum(1, keepdim=True), radius, padding)  # [n, 1, H+2r, W+2r]
    return F.avg_pool2d(sq, k, stride=1, divisor_override=1)[:, 0]  # [n, H, W]


def flat_patches(images: torch.Tensor, radius: int, padding: str) -> torch.Tensor:
    """Which k x k patches are constant (every pixel and channel equal).

    Returns:
        ``[n, H, W]`` bool; exact comparisons (max pool == min pool).
    """
    k = 2 * radius + 1
    padded = pad_images(images, radius, padding)  # [n, C, H+2r, W+2r]
    hi = F.max_pool2d(padded, k, stride=1).amax(1)  # [n, H, W]
    lo = -F.max_pool2d(-padded, k, stride=1).amax(1)  # [n, H, W], min over the patch and channels
    return hi == lo


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
    if isinstance(r_ix, slice):
        t = t[:, :, r_ix].unsqueeze(2)  # [n, C, 1, n_r, W, ...]
    else:
        t = t[:, :, r_ix.to(t.device)]  # [n, C, nb_r, n_r, W, ...]
    if isinstance(c_ix, slice):
        return t[:, :, :, :, c_ix].unsqueeze(4)  # [n, C, nb_r, n_r, 1, n_c, ...]
    return t[:, :, :, :, c_ix.to(t.device)]  # [n, C, nb_r, n_r, nb_c, n_c, ...]


EXP_FLOOR = {torch.float32: -80.0, torch.float64: -100.0}


EXP_CAP = {torch.float32: 60.0, torch.float64: 300.0}


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

    Args:
        queries: ``[G, Bq, D + 2]`` augmented queries (:func:`augment_queries`);
            the state owns them and writes the shift into their last column.
        values: Value dimension V (without the normaliser column).
    """

    def __init__(self, queries: torch.Tensor, values: int, *, max_logits: int = 1 << 22):
        dtype = queries.dtype
        if dtype not in EXP_FLOOR:
            raise ValueError(
                f"score machines compute in float32 or float64, got {dtype}: lower precision "
                "makes the 1/(1 - alpha_bar)-scaled logits wrong at low noise"
            )
        G, Bq, _ = queries.shape
        self.queries = queries
        self.ref = torch.full((G, Bq), float("-inf"), dtype=dtype, device=queries.device)
        self.acc = torch.zeros((G, Bq, values + 1), dtype=dtype, device=queries.device)
        self.floor, self.cap = EXP_FLOOR[dtype], EXP_CAP[dtype]
        self.max_logits = max_logits
        self._workspace = torch.empty(0, dtype=dtype, device=queries.device)

    def update(self, keys_t: torch.Tensor, values: torch.Tensor) -> None:
        """Fold one chunk of candidates into the running state.

        Query rows are processed in blocks so that one logit block holds at most
        ``max_logits`` elements; each row's arithmetic does not depend on the
        blocking.

        Args:
            keys_t: ``[G, D + 2, M]`` augmented keys, transposed (:func:`augment_keys`).
            values: ``[G, M, V + 1]`` augmented values (:func:`augment_values`).
        """
        G, Bq, _ = self.queries.shape
        M = keys_t.shape[-1]
        if M == 0:  # e.g. a chunk whose patches were all compacted away
            return
        rows = max(1, min(Bq, self.max_logits // max(1, G * M)))
        if self._workspace.numel() < G * rows * M:
            self._workspace = self.queries.new_empty(G * rows * M)
        for start in range(0, Bq, rows):
            sl = slice(start, min(Bq, start + rows))
            self._update_rows(sl, keys_t, values)

    def _logits(self, sl: slice, keys_t: torch.Tensor) -> torch.Tensor:
        """``queries[:, sl] @ keys_t`` into the reusable workspace: ``[G, rows, M]``."""
        G, M = keys_t.shape[0], keys_t.shape[-1]
        rows = sl.stop - sl.start
        out = self._workspace[: G * rows * M].view(G, rows, M)
        return torch.bmm(self.queries[:, sl], keys_t, out=out)

    def _update_rows(self, sl: slice, keys_t: torch.Tensor, values: torch.Tensor) -> None:
        if torch.isinf(self.ref[:, sl]).any():  # first chunk: no reference yet
            self._exact_update(sl, keys_t, values)
            return
        self.queries[:, sl, -1] = -self.ref[:, sl]
        weights = self._logits(sl, keys_t)  # [G, rows, M], logits - ref
        weights.clamp_(min=self.floor, max=self.cap).exp_()
        contrib = torch.bmm(weights, values)  # [G, rows, V + 1]
        if bool((contrib[..., -1] >= 0.999 * math.exp(self.cap)).any()):  # a logit was capped
            self._exact_update(sl, keys_t, values)
            return
        self.acc[:, sl] += contrib
        self._rebase(sl)

    def _exact_update(self, sl: slice, keys_t: torch.Tensor, values: torch.Tensor) -> None:
        """Update rows ``sl`` with the chunk's own maximum (four passes over the logits)."""
        self.queries[:, sl, -1] = 0.0
        logits = self._logits(sl, keys_t)  # [G, rows, M]
        ref = self.ref[:, sl]
        new_ref = torch.maximum(ref, logits.amax(dim=-1))  # [G, rows]
        weights = logits.sub_(new_ref[..., None]).clamp_(min=self.floor).exp_()  # [G, rows, M]
        acc = self.acc[:, sl]
        acc.mul_(torch.exp(ref - new_ref)[..., None])
        acc.baddbmm_(weights, values)  # [G, rows, V + 1]
        self.ref[:, sl] = new_ref
        self._rebase(sl)

    def _rebase(self, sl: slice) -> None:
        """Move the reference of rows ``sl`` to their running log-sum-exp (``acc[..., -1] = 1``)."""
        norm = self.acc[:, sl, -1].clone()  # [G, rows], >= 1 after any chunk (a copy: acc changes below)
        self.acc[:, sl] /= norm[..., None]
        self.ref[:, sl] += torch.log(norm)

    def merge(self, ref: torch.Tensor, acc: torch.Tensor) -> None:
        """Combine with the state ``(ref, acc)`` of a disjoint set of keys (e.g. another shard)."""
        new_ref = torch.maximum(self.ref, ref)
        self.acc = self.acc * torch.exp(self.ref - new_ref)[..., None] + acc * torch.exp(ref - new_ref)[..., None]
        self.ref = new_ref

    def all_reduce(self, group: object = None) -> None:
        """Merge the states of all ranks in ``group`` (each streamed a disjoint shard).

        ``ref`` becomes the maximum over ranks (MAX all-reduce), each rank rescales
        its ``acc`` to it and the results are summed (SUM all-reduce): exactly the
        state of one pass over the union of the shards. A rank whose shard held no
        candidate (``ref = -inf``) contributes zero.
        """
        import torch.distributed as dist

        ref = self.ref.clone()
        dist.all_reduce(ref, op=dist.ReduceOp.MAX, group=group)
        acc = self.acc * torch.exp(self.ref - ref)[..., None]
        dist.all_reduce(acc, op=dist.ReduceOp.SUM, group=group)
        self.ref, self.acc = ref, acc

    def mean(self) -> torch.Tensor:
        """The softmax-weighted mean ``[G, Bq, V]``."""
        return self.acc[..., :-1] / self.acc[..., -1:]
