"""Streaming softmax-weighted means over training patches: the shared engine.

Every machine computes, for each query row ``b`` (a pixel's noisy patch, or a
whole noisy image), the posterior mean

    x0_hat[b] = sum_m softmax_m(logit[b, m]) * value[m],
    logit[b, m] = -|x[b] - a * key[m]|^2 / (2 s2),   a = sqrt(abar), s2 = 1 - abar

(Kamb & Ganguli 2412.20292, Eq. 6-9). The ``|x[b]|^2`` term is the same for
every candidate of a query and cancels in the softmax, so logits come from one
matrix product of *augmented* vectors:

    query'[b] = [(a / s2) x[b], -a^2 / (2 s2)],   key'[m] = [key[m], |key[m]|^2]
    logit[b, m] = <query'[b], key'[m]>

No per-candidate difference image is ever formed. Keys are streamed in chunks
and combined with an online log-sum-exp (running max, rescaled weighted sum),
so memory is bounded by the chunk, not by the training set.

Values carry a trailing column of ones, so the same product that forms the
weighted sum also forms the softmax normaliser.

Exponent floor: shifted logits below ``EXP_FLOOR`` (-80 in float32, -100 in
float64) are raised to it before ``exp``. Vectorised ``exp`` falls back to a
slow path for arguments that underflow (27x slower measured here), and a
candidate that far below the running max carries relative weight at most
``e^-80 = 1.8e-35``; with ``M`` candidates the normaliser and the weighted sum
move by at most ``M * e^-80`` relative (below 1e-24 for M = 1e10), far under
the dtype's rounding error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from patchmosaic.geometry import AxisBlocks

__all__ = [
    "SoftmaxMean",
    "augment_keys",
    "augment_queries",
    "augment_values",
    "logit_coefficients",
    "pad_images",
    "patch_sq_norms",
    "patch_windows",
    "select_blocks",
]


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
    """``[(a / s2) x, -a^2 / (2 s2)]`` for each query row.

    Args:
        x: ``[G, Bq, D]`` query vectors.
        scale: ``[Bq]`` per-row ``a / s2``.
        bias: ``[Bq]`` per-row ``-a^2 / (2 s2)``.

    Returns:
        ``[G, Bq, D + 1]``.
    """
    G, Bq, _ = x.shape
    return torch.cat([x * scale[None, :, None], bias[None, :, None].expand(G, Bq, 1)], dim=-1)


def augment_keys(keys_t: torch.Tensor) -> torch.Tensor:
    """``[key; |key|^2]`` in transposed layout: ``[G, D, M]`` -> ``[G, D + 1, M]``."""
    return torch.cat([keys_t, keys_t.square().sum(1, keepdim=True)], dim=1)


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


class SoftmaxMean:
    """Online softmax-weighted mean of values, streamed over chunks of keys.

    The state is ``(max [G, Bq], acc [G, Bq, V + 1])`` with
    ``acc = sum_m exp(logit_m - max) [value_m, 1]``; chunks can come in any
    order and partial states from disjoint key sets merge exactly (:meth:`merge`).
    """

    def __init__(self, groups: int, rows: int, values: int, *, dtype: torch.dtype, device: torch.device):
        self.max = torch.full((groups, rows), float("-inf"), dtype=dtype, device=device)
        self.acc = torch.zeros((groups, rows, values + 1), dtype=dtype, device=device)
        if dtype not in EXP_FLOOR:
            raise ValueError(
                f"score machines compute in float32 or float64, got {dtype}: lower precision "
                "makes the 1/(1 - alpha_bar)-scaled logits wrong at low noise"
            )
        self.floor = EXP_FLOOR[dtype]

    def update(self, queries: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor) -> None:
        """Fold one chunk of candidates into the running state.

        Args:
            queries: ``[G, Bq, D + 1]`` augmented queries.
            keys_t: ``[G, D + 1, M]`` augmented keys, transposed.
            values: ``[G, M, V + 1]`` augmented values.
        """
        logits = torch.bmm(queries, keys_t)  # [G, Bq, M]
        new_max = torch.maximum(self.max, logits.amax(dim=-1))  # [G, Bq]
        weights = logits.sub_(new_max[..., None]).clamp_(min=self.floor).exp_()  # [G, Bq, M]
        self.acc.mul_(torch.exp(self.max - new_max)[..., None])
        self.acc.baddbmm_(weights, values)  # [G, Bq, V + 1]
        self.max = new_max

    def merge(self, max_: torch.Tensor, acc: torch.Tensor) -> None:
        """Combine with the state of a disjoint set of keys (e.g. another shard)."""
        new_max = torch.maximum(self.max, max_)
        self.acc = self.acc * torch.exp(self.max - new_max)[..., None] + acc * torch.exp(
            max_ - new_max
        )[..., None]
        self.max = new_max

    def mean(self) -> torch.Tensor:
        """The softmax-weighted mean ``[G, Bq, V]``."""
        return self.acc[..., :-1] / self.acc[..., -1:]
