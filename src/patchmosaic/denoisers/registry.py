"""Build any closed-form denoiser of the family by name: ``build_denoiser(name, train_images, **params)``.

One table (:data:`DENOISERS`) holds, per name, the constructor, its parameters
with their defaults and published values, the formula and the source paper, so
a command line (``patchmosaic probe``, ``patchmosaic sample --denoiser NAME``)
can list and validate them from one place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from patchmosaic.denoisers.data_locality import DATA_LOCALITY_THRESHOLDS, DataLocality
from patchmosaic.denoisers.neighbours import KNNImportance, Nearest, TopK
from patchmosaic.denoisers.patch_composite import PatchComposite, pspc_cifar10_schedule
from patchmosaic.denoisers.score_machines import IdealScoreMachine as Ideal
from patchmosaic.denoisers.smoothed import Smoothed
from patchmosaic.denoisers.wiener import Wiener

__all__ = ["DENOISERS", "REQUIRED", "DenoiserSpec", "Param", "build_denoiser", "denoiser_table"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()  # marks a parameter without a default


@dataclass(frozen=True)
class Param:
    """One constructor parameter of a denoiser."""

    name: str  # keyword in build_denoiser(**params)
    default: object  # used when not given; REQUIRED: must be given
    published: str  # the value(s) the source paper uses
    help: str  # one line


@dataclass(frozen=True)
class DenoiserSpec:
    """A registry entry."""

    name: str  # registry name, e.g. "data-locality"
    build: Callable[..., object]  # build(train_images, labels=..., **params) -> denoiser
    params: tuple[Param, ...]  # its parameters
    formula: str  # D(x, sigma) in one line
    source: str  # paper (arXiv id)


_PSPC_DEFAULT = "the PSPC CIFAR-10 schedule k(sigma) (32 x 7, 23, 15, 11, 7, 5, 3 x 6 on 18 Karras sigmas)"

DENOISERS: dict[str, DenoiserSpec] = {
    spec.name: spec
    for spec in (
        DenoiserSpec(
            "ideal",
            Ideal,
            (),
            "sum_k softmax_k(-|x - X_k|^2 / 2 sigma^2) X_k",
            "Kamb & Ganguli 2412.20292 (IS machine)",
        ),
        DenoiserSpec(
            "wiener",
            Wiener,
            (Param("rank", None, "full", "keep the top r eigenpairs of the covariance (None: all)"),),
            "mu + U diag(lambda / (lambda + sigma^2)) U^T (x - mu)",
            "Gaussian posterior mean (e.g. Wang & Vastola 2303.02490)",
        ),
        DenoiserSpec(
            "data-locality",
            DataLocality,
            (
                Param("threshold", REQUIRED, ", ".join(f"{k} {v}" for k, v in DATA_LOCALITY_THRESHOLDS.items()),
                      "mask threshold in (0, 1] relative to max |W[i,j] / W[i,i]|"),
                Param("temperature", 1.0, "1", "softmax temperature"),
            ),
            "D[j] = sum_k softmax_k(-sum_i M[i,j] (x_i - X_k,i)^2 / 2 sigma^2 T) X_k,j, M from W = Sigma (Sigma + sigma^2)^-1",
            "Lukoianov et al. 2509.09672",
        ),
        DenoiserSpec(
            "pspc",
            PatchComposite,
            (
                Param("patch_size", None, _PSPC_DEFAULT,
                      "window side P (int) or k(sigma); None: the published CIFAR-10 schedule"),
                Param("flips", False, "horizontal flips as extra windows", "also use mirrored training images"),
            ),
            "mean over P x P windows w containing p of sum_k softmax_k(-|x_w - X_k,w|^2 / 2 sigma^2) X_k,w",
            "Niedoba et al. 2411.19339 (PSPC-Square)",
        ),
        DenoiserSpec(
            "smoothed",
            Smoothed,
            (
                Param("base", "ideal", "ideal (closed-form) denoiser", "registry name of the smoothed denoiser"),
                Param("std", REQUIRED, "chosen per dataset", "smoothing std in the VE units of x"),
                Param("draws", 8, "Monte-Carlo average", "perturbations averaged per call"),
                Param("seed", 0, "-", "seed of the per-call generators"),
            ),
            "mean_m base(x + std eps_m, sigma)",
            "Scarvelis et al. 2310.12395",
        ),
        DenoiserSpec(
            "topk",
            TopK,
            (Param("k", REQUIRED, "-", "nearest training images kept (1..N)"),),
            "sum_{k in kNN(x)} softmax_k(-|x - X_k|^2 / 2 sigma^2) X_k",
            "Niedoba et al. 2402.08018 (top-k part)",
        ),
        DenoiserSpec(
            "knn",
            KNNImportance,
            (
                Param("k", REQUIRED, "-", "exact nearest neighbours (1..N)"),
                Param("samples", REQUIRED, "-", "importance samples of the tail per query"),
                Param("seed", 0, "-", "seed of the per-call generators"),
            ),
            "(Y_kNN + (N-k)/S sum_s u_s X_s) / (Z_kNN + (N-k)/S sum_s u_s), s uniform over the tail",
            "Niedoba et al. 2402.08018",
        ),
        DenoiserSpec(
            "nearest",
            Nearest,
            (),
            "argmin_k |x - X_k| (the training image)",
            "sigma -> 0 limit of the ideal denoiser",
        ),
    )
}


def _resolve(spec: DenoiserSpec, params: dict[str, object], extra_ok: bool = False) -> tuple[dict, dict]:
    """Split ``params`` into this spec's (with defaults filled) and the rest; check unknown/missing ones."""
    known = {p.name for p in spec.params}
    rest = {k: v for k, v in params.items() if k not in known}
    if rest and not extra_ok:
        expected = ", ".join(sorted(known)) or "none"
        raise ValueError(f"unknown parameter(s) {sorted(rest)} for denoiser {spec.name!r}; expected: {expected}")
    own = {}
    for p in spec.params:
        value = params.get(p.name, p.default)
        if value is REQUIRED:
            raise ValueError(f"denoiser {spec.name!r} needs the parameter {p.name}= ({p.help}; published: {p.published})")
        own[p.name] = value
    return own, rest


def build_denoiser(
    name: str,
    train_images: torch.Tensor | np.ndarray,
    *,
    labels: torch.Tensor | np.ndarray | Sequence[int] | None = None,
    **params: object,
) -> object:
    """Construct the denoiser ``name`` on ``train_images``.

    Args:
        name: One of :data:`DENOISERS` (``ideal``, ``wiener``, ``data-locality``,
            ``pspc``, ``smoothed``, ``topk``, ``knn``, ``nearest``).
        train_images: ``[N, C, H, W]`` training images.
        labels: Optional ``[N]`` integer labels, enabling ``label=`` at call time.
        **params: The denoiser's parameters (see :func:`denoiser_table`).
            ``smoothed`` takes ``base=`` (a registry name, default ``ideal``) and
            passes the parameters it does not know to that base.

    Returns:
        A callable ``D(x, sigma, label=None) -> x0_hat``.

    Raises:
        ValueError: Unknown name, unknown or missing parameter, or a parameter
            out of range (raised by the denoiser's constructor).
    """
    if name not in DENOISERS:
        raise ValueError(f"unknown denoiser {name!r}; expected one of {sorted(DENOISERS)}")
    spec = DENOISERS[name]
    own, rest = _resolve(spec, params, extra_ok=name == "smoothed")
    if name == "smoothed":
        base = own.pop("base")
        if base == "smoothed" or base not in DENOISERS:
            raise ValueError(f"smoothed: base must be one of {sorted(set(DENOISERS) - {'smoothed'})}, got {base!r}")
        return Smoothed(build_denoiser(base, train_images, labels=labels, **rest), **own)
    if name == "pspc" and own["patch_size"] is None:
        own["patch_size"] = pspc_cifar10_schedule()
    return spec.build(train_images, labels=labels, **own)


def denoiser_table() -> str:
    """Markdown table of every denoiser: name, formula, parameters (default; published), source."""
    lines = ["| name | D(x, sigma) | parameters (default; published) | source |", "|---|---|---|---|"]
    for spec in DENOISERS.values():
        params = "; ".join(f"`{p.name}` ({p.default!r}; {p.published})" for p in spec.params) or "-"
        lines.append(f"| `{spec.name}` | {spec.formula} | {params} | {spec.source} |")
    return "\n".join(lines)
