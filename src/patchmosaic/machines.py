"""Training-free score machines (Kamb & Ganguli 2412.20292, Sec. 3).

A :class:`ScoreMachine` holds a training set and returns the posterior mean
``E[x0 | x_t]`` under the forward process
``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps`` for one of four constrained
denoisers:

* ``"ideal"`` (IS): softmax over whole training images; it memorises.
* ``"es"`` (ES): softmax over every training image at every circular shift.
* ``"ls"`` (LS): each pixel p sees the k x k patch around p; candidates are
  the training images' patches at the same location p.
* ``"els"`` (ELS): candidates are (image i, centre q) for every admissible q
  (see :mod:`patchmosaic.geometry`); the output pixel is the weighted centre
  pixel of the training patch.

All four run on :class:`patchmosaic.engine.SoftmaxMean`; LS and ELS differ only
in their :class:`patchmosaic.geometry.Geometry`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from patchmosaic.engine import (
    SoftmaxMean,
    augment_keys,
    augment_queries,
    augment_values,
    exact_float32_matmul,
    flat_patches,
    logit_coefficients,
    patch_sq_norms,
    patch_windows,
    select_blocks,
)
from patchmosaic.geometry import PADDINGS, AxisBlocks, Geometry, make_geometry, scatter_pixels
from patchmosaic.provenance import Provenance
from patchmosaic.schedules import CosineSchedule, PatchSchedule, check_patch_size

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "KINDS", "MachineDenoiser", "ScoreMachine"]

KINDS = ("ideal", "es", "ls", "els")

# Default bound on the elements of one chunk's logit block (and patch tensor):
# 2**22 float32 values = 16 MiB, so the streaming pass stays in that budget.
DEFAULT_CHUNK_ELEMENTS = 2**22

# A shared-candidate chunk whose constant patches make up at least this
# fraction is compacted: its constant patches are collapsed into one candidate
# per value with a multiplicity (MNIST at k=3: 59% of the patches are constant).
FLAT_COMPACTION_MIN_FRACTION = 0.125

# The |key|^2 slot of an absent (padding) candidate: its logit -a^2/(2 s2) * 1e30
# lies far below every real candidate's, so it is floored to exp(EXP_FLOOR) and,
# with a zero value row, adds nothing to the mean.
ABSENT_NORM = 1e30


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} contains NaN or infinite values")


def _patch_ids(img: torch.Tensor, q_row: torch.Tensor, q_col: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Candidate id ``(image * H + q_row) * W + q_col`` of a training patch (broadcasts)."""
    return (img * H + q_row) * W + q_col


def _tally(
    block: torch.Tensor, value: torch.Tensor, ids: torch.Tensor | None = None, counts: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Group constant patches by (block, value).

    Args:
        block: ``[F]`` block index g of each constant patch (or partial tally row).
        value: ``[F]`` its value; ids ``[F]`` its candidate id (optional: provenance);
            counts ``[F]`` how many patches each row stands for (default 1).

    Returns:
        ``(rows [U, 2] = (block, value), counts [U], lowest id [U] or None)``, sorted by block.
    """
    uv, inv_v = torch.unique(value, return_inverse=True)  # [V]
    key = block * uv.numel() + inv_v  # [F], orders by block, then value
    uk, inverse = torch.unique(key, return_inverse=True)  # [U]
    n = torch.zeros(uk.numel(), dtype=torch.long, device=key.device)
    n.index_add_(0, inverse, torch.ones_like(key) if counts is None else counts.long())
    first = None
    if ids is not None:
        first = torch.full((uk.numel(),), torch.iinfo(torch.long).max, dtype=torch.long, device=key.device)
        first.scatter_reduce_(0, inverse, ids, reduce="amin")
    rows = torch.stack([(uk // uv.numel()).to(value.dtype), uv[uk % uv.numel()]], dim=1)  # [U, 2]
    return rows, n, first


class ScoreMachine:
    """Closed-form optimal denoiser under locality/equivariance constraints.

    Args:
        train_images: ``[N, C, H, W]`` floating training images (e.g. in [-1, 1]).
        kind: ``"ideal"``, ``"es"``, ``"ls"`` or ``"els"``.
        padding: ``"zeros"`` or ``"circular"`` (ES needs ``"circular"``).
        labels: Optional ``[N]`` integer class labels, enabling ``label=`` conditioning.
        wrap_training_patches: Circular ELS only. ``False`` keeps only training
            patches that do not wrap around the border (as the paper's released code).
        chunk_elements: Memory bound per streamed chunk (elements of the logit block).
        distributed: Shard the training set across the processes of the default
            ``torch.distributed`` group (gloo on CPU, NCCL on GPU): each rank keeps
            and streams a contiguous 1/world of the images, and the per-pixel
            (log-sum-exp reference, weighted sum) partials are merged with two
            all-reduces, giving the single-process result. Every rank must call
            ``denoise`` with the same inputs.
    """

    def __init__(
        self,
        train_images: torch.Tensor | np.ndarray,
        *,
        kind: str,
        padding: str = "zeros",
        labels: torch.Tensor | np.ndarray | Sequence[int] | None = None,
        wrap_training_patches: bool = True,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        distributed: bool = False,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown machine kind {kind!r}; expected one of {KINDS}")
        if padding not in PADDINGS:
            raise ValueError(f"unknown padding {padding!r}; expected one of {PADDINGS}")
        if kind == "es" and padding != "circular":
            raise ValueError(
                "the equivariant score machine (kind='es') is defined for circular padding only"
            )
        if not wrap_training_patches and not (kind == "els" and padding == "circular"):
            raise ValueError(
                "wrap_training_patches=False applies to kind='els' with padding='circular' only"
            )
        images = torch.as_tensor(train_images)
        if images.ndim != 4:
            raise ValueError(
                f"train_images must have shape [N, C, H, W], got {tuple(images.shape)}"
            )
        if images.shape[0] == 0:
            raise ValueError("empty training set: train_images has N = 0 images")
        if not images.is_floating_point():
            raise ValueError(
                f"train_images must be floating point (e.g. scaled to [-1, 1]), got {images.dtype}"
            )
        _check_finite(images, "train_images")
        self.rank, self.world = 0, 1
        if distributed:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError(
                    "distributed=True needs torch.distributed.init_process_group() first "
                    "(run under torchrun)"
                )
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        N = images.shape[0]
        lo, hi = self.rank * N // self.world, (self.rank + 1) * N // self.world
        self.num_train = N  # the whole training set, over all shards
        self.images = images[lo:hi]  # [N_shard, C, H, W], this process's shard
        self.kind = kind
        self.padding = padding
        self.wrap_training_patches = wrap_training_patches
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements must be positive, got {chunk_elements}")
        self.chunk_elements = int(chunk_elements)
        self.labels: torch.Tensor | None = None
        self._classes: list[int] = []  # over the whole training set
        self._class_index: dict[int, torch.Tensor] = {}  # positions in this shard
        if labels is not None:
            lab = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels)
            if lab.ndim != 1 or lab.shape[0] != images.shape[0]:
                raise ValueError(
                    f"labels must have shape [N] = [{images.shape[0]}], got {tuple(lab.shape)}"
                )
            if lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
                raise ValueError(f"labels must be integers, got {lab.dtype}")
            self._classes = [int(c) for c in torch.unique(lab).tolist()]
            self.labels = lab.to(torch.long)[lo:hi]
            for c in self._classes:
                self._class_index[c] = torch.nonzero(self.labels == c).flatten()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the training images."""
        _, C, H, W = self.images.shape
        return C, H, W

    def __repr__(self) -> str:
        _, C, H, W = self.images.shape
        shard = f", shard {self.rank}/{self.world}" if self.world > 1 else ""
        return (
            f"ScoreMachine(kind={self.kind!r}, padding={self.padding!r}, N={self.num_train}{shard}, "
            f"image=({C}, {H}, {W}), labels={'yes' if self.labels is not None else 'no'})"
        )

    # ------------------------------------------------------------------ inputs
    def _check_query(self, x_t: torch.Tensor) -> None:
        if not torch.is_tensor(x_t):
            raise ValueError(f"x_t must be a torch tensor, got {type(x_t).__name__}")
        C, H, W = self.image_shape
        if x_t.ndim == 3:
            raise ValueError(
                f"x_t has shape {tuple(x_t.shape)}: missing batch dimension, expected "
                f"[B, {C}, {H}, {W}] (use x_t[None] for one image)"
            )
        if x_t.ndim != 4:
            raise ValueError(f"x_t must have shape [B, C, H, W], got {tuple(x_t.shape)}")
        if x_t.shape[1] != C:
            raise ValueError(f"x_t has {x_t.shape[1]} channels but the training images have {C}")
        if tuple(x_t.shape[2:]) != (H, W):
            raise ValueError(
                f"x_t is {x_t.shape[2]}x{x_t.shape[3]} but the training images are {H}x{W}"
            )
        if not x_t.is_floating_point():
            raise ValueError(f"x_t must be floating point, got {x_t.dtype}")
        if x_t.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"x_t is {x_t.dtype}: score machines compute in float32 or float64 (lower "
                "precision makes the 1/(1 - alpha_bar)-scaled logits wrong at low noise)"
            )
        _check_finite(x_t, "x_t")

    @staticmethod
    def _alpha_bar_vector(alpha_bar: torch.Tensor | float, x_t: torch.Tensor) -> torch.Tensor:
        ab = torch.as_tensor(alpha_bar, dtype=x_t.dtype, device=x_t.device)
        B = x_t.shape[0]
        if ab.ndim == 0:
            ab = ab.expand(B)
        if ab.shape != (B,):
            raise ValueError(f"alpha_bar must be a float or a [B] = [{B}] tensor, got shape {tuple(ab.shape)}")
        if not torch.isfinite(ab).all() or not ((ab > 0) & (ab < 1)).all():
            raise ValueError(f"alpha_bar must lie strictly inside (0, 1), got {ab.tolist()}")
        return ab.contiguous()

    def _label_vector(self, label: int | torch.Tensor | None, batch: int) -> torch.Tensor | None:
        if label is None:
            return None
        if self.labels is None:
            raise ValueError("label given but the machine was built without training labels")
        lab = torch.as_tensor(label)
        if lab.is_floating_point():
            raise ValueError(f"label must be an integer or an integer [B] tensor, got {lab.dtype}")
        lab = lab.to(torch.long).flatten() if lab.ndim else lab.to(torch.long).expand(batch)
        if lab.shape != (batch,):
            raise ValueError(f"label must be an int or a [B] = [{batch}] tensor, got {tuple(lab.shape)}")
        missing = sorted(set(lab.tolist()) - set(self._classes))
        if missing:
            raise ValueError(
                f"label(s) {missing} not present in the training labels (classes: {self._classes})"
            )
        return lab

    # --------------------------------------------------------------- denoise
    def denoise(
        self,
        x_t: torch.Tensor,
        alpha_bar: torch.Tensor | float,
        *,
        patch_size: int | None = None,
        label: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Posterior mean ``E[x0 | x_t]`` of this machine.

        Args:
            x_t: ``[B, C, H, W]`` noisy images.
            alpha_bar: Float or ``[B]`` tensor in (0, 1).
            patch_size: Odd patch size k; required for ``"ls"``/``"els"``, must be
                ``None`` for ``"ideal"``/``"es"``.
            label: ``None``, an int, or a ``[B]`` tensor: restricts each sample's
                training set to that class.

        Returns:
            ``[B, C, H, W]`` estimate of x0, in the dtype of ``x_t``.
        """
        self._check_query(x_t)
        ab = self._alpha_bar_vector(alpha_bar, x_t)  # [B]
        x0, _ = self._run(x_t, logit_coefficients(ab), patch_size, label, track=None)
        return x0

    def denoise_provenance(
        self,
        x_t: torch.Tensor,
        alpha_bar: torch.Tensor | float,
        *,
        patch_size: int | None = None,
        label: int | torch.Tensor | None = None,
        top: int = 8,
    ) -> tuple[torch.Tensor, Provenance]:
        """:meth:`denoise` plus, per output pixel, where its value came from.

        Computed in the same streaming pass (no second pass over the training
        set): the ``top`` candidates of the pixel's softmax (training image,
        patch centre q, weight), the effective number of contributing patches
        ``N_eff = 1 / sum_m w_m^2`` and the posterior entropy ``-sum_m w_m log w_m``.
        For IS the candidates are whole images (q = p); for ES shifted images
        (q = p - shift, mod the image size); for LS/ELS training patches.
        Constant training patches (every pixel equal) of one value form one
        entry, with ``count`` positions and the lowest-id position as its
        representative; ``N_eff`` and the entropy count every position.

        Args:
            x_t, alpha_bar, patch_size, label: As for :meth:`denoise`.
            top: Entries per pixel (0: only ``N_eff`` and entropy).

        Returns:
            ``(x0_hat [B, C, H, W], provenance)``; ``x0_hat`` equals :meth:`denoise`
            up to float rounding.
        """
        self._check_query(x_t)
        ab = self._alpha_bar_vector(alpha_bar, x_t)  # [B]
        return self._run(x_t, logit_coefficients(ab), patch_size, label, track=self._check_top(top))

    def nearest_patches(
        self,
        x: torch.Tensor,
        *,
        patch_size: int | None = None,
        label: int | torch.Tensor | None = None,
        top: int = 1,
    ) -> Provenance:
        """For each pixel of ``x``, the admissible training candidates nearest in l2.

        The same candidates as :meth:`denoise_provenance` ranked by
        ``-|x_patch - X_patch|^2 / 2`` (the noiseless limit of the logits), so
        ``index``/``source`` of entry 0 name the l2-nearest training patch. The
        ``weight``, ``n_eff`` and ``entropy`` fields are those of a softmax over
        ``-|x_patch - X_patch|^2 / 2``.

        Args:
            x: ``[B, C, H, W]`` images (e.g. finished samples).
            patch_size, label: As for :meth:`denoise`.
            top: Nearest candidates per pixel (>= 1).
        """
        self._check_query(x)
        if top < 1:
            raise ValueError(f"top must be at least 1, got {top}")
        B = x.shape[0]
        coeffs = (x.new_ones(B), x.new_full((B,), -0.5))  # logit = <x, X> - |X|^2 / 2
        return self._run(x, coeffs, patch_size, label, track=self._check_top(top))[1]

    @staticmethod
    def _check_top(top: int) -> int:
        if isinstance(top, bool) or not isinstance(top, int) or top < 0:
            raise ValueError(f"top must be a non-negative integer, got {top!r}")
        return top

    def _geometry(self, patch_size: int | None) -> Geometry | None:
        if self.kind in ("ls", "els"):
            if patch_size is None:
                raise ValueError(f"kind={self.kind!r} needs a patch_size (odd integer)")
            k = check_patch_size(patch_size)
            _, H, W = self.image_shape
            return make_geometry(self.kind, self.padding, H, W, k, wrap=self.wrap_training_patches)
        if patch_size is not None:
            raise ValueError(f"patch_size does not apply to kind={self.kind!r}; pass None")
        return None

    def _run(
        self,
        x_t: torch.Tensor,
        coeffs: tuple[torch.Tensor, torch.Tensor],
        patch_size: int | None,
        label: int | torch.Tensor | None,
        track: int | None,
    ) -> tuple[torch.Tensor, Provenance | None]:
        """Softmax means (and provenance when ``track`` is not None) for every class in the batch."""
        geometry = self._geometry(patch_size)
        labels = self._label_vector(label, x_t.shape[0])
        offset = self.rank * self.num_train // self.world  # global index of this shard's first image
        if labels is None:
            ids = offset + torch.arange(self.images.shape[0])  # [N_shard]
            return self._run_subset(x_t, coeffs, self.images, ids, geometry, track)
        out = torch.empty_like(x_t)
        parts = []
        for c in torch.unique(labels).tolist():
            rows = torch.nonzero(labels == c).flatten()
            subset = self._class_index[c]
            scale, bias = coeffs
            out[rows], prov = self._run_subset(
                x_t[rows], (scale[rows], bias[rows]), self.images[subset], offset + subset, geometry, track
            )
            parts.append((rows, prov))
        if track is None:
            return out, None
        return out, Provenance.scatter(parts, x_t.shape[0])

    def _run_subset(
        self,
        x_t: torch.Tensor,
        coeffs: tuple[torch.Tensor, torch.Tensor],
        train: torch.Tensor,
        train_ids: torch.Tensor,
        geometry: Geometry | None,
        track: int | None,
    ) -> tuple[torch.Tensor, Provenance | None]:
        with exact_float32_matmul():
            if geometry is not None:
                return self._denoise_patches(x_t, coeffs, train, train_ids, geometry, track)
            return self._denoise_global(x_t, coeffs, train, train_ids, track)

    def score(self, x_t: torch.Tensor, alpha_bar: torch.Tensor | float, **kwargs: object) -> torch.Tensor:
        """Score ``-(x_t - sqrt(abar) x0_hat) / (1 - abar)`` of the machine."""
        ab = self._alpha_bar_vector(alpha_bar, x_t)[:, None, None, None]  # [B, 1, 1, 1]
        x0 = self.denoise(x_t, alpha_bar, **kwargs)
        return -(x_t - ab.sqrt() * x0) / (1.0 - ab)

    @staticmethod
    def _update_compacted(
        state: SoftmaxMean,
        rows: AxisBlocks,
        cols: AxisBlocks,
        chunk: torch.Tensor,
        t_win: torch.Tensor,
        norms: torch.Tensor,
        flat: torch.Tensor,
        found: list[tuple[torch.Tensor, ...]],
        img_ids: torch.Tensor | None = None,
    ) -> bool:
        """Stream a shared-candidate group's chunk without its constant patches.

        Constant patches are only tallied ((block 0, value), count) into
        ``found`` (:func:`_tally`); they enter the softmax once per value with
        their multiplicity at the end (:meth:`_update_flat`), which is exact:
        ``m * exp(l) = exp(l + log m)``. With ``img_ids`` (the chunk's global
        image ids; provenance) the chunk is always compacted, and candidates
        and tallies carry their ids (a value's lowest).

        Returns:
            False (and does nothing) when too few patches are constant to pay.
        """
        is_flat = select_blocks(flat, rows, cols, "Q")[:, 0, 0, :, 0, :]  # [n, nqr, nqc]
        if img_ids is None and float(is_flat.float().mean()) < FLAT_COMPACTION_MIN_FRACTION:
            return False
        C, H, W = chunk.shape[1:]
        k = t_win.shape[-1]
        D = C * k * k
        img, a, b = torch.nonzero(~is_flat, as_tuple=True)  # [M'] each
        y, x = rows.Q[0].to(a.device)[a], cols.Q[0].to(b.device)[b]  # [M'] pixel positions
        M = img.shape[0]
        keys_t = chunk.new_empty(1, D + 2, M)  # [key; |key|^2; 1], transposed
        keys_t[0, :D] = t_win[img, :, y, x].reshape(M, D).T
        keys_t[0, D] = norms[img, 0, y, x]
        keys_t[0, D + 1] = 1.0
        ids = None if img_ids is None else _patch_ids(img_ids[img], y, x, H, W)[None]  # [1, M']
        state.update(keys_t, augment_values(chunk[img, :, y, x][None]), ids=ids)  # values [1, M', C + 1]
        img, a, b = torch.nonzero(is_flat, as_tuple=True)
        y, x = rows.Q[0].to(a.device)[a], cols.Q[0].to(b.device)[b]
        if img.numel():
            ids = None if img_ids is None else _patch_ids(img_ids[img], y, x, H, W)
            found.append(_tally(torch.zeros_like(img), chunk[img, 0, y, x], ids))
        return True

    @staticmethod
    def _update_tracked(
        state: SoftmaxMean,
        keys_t: torch.Tensor,
        centres: torch.Tensor,
        ids: torch.Tensor,
        is_flat: torch.Tensor,
        found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    ) -> None:
        """Stream one group's chunk for provenance: constant patches are set aside.

        Every block g keeps its non-constant candidates (padded to a common
        length with absent candidates: zero value row, a key whose ``|key|^2``
        slot is ``ABSENT_NORM`` so its logit is far below any real one, id -1).
        Constant patches are tallied per (g, value) with their count and lowest
        id into ``found`` and enter once per value at the end
        (:meth:`_update_flat`), so a constant value is one entry.

        Args:
            keys_t: ``[G, D + 2, M]`` augmented keys; centres ``[G, M, C]``;
                ids ``[G, M]``; is_flat ``[G, M]`` bool.
        """
        G, D2, M = keys_t.shape
        C = centres.shape[-1]
        if bool(is_flat.any()):
            g, m = torch.nonzero(is_flat, as_tuple=True)  # [F] each
            found.append(_tally(g, centres[g, m, 0], ids[g, m]))
            keep = ~is_flat
            n_keep = keep.sum(1)  # [G]
            width = int(n_keep.max())
            if width == 0:
                return
            order = torch.argsort(is_flat.to(torch.int8), dim=1, stable=True)[:, :width]  # [G, width], kept first
            real = torch.arange(width, device=ids.device) < n_keep[:, None]  # [G, width]
            keys_t = keys_t.gather(2, order[:, None, :].expand(G, D2, width))
            keys_t[:, : D2 - 2] *= real[:, None, :]
            keys_t[:, D2 - 2] = torch.where(real, keys_t[:, D2 - 2], ABSENT_NORM)
            centres = centres.gather(1, order[..., None].expand(G, width, C)) * real[..., None]
            ids = ids.gather(1, order).masked_fill(~real, -1)
            values = augment_values(centres) * real[..., None]
        else:
            values = augment_values(centres)
        state.update(keys_t, values, ids=ids)

    @staticmethod
    def _update_flat(
        state: SoftmaxMean, found: list[tuple[torch.Tensor, ...]], G: int, C: int, D: int
    ) -> None:
        """Add the constant patches tallied (:func:`_tally`) by :meth:`_update_compacted` or
        :meth:`_update_tracked`: one candidate per (block, value), with its multiplicity.

        Blocks are padded to a common width with absent candidates (count 0).
        """
        rows = torch.cat([u for u, _, _ in found])  # [F, 2] (block, value)
        tracked = found[0][2] is not None
        uniq, counts, first = _tally(
            rows[:, 0].long(), rows[:, 1], torch.cat([f for _, _, f in found]) if tracked else None,
            torch.cat([c for _, c, _ in found]),
        )
        U = uniq.shape[0]
        g = uniq[:, 0].long()  # [U], sorted by block
        slot = torch.arange(U, device=g.device) - torch.searchsorted(g, g)  # position within its block
        width = int(slot.max()) + 1
        value = uniq.new_zeros(G, width)
        count = uniq.new_zeros(G, width)
        value[g, slot], count[g, slot] = uniq[:, 1], counts.to(uniq.dtype)
        ids = None
        if tracked:
            ids = torch.full((G, width), -1, dtype=torch.long, device=g.device)
            ids[g, slot] = first
        real = count > 0
        norm = torch.where(real, D * value.square(), ABSENT_NORM)
        keys_t = torch.cat([value[:, None].expand(G, D, width), norm[:, None], torch.ones_like(norm)[:, None]], dim=1)
        weighted = torch.stack([value] * C + [torch.ones_like(value)], dim=-1) * count[..., None]  # [G, width, C + 1]
        state.update(keys_t, weighted, ids=ids, counts=count)

    def _gather_tallies(self, found: list[tuple[torch.Tensor, ...]]) -> list[tuple[torch.Tensor, ...]]:
        """All shards' constant-patch tallies on rank 0 (none elsewhere), so each value is one entry.

        Every rank must call this for the same groups in the same order.
        """
        if self.world == 1:
            return found
        import torch.distributed as dist

        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, [tuple(t.cpu() for t in f) for f in found])
        if self.rank != 0:
            return []
        device = self.images.device if not found else found[0][0].device
        return [tuple(t.to(device) for t in f) for part in gathered for f in part]

    def _reduce(self, states: list[SoftmaxMean]) -> None:
        """Merge the partial states of all shards (no-op in a single process)."""
        if self.world > 1:
            for state in states:
                state.all_reduce()

    def _chunks(
        self, train: torch.Tensor, per_image: int, like: torch.Tensor
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, images)``: training images in chunks of at most ``chunk_elements / per_image``.

        ``per_image`` must not depend on the query batch, so that every sample's
        result is independent of which other samples share its batch.
        """
        n = max(1, self.chunk_elements // max(1, per_image))
        for start in range(0, train.shape[0], n):
            yield start, train[start : start + n].to(device=like.device, dtype=like.dtype)

    def _denoise_global(
        self,
        x_t: torch.Tensor,
        coeffs: tuple[torch.Tensor, torch.Tensor],
        train: torch.Tensor,
        train_ids: torch.Tensor,
        track: int | None,
    ) -> tuple[torch.Tensor, Provenance | None]:
        """IS and ES: candidates are whole (shifted) training images."""
        B, C, H, W = x_t.shape
        queries = augment_queries(x_t.reshape(1, B, C * H * W), *coeffs)  # [1, B, CHW+2]
        state = SoftmaxMean(queries, C * H * W, max_logits=self.chunk_elements, track=track)
        shifts = 1 if self.kind == "ideal" else H * W
        if self.kind == "es":
            # roll(X, (sy, sx))[y, x] = X[(y - sy) % H, (x - sx) % W]
            ys = (torch.arange(H)[None, :] - torch.arange(H)[:, None]) % H  # [sy, y]
            xs = (torch.arange(W)[None, :] - torch.arange(W)[:, None]) % W  # [sx, x]
            ys, xs = ys.to(x_t.device), xs.to(x_t.device)
        per_image = shifts * C * H * W  # key elements of one training image
        for start, chunk in self._chunks(train, per_image, x_t):
            n = chunk.shape[0]
            if self.kind == "ideal":
                cand = chunk.reshape(1, n, C * H * W)  # [1, n, CHW]
            else:
                rolled = chunk[:, :, ys[:, None, :, None], xs[None, :, None, :]]  # [n, C, sy, sx, y, x]
                cand = rolled.permute(0, 2, 3, 1, 4, 5).reshape(1, n * H * W, C * H * W)
            ids = None
            if track:  # image id, times the shift (sy, sx) for ES: [1, n * shifts]
                img = train_ids[start : start + n].to(x_t.device)
                ids = (img[:, None] * shifts + torch.arange(shifts, device=x_t.device)).reshape(1, -1)
            state.update(augment_keys(cand.transpose(1, 2)), augment_values(cand), ids=ids)
        self._reduce([state])
        x0 = state.mean().reshape(B, C, H, W)
        if track is None:
            return x0, None
        return x0, Provenance.from_global(state, self.kind, H, W)

    def _denoise_patches(
        self,
        x_t: torch.Tensor,
        coeffs: tuple[torch.Tensor, torch.Tensor],
        train: torch.Tensor,
        train_ids: torch.Tensor,
        geometry: Geometry,
        track: int | None,
    ) -> tuple[torch.Tensor, Provenance | None]:
        """LS and ELS: per-pixel softmax over admissible training patches."""
        B, C, H, W = x_t.shape
        r, pad = geometry.radius, geometry.padding
        k = 2 * r + 1
        D = C * k * k
        scale, bias = coeffs  # [B], [B]
        x_win = patch_windows(x_t, r, pad)  # [B, C, H, W, k, k]
        plan = []  # (rows, cols, augmented queries, state) per group
        per_image = (C + 1) * (H + 2 * r) * (W + 2 * r)  # padded copy of one training image
        for rows, cols in geometry.groups():
            nbr, npr = rows.P.shape
            nbc, npc = cols.P.shape
            q = select_blocks(x_win, rows, cols, "P")  # [B, C, nbr, npr, nbc, npc, k, k]
            q = q.permute(2, 4, 0, 3, 5, 1, 6, 7).reshape(nbr * nbc, B * npr * npc, D)
            rep = npr * npc
            queries = augment_queries(q, scale.repeat_interleave(rep), bias.repeat_interleave(rep))
            plan.append((rows, cols, SoftmaxMean(queries, C, max_logits=self.chunk_elements, track=track)))
            per_image = max(per_image, nbr * nbc * rows.Q.shape[1] * cols.Q.shape[1] * max(rep, D + 2))
        shared = [i for i, (rows, cols, _) in enumerate(plan) if rows.Q.shape[0] == cols.Q.shape[0] == 1]
        compact = {i: [] for i in (shared if track is None else range(len(plan)))}  # constant patches set aside
        for start, chunk in self._chunks(train, per_image, x_t):
            img = train_ids[start : start + chunk.shape[0]].to(x_t.device)  # [n] global image ids
            t_win = patch_windows(chunk, r, pad)  # [n, C, H, W, k, k] view
            norms = patch_sq_norms(chunk, r, pad)[:, None]  # [n, 1, H, W]
            flat = flat_patches(chunk, r, pad)[:, None] if compact else None  # [n, 1, H, W]
            for i, (rows, cols, state) in enumerate(plan):
                if track is None:
                    if i in compact and self._update_compacted(state, rows, cols, chunk, t_win, norms, flat, compact[i]):
                        continue
                    state.update(*self._group_candidates(rows, cols, chunk, t_win, norms))
                    continue
                if i in shared:
                    self._update_compacted(state, rows, cols, chunk, t_win, norms, flat, compact[i], img)
                    continue
                keys_t, values = self._group_candidates(rows, cols, chunk, t_win, norms)
                ids = self._candidate_ids(rows, cols, img, H, W)  # [G, M]
                is_flat = select_blocks(flat, rows, cols, "Q")[:, 0].permute(1, 3, 0, 2, 4).reshape(ids.shape)
                self._update_tracked(state, keys_t, values[..., :-1], ids, is_flat, compact[i])
        for i, found in compact.items():
            if track is not None:
                found = self._gather_tallies(found)  # one entry per value over all shards
            if found:
                rows, cols, state = plan[i]
                self._update_flat(state, found, rows.Q.shape[0] * cols.Q.shape[0], C, D)
        self._reduce([state for _, _, state in plan])
        out = torch.empty_like(x_t)
        out_hwc = out.permute(0, 2, 3, 1)  # [B, H, W, C] view
        for rows, cols, state in plan:
            scatter_pixels(out_hwc, state.mean(), rows, cols)
        if track is None:
            return out, None
        return out, Provenance.from_patches(plan, B, H, W, track)

    @staticmethod
    def _group_candidates(
        rows: AxisBlocks, cols: AxisBlocks, chunk: torch.Tensor, t_win: torch.Tensor, norms: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented keys ``[G, D + 2, M]`` and values ``[G, M, C + 1]`` of one group's candidates.

        Candidates are ordered (image, q_row, q_col) within each block g = (row block, column block).
        """
        n, C = chunk.shape[:2]
        k = t_win.shape[-1]
        D = C * k * k
        nbr, nqr = rows.Q.shape
        nbc, nqc = cols.Q.shape
        G, M = nbr * nbc, n * nqr * nqc
        keys = select_blocks(t_win, rows, cols, "Q")  # [n, C, nbr, nqr, nbc, nqc, k, k]
        keys_t = chunk.new_empty(G, D + 2, M)  # [key; |key|^2; 1], transposed
        keys_t[:, D + 1] = 1.0
        keys_t[:, :D].view(nbr, nbc, C, k, k, n, nqr, nqc).copy_(keys.permute(2, 4, 1, 6, 7, 0, 3, 5))
        sel = select_blocks(norms, rows, cols, "Q")  # [n, 1, nbr, nqr, nbc, nqc]
        keys_t[:, D].view(nbr, nbc, n, nqr, nqc).copy_(sel[:, 0].permute(1, 3, 0, 2, 4))
        centres = select_blocks(chunk, rows, cols, "Q")  # [n, C, nbr, nqr, nbc, nqc]
        centres = centres.permute(2, 4, 0, 3, 5, 1).reshape(G, M, C)
        return keys_t, augment_values(centres)

    @staticmethod
    def _candidate_ids(rows: AxisBlocks, cols: AxisBlocks, img: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """``id = (image * H + q_row) * W + q_col`` of one group's candidates: ``[G, M]``."""
        Qr = rows.Q.to(img.device)[:, None, None, :, None]  # [nbr, 1, 1, nqr, 1]
        Qc = cols.Q.to(img.device)[None, :, None, None, :]  # [1, nbc, 1, 1, nqc]
        ids = _patch_ids(img[None, None, :, None, None], Qr, Qc, H, W)  # [nbr, nbc, n, nqr, nqc]
        return ids.reshape(rows.Q.shape[0] * cols.Q.shape[0], -1)

    # ------------------------------------------------------ denoiser protocol
    def bind(
        self,
        *,
        patch_sizes: PatchSchedule | Sequence[int] | str | None = None,
        label: int | torch.Tensor | None = None,
        steps: int | None = None,
        schedule: CosineSchedule = CosineSchedule(),
    ) -> "MachineDenoiser":
        """A ``D(x_t, t) -> x0_hat`` denoiser with a locality schedule k(t) and label bound."""
        if self.kind in ("ls", "els") and patch_sizes is None:
            raise ValueError(f"kind={self.kind!r} needs patch_sizes (a schedule k(t))")
        if self.kind in ("ideal", "es") and patch_sizes is not None:
            raise ValueError(f"patch_sizes do not apply to kind={self.kind!r}")
        ps: PatchSchedule | None = None
        if patch_sizes is not None:
            if isinstance(patch_sizes, PatchSchedule):
                ps = patch_sizes
            elif isinstance(patch_sizes, str):
                ps = PatchSchedule.parse(patch_sizes)
            else:
                ps = PatchSchedule(tuple(patch_sizes))
            if steps is not None and ps.steps != steps:
                raise ValueError(
                    f"the patch-size schedule has {ps.steps} sizes but the sampler runs {steps} "
                    f"steps; they must match (sizes[i-1] is used at t = i/steps)"
                )
            _, H, W = self.image_shape
            for k in sorted(set(ps.sizes)):
                make_geometry(self.kind, self.padding, H, W, k, wrap=self.wrap_training_patches)
        if label is not None:
            lab = torch.as_tensor(label)
            self._label_vector(label, int(lab.numel()) if lab.ndim else 1)
        return MachineDenoiser(self, ps, label, schedule)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Denoiser protocol for ``"ideal"``/``"es"``; LS/ELS need :meth:`bind`."""
        return self.bind()(x_t, t)


@dataclass(frozen=True)
class MachineDenoiser:
    """A :class:`ScoreMachine` bound to a noise schedule, a k(t) and a label.

    Calling it with ``(x_t, t)`` implements the denoiser protocol
    ``D(x_t, t) -> x0_hat`` that :func:`patchmosaic.sample` drives.
    """

    machine: ScoreMachine
    patch_sizes: PatchSchedule | None
    label: int | torch.Tensor | None
    schedule: CosineSchedule

    def patch_size_at(self, t: float) -> int | None:
        """k at time ``t``, or None for machines without patches."""
        return None if self.patch_sizes is None else self.patch_sizes.at(t)

    def _time(self, t: torch.Tensor | float) -> tuple[float, float]:
        """``(t, alpha_bar(t))`` for a valid time ``t`` in (0, 1]."""
        t = float(t)
        if not 0.0 < t <= 1.0 or math.isnan(t):
            raise ValueError(f"t must lie in (0, 1], got {t}")
        return t, float(self.schedule.alpha_bar(t))

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        t, ab = self._time(t)
        return self.machine.denoise(x_t, ab, patch_size=self.patch_size_at(t), label=self.label)

    def with_provenance(
        self, x_t: torch.Tensor, t: torch.Tensor | float, *, top: int = 8
    ) -> tuple[torch.Tensor, Provenance]:
        """``(x0_hat, provenance)`` at ``t`` (:meth:`ScoreMachine.denoise_provenance`)."""
        t, ab = self._time(t)
        return self.machine.denoise_provenance(x_t, ab, patch_size=self.patch_size_at(t), label=self.label, top=top)
