"""Calibrating a locality schedule k(t) against a trained network.

Kamb & Ganguli (2412.20292, Sec. 5) choose, for every time step, the patch size
of the ELS machine whose denoiser best matches the trained network. Here the
*network drives the sampler*: DDIM runs on the network's own estimates, and at
each step ``t_i = i / n`` the network's ``x0_hat(x_t, t_i)`` is compared, at the
*same* ``x_t``, with each candidate machine's ``x0_hat_k(x_t, t_i)``:

* ``metric="cosine"``: cosine similarity of the flattened images (higher wins);
* ``metric="l2"``: Euclidean distance ``||x0_net - x0_k||`` (lower wins).

Per step and seed the best candidate wins (ties go to the smallest k); per step
the schedule takes the median over seeds, rounded *down* to a candidate: the
largest candidate not above the median. With consecutive odd candidates
(3, 5, 7, ...) that is "if the median of odd sizes lands between two odd sizes
(an even number of seeds), take the lower one".

Time indexing is the sampler's (:class:`~patchmosaic.schedules.PatchSchedule`):
the size chosen at ``t = i / n`` is stored at index ``i - 1``, lowest noise
first, and is the size :meth:`PatchSchedule.at` returns at that time. (The
paper's released code stores at ``i - 1`` but reads index ``i``.)

Cost: every candidate k is one full machine call per step on the whole batch of
seeds; nothing is shared across k yet (the logit blocks of different patch
sizes share the same per-channel products and could be accumulated
incrementally from k to k + 2). :class:`CalibrationResult` reports the cost as
the time of all candidate evaluations over the time of the chosen candidate's
call, per step and in total: how many machine sampling runs one calibration costs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchmosaic.geometry import make_geometry
from patchmosaic.machines import ScoreMachine
from patchmosaic.sampler import Denoiser, sample
from patchmosaic.schedules import (
    CosineSchedule,
    PatchSchedule,
    check_patch_size,
    time_grid,
)

__all__ = [
    "METRICS",
    "CalibrationResult",
    "calibrate",
    "check_candidates",
    "median_patch_size",
    "parse_candidates",
    "similarity",
]

METRICS = ("cosine", "l2")


def similarity(reference: torch.Tensor, estimate: torch.Tensor, metric: str) -> torch.Tensor:
    """Per-sample score of ``estimate`` against ``reference``, oriented so that *higher is better*.

    Args:
        reference: ``[B, C, H, W]`` network estimates.
        estimate: ``[B, C, H, W]`` machine estimates.
        metric: ``"cosine"``: cosine similarity of the flattened images (0 if
            either is all zero); ``"l2"``: minus the Euclidean distance.

    Returns:
        ``[B]`` float64 scores.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    a = reference.reshape(reference.shape[0], -1).to(torch.float64)  # [B, D]
    b = estimate.reshape(estimate.shape[0], -1).to(torch.float64)  # [B, D]
    if metric == "l2":
        return -torch.linalg.vector_norm(a - b, dim=1)  # [B]
    denom = torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(b, dim=1)  # [B]
    return torch.where(denom > 0, (a * b).sum(dim=1) / denom.clamp_min(1e-300), torch.zeros_like(denom))


def parse_candidates(spec: str) -> tuple[int, ...]:
    """Parse ``"3,5,7"`` or the odd range ``"3-21"`` (= 3, 5, ..., 21), or a mix, into sorted sizes.

    Raises:
        ValueError: On an even, non-positive, repeated or unparsable size.
    """
    sizes: list[int] = []
    for item in str(spec).split(","):
        item = item.strip()
        try:
            if "-" in item:
                lo, hi = (int(p) for p in item.split("-"))
                if lo % 2 == 0 or hi % 2 == 0 or hi < lo:
                    raise ValueError(f"range {item!r} must run from one odd size up to another (e.g. 3-21)")
                sizes.extend(range(lo, hi + 1, 2))
            else:
                sizes.append(int(item))
        except ValueError as err:
            if "range" in str(err):
                raise
            raise ValueError(f"cannot parse candidate {item!r} in {spec!r}: expected odd sizes like 3,5,7 or 3-21") from None
    for k in sizes:
        check_patch_size(k)
    repeated = sorted({k for k in sizes if sizes.count(k) > 1})
    if repeated:
        raise ValueError(f"candidate sizes {repeated} are repeated in {spec!r}")
    return tuple(sorted(sizes))


def check_candidates(machine: ScoreMachine, candidates: Sequence[int]) -> tuple[int, ...]:
    """Validate candidate patch sizes against ``machine``; return them sorted.

    A size must be odd, accepted by the machine's geometry, and at most
    ``2 * min(H, W) - 1`` (a patch that covers the whole image from every
    pixel; larger ones only add padding, so they could never win a tie).

    Raises:
        ValueError: Naming the offending size and the limit.
    """
    if machine.kind not in ("ls", "els"):
        raise ValueError(f"calibration needs a patch machine (ls or els), got kind={machine.kind!r}")
    if len(candidates) == 0:
        raise ValueError("no candidate patch sizes given")
    _, H, W = machine.image_shape
    limit = 2 * min(H, W) - 1
    out = sorted(check_patch_size(int(k)) for k in candidates)
    if len(set(out)) != len(out):
        raise ValueError(f"candidate sizes are repeated: {out}")
    for k in out:
        if k > limit:
            raise ValueError(
                f"candidate patch size {k} exceeds what the {machine.kind} machine allows on {H}x{W} images "
                f"(at most {limit}: a patch covering the whole image from every pixel)"
            )
        make_geometry(machine.kind, machine.padding, H, W, k, wrap=machine.wrap_training_patches)
    return tuple(out)


def median_patch_size(choices: Sequence[int], candidates: Sequence[int]) -> int:
    """The median of per-seed choices, rounded down to the largest candidate not above it.

    With an odd number of seeds the median is one of the choices. With an even
    number it is the mean of the two middle choices; e.g. choices (5, 7) give
    6, and with consecutive odd candidates the lower odd size, 5, is taken.
    """
    m = float(np.median(np.asarray(choices, dtype=np.float64)))
    below = [k for k in sorted(candidates) if k <= m + 1e-9]
    return below[-1] if below else min(candidates)


@dataclass
class CalibrationResult:
    """The calibrated schedule and everything that went into it.

    Every ``[steps, ...]`` array is indexed like :attr:`PatchSchedule.sizes`:
    row ``i - 1`` belongs to ``t = i / steps`` (row 0 is the lowest noise).
    """

    schedule: PatchSchedule  # the median choice per step, lowest noise first
    candidates: tuple[int, ...]  # the patch sizes tried, ascending
    metric: str  # "cosine" or "l2"
    seeds: list[int]  # one column per seed
    labels: list[int] | None  # the class of each seed (conditional models)
    times: list[float]  # [steps] t = i / steps for row i - 1
    choices: np.ndarray  # [steps, S] best candidate per step and seed
    scores: np.ndarray  # [steps, K, S] raw metric (cosine similarity, or L2 distance)
    candidate_seconds: np.ndarray  # [steps, K] wall time of each candidate's machine call
    network_seconds: np.ndarray  # [steps] wall time of the network call
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return self.schedule.steps

    def cost(self) -> dict[str, Any]:
        """Calibration cost relative to one machine call at the chosen (median) k.

        Per step: ``sum_k seconds(k) / seconds(k_chosen)``; the ``total`` ratio is
        the same with both sides summed over the steps, i.e. calibration time
        over the time of one machine sampling run with the calibrated schedule.
        The chosen k is one of the candidates, so its call was timed already.
        """
        idx = [self.candidates.index(k) for k in self.schedule.sizes]  # [steps]
        chosen = self.candidate_seconds[np.arange(self.steps), idx]  # [steps]
        per_step = self.candidate_seconds.sum(axis=1) / np.maximum(chosen, 1e-12)  # [steps]
        return {
            "definition": "time of all candidate machine calls / time of one machine call at the chosen k "
            "(the same x_t batch); each candidate is one full machine call, no work is shared across k",
            "per_step_ratio": [round(float(r), 3) for r in per_step],
            "total_ratio": round(float(self.candidate_seconds.sum() / max(chosen.sum(), 1e-12)), 3),
            "candidate_seconds_total": round(float(self.candidate_seconds.sum()), 3),
            "chosen_k_seconds_total": round(float(chosen.sum()), 3),
            "network_seconds_total": round(float(self.network_seconds.sum()), 3),
        }

    def metadata(self) -> dict[str, Any]:
        """JSON-able record of the calibration (saved beside the schedule)."""
        scores = np.round(self.scores, 6)
        return {
            "calibration": {
                "metric": self.metric,
                "metric_orientation": "cosine: higher is better" if self.metric == "cosine" else "l2: lower is better",
                "candidates": list(self.candidates),
                "seeds": list(self.seeds),
                "labels": self.labels,
                "times": self.times,
                "rule": "per step and seed the best candidate (ties: smaller k); per step the median over seeds, "
                "rounded down to the largest candidate not above it; sizes[i-1] is used at t = i/steps",
                "choices": self.choices.tolist(),  # [steps][S]
                "scores": scores.tolist(),  # [steps][K][S]
                "mean_scores": np.round(self.scores.mean(axis=2), 6).tolist(),  # [steps][K]
                "cost": self.cost(),
                **self.extra,
            }
        }

    def save(self, path: str | Path, **metadata: Any) -> None:
        """Write the schedule file (:meth:`PatchSchedule.save` JSON plus the calibration record)."""
        self.schedule.save(path, **metadata, **self.metadata())


def calibrate(
    network: Denoiser,
    machine: ScoreMachine,
    noise: torch.Tensor,
    *,
    candidates: Sequence[int],
    steps: int = 20,
    metric: str = "cosine",
    label: int | torch.Tensor | None = None,
    seeds: Sequence[int] | None = None,
    schedule: CosineSchedule = CosineSchedule(),
    progress: Callable[[int, float, int], None] | None = None,
) -> CalibrationResult:
    """Calibrate a locality schedule: the machine patch size that best matches the network per step.

    The network drives DDIM from ``noise``; at every step each candidate
    machine denoises the network's current ``x_t`` (one ``[B, C, H, W]`` batch
    per candidate: all seeds in one call).

    Args:
        network: ``D(x_t, t) -> x0_hat`` (a conditional network must be bound to
            ``label`` already, or offer ``bind(label=)``).
        machine: A ``"ls"`` or ``"els"`` :class:`ScoreMachine` on the network's training set.
        noise: ``[B, C, H, W]`` initial noise, one row per seed.
        candidates: Odd patch sizes to try (see :func:`check_candidates`).
        steps: Sampler steps n; the schedule has n sizes.
        metric: ``"cosine"`` or ``"l2"`` (see :func:`similarity`).
        label: ``None``, an int or a ``[B]`` tensor, for network and machine alike.
        seeds: Names of the ``B`` rows, recorded in the result (default ``0..B-1``).
        schedule: Noise schedule of network and machine.
        progress: Called as ``progress(i, t_i, k_best)`` after each step.

    Returns:
        A :class:`CalibrationResult`.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    cands = check_candidates(machine, candidates)
    if noise.ndim != 4:
        raise ValueError(f"noise must have shape [B, C, H, W], got {tuple(noise.shape)}")
    B = noise.shape[0]
    seeds = list(range(B)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != B:
        raise ValueError(f"{len(seeds)} seeds for a batch of {B} noise images")
    if label is not None:
        bind = getattr(network, "bind", None)
        if bind is not None:
            network = bind(label=label)
        machine._label_vector(label, B)  # validate before the first step
    K = len(cands)
    grid = time_grid(steps)  # [steps + 1], 1 -> 0
    scores = np.full((steps, K, B), np.nan)
    choices = np.zeros((steps, B), dtype=np.int64)
    candidate_seconds = np.zeros((steps, K))
    network_seconds = np.zeros(steps)
    lower_is_better = metric == "l2"
    row_of = PatchSchedule((cands[0],) * steps).index  # t = i / steps -> row i - 1, as the sampler reads it

    def probe(x_t: torch.Tensor, t: float) -> torch.Tensor:
        """The network's estimate (it drives DDIM); records every candidate's match at this x_t."""
        row = row_of(t)
        start = time.perf_counter()
        x0_net = network(x_t, t)  # [B, C, H, W]
        network_seconds[row] = time.perf_counter() - start
        ab = float(schedule.alpha_bar(t))
        for j, k in enumerate(cands):
            start = time.perf_counter()
            x0_k = machine.denoise(x_t.to(machine.images.dtype), ab, patch_size=k, label=label)  # [B, C, H, W]
            candidate_seconds[row, j] = time.perf_counter() - start
            sim = similarity(x0_net, x0_k, metric)  # [B], higher is better
            scores[row, j] = (-sim if lower_is_better else sim).numpy()
        best = np.argmax(-scores[row] if lower_is_better else scores[row], axis=0)  # [B], first max: smallest k
        choices[row] = np.asarray(cands)[best]
        if progress is not None:
            progress(row + 1, t, median_patch_size(choices[row].tolist(), cands))
        return x0_net

    sample(probe, noise, steps=steps, schedule=schedule)
    sizes = tuple(median_patch_size(choices[r].tolist(), cands) for r in range(steps))
    labels = None
    if label is not None:
        lab = torch.as_tensor(label).to(torch.long)
        labels = (lab.expand(B) if lab.ndim == 0 else lab).tolist()
    return CalibrationResult(
        schedule=PatchSchedule(sizes, name="calibrated"),
        candidates=cands,
        metric=metric,
        seeds=seeds,
        labels=labels,
        times=[float(grid[steps - 1 - r]) for r in range(steps)],  # row r <-> t = (r + 1) / steps
        choices=choices,
        scores=scores,
        candidate_seconds=candidate_seconds,
        network_seconds=network_seconds,
    )
