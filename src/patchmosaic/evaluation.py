"""How well the score machines predict a trained network's samples, seed by seed.

For every seed, the network and the machines run DDIM from the same initial
noise (:func:`patchmosaic.noise_for_seed`); each machine's final image is
compared with the network's (the reference):

* ``pearson_r``: the Pearson correlation r of the two flattened images. This
  is the number the paper's released code reports (and labels "r^2");
* ``r_squared``: its square, r^2;
* ``R2``: the coefficient of determination ``1 - SS_res / SS_tot`` with
  ``SS_res = sum (net - machine)^2`` and ``SS_tot = sum (net - mean(net))^2``
  over one image's n pixels: unlike r it penalises offsets and scale errors,
  and can be negative;
* ``R2_ads``: per-image R^2 as Analytic Diffusion Studio defines it,
  ``1 - SSE / (n * var(net))`` with the unbiased variance
  ``var(net) = SS_tot / (n - 1)``, i.e. ``1 - (n - 1) / n * SS_res / SS_tot``
  (ADS reports its mean over images: ``R2_ads_mean``);
* ``mse``: ``SS_res / n``, the mean squared pixel error;
* ``R2_pooled`` (one number per denoiser, not per seed):
  ``1 - sum_s SS_res_s / sum_s sum_p (net_sp - mean(net))^2`` over all seeds'
  pixels, the mean taken over all of them (:func:`pooled_r2`).

Aggregates are medians over seeds with a percentile-bootstrap 95% interval
(:func:`bootstrap_median`: numpy ``default_rng(seed)``, 10,000 resamples by
default; ``R2_pooled`` gets a bootstrap over seeds of the pooled value,
:func:`bootstrap_pooled_r2`), plus the fraction of seeds where the ELS machine
beats each other denoiser on Pearson r (strictly greater). The nearest training
image (L2) to each network sample is recorded as a memorisation check.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from patchmosaic.samplers import sample_seeds
from patchmosaic.schedules import PatchSchedule, sigmas_cosine

__all__ = [
    "METRIC_NAMES",
    "EvaluationResult",
    "beats_fraction",
    "bootstrap_median",
    "bootstrap_pooled_r2",
    "coefficient_of_determination",
    "compare",
    "evaluate",
    "mean_squared_error",
    "nearest_training_images",
    "pearson_r",
    "pooled_r2",
    "r2_ads",
    "run_sampler",
    "save_comparison",
    "save_scatter",
    "summarize",
]

METRIC_NAMES = ("pearson_r", "r_squared", "R2", "R2_ads", "mse")


def _flat(images: np.ndarray | torch.Tensor) -> np.ndarray:
    arr = images.detach().cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
    if arr.ndim < 2:
        raise ValueError(f"images must have shape [B, ...], got {list(arr.shape)}")
    return arr.reshape(arr.shape[0], -1).astype(np.float64)  # [B, D]


def _pair(reference: np.ndarray | torch.Tensor, estimate: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    a, b = _flat(reference), _flat(estimate)  # [B, D], [B, D]
    if a.shape != b.shape:
        raise ValueError(f"reference and estimate differ in shape: {list(a.shape)} vs {list(b.shape)}")
    return a, b


def pearson_r(reference: np.ndarray | torch.Tensor, estimate: np.ndarray | torch.Tensor) -> np.ndarray:
    """Pearson correlation of each pair of flattened images.

    Args:
        reference: ``[B, ...]`` images (the network's).
        estimate: ``[B, ...]`` images (a machine's).

    Returns:
        ``[B]`` float64 r in [-1, 1]; NaN where either image is constant.
    """
    a, b = _pair(reference, estimate)
    a = a - a.mean(axis=1, keepdims=True)  # [B, D]
    b = b - b.mean(axis=1, keepdims=True)  # [B, D]
    denom = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))  # [B]
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=1) / denom
    return np.where(denom > 0, np.clip(r, -1.0, 1.0), np.nan)


def coefficient_of_determination(
    reference: np.ndarray | torch.Tensor, estimate: np.ndarray | torch.Tensor
) -> np.ndarray:
    """``R^2 = 1 - SS_res / SS_tot`` of ``estimate`` as a prediction of ``reference``, per image.

    Returns:
        ``[B]`` float64 (1 for a perfect prediction, <= 1, may be negative; NaN for a constant reference).
    """
    a, b = _pair(reference, estimate)
    ss_res = ((a - b) ** 2).sum(axis=1)  # [B]
    ss_tot = ((a - a.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)  # [B]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ss_tot > 0, 1.0 - ss_res / ss_tot, np.nan)


def r2_ads(reference: np.ndarray | torch.Tensor, estimate: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per-image R^2 of Analytic Diffusion Studio: ``1 - SSE / (n * var_unbiased(reference))``.

    With n pixels per image, ``var_unbiased = SS_tot / (n - 1)``, so this is
    ``1 - (n - 1) / n * SS_res / SS_tot`` (slightly above :func:`coefficient_of_determination`).

    Returns:
        ``[B]`` float64; NaN for a constant reference or a one-pixel image.
    """
    a, b = _pair(reference, estimate)
    n = a.shape[1]
    sse = ((a - b) ** 2).sum(axis=1)  # [B]
    var = a.var(axis=1, ddof=1) if n > 1 else np.full(a.shape[0], np.nan)  # [B] unbiased
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(var > 0, 1.0 - sse / (n * var), np.nan)


def mean_squared_error(reference: np.ndarray | torch.Tensor, estimate: np.ndarray | torch.Tensor) -> np.ndarray:
    """``[B]`` mean over pixels of ``(reference - estimate)^2``."""
    a, b = _pair(reference, estimate)
    return ((a - b) ** 2).mean(axis=1)


def pooled_r2(reference: np.ndarray | torch.Tensor, estimate: np.ndarray | torch.Tensor) -> float:
    """One R^2 over all images' pixels: ``1 - sum (ref - est)^2 / sum (ref - mean(ref))^2``.

    The mean is over every pixel of every image (not per image), so the
    denominator also counts the variation between images.

    Returns:
        float (NaN for a constant reference).
    """
    a, b = _pair(reference, estimate)
    ss_tot = float(((a - a.mean()) ** 2).sum())
    return 1.0 - float(((a - b) ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")


def bootstrap_pooled_r2(
    reference: np.ndarray | torch.Tensor,
    estimate: np.ndarray | torch.Tensor,
    *,
    resamples: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """:func:`pooled_r2` with a percentile-bootstrap interval over images (resampled with replacement).

    Returns:
        ``{"value", "ci_low", "ci_high", "n", "level", "resamples", "seed"}``.
    """
    if resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"need resamples >= 1 and 0 < level < 1, got {resamples}, {level}")
    a, b = _pair(reference, estimate)  # [S, D]
    S = a.shape[0]
    out: dict[str, Any] = {"n": S, "level": level, "resamples": resamples, "seed": seed}
    value = pooled_r2(a, b)
    sse = ((a - b) ** 2).sum(axis=1)  # [S]
    s1, s2, d = a.sum(axis=1), (a * a).sum(axis=1), a.shape[1]  # [S], [S], pixels per image
    rng = np.random.default_rng(seed)
    values = np.empty(resamples)
    per_chunk = max(1, 2**20 // max(S, 1))
    for start in range(0, resamples, per_chunk):
        stop = min(resamples, start + per_chunk)
        idx = rng.integers(0, S, size=(stop - start, S))  # [r, S]
        total = s1[idx].sum(axis=1)  # [r]
        ss_tot = s2[idx].sum(axis=1) - total**2 / (S * d)  # [r] sum of squares about the pooled mean
        with np.errstate(invalid="ignore", divide="ignore"):
            values[start:stop] = np.where(ss_tot > 0, 1.0 - sse[idx].sum(axis=1) / ss_tot, np.nan)
    finite = values[np.isfinite(values)]
    if not np.isfinite(value) or finite.size == 0:
        return {"value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), **out}
    lo, hi = np.quantile(finite, [(1.0 - level) / 2, (1.0 + level) / 2])
    return {"value": value, "ci_low": float(lo), "ci_high": float(hi), **out}


def beats_fraction(r_machine: Sequence[float] | np.ndarray, r_other: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """How often ``r_machine > r_other`` (strictly), over the seeds where both are finite.

    Returns:
        ``{"wins", "n", "fraction"}`` (fraction NaN when n = 0).
    """
    a, b = np.asarray(r_machine, dtype=np.float64), np.asarray(r_other, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    wins = int((a[ok] > b[ok]).sum())
    n = int(ok.sum())
    return {"wins": wins, "n": n, "fraction": wins / n if n else float("nan")}


def compare(reference: np.ndarray | torch.Tensor, estimate: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
    """Every metric of :data:`METRIC_NAMES`, each ``[B]``, of ``estimate`` against ``reference``."""
    r = pearson_r(reference, estimate)
    return {"pearson_r": r, "r_squared": r**2, "R2": coefficient_of_determination(reference, estimate),
            "R2_ads": r2_ads(reference, estimate), "mse": mean_squared_error(reference, estimate)}


def bootstrap_median(
    values: Sequence[float] | np.ndarray, *, resamples: int = 10_000, level: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """Median with a percentile-bootstrap confidence interval.

    Draws ``resamples`` samples of size n with replacement from the finite
    values (``numpy.random.default_rng(seed)``, so the interval is
    deterministic), takes each one's median and reports the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of those medians.

    Returns:
        ``{"median", "ci_low", "ci_high", "n", "level", "resamples", "seed"}``;
        NaNs when no value is finite.
    """
    if resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"need resamples >= 1 and 0 < level < 1, got {resamples}, {level}")
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]  # [n]
    out: dict[str, Any] = {"n": int(x.size), "level": level, "resamples": resamples, "seed": seed}
    if x.size == 0:
        return {"median": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), **out}
    rng = np.random.default_rng(seed)
    medians = np.empty(resamples)
    per_chunk = max(1, 2**20 // x.size)  # bounded memory: at most ~2^20 indices at a time
    for start in range(0, resamples, per_chunk):
        stop = min(resamples, start + per_chunk)
        idx = rng.integers(0, x.size, size=(stop - start, x.size))  # [r, n]
        medians[start:stop] = np.median(x[idx], axis=1)
    lo, hi = np.quantile(medians, [(1.0 - level) / 2, (1.0 + level) / 2])
    return {"median": float(np.median(x)), "ci_low": float(lo), "ci_high": float(hi), **out}


def nearest_training_images(
    queries: np.ndarray | torch.Tensor, train: np.ndarray | torch.Tensor, *, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Index and L2 distance of the nearest training image to each query.

    Args:
        queries: ``[B, C, H, W]`` images.
        train: ``[N, C, H, W]`` training images.

    Returns:
        ``([B] int64 indices, [B] float64 distances)``.
    """
    q = torch.as_tensor(_flat(queries))  # [B, D]
    best_d = torch.full((q.shape[0],), float("inf"), dtype=torch.float64)  # [B]
    best_i = torch.zeros(q.shape[0], dtype=torch.long)  # [B]
    t_all = torch.as_tensor(train)
    for start in range(0, t_all.shape[0], chunk):
        t = t_all[start : start + chunk].reshape(-1, q.shape[1]).to(torch.float64)  # [n, D]
        d = torch.cdist(q, t)  # [B, n]
        m, i = d.min(dim=1)  # [B], [B]
        better = m < best_d
        best_d = torch.where(better, m, best_d)
        best_i = torch.where(better, i + start, best_i)
    return best_i.numpy(), best_d.numpy()


def summarize(
    images: Mapping[str, np.ndarray],
    seeds: Sequence[int],
    *,
    reference: str = "network",
    machine: str = "els",
    baseline: str = "ideal",
    labels: Sequence[int] | None = None,
    train_images: np.ndarray | torch.Tensor | None = None,
    resamples: int = 10_000,
    bootstrap_seed: int = 0,
) -> dict[str, Any]:
    """Per-seed metrics of every non-reference entry of ``images`` and their aggregates.

    Args:
        images: ``name -> [S, C, H, W]`` final samples, rows in the order of ``seeds``.
        seeds: The ``S`` seeds.
        reference: The key of the network's samples.
        machine, baseline: Keys compared in ``fraction_machine_beats_baseline``.
        labels: The class of each seed (conditional runs).
        train_images: ``[N, C, H, W]`` training set for the nearest-image check.
        resamples, bootstrap_seed: See :func:`bootstrap_median`.

    Returns:
        ``{"per_seed": [row per seed], "aggregates": {name: {metric: bootstrap}},
        "fraction_machine_beats_baseline": ..., ...}``.
    """
    if reference not in images:
        raise ValueError(f"no {reference!r} samples among {sorted(images)}")
    ref = images[reference]
    S = len(seeds)
    for name, arr in images.items():
        if len(arr) != S:
            raise ValueError(f"{name}: {len(arr)} samples for {S} seeds")
    names = [n for n in images if n != reference]
    metrics = {n: compare(ref, images[n]) for n in names}  # name -> metric -> [S]
    rows: list[dict[str, Any]] = []
    nearest = None
    if train_images is not None:
        nearest = nearest_training_images(ref, train_images)
        train_arr = torch.as_tensor(train_images).numpy()
        nearest_r = pearson_r(ref, train_arr[nearest[0]])
    for s in range(S):
        row: dict[str, Any] = {"seed": int(seeds[s]), "label": None if labels is None else int(labels[s])}
        for n in names:
            for m in METRIC_NAMES:
                row[f"{m}_{n}"] = _json_float(metrics[n][m][s])
        if machine in metrics and baseline in metrics:
            row[f"{machine}_beats_{baseline}"] = bool(metrics[machine]["pearson_r"][s] > metrics[baseline]["pearson_r"][s])
        if nearest is not None:
            row["nearest_train_index"] = int(nearest[0][s])
            row["nearest_train_l2"] = _json_float(nearest[1][s])
            row["pearson_r_nearest_train"] = _json_float(nearest_r[s])
        rows.append(row)
    aggregates = {
        n: {m: bootstrap_median(metrics[n][m], resamples=resamples, seed=bootstrap_seed) for m in METRIC_NAMES}
        for n in names
    }
    out: dict[str, Any] = {"n_seeds": S, "per_seed": rows, "aggregates": aggregates}
    out["pooled"] = {n: {"R2_pooled": bootstrap_pooled_r2(ref, images[n], resamples=resamples, seed=bootstrap_seed)}
                     for n in names}
    out["R2_ads_mean"] = {n: _json_float(np.nanmean(metrics[n]["R2_ads"])) if np.isfinite(metrics[n]["R2_ads"]).any()
                          else None for n in names}
    if machine in metrics:
        out["machine_beats"] = {
            "machine": machine,
            "metric": "pearson_r (strictly greater)",
            "versus": {n: beats_fraction(metrics[machine]["pearson_r"], metrics[n]["pearson_r"])
                       for n in names if n != machine},
        }
    if machine in metrics and baseline in metrics:
        wins = metrics[machine]["pearson_r"] > metrics[baseline]["pearson_r"]  # [S]
        out["fraction_machine_beats_baseline"] = {
            "machine": machine,
            "baseline": baseline,
            "metric": "pearson_r (strictly greater)",
            "wins": int(wins.sum()),
            "n": S,
            "fraction": float(wins.mean()),
        }
    if nearest is not None:
        out["aggregates"]["nearest_train"] = {
            "pearson_r": bootstrap_median(nearest_r, resamples=resamples, seed=bootstrap_seed),
            "l2": bootstrap_median(nearest[1], resamples=resamples, seed=bootstrap_seed),
        }
    return out


def _json_float(x: float) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def run_sampler(
    denoiser: Any,
    seeds: Sequence[int],
    shape: Sequence[int],
    *,
    sigmas: torch.Tensor,
    sampler: str = "euler",
    patch_sizes: PatchSchedule | None = None,
    labels: Sequence[int] | None = None,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    bar: tqdm | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """:func:`~patchmosaic.samplers.sample_seeds` for a machine (bound to ``patch_sizes``) or a network.

    Returns:
        ``[S, C, H, W]`` final samples in the order of ``seeds``.
    """
    if patch_sizes is not None:
        denoiser = denoiser.bind(patch_sizes=patch_sizes)
    callback = None if bar is None else (lambda info: bar.update(1))
    return sample_seeds(denoiser, seeds, shape, sigmas=sigmas, sampler=sampler, labels=labels,
                        batch_size=batch_size, dtype=dtype, device=device, callback=callback)


@dataclass
class EvaluationResult:
    """Final samples of every denoiser and their comparison (see :func:`summarize`)."""

    images: dict[str, np.ndarray]  # name -> [S, C, H, W] float32
    summary: dict[str, Any]
    seconds_per_seed: dict[str, float | None] = field(default_factory=dict)  # None: reused, not run


def evaluate(
    network: Any,
    machine: Any,
    baseline: Any,
    seeds: Sequence[int],
    shape: Sequence[int],
    *,
    patch_sizes: PatchSchedule,
    sigmas: torch.Tensor | None = None,
    network_sigmas: torch.Tensor | None = None,
    labels: Sequence[int] | None = None,
    names: tuple[str, str] = ("els", "ideal"),
    train_images: torch.Tensor | None = None,
    reuse: Mapping[str, np.ndarray] | None = None,
    batch_size: int = 8,
    resamples: int = 10_000,
    bootstrap_seed: int = 0,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> EvaluationResult:
    """Run the network, a patch machine (with ``patch_sizes``) and a baseline machine from the same noise.

    Args:
        network: Denoiser with ``bind(label=)`` (an :class:`~patchmosaic.models.EpsDenoiser`).
        machine: The patch :class:`~patchmosaic.ScoreMachine` (``els``).
        baseline: The baseline :class:`~patchmosaic.ScoreMachine` (``ideal``).
        seeds: Seeds; seed s starts from ``noise_for_seed(s)``.
        shape: ``(C, H, W)``.
        patch_sizes: The machine's locality schedule k(sigma).
        sigmas: The sampler grid of the machines (default: the paper's cosine grid
            with one step per entry of ``patch_sizes``).
        network_sigmas: The network's grid (default: ``sigmas``; the paper samples
            its networks on the 150-step cosine grid).
        labels: The class of each seed (conditional models), for every denoiser.
        names: Keys of the machine's and the baseline's samples.
        train_images: ``[N, C, H, W]`` for the nearest-training-image check.
        reuse: ``name -> [S, C, H, W]`` samples to use instead of running that machine.
        batch_size: Seeds per sampler call.
        resamples, bootstrap_seed: See :func:`bootstrap_median`.
        progress: tqdm bars on stderr.
        device: Where the samplers run (the denoisers must live there too).
    """
    sigmas = sigmas_cosine(len(patch_sizes)) if sigmas is None else sigmas
    network_sigmas = sigmas if network_sigmas is None else network_sigmas
    reuse = dict(reuse or {})
    runs: list[tuple[str, Any, PatchSchedule | None]] = [
        ("network", network, None), (names[0], machine, patch_sizes), (names[1], baseline, None),
    ]
    images: dict[str, np.ndarray] = {}
    seconds: dict[str, float | None] = {}
    n_batches = -(-len(seeds) // batch_size)
    for name, denoiser, ps in runs:
        if name in reuse:
            images[name] = np.asarray(reuse[name], dtype=np.float32)
            seconds[name] = None
            continue
        grid = network_sigmas if name == "network" else sigmas
        with tqdm(total=(len(grid) - 1) * n_batches, desc=name, unit="call", file=sys.stderr, dynamic_ncols=True,
                  disable=not progress) as bar:
            start = time.perf_counter()
            out = run_sampler(denoiser, seeds, shape, sigmas=grid, patch_sizes=ps, labels=labels,
                              batch_size=batch_size, bar=bar, device=device)
            seconds[name] = (time.perf_counter() - start) / len(seeds)
        images[name] = out.numpy().astype(np.float32)
    summary = summarize(images, seeds, machine=names[0], baseline=names[1], labels=labels,
                        train_images=train_images, resamples=resamples, bootstrap_seed=bootstrap_seed)
    return EvaluationResult(images=images, summary=summary, seconds_per_seed=seconds)


# ------------------------------------------------------------------ figures


def save_scatter(path: str | Path, r_machine: Sequence[float], r_baseline: Sequence[float], *,
                 machine: str = "ELS", baseline: str = "IS", title: str | None = None) -> None:
    """Per-seed Pearson r of the machine (y) against the baseline (x), with the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = np.asarray(r_baseline, dtype=float), np.asarray(r_machine, dtype=float)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    finite = np.concatenate([x[np.isfinite(x)], y[np.isfinite(y)]])
    lo = min(0.0, float(finite.min())) - 0.03 if finite.size else 0.0  # margin: no half-drawn markers
    ax.plot([lo, 1.0], [lo, 1.0], color="0.6", lw=1, ls="--", label="y = x")
    ax.scatter(x, y, s=14, alpha=0.8)
    above = int(np.sum(y > x))
    ax.set_xlabel(f"{baseline} Pearson r with the network")
    ax.set_ylabel(f"{machine} Pearson r with the network")
    ax.set_xlim(lo, 1.02)
    ax.set_ylim(lo, 1.02)
    ax.set_aspect("equal")
    ax.set_title(title or f"{machine} beats {baseline} on {above}/{len(x)} seeds", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(path))
    plt.close(fig)


def save_comparison(path: str | Path, columns: Sequence[tuple[str, np.ndarray]], seeds: Sequence[int], *,
                    labels: Sequence[int] | None = None, rows: int = 8) -> None:
    """A grid: one row per seed (the first ``rows``), one column per ``(title, [S, C, H, W])`` entry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(rows, len(seeds))
    ncol = len(columns)
    fig, axes = plt.subplots(n, ncol, figsize=(1.3 * ncol + 0.6, 1.3 * n + 0.3), dpi=120, squeeze=False)
    for r in range(n):
        for c, (title, arr) in enumerate(columns):
            img = np.clip((np.asarray(arr[r], dtype=np.float64) + 1.0) / 2.0, 0.0, 1.0)  # [C, H, W] in [0, 1]
            ax = axes[r, c]
            if img.shape[0] == 1:
                ax.imshow(img[0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            else:
                ax.imshow(img.transpose(1, 2, 0), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=8)
            if c == 0:
                lab = "" if labels is None else f"\nclass {labels[r]}"
                ax.set_ylabel(f"seed {seeds[r]}{lab}", fontsize=7)
    fig.tight_layout()
    fig.savefig(Path(path))
    plt.close(fig)
