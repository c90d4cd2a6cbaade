"""Training-free score machines (Kamb & Ganguli 2412.20292, Sec. 3).

A score machine holds a training set and returns the posterior mean of one of
four constrained denoisers, one class each:

* :class:`IdealScoreMachine` (IS, ``kind="ideal"``): softmax over whole training
  images; it memorises.
* :class:`EquivariantScoreMachine` (ES, ``"es"``): softmax over every training
  image at every circular shift.
* :class:`LocalScoreMachine` (LS, ``"ls"``): each pixel p sees the k x k patch
  around p; candidates are the training images' patches at the same location p.
* :class:`EquivariantLocalScoreMachine` (ELS, ``"els"``): candidates are (image i,
  centre q) for every admissible q (see :mod:`patchmosaic.geometry`); the output
  pixel is the weighted centre pixel of the training patch.

``ScoreMachine(train, kind=...)`` is the factory (and the common base class).
Every machine is a denoiser ``D(x, sigma)`` in the VE form of
:mod:`patchmosaic.denoisers.base` (LS/ELS with ``patch_size=`` or through
:meth:`ScoreMachine.bind`), and keeps the paper's VP form as
:meth:`ScoreMachine.denoise` ``(x_t, alpha_bar)``. Both give the same posterior
mean; the logits are ``-|x - X|^2 / (2 sigma^2)`` in VE and
``-|x_t - sqrt(abar) X|^2 / (2 (1 - abar))`` in VP (Eq. 6-9).

All four run on :class:`patchmosaic.engine.SoftmaxMean`; LS and ELS differ only
in their :class:`patchmosaic.geometry.Geometry`, IS and ES only in their
candidate images.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import numpy as np
import torch

from patchmosaic.denoisers.base import check_images, check_label_vector, sigma_vector
from patchmosaic.engine import (
    SoftmaxMean,
    augment_keys,
    augment_queries,
    augment_values,
    block_views,
    exact_float32_matmul,
    flat_patches,
    logit_coefficients,
    patch_sq_norms,
    patch_windows,
    select_blocks,
    ve_logit_coefficients,
)
from patchmosaic.geometry import (
    PADDINGS,
    AxisBlocks,
    Geometry,
    make_geometry,
    scatter_pixels,
)
from patchmosaic.nested import NESTED_FROM, NESTED_TILE, nested_dense_means
from patchmosaic.provenance import Provenance
from patchmosaic.schedules import CosineSchedule, PatchSchedule, check_patch_size

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "KINDS",
    "EquivariantLocalScoreMachine",
    "EquivariantScoreMachine",
    "IdealScoreMachine",
    "LocalScoreMachine",
    "MachineDenoiser",
    "ScoreMachine",
    "check_machine_options",
]

KINDS = ("ideal", "es", "ls", "els")
KERNELS = ("auto", "torch", "triton", "numba")
T = TypeVar("T")  # what a worker returns
# Row width (elements) the fused path rounds each candidate's copied patch up to, so that
# rows start 16-element aligned (Triton specialises strides divisible by 16 and vectorises loads).
FUSED_ROW_ALIGN = 16
KERNEL_PRECISIONS = ("ieee", "tf32x3")  # patchmosaic.kernels.PRECISIONS (that module imports triton)
PATCH_KINDS = ("ls", "els")

# Smallest patch size whose ELS calls "auto" streams through the compiled window-sum kernel on the CPU
# (patchmosaic.kernels.window_sums): its time follows the pairs, the engine's grows as k^2 per pair, and
# below k = 7 the engine's pruning wins at low noise. One call on the demo's batch, one thread
# (benchmarks/bench_window_kernel.py): 4.4-5.1x at k = 15, 1.65-2.2x at k = 7, 1.0-1.4x at k = 5 and
# 0.33-0.46x at k = 3 (README, "Window-sum kernel").
WINDOW_KERNEL_MIN_K = 7

# Default bound on the elements of one chunk's logit block (and patch tensor):
# 2**22 float32 values = 16 MiB, so the streaming pass stays in that budget.
DEFAULT_CHUNK_ELEMENTS = 2**22

# A shared-candidate chunk whose constant patches make up at least this
# fraction is compacted: its constant patches are collapsed into one candidate
# per value with a multiplicity (MNIST at k=3: 59% of the patches are constant).
FLAT_COMPACTION_MIN_FRACTION = 0.125

# Rank of the distance bound that prunes patch candidates proven below the
# engine's exponent floor (patchmosaic.engine, "Bounded pruning"); 0 turns it off.
# On MNIST at the published schedule it skips 26-66% of the pairs at sigma <= 0.41
# (1.2-2.7x there), switches itself off above, and a pruning machine's larger key
# chunks run the unbounded levels at 1.0-1.17x (benchmarks/bench_prune.py; README,
# "Bounded pruning"). Results move by at most the engine's M e^floor bound.
PRUNE_RANK = 16

# The |key|^2 slot of an absent (padding) candidate: its logit -a^2/(2 s2) * 1e30
# lies far below every real candidate's, so it is floored to exp(EXP_FLOOR) and,
# with a zero value row, adds nothing to the mean.
ABSENT_NORM = 1e30


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} contains NaN or infinite values")


def check_machine_options(kind: str, padding: str, wrap_training_patches: bool = True) -> None:
    """The one check of a machine's kind x padding x wrap combination (ValueError naming the problem)."""
    if kind not in KINDS:
        raise ValueError(f"unknown machine kind {kind!r}; expected one of {KINDS}")
    if padding not in PADDINGS:
        raise ValueError(f"unknown padding {padding!r}; expected one of {PADDINGS}")
    if kind == "es" and padding != "circular":
        raise ValueError("the equivariant score machine (kind='es') is defined for circular padding only")
    if not wrap_training_patches and not (kind == "els" and padding == "circular"):
        raise ValueError("wrap_training_patches=False (--no-wrap-training-patches) only applies to kind='els' with "
                         "padding='circular'")


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

    ``ScoreMachine(train, kind=...)`` returns the subclass of that kind.

    Args:
        train_images: ``[N, C, H, W]`` floating training images in [-1, 1].
        kind: ``"ideal"``, ``"es"``, ``"ls"`` or ``"els"`` (may be omitted when
            constructing a subclass directly).
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
        device: Where the training images live (default: where they are). Queries
            may be on any device; each streamed chunk moves to the query's device,
            so keep both on the same one (``--device`` in the CLI does).
        prune_rank: LS/ELS: rank of the bound that skips training patches proven
            below the engine's pruning floor (:mod:`patchmosaic.engine`, within
            its stated ``M e^floor`` bound; default ``PRUNE_RANK``); 0 computes
            every candidate, in the chunks sized for the logits.
            ``prune_stats`` holds the last call's ``(skipped, pairs, bounded)`` (over its classes,
            workers and, for :meth:`denoise_sizes`, sizes) (:class:`patchmosaic.engine.SoftmaxMean`).
        kernel: LS/ELS without provenance: ``"triton"`` streams every (group,
            chunk) through the fused one-pass kernel
            (:func:`patchmosaic.kernels.fused_softmax_mean`; float32 CUDA tensors,
            or CPU tensors under ``TRITON_INTERPRET=1``; an error otherwise),
            ``"torch"`` through :class:`~patchmosaic.engine.SoftmaxMean`, and
            ``"auto"`` picks the fused kernel for float32 CUDA queries when
            Triton is installed (the ``gpu`` extra). Provenance always uses the engine.
            ``"numba"`` (ELS, float32 CPU queries; an error otherwise) streams every group
            through the compiled window-sum kernel (:mod:`patchmosaic.kernels.window_sums`:
            logits from shared sliding window sums, not one product per pair) at every patch
            size, with posterior statistics too; top candidates use the engine. ``"auto"`` does the
            same on the CPU from ``WINDOW_KERNEL_MIN_K`` (7) up, where it is faster.
        kernel_precision: Products of the fused kernel: ``"tf32x3"`` (split-precision TF32
            tensor-core products, the default) or ``"ieee"`` (IEEE float32 multiply-adds); both
            errors are measured against float64 in ``benchmarks/gpu_check_fused.py``, where on one
            H200 both stay within the float32 engine's and tf32x3 is 2.5x faster.
            See :mod:`patchmosaic.kernels.fused_softmax`.
        workers: CPU queries: split each call's batch (:meth:`denoise_sizes`' too) into up to
            this many contiguous parts, each streamed by its own thread with one torch thread
            (torch's thread count is set to 1 for the call and restored after). On a 2-core CPU two
            workers sampled the demo's batch of 8 seeds 1.45-1.53x faster than torch's two
            intra-op threads (README, "Workers"): the engine's cache-sized blocks are too small to
            split well inside each operation. Results equal the single-worker call up to float
            rounding (a sample's rounding depends on which samples share its batch either way).
            Not with ``distributed`` (each worker would all-reduce on its own); CUDA queries and
            the fused kernel run one stream.
    """

    kind: ClassVar[str]
    needs_patch_size: ClassVar[bool] = False

    def __new__(cls, train_images: object = None, *, kind: str | None = None, **kwargs: object) -> "ScoreMachine":
        if cls is ScoreMachine:
            if kind not in _MACHINES:
                raise ValueError(f"unknown machine kind {kind!r}; expected one of {KINDS}")
            cls = _MACHINES[kind]
        elif kind is not None and kind != cls.kind:
            raise ValueError(f"{cls.__name__} is kind={cls.kind!r}, got kind={kind!r}")
        return super().__new__(cls)

    def __init__(
        self,
        train_images: torch.Tensor | np.ndarray,
        *,
        kind: str | None = None,
        padding: str = "zeros",
        labels: torch.Tensor | np.ndarray | Sequence[int] | None = None,
        wrap_training_patches: bool = True,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        distributed: bool = False,
        device: torch.device | str | None = None,
        prune_rank: int = PRUNE_RANK,
        kernel: str = "auto",
        kernel_precision: str = "tf32x3",
        workers: int = 1,
    ) -> None:
        check_machine_options(self.kind, padding, wrap_training_patches)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        if workers > 1 and distributed:
            raise ValueError("workers > 1 cannot be combined with distributed=True (each worker would all-reduce)")
        self.workers = workers
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
        if kernel_precision not in KERNEL_PRECISIONS:
            raise ValueError(f"unknown kernel_precision {kernel_precision!r}; expected one of {KERNEL_PRECISIONS}")
        self.kernel = kernel
        self.kernel_precision = kernel_precision
        if prune_rank < 0:
            raise ValueError(f"prune_rank must be 0 (off) or positive, got {prune_rank}")
        self.prune_rank = int(prune_rank)
        self.prune_stats = (0, 0, 0)
        self._stats_lock = threading.Lock()
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
        lo_val, hi_val = float(images.min()), float(images.max())
        if lo_val < -1.0 - 1e-6 or hi_val > 1.0 + 1e-6:
            raise ValueError(
                f"train_images must be scaled to [-1, 1], got values in [{lo_val:g}, {hi_val:g}] "
                "(for 0..255 pixels use x / 127.5 - 1; patchmosaic.data.load_dataset does this)"
            )
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
        self.images = images[lo:hi].to(device)  # [N_shard, C, H, W], this process's shard, on `device`
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
    def _check_images(self, x: torch.Tensor, what: str = "x_t") -> None:
        check_images(x, self.image_shape, what)

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
        return check_label_vector(label, batch, None if self.labels is None else self._classes, what="machine")

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
        self._check_images(x_t)
        ab = self._alpha_bar_vector(alpha_bar, x_t)  # [B]
        x0, _ = self._run(x_t, logit_coefficients(ab), patch_size, label, track=None)
        return x0

    def __call__(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        *,
        patch_size: int | None = None,
        label: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The denoiser protocol ``D(x, sigma) -> x0_hat`` (VE form, ``x = x0 + sigma eps``).

        Equals :meth:`denoise` at ``x_t = x / sqrt(1 + sigma^2)``,
        ``alpha_bar = 1 / (1 + sigma^2)`` up to float rounding; the logits are
        ``-|x - X|^2 / (2 sigma^2)``.

        Args:
            x: ``[B, C, H, W]`` noisy images.
            sigma: Float or ``[B]`` tensor of noise levels > 0.
            patch_size, label: As for :meth:`denoise` (or bind them: :meth:`bind`).

        Returns:
            ``[B, C, H, W]`` estimate of x0, in the dtype of ``x``.
        """
        return self._call_ve(x, sigma, patch_size, label, track=None)[0]

    def _call_ve(
        self, x: torch.Tensor, sigma: torch.Tensor | float, patch_size: int | None,
        label: int | torch.Tensor | None, track: int | None,
    ) -> tuple[torch.Tensor, Provenance | None]:
        self._check_images(x, "x")
        return self._run(x, ve_logit_coefficients(sigma_vector(sigma, x)), patch_size, label, track=track)

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
        self._check_images(x_t)
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
        self._check_images(x)
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
        """The geometry of one call (None for the global machines IS and ES)."""
        if patch_size is not None:
            raise ValueError(f"patch_size does not apply to kind={self.kind!r}; pass None")
        return None

    def check_patch_sizes(self, sizes: Sequence[int]) -> None:
        """Check every size of a locality schedule against this machine (ValueError naming the first bad one)."""
        if sizes:
            raise ValueError(f"patch sizes do not apply to kind={self.kind!r}")

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
        self.prune_stats = (0, 0, 0)  # summed over the call's classes and workers
        labels = self._label_vector(label, x_t.shape[0])
        if labels is None:
            _, train, ids = next(self._subsets(None))
            return self._run_subset(x_t, coeffs, train, ids, geometry, track)
        out = torch.empty_like(x_t)
        parts = []
        scale, bias = coeffs
        for rows, train, ids in self._subsets(labels):
            out[rows], prov = self._run_subset(x_t[rows], (scale[rows], bias[rows]), train, ids, geometry, track)
            parts.append((rows, prov))
        if track is None:
            return out, None
        return out, Provenance.scatter(parts, x_t.shape[0])

    def _subsets(self, labels: torch.Tensor | None) -> Iterator[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]:
        """``(batch rows, training images, their global ids)`` per class of the batch (one entry, rows None, unconditioned)."""
        offset = self.rank * self.num_train // self.world  # global index of this shard's first image
        if labels is None:
            yield None, self.images, offset + torch.arange(self.images.shape[0])  # [N_shard]
            return
        for c in torch.unique(labels).tolist():
            subset = self._class_index[c]
            yield torch.nonzero(labels == c).flatten(), self.images[subset], offset + subset

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
            parts = self._in_workers(x_t, coeffs, lambda x, c: self._denoise(x, c, train, train_ids, geometry, track))
        out = torch.cat([x0 for _, (x0, _) in parts])
        if track is None:
            return out, None
        return out, Provenance.scatter([(torch.arange(a, b), prov) for (a, b), (_, prov) in parts], x_t.shape[0])

    def _add_prune_stats(self, skipped: int, pairs: int, bounded: int) -> None:
        """Add to the call's ``prune_stats`` (workers add theirs concurrently)."""
        with self._stats_lock:
            a, b, c = self.prune_stats
            self.prune_stats = (a + skipped, b + pairs, c + bounded)

    def _in_workers(
        self, x: torch.Tensor, coeffs: tuple[torch.Tensor, torch.Tensor], fn: Callable[..., T]
    ) -> list[tuple[tuple[int, int], T]]:
        """``fn(x[a:b], coeffs[a:b])`` for contiguous parts ``[a, b)`` of the batch, one per worker thread
        with one torch thread (restored after), or the whole batch inline (one worker, one sample, CUDA,
        or the fused kernel): ``[((a, b), result)]`` in batch order."""
        B = x.shape[0]
        n = min(self.workers, B)
        if n == 1 or x.device.type != "cpu" or self.kernel == "triton":
            return [((0, B), fn(x, coeffs))]
        bounds = [(i * B // n, (i + 1) * B // n) for i in range(n)]
        scale, bias = coeffs
        results: list[T | None] = [None] * n
        errors: list[BaseException] = []

        def work(i: int) -> None:
            a, b = bounds[i]
            try:
                results[i] = fn(x[a:b], (scale[a:b], bias[a:b]))
            except BaseException as err:  # re-raised in the calling thread
                errors.append(err)

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:  # one thread per part (a pool may run two short parts one after the other on one thread)
            pool = [threading.Thread(target=work, args=(i,), name=f"patchmosaic-worker-{i}") for i in range(n)]
            for thread in pool:
                thread.start()
            for thread in pool:
                thread.join()
        finally:
            torch.set_num_threads(threads)
        if errors:
            raise errors[0]
        return list(zip(bounds, results))

    def _denoise(
        self,
        x_t: torch.Tensor,
        coeffs: tuple[torch.Tensor, torch.Tensor],
        train: torch.Tensor,
        train_ids: torch.Tensor,
        geometry: Geometry | None,
        track: int | None,
    ) -> tuple[torch.Tensor, Provenance | None]:
        raise NotImplementedError  # each kind's subclass

    def score(self, x_t: torch.Tensor, alpha_bar: torch.Tensor | float, **kwargs: object) -> torch.Tensor:
        """Score ``-(x_t - sqrt(abar) x0_hat) / (1 - abar)`` of the machine."""
        ab = self._alpha_bar_vector(alpha_bar, x_t)[:, None, None, None]  # [B, 1, 1, 1]
        x0 = self.denoise(x_t, alpha_bar, **kwargs)
        return -(x_t - ab.sqrt() * x0) / (1.0 - ab)

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

    # ------------------------------------------------------ denoiser protocol
    def bind(
        self,
        *,
        patch_sizes: PatchSchedule | Sequence[int] | str | None = None,
        label: int | torch.Tensor | None = None,
        schedule: CosineSchedule | None = None,
    ) -> "MachineDenoiser":
        """A denoiser ``D(x, sigma) -> x0_hat`` with a locality schedule k(sigma) and a label bound.

        Args:
            patch_sizes: LS/ELS: a :class:`PatchSchedule` (sigma-keyed), a preset
                name or schedule file (:meth:`PatchSchedule.parse`), or a list of
                sizes lowest noise first, keyed to the DDIM grid ``t = i / n`` of
                ``schedule`` (``n = len(patch_sizes)``). None for IS/ES.
            label: ``None``, an int or a ``[B]`` tensor (class conditioning).
            schedule: Noise schedule that a *list* of sizes is keyed to (default: the
                paper's cosine schedule). Ignored for sigma-keyed schedules.
        """
        ps: PatchSchedule | None = None
        if patch_sizes is not None:
            if isinstance(patch_sizes, PatchSchedule):
                ps = patch_sizes
            elif isinstance(patch_sizes, str):
                ps = PatchSchedule.parse(patch_sizes)
            else:
                ps = PatchSchedule.from_steps(tuple(patch_sizes), schedule)
        self.check_patch_sizes(() if ps is None else ps.sizes)
        if label is not None:
            lab = torch.as_tensor(label)
            self._label_vector(label, int(lab.numel()) if lab.ndim else 1)
        return MachineDenoiser(self, ps, label)


class _GlobalMachine(ScoreMachine):
    """IS and ES: each candidate is a whole training image (at some shift)."""

    @staticmethod
    def _shifts(H: int, W: int) -> int:
        """Candidates per training image."""
        raise NotImplementedError

    @staticmethod
    def _candidates(chunk: torch.Tensor) -> torch.Tensor:
        """``[n, C, H, W]`` training images -> ``[1, n * shifts, C * H * W]`` candidate images."""
        raise NotImplementedError

    def _denoise(
        self,
        x_t: torch.Tensor,
        coeffs: tuple[torch.Tensor, torch.Tensor],
        train: torch.Tensor,
        train_ids: torch.Tensor,
        geometry: Geometry | None,
        track: int | None,
    ) -> tuple[torch.Tensor, Provenance | None]:
        """Candidates are whole (shifted) training images."""
        B, C, H, W = x_t.shape
        queries = augment_queries(x_t.reshape(1, B, C * H * W), *coeffs)  # [1, B, CHW+2]
        state = SoftmaxMean(queries, C * H * W, max_logits=self.chunk_elements, track=track)
        shifts = self._shifts(H, W)
        per_image = shifts * C * H * W  # key elements of one training image
        for start, chunk in self._chunks(train, per_image, x_t):
            n = chunk.shape[0]
            cand = self._candidates(chunk)  # [1, n * shifts, CHW]
            ids = None
            if track:  # image id, times the shift (sy, sx) for ES: [1, n * shifts]
                img = train_ids[start : start + n].to(x_t.device)
                ids = (img[:, None] * shifts + torch.arange(shifts, device=x_t.device)).reshape(1, -1)
            state.update(augment_keys(cand.transpose(1, 2)), augment_values(cand), ids=ids)
        self._reduce([state])
        x0 = state.mean().reshape(B, C, H, W)
        if track is None:
            return x0, None
        return x0, Provenance.from_global(state, shifts, H, W)



class IdealScoreMachine(_GlobalMachine):
    """IS: the unconstrained optimal denoiser; a softmax over whole training images (memorises)."""

    kind = "ideal"

    @staticmethod
    def _shifts(H: int, W: int) -> int:
        return 1

    @staticmethod
    def _candidates(chunk: torch.Tensor) -> torch.Tensor:
        return chunk.reshape(1, chunk.shape[0], -1)  # [1, n, CHW]


class EquivariantScoreMachine(_GlobalMachine):
    """ES: the translation-equivariant optimal denoiser; every training image at every circular shift.

    Candidate ``image * H * W + sy * W + sx`` is ``roll(X, (sy, sx))``, i.e.
    ``X[(y - sy) % H, (x - sx) % W]`` at pixel (y, x).
    """

    kind = "es"

    @staticmethod
    def _shifts(H: int, W: int) -> int:
        return H * W

    @staticmethod
    def _candidates(chunk: torch.Tensor) -> torch.Tensor:
        n, C, H, W = chunk.shape
        ys = (torch.arange(H, device=chunk.device)[None, :] - torch.arange(H, device=chunk.device)[:, None]) % H  # [sy, y]
        xs = (torch.arange(W, device=chunk.device)[None, :] - torch.arange(W, device=chunk.device)[:, None]) % W  # [sx, x]
        rolled = chunk[:, :, ys[:, None, :, None], xs[None, :, None, :]]  # [n, C, sy, sx, y, x]
        return rolled.permute(0, 2, 3, 1, 4, 5).reshape(1, n * H * W, C * H * W)



class _PatchMachine(ScoreMachine):
    """LS and ELS: each output pixel is a softmax over training patches; a Geometry says which."""

    needs_patch_size = True

    def _geometry(self, patch_size: int | None) -> Geometry | None:
        if patch_size is None:
            raise ValueError(f"kind={self.kind!r} needs a patch_size (odd integer), or bind(patch_sizes=...)")
        k = check_patch_size(patch_size)
        _, H, W = self.image_shape
        return make_geometry(self.kind, self.padding, H, W, k, wrap=self.wrap_training_patches)

    def check_patch_sizes(self, sizes: Sequence[int]) -> None:
        if not sizes:
            raise ValueError(f"kind={self.kind!r} needs patch sizes (a locality schedule k(sigma))")
        for k in sorted(set(sizes)):
            self._geometry(k)

    def denoise_sizes(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        sizes: Sequence[int],
        *,
        label: int | torch.Tensor | None = None,
    ) -> dict[int, torch.Tensor]:
        """``{k: D_k(x, sigma)}`` for every patch size k: what calibration scores.

        Each entry equals ``self(x, sigma, patch_size=k, label=label)`` up to
        float rounding. ELS computes the sizes from ``NESTED_FROM`` (7) up in one
        stream over the training set (:mod:`patchmosaic.nested`: the products of
        nested windows are shared, so their matrix products cost one call at the
        largest size) and smaller sizes one call each (that path collapses
        constant patches); sizes that take the window-sum kernel
        (:meth:`uses_window_kernel`: float32 on the CPU from k = 7 up) are one
        kernel call each, which costs less than the nested stream; LS, and ELS
        sharded over processes (``distributed=True``), make one call per size.

        Args:
            x: ``[B, C, H, W]`` noisy images.
            sigma: Float or ``[B]`` tensor of noise levels > 0.
            sizes: Odd patch sizes (any order; repeats are computed once).
            label: As for :meth:`__call__`.

        Returns:
            One ``[B, C, H, W]`` estimate per distinct size, keyed by size.
        """
        self._check_images(x, "x")
        ks = sorted({check_patch_size(k) for k in sizes})
        if not ks:
            raise ValueError("denoise_sizes needs at least one patch size")
        geometries = {k: self._geometry(k) for k in ks}  # every size checked before any work
        coeffs = ve_logit_coefficients(sigma_vector(sigma, x))
        # sizes the window-sum kernel takes are one call each: cheaper than the nested stream's products
        # (bench_calibrate.py, MNIST zeros, ten sizes: 3.5-3.6 s against 5.5-5.6 s)
        shared = [k for k in ks if k >= NESTED_FROM and not self.uses_window_kernel(x.device, x.dtype, k)] \
            if self.kind == "els" and self.world == 1 else []
        if len(shared) < 2:
            shared = []
        result, stats = {}, (0, 0, 0)
        for k in ks:
            if k not in shared:
                result[k] = self._run(x, coeffs, k, label, track=None)[0]  # each call resets prune_stats
                stats = tuple(a + b for a, b in zip(stats, self.prune_stats))
        self.prune_stats = stats  # the call's: every size's, the nested stream's pairs added below
        if not shared:
            return result
        nested = [geometries[k] for k in shared]
        labels = self._label_vector(label, x.shape[0])
        out = None if labels is None else x.new_empty((len(shared),) + tuple(x.shape))  # [K, B, C, H, W]
        scale, bias = coeffs
        with exact_float32_matmul():
            for rows, train, ids in self._subsets(labels):
                xs, cs = (x, coeffs) if rows is None else (x[rows], (scale[rows], bias[rows]))
                parts = self._in_workers(xs, cs, lambda x, c: self._denoise_sizes(x, c, train, ids, nested))
                sizes = torch.cat([o for _, o in parts], dim=1)  # [K, b, C, H, W]
                if rows is None:  # unconditioned: one subset, the whole batch
                    out = sizes
                else:
                    out[:, rows] = sizes
        result.update({k: out[i] for i, k in enumerate(shared)})
        return dict(sorted(result.items()))

    def _denoise_sizes(
        self,
        x: torch.Tensor,
        coeffs: tuple[torch.Tensor, torch.Tensor],
        train: torch.Tensor,
        train_ids: torch.Tensor,
        geometries: list[Geometry],
    ) -> torch.Tensor:
        """``[K, B, C, H, W]``: the dense pairs of every size in one nested stream, the others per size."""
        out = x.new_empty((len(geometries),) + tuple(x.shape))
        dense = []
        for i, geometry in enumerate(geometries):
            groups = geometry.groups()
            inner = [g for g in groups if g[0].P.shape[0] == 1 and g[1].P.shape[0] == 1]
            assert len(inner) == 1, "an ELS geometry has exactly one dense (single-block) group"
            dense.append(inner[0])
            rest = [g for g in groups if g is not inner[0]]
            if rest:  # pixels within r of an edge (zero padding): few pairs, the single-size path
                out[i] = self._denoise(x, coeffs, train, train_ids, geometry, None, groups=rest)[0]
        C, H, W = x.shape[1:]
        R = geometries[-1].radius
        per_image = H * W * (C * (2 * R + 1) ** 2 + 2 * len(geometries) + C + 1)  # a chunk's keys and values
        states = nested_dense_means(
            x, coeffs, (chunk for _, chunk in self._chunks(train, per_image, x)),
            [g[0] for g in dense], [g[1] for g in dense], [g.radius for g in geometries],
            geometries[0].padding, out, tile=min(NESTED_TILE, self.chunk_elements),
        )
        self._add_prune_stats(0, sum(s.pairs for s in states), 0)  # the nested stream computes every pair
        return out

    def _fused(self, x: torch.Tensor) -> bool:
        """Whether this call streams through the fused Triton kernel (see ``kernel``)."""
        return self.uses_fused_kernel(x.device, x.dtype)

    def uses_fused_kernel(self, device: torch.device | str, dtype: torch.dtype) -> bool:
        """Whether calls without provenance on ``device`` in ``dtype`` stream through the fused Triton kernel
        (``kernel``: 'triton' always, 'torch' never, 'auto' for float32 on CUDA with Triton installed)."""
        if self.kernel == "torch":
            return False
        if self.kernel == "triton":
            return True
        return (torch.device(device).type == "cuda" and dtype == torch.float32
                and importlib.util.find_spec("triton") is not None)

    def uses_window_kernel(self, device: torch.device | str, dtype: torch.dtype, patch_size: int,
                           track: int | None = None) -> bool:
        """Whether a call at ``patch_size`` on ``device`` in ``dtype`` streams its groups through the
        compiled window-sum kernel (``kernel``: 'numba' always, 'auto' on the CPU in float32 from
        ``WINDOW_KERNEL_MIN_K`` up; ELS only, and never with top candidates, ``track > 0``)."""
        if self.kind != "els" or self.kernel in ("torch", "triton") or track:
            return False
        cpu32 = torch.device(device).type == "cpu" and dtype == torch.float32
        if self.kernel == "numba":
            if not cpu32:
                raise ValueError(f"kernel='numba' runs float32 queries on the CPU, got {dtype} on {device}")
            return True
        return cpu32 and patch_size >= WINDOW_KERNEL_MIN_K

    def _denoise(
        self,
        x_t: torch.Tensor,
        coeffs: tuple[torch.Tensor, torch.Tensor],
        train: torch.Tensor,
        train_ids: torch.Tensor,
        geometry: Geometry | None,
        track: int | None,
        groups: list[tuple[AxisBlocks, AxisBlocks]] | None = None,
    ) -> tuple[torch.Tensor, Provenance | None]:
        """Per-pixel softmax over the training patches the geometry admits (only ``groups`` of it when given:
        the other pixels of the output are left unwritten)."""
        assert geometry is not None
        if track is None and self._fused(x_t):
            return self._denoise_fused(x_t, coeffs, train, geometry, groups), None
        if self.uses_window_kernel(x_t.device, x_t.dtype, 2 * geometry.radius + 1, track):
            return self._denoise_window(x_t, coeffs, train, geometry, track, groups)
        B, C, H, W = x_t.shape
        r, pad = geometry.radius, geometry.padding
        k = 2 * r + 1
        D = C * k * k
        scale, bias = coeffs  # [B], [B]
        x_win = patch_windows(x_t, r, pad)  # [B, C, H, W, k, k]
        plan = []  # (rows, cols, augmented queries, state) per group
        per_image = (C + 1) * (H + 2 * r) * (W + 2 * r)  # padded copy of one training image
        for rows, cols in geometry.groups() if groups is None else groups:
            q, rep = self._group_queries(x_win, rows, cols)  # [G, Bq, D]
            queries = augment_queries(q, scale.repeat_interleave(rep), bias.repeat_interleave(rep))
            plan.append((rows, cols, SoftmaxMean(queries, C, max_logits=self.chunk_elements, track=track,
                                                 prune=self.prune_rank)))
            # a chunk's logit block per sample, or its keys alone where the state bounds the logits it
            # computes (pruning: large chunks give tighter key blocks and fewer passes over the tiles)
            width = D + 2 if self.prune_rank else max(rep, D + 2)
            per_image = max(per_image, q.shape[0] * rows.Q.shape[1] * cols.Q.shape[1] * width)
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
        self._add_prune_stats(*(sum(getattr(s, f) for _, _, s in plan) for f in ("skipped", "pairs", "bounded")))
        out = self._scatter_means(x_t, plan)
        if track is None:
            return out, None
        return out, Provenance.from_patches(plan, B, H, W, track)

    def _denoise_window(
        self,
        x_t: torch.Tensor,
        coeffs: tuple[torch.Tensor, torch.Tensor],
        train: torch.Tensor,
        geometry: Geometry,
        track: int | None,
        groups: list[tuple[AxisBlocks, AxisBlocks]] | None,
    ) -> tuple[torch.Tensor, Provenance | None]:
        """:meth:`_denoise` with every group streamed by the compiled window-sum kernel
        (:class:`patchmosaic.kernels.window_sums.WindowGroups`), whose partial states merge exactly into
        the engine's; no query matrix is formed (the kernel reads the padded queries)."""
        from patchmosaic.kernels.window_sums import WindowGroups  # compiles on first use (cached on disk)

        B, C, H, W = x_t.shape
        r, pad = geometry.radius, geometry.padding
        D = C * (2 * r + 1) ** 2
        scale, bias = coeffs
        plan = []  # (rows, cols, state) per group
        per_image = (C + 1) * (H + 2 * r) * (W + 2 * r)  # chunks sized as the engine's (_denoise)
        for rows, cols in geometry.groups() if groups is None else groups:
            G, rep = rows.P.shape[0] * cols.P.shape[0], rows.P.shape[1] * cols.P.shape[1]
            queries = augment_queries(x_t.new_empty(G, B * rep, 0), scale.repeat_interleave(rep),
                                      bias.repeat_interleave(rep))  # [G, Bq, 2]: the state's shape only
            plan.append((rows, cols, SoftmaxMean(queries, C, track=track)))
            width = D + 2 if self.prune_rank else max(rep, D + 2)
            per_image = max(per_image, G * rows.Q.shape[1] * cols.Q.shape[1] * width)
        window = WindowGroups(x_t, coeffs, [(rows, cols) for rows, cols, _ in plan], r, pad)
        for _, chunk in self._chunks(train, per_image, x_t):
            window.update(chunk)
        for (_, _, state), result, pairs in zip(plan, window.states(), window.pairs):
            state.merge(result.ref, result.acc, *((result.sq, result.xl) if track is not None else ()))
            state.pairs += pairs
        self._reduce([state for _, _, state in plan])
        self._add_prune_stats(0, sum(state.pairs for _, _, state in plan), 0)
        out = self._scatter_means(x_t, plan)
        return out, None if track is None else Provenance.from_patches(plan, B, H, W, track)

    def _denoise_fused(
        self,
        x_t: torch.Tensor,
        coeffs: tuple[torch.Tensor, torch.Tensor],
        train: torch.Tensor,
        geometry: Geometry,
        groups: list[tuple[AxisBlocks, AxisBlocks]] | None,
    ) -> torch.Tensor:
        """:meth:`_denoise` with one fused kernel call per (group, chunk); partial states merge exactly.

        Every candidate is streamed (no constant-patch collapsing: the kernel
        never writes a logit block, so that CPU saving buys nothing here).
        """
        from patchmosaic.kernels import (
            fused_softmax_mean,  # imports triton: only when asked for
        )

        _, C, H, W = x_t.shape
        r, pad = geometry.radius, geometry.padding
        D = C * (2 * r + 1) ** 2
        scale, bias = coeffs
        x_win = patch_windows(x_t, r, pad)  # [B, C, H, W, k, k]
        plan = []
        per_image = (C + 1) * (H + 2 * r) * (W + 2 * r)
        for rows, cols in geometry.groups() if groups is None else groups:
            q, rep = self._group_queries(x_win, rows, cols)  # [G, Bq, D]
            s, b = scale.repeat_interleave(rep), bias.repeat_interleave(rep)  # [Bq]
            plan.append((rows, cols, q, s, b, SoftmaxMean(augment_queries(q[:, :, :0], s, b), C)))
            width = self._row_width(D, FUSED_ROW_ALIGN) + C + 1  # a candidate's aligned key row and its values
            per_image = max(per_image, q.shape[0] * rows.Q.shape[1] * cols.Q.shape[1] * width)
        for _, chunk in self._chunks(train, per_image, x_t):
            t_win = patch_windows(chunk, r, pad)  # [n, C, H, W, k, k] view
            norms = patch_sq_norms(chunk, r, pad)[:, None]  # [n, 1, H, W]
            for rows, cols, q, s, b, state in plan:
                keys_t, values = self._group_candidates(rows, cols, chunk, t_win, norms, align=FUSED_ROW_ALIGN)
                state.merge(*fused_softmax_mean(q, s, b, keys_t[:, :D].transpose(1, 2), keys_t[:, D],
                                                values[..., :C], backend="triton", precision=self.kernel_precision))
        self._reduce([state for *_, state in plan])
        return self._scatter_means(x_t, [(rows, cols, state) for rows, cols, *_, state in plan])

    @staticmethod
    def _group_queries(x_win: torch.Tensor, rows: AxisBlocks, cols: AxisBlocks) -> tuple[torch.Tensor, int]:
        """One group's query patches ``[G, B * npr * npc, D]`` (rows ordered block, sample, row, column)
        from the windows ``[B, C, H, W, k, k]``, and ``npr * npc`` (query rows per sample and block)."""
        B = x_win.shape[0]
        nbr, npr = rows.P.shape
        nbc, npc = cols.P.shape
        q = select_blocks(x_win, rows, cols, "P")  # [B, C, nbr, npr, nbc, npc, k, k]
        return q.permute(2, 4, 0, 3, 5, 1, 6, 7).reshape(nbr * nbc, B * npr * npc, -1), npr * npc

    @staticmethod
    def _scatter_means(x_t: torch.Tensor, plan: list[tuple[AxisBlocks, AxisBlocks, SoftmaxMean]]) -> torch.Tensor:
        """``[B, C, H, W]`` with every group's softmax means at its query pixels (others left unwritten)."""
        out = torch.empty_like(x_t)
        out_hwc = out.permute(0, 2, 3, 1)  # [B, H, W, C] view
        for rows, cols, state in plan:
            scatter_pixels(out_hwc, state.mean(), rows, cols)
        return out

    @staticmethod
    def _row_width(D: int, align: int) -> int:
        """Elements of one candidate's key row ``[key (D), |key|^2, 1]``, rounded up to ``align``."""
        return -(-(D + 2) // align) * align

    @staticmethod
    def _group_candidates(
        rows: AxisBlocks, cols: AxisBlocks, chunk: torch.Tensor, t_win: torch.Tensor, norms: torch.Tensor,
        align: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented keys ``[G, D + 2, M]`` and values ``[G, M, C + 1]`` of one group's candidates.

        Candidates are ordered (image, q_row, q_col) within each block g = (row block, column block);
        each candidate's row ``[key, |key|^2, 1]`` starts at a multiple of ``align`` elements.
        """
        n, C = chunk.shape[:2]
        k = t_win.shape[-1]
        D = C * k * k
        nbr, nqr = rows.Q.shape
        nbc, nqc = cols.Q.shape
        G, M = nbr * nbc, n * nqr * nqc
        # [key, |key|^2, 1] per candidate, each patch copied contiguously
        rows_t = chunk.new_empty(G, M, _PatchMachine._row_width(D, align))[..., : D + 2]
        rows_t[:, :, D + 1] = 1.0
        dst = rows_t[:, :, :D].view(nbr, nbc, n, nqr, nqc, C, k, k)
        pieces = block_views(t_win, rows, cols, "Q")  # slices of the windows: copied without a gather
        if pieces is None:
            pieces = [(slice(None), slice(None), select_blocks(t_win, rows, cols, "Q"))]
        for rb, cb, keys in pieces:  # keys [n, C, nbr', nqr, nbc', nqc, k, k]
            dst[rb, cb].copy_(keys.permute(2, 4, 0, 3, 5, 1, 6, 7))
        sel = select_blocks(norms, rows, cols, "Q")  # [n, 1, nbr, nqr, nbc, nqc]
        rows_t[:, :, D].view(nbr, nbc, n, nqr, nqc).copy_(sel[:, 0].permute(1, 3, 0, 2, 4))
        keys_t = rows_t.transpose(1, 2)  # [G, D + 2, M] view (the products read it transposed)
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
        keys = chunk.new_empty(1, M, D + 2)  # [key, |key|^2, 1] rows
        keys[0, :, :D] = t_win[img, :, y, x].reshape(M, D)
        keys[0, :, D] = norms[img, 0, y, x]
        keys[0, :, D + 1] = 1.0
        keys_t = keys.transpose(1, 2)  # [1, D + 2, M] view (the products read it transposed)
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



class LocalScoreMachine(_PatchMachine):
    """LS: pixel p's candidates are the training patches centred at p (locality only)."""

    kind = "ls"


class EquivariantLocalScoreMachine(_PatchMachine):
    """ELS: pixel p's candidates are training patches centred anywhere the geometry admits."""

    kind = "els"


_MACHINES: dict[str, type[ScoreMachine]] = {
    cls.kind: cls
    for cls in (IdealScoreMachine, EquivariantScoreMachine, LocalScoreMachine, EquivariantLocalScoreMachine)
}


@dataclass(frozen=True)
class MachineDenoiser:
    """A score machine with its locality schedule k(sigma) and label bound: ``D(x, sigma) -> x0_hat``.

    Rows of a batch whose sigmas map to different patch sizes are denoised in
    one call per size.
    """

    machine: ScoreMachine
    patch_sizes: PatchSchedule | None
    label: int | torch.Tensor | None

    def patch_size_at(self, sigma: float | torch.Tensor) -> int | None:
        """k at noise level ``sigma``, or None for machines without patches."""
        return None if self.patch_sizes is None else self.patch_sizes.size_at(sigma)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        return self._apply(x, sigma, track=None)[0]

    def bind(self, *, label: int | torch.Tensor | None = None, **_: object) -> "MachineDenoiser":
        """The same machine and locality schedule with ``label`` bound instead."""
        return self.machine.bind(patch_sizes=self.patch_sizes, label=label)

    def with_provenance(
        self, x: torch.Tensor, sigma: torch.Tensor | float, *, top: int = 8
    ) -> tuple[torch.Tensor, Provenance]:
        """``(x0_hat, provenance)`` at ``sigma`` (see :meth:`ScoreMachine.denoise_provenance`)."""
        return self._apply(x, sigma, track=self.machine._check_top(top))

    def _apply(
        self, x: torch.Tensor, sigma: torch.Tensor | float, track: int | None
    ) -> tuple[torch.Tensor, Provenance | None]:
        self.machine._check_images(x, "x")
        sig = sigma_vector(sigma, x)  # [B]
        sizes = [self.patch_size_at(s) for s in sig.tolist()]
        if len(set(sizes)) == 1:
            return self.machine._call_ve(x, sig, sizes[0], self.label, track)
        label = self.label
        if label is not None and torch.as_tensor(label).ndim:
            label = torch.as_tensor(label).to(torch.long)
        out, parts = torch.empty_like(x), []
        for k in sorted(set(sizes)):
            rows = torch.tensor([i for i, size in enumerate(sizes) if size == k], device=x.device)  # [B_k]
            lab = label[rows.cpu()] if torch.is_tensor(label) and label.ndim else label
            out[rows], prov = self.machine._call_ve(x[rows], sig[rows], k, lab, track)
            parts.append((rows, prov))
        return out, None if track is None else Provenance.scatter(parts, x.shape[0])
