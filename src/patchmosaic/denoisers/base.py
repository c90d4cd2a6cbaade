"""The denoiser protocol shared by every method and network (k-diffusion / EDM form).

A denoiser is any callable ``D(x, sigma) -> x0_hat`` (Karras et al. 2206.00364):

* ``x`` ``[B, C, H, W]`` float tensor, ``x = x0 + sigma * eps`` (variance exploding);
* ``sigma`` ``[B]`` float tensor of noise levels, every entry finite and > 0
  (:func:`sigma_vector` also accepts a Python float);
* the result ``[B, C, H, W]`` estimates ``E[x0 | x]`` in the dtype and on the device of ``x``.

Denoisers with a training set also take ``label=`` (an int or a ``[B]`` tensor)
as a keyword. Samplers (:mod:`patchmosaic.samplers`) only ever call
``D(x, sigma)``; locality schedules, labels and noise schedules are bound into
the denoiser beforehand (e.g. :meth:`patchmosaic.ScoreMachine.bind`). The paper's
VP form is a change of variables (:mod:`patchmosaic.schedules`):
``D(x_t / sqrt(abar), sigma(abar))`` is the VP posterior mean ``E[x0 | x_t]``.

This module also holds what the closed-form family shares: the input checks,
the training set with its optional labels (:class:`TrainingSet`), and per-call
random generators.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from patchmosaic.provenance import Provenance

__all__ = [
    "CHUNK_ELEMENTS",
    "COMPUTE_DTYPES",
    "Denoiser",
    "LabelBound",
    "bind_label",
    "TrainingSet",
    "TrainingSetDenoiser",
    "check_seed",
    "call_generator",
    "check_positive_int",
    "check_images",
    "check_label_vector",
    "sigma_vector",
]

COMPUTE_DTYPES = (torch.float32, torch.float64)

# Default bound on the elements of one streamed block (stacked query rows, keys,
# logits) of DataLocality and PatchComposite: 2**24 float32 values = 64 MiB.
# Measured on MNIST N = 1000, B = 8 (2 shared cores): 2**22 split the work into
# 3 chunks and ran 1.5-2x slower; the result does not depend on it (tested).
CHUNK_ELEMENTS = 1 << 24

LabelArg = int | torch.Tensor | None


@runtime_checkable
class Denoiser(Protocol):
    """``D(x, sigma) -> x0_hat`` with ``x [B, C, H, W]`` and ``sigma [B]`` (VE form)."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...


class LabelBound:
    """``D(x, sigma)`` of a denoiser that takes ``label=`` at call time, with the label fixed."""

    def __init__(self, denoiser: Callable[..., torch.Tensor], label: LabelArg) -> None:
        self.denoiser, self.label = denoiser, label

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x, sigma, label=self.label)

    def with_provenance(self, x: torch.Tensor, sigma: torch.Tensor, *, top: int = 8) -> tuple:
        """The bound denoiser's ``with_provenance`` (where it has one)."""
        return self.denoiser.with_provenance(x, sigma, label=self.label, top=top)  # type: ignore[attr-defined]

    def patch_size_at(self, sigma: float) -> int | None:
        size_at = getattr(self.denoiser, "patch_size_at", None)
        return None if size_at is None else size_at(sigma)


def bind_label(denoiser: object, label: LabelArg) -> object:
    """``denoiser`` with ``label`` bound: its own ``bind(label=)`` where it has one, else :class:`LabelBound`."""
    bind = getattr(denoiser, "bind", None)
    return bind(label=label) if bind is not None else LabelBound(denoiser, label)  # type: ignore[arg-type]


def check_label_vector(
    label: LabelArg, batch: int, classes: Sequence[int] | None, what: str = "denoiser"
) -> torch.Tensor | None:
    """``label`` (an int or a ``[B]`` tensor) as a checked ``[B]`` long tensor, or None.

    Args:
        label: The class of every sample, or of each.
        batch: B.
        classes: The classes present in the training labels; None when the
            ``what`` was built without labels.
    """
    if label is None:
        return None
    if classes is None:
        raise ValueError(f"label given but the {what} was built without training labels (labels=[N])")
    lab = torch.as_tensor(label)
    if lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
        raise ValueError(f"label must be an integer or an integer [B] tensor, got {lab.dtype}")
    lab = lab.to(torch.long).flatten() if lab.ndim else lab.to(torch.long).expand(batch)
    if lab.shape != (batch,):
        raise ValueError(f"label must be an int or a [B] = [{batch}] tensor, got {tuple(lab.shape)}")
    missing = sorted(set(lab.tolist()) - set(classes))
    if missing:
        raise ValueError(f"label(s) {missing} not present in the training labels (classes: {list(classes)})")
    return lab


def check_positive_int(value: object, name: str, *, maximum: int | None = None, what_max: str = "") -> int:
    """``value`` as an int in ``1..maximum``, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 1 or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f"..{maximum}{what_max}"
        raise ValueError(f"{name} must be in 1{upper}, got {value}")
    return int(value)


def check_seed(seed: object) -> int:
    """``seed`` as a non-negative int, else a ValueError."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def check_images(x: object, shape: tuple[int, int, int], what: str = "x") -> torch.Tensor:
    """Check that ``x`` is a finite float32/float64 ``[B, *shape]`` tensor; raise ValueError naming the problem.

    Args:
        x: The query batch.
        shape: ``(C, H, W)`` the denoiser expects (its training images').
        what: The argument's name in messages.
    """
    if not torch.is_tensor(x):
        raise ValueError(f"{what} must be a torch tensor, got {type(x).__name__}")
    C, H, W = shape
    if x.ndim == 3:
        raise ValueError(
            f"{what} has shape {tuple(x.shape)}: missing batch dimension, expected "
            f"[B, {C}, {H}, {W}] (use {what}[None] for one image)"
        )
    if x.ndim != 4:
        raise ValueError(f"{what} must have shape [B, C, H, W], got {tuple(x.shape)}")
    if x.shape[1] != C:
        raise ValueError(f"{what} has {x.shape[1]} channels but the training images have {C}")
    if tuple(x.shape[2:]) != (H, W):
        raise ValueError(f"{what} is {x.shape[2]}x{x.shape[3]} but the training images are {H}x{W}")
    if x.dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"{what} is {x.dtype}: closed-form denoisers compute in float32 or float64 (lower "
            "precision makes the 1/sigma^2-scaled logits wrong at low noise)"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{what} is an empty batch (B = 0)")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    return x


def sigma_vector(sigma: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Noise levels as a ``[B]`` tensor in ``x``'s dtype/device (a float broadcasts)."""
    s = sigma if torch.is_tensor(sigma) else torch.as_tensor(np.asarray(sigma, dtype=np.float64))
    if s.is_complex() or s.dtype == torch.bool:
        raise ValueError(f"sigma must be real, got {s.dtype}")
    s = s.to(dtype=x.dtype, device=x.device)
    B = x.shape[0]
    if s.ndim == 0:
        s = s.expand(B)
    if s.shape != (B,):
        raise ValueError(f"sigma must be a float or a [B] = [{B}] tensor, got shape {tuple(s.shape)}")
    if not torch.isfinite(s).all() or not (s > 0).all():
        raise ValueError(f"sigma must be finite and > 0 (sigma = 0 is noiseless: no denoising), got {s.tolist()}")
    return s.contiguous()


def call_generator(seed: int, call: int) -> torch.Generator:
    """CPU generator of the draws of call number ``call`` (0, 1, ...) of a denoiser built with ``seed``.

    Seeded with the 64-bit state ``numpy.random.SeedSequence([seed, call])
    .generate_state(2, uint32)`` (high word first, top bit cleared), so a run is
    reproducible from ``seed`` and nearby ``(seed, call)`` pairs give unrelated draws.
    """
    lo, hi = np.random.SeedSequence([int(seed), int(call)]).generate_state(2, dtype=np.uint32)
    return torch.Generator("cpu").manual_seed(((int(hi) << 32) | int(lo)) & 0x7FFF_FFFF_FFFF_FFFF)


class TrainingSet:
    """Training images ``X_k`` with optional class labels, split per class on demand.

    Args:
        train: ``[N, C, H, W]`` floating images (e.g. in [-1, 1]), torch or numpy.
        labels: Optional ``[N]`` integer labels enabling ``label=`` at call time.
    """

    def __init__(self, train: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | Sequence[int] | None):
        images = torch.as_tensor(train)
        if images.ndim != 4:
            raise ValueError(f"train must have shape [N, C, H, W], got {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError("empty training set: train has N = 0 images")
        if not images.is_floating_point():
            raise ValueError(f"train must be floating point (e.g. scaled to [-1, 1]), got {images.dtype}")
        if not torch.isfinite(images).all():
            raise ValueError("train contains NaN or infinite values")
        self.images = images  # [N, C, H, W]
        self.labels: torch.Tensor | None = None
        self.classes: list[int] = []
        self._index: dict[int, torch.Tensor] = {}
        self._cast: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        if labels is not None:
            lab = labels if torch.is_tensor(labels) else torch.as_tensor(np.asarray(labels))
            if lab.ndim != 1 or lab.shape[0] != images.shape[0]:
                raise ValueError(f"labels must have shape [N] = [{images.shape[0]}], got {tuple(lab.shape)}")
            if lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
                raise ValueError(f"labels must be integers, got {lab.dtype}")
            self.labels = lab.to(torch.long)  # [N]
            self.classes = [int(c) for c in torch.unique(self.labels).tolist()]
            self._index = {c: torch.nonzero(self.labels == c).flatten() for c in self.classes}

    @property
    def num(self) -> int:
        """N, the number of training images."""
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return tuple(self.images.shape[1:])

    @property
    def dim(self) -> int:
        """n = C * H * W."""
        C, H, W = self.image_shape
        return C * H * W

    def images_of(self, cls: int | None) -> torch.Tensor:
        """The stored images of class ``cls`` (all for None): ``[N_c, C, H, W]``."""
        return self.images if cls is None else self.images[self._index[cls]]

    def like(self, x: torch.Tensor) -> torch.Tensor:
        """All training images in ``x``'s dtype and device (cached): ``[N, C, H, W]``."""
        key = (x.dtype, x.device)
        if key not in self._cast:
            self._cast[key] = self.images.to(dtype=x.dtype, device=x.device)
        return self._cast[key]

    def subset(self, x: torch.Tensor, cls: int | None) -> torch.Tensor:
        """The images of class ``cls`` (all for ``None``) in ``x``'s dtype/device: ``[N_c, C, H, W]``."""
        images = self.like(x)
        if cls is None:
            return images
        return images[self._index[cls].to(x.device)]

    def global_ids(self, cls: int | None) -> torch.Tensor:
        """``[N_c]`` index in the whole training set of each image of class ``cls`` (all for None)."""
        return torch.arange(self.num) if cls is None else self._index[cls]

    def class_size(self, cls: int | None) -> int:
        """Number of training images of class ``cls`` (N for ``None``)."""
        return self.num if cls is None else int(self._index[cls].numel())

    def label_vector(self, label: LabelArg, batch: int) -> torch.Tensor | None:
        """``label`` (int or ``[B]``) as a checked ``[B]`` long tensor, or None (:func:`check_label_vector`)."""
        return check_label_vector(label, batch, None if self.labels is None else self.classes)

    def by_class(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        label: LabelArg,
        fn: Callable[..., torch.Tensor],
        *per_row: torch.Tensor,
    ) -> torch.Tensor:
        """Apply ``fn(x_rows, sigma_rows, cls, *per_row_rows)`` to the rows of each class in the batch.

        ``cls`` is None when no label is given (the whole training set);
        ``per_row`` are further ``[B, ...]`` tensors cut to the same rows.

        Returns:
            ``[B, C, H, W]``, each row from its class's call.
        """
        labels = self.label_vector(label, x.shape[0])
        if labels is None:
            return fn(x, sigma, None, *per_row)
        out = torch.empty_like(x)  # [B, C, H, W]
        for c in torch.unique(labels).tolist():
            rows = torch.nonzero(labels == c).flatten()  # [B_c]
            extra = [t[rows.to(t.device)] for t in per_row]
            rows = rows.to(x.device)
            out[rows] = fn(x[rows], sigma[rows], int(c), *extra)
        return out


class TrainingSetDenoiser:
    """Protocol entry point of the denoisers that hold a :class:`TrainingSet` (``self.train``).

    ``__call__`` checks ``x`` and ``sigma``, draws this call's per-row random
    inputs (:meth:`_draw`, none by default) and runs :meth:`_denoise_class` on the
    rows of each class (all rows with ``cls = None`` when no label is given).
    """

    train: TrainingSet
    reports_provenance = False  # True where with_provenance is implemented (_provenance_class)

    def __call__(
        self, x: torch.Tensor, sigma: float | torch.Tensor, *, label: LabelArg = None
    ) -> torch.Tensor:
        """Denoise ``x``.

        Args:
            x: ``[B, C, H, W]`` noisy images (float32 or float64), ``x = x0 + sigma * eps``.
            sigma: Float or ``[B]`` noise levels (finite, > 0).
            label: None, an int or a ``[B]`` integer tensor: restricts each row's
                training set to its class (needs ``labels`` at construction).

        Returns:
            ``[B, C, H, W]`` estimate of ``x0`` in ``x``'s dtype and device.
        """
        check_images(x, self.train.image_shape)
        s = sigma_vector(sigma, x)  # [B]
        return self.train.by_class(x, s, label, self._denoise_class, *self._draw(x.shape[0]))

    def with_provenance(
        self, x: torch.Tensor, sigma: float | torch.Tensor, *, label: LabelArg = None, top: int = 8
    ) -> tuple[torch.Tensor, Provenance]:
        """``(x0_hat, provenance)``: the denoiser's output and, per pixel, which training images made it.

        Available where the denoiser is a per-pixel mixture of training pixels
        (:mod:`patchmosaic.denoisers.mixture_provenance`); the same
        :class:`~patchmosaic.provenance.Provenance` as the score machines report.
        """
        if isinstance(top, bool) or not isinstance(top, int) or top < 0:
            raise ValueError(f"top must be a non-negative integer, got {top!r}")
        check_images(x, self.train.image_shape)
        s = sigma_vector(sigma, x)  # [B]
        labels = self.train.label_vector(label, x.shape[0])
        if labels is None:
            return self._provenance_class(x, s, None, top)
        out, parts = torch.empty_like(x), []
        for c in torch.unique(labels).tolist():
            rows = torch.nonzero(labels == c).flatten().to(x.device)  # [B_c]
            out[rows], prov = self._provenance_class(x[rows], s[rows], int(c), top)
            parts.append((rows, prov))
        return out, Provenance.scatter(parts, x.shape[0])

    def _provenance_class(
        self, x: torch.Tensor, sigma: torch.Tensor, cls: int | None, top: int
    ) -> tuple[torch.Tensor, Provenance]:
        raise ValueError(f"{type(self).__name__} reports no provenance (its output is not a mixture of training pixels)")

    def patch_size_at(self, sigma: float) -> int | None:
        """The locality size used at ``sigma`` (None: the denoiser has none)."""
        return None

    def _draw(self, batch: int) -> tuple[torch.Tensor, ...]:
        """Per-row random inputs ``[B, ...]`` of this call (none for deterministic denoisers)."""
        return ()

    def _denoise_class(self, x: torch.Tensor, sigma: torch.Tensor, cls: int | None, *draws: torch.Tensor) -> torch.Tensor:
        """``[B_c, C, H, W]`` for the rows ``x [B_c, C, H, W]`` of class ``cls`` at ``sigma [B_c]``."""
        raise NotImplementedError
