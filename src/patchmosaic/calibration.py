"""Calibrating a locality schedule k(t) against a trained network.

Kamb & Ganguli (2412.20292, Sec. 5) choose, for every time step, the patch size
of the ELS machine whose denoiser best matches the trained network. Here the
*network drives the sampler*: deterministic DDIM (Euler on a sigma grid) runs on
the network's own estimates, and at each grid point sigma_i the network's
``x0_hat(x, sigma_i)`` is compared, at the *same* ``x``, with each candidate
machine's ``x0_hat_k(x, sigma_i)``:

* ``metric="cosine"``: cosine similarity of the flattened images (higher wins);
* ``metric="l2"``: Euclidean distance ``||x0_net - x0_k||`` (lower wins).

Per step and seed the best candidate wins (ties go to the smallest k); per step
the schedule takes the median over seeds, rounded *down* to a candidate: the
largest candidate not above the median. With consecutive odd candidates
(3, 5, 7, ...) that is "if the median of odd sizes lands between two odd sizes
(an even number of seeds), take the lower one".

The result is a sigma-keyed :class:`~patchmosaic.schedules.PatchSchedule`: the
size chosen at grid point sigma_i is keyed by sigma_i (lowest noise first), so
``schedule.size_at(sigma_i)`` returns it on that grid and the nearest key (in
log sigma) on any other. (The paper's released code stores the size for
t = i/n at index i - 1 but reads index i.)

Cost: for an ELS :class:`~patchmosaic.denoisers.ScoreMachine` all candidates of
a step come from one call, :meth:`ScoreMachine.denoise_sizes`, which streams the
sizes from 7 up once over the training set and shares the products of nested
windows (:mod:`patchmosaic.nested`); ``shared=False`` (``calibrate
--separate-calls``) makes one full machine call per candidate instead, as LS
and the patch composite always do. :class:`CalibrationResult` reports the
machine time per step; with separate calls also the time of all candidate calls
over the time of the chosen candidate's call, per step and in total (how many
machine sampling runs one calibration costs).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchmosaic.denoisers import (
    DataLocality,
    Denoiser,
    PatchComposite,
    ScoreMachine,
    Smoothed,
)
from patchmosaic.samplers import initial_state, sample_euler
from patchmosaic.schedules import (
    PatchSchedule,
    ValueSchedule,
    check_patch_size,
    sigmas_cosine,
)

__all__ = [
    "METRICS",
    "VALUE_KNOBS",
    "CalibrationResult",
    "calibrate",
    "check_candidates",
    "median_patch_size",
    "parse_candidates",
    "similarity",
]

METRICS = ("cosine", "l2")

# Denoisers whose locality knob is a real number: class -> (attribute and parameter name, valid range, help).
VALUE_KNOBS: dict[type, tuple[str, Callable[[float], bool], str]] = {
    DataLocality: ("threshold", lambda v: 0 < v <= 1, "in (0, 1]"),
    Smoothed: ("std", lambda v: math.isfinite(v) and v >= 0, "finite and >= 0"),
}

Calibrated = ScoreMachine | PatchComposite | DataLocality | Smoothed


def _value_knob(machine: object) -> tuple[str, Callable[[float], bool], str] | None:
    """The real-valued knob of ``machine`` (:data:`VALUE_KNOBS`), or None for a patch-size knob."""
    return next((knob for cls, knob in VALUE_KNOBS.items() if isinstance(machine, cls)), None)


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


def check_candidates(machine: Calibrated, candidates: Sequence[float]) -> tuple[float, ...]:
    """Validate the candidate knob values against ``machine``; return them sorted.

    A patch size must be odd and accepted by the machine (:meth:`ScoreMachine.check_patch_sizes`:
    its geometry bounds the size by the image; a PSPC window must fit in the image). A
    data-locality threshold must lie in (0, 1], a smoothing std be finite and >= 0.

    Raises:
        ValueError: Naming the offending value and the limit.
    """
    knob = _value_knob(machine)
    if knob is not None:
        name, valid, limits = knob
        if len(candidates) == 0:
            raise ValueError(f"no candidate {name} values given")
        values = sorted(float(v) for v in candidates)
        bad = [v for v in values if not valid(v)]
        if bad:
            raise ValueError(f"candidate {name} values must be {limits}, got {bad}")
        if len(set(values)) != len(values):
            raise ValueError(f"candidate {name} values are repeated: {values}")
        return tuple(values)
    if isinstance(machine, PatchComposite):
        if len(candidates) == 0:
            raise ValueError("no candidate window sizes given")
        out = sorted(check_patch_size(int(k)) for k in candidates)
        if len(set(out)) != len(out):
            raise ValueError(f"candidate sizes are repeated: {out}")
        for k in out:
            machine._check_size(k)
        return tuple(out)
    if not machine.needs_patch_size:
        raise ValueError(f"calibration needs a patch machine (ls or els), got kind={machine.kind!r}")
    if len(candidates) == 0:
        raise ValueError("no candidate patch sizes given")
    out = sorted(check_patch_size(int(k)) for k in candidates)
    if len(set(out)) != len(out):
        raise ValueError(f"candidate sizes are repeated: {out}")
    machine.check_patch_sizes(out)
    return tuple(out)


def median_patch_size(choices: Sequence[float], candidates: Sequence[float]) -> float:
    """The median of per-seed choices, rounded down to the largest candidate not above it.

    (Used for every knob: patch sizes, PSPC windows, thresholds and stds.)

    With an odd number of seeds the median is one of the choices. With an even
    number it is the mean of the two middle choices; e.g. choices (5, 7) give
    6, and with consecutive odd candidates the lower odd size, 5, is taken.
    """
    m = float(np.median(np.asarray(choices, dtype=np.float64)))
    below = [k for k in sorted(candidates) if k <= m + 1e-9 * max(1.0, abs(m))]
    return below[-1] if below else min(candidates)


@dataclass
class CalibrationResult:
    """The calibrated schedule and everything that went into it.

    Every ``[steps, ...]`` array is indexed like :attr:`PatchSchedule.sizes`:
    row r belongs to ``sigmas[r]`` (row 0 is the lowest noise).
    """

    schedule: PatchSchedule | ValueSchedule  # the median choice per step, lowest noise first
    candidates: tuple[float, ...]  # the knob values tried (patch sizes, thresholds, stds), ascending
    metric: str  # "cosine" or "l2"
    seeds: list[int]  # one column per seed
    labels: list[int] | None  # the class of each seed (conditional models)
    sigmas: list[float]  # [steps] the grid's sigma of each row, ascending
    choices: np.ndarray  # [steps, S] best candidate per step and seed (int sizes, float values)
    scores: np.ndarray  # [steps, K, S] raw metric (cosine similarity, or L2 distance)
    candidate_seconds: np.ndarray  # [steps, K] wall time of each candidate's machine call (NaN: shared)
    network_seconds: np.ndarray  # [steps] wall time of the network call
    shared: bool = False  # all candidates of a step in one ScoreMachine.denoise_sizes call
    machine_seconds: np.ndarray | None = None  # [steps] wall time of all candidates of the step
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.schedule)

    @property
    def chosen(self) -> tuple[float, ...]:
        """The chosen value per step, lowest noise first (patch sizes or the value schedule's values)."""
        return self.schedule.values if isinstance(self.schedule, ValueSchedule) else self.schedule.sizes

    def cost(self) -> dict[str, Any]:
        """Calibration cost relative to one machine call at the chosen (median) k.

        Per step: ``sum_k seconds(k) / seconds(k_chosen)``; the ``total`` ratio is
        the same with both sides summed over the steps, i.e. calibration time
        over the time of one machine sampling run with the calibrated schedule.
        The chosen k is one of the candidates, so its call was timed already.
        With shared calls (:attr:`shared`) no single candidate is timed, and the
        record holds the machine seconds per step instead.
        """
        if self.shared:
            machine = self.machine_seconds if self.machine_seconds is not None else np.zeros(self.steps)
            return {
                "definition": "all candidates of a step in one ScoreMachine.denoise_sizes call on the same x_t batch "
                "(sizes >= 7 share the products of nested windows); per-step machine seconds, no single-candidate "
                "call is timed (benchmarks/bench_calibrate.py measures the ratios)",
                "per_step_seconds": [round(float(t), 3) for t in machine],
                "machine_seconds_total": round(float(machine.sum()), 3),
                "network_seconds_total": round(float(self.network_seconds.sum()), 3),
            }
        idx = [self.candidates.index(k) for k in self.chosen]  # [steps]
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
                "sigmas": self.sigmas,
                "rule": "per step and seed the best candidate (ties: smaller k); per step the median over seeds, "
                "rounded down to the largest candidate not above it; keyed by the step's sigma",
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


def _dtype_of(denoiser: object) -> torch.dtype:
    """The dtype a training-set denoiser computes in (a smoothed one: its base's)."""
    for holder in (denoiser, getattr(denoiser, "train", None)):  # ScoreMachine.images, TrainingSet.images
        if torch.is_tensor(getattr(holder, "images", None)):
            return holder.images.dtype
    base = getattr(denoiser, "base", None)
    if base is None:
        raise ValueError(f"cannot tell the dtype {type(denoiser).__name__} computes in (no training images)")
    return _dtype_of(base)


def _candidate_calls(machine: Calibrated,
                     cands: Sequence[float]) -> tuple[Callable[..., torch.Tensor], torch.dtype]:
    """``call(x, sigma, k, label)`` of candidate k (one call per candidate), and the dtype the machine computes in."""
    knob = _value_knob(machine)
    if knob is not None:
        views = {}
        for v in cands:  # shallow copies: the training set (and data-locality's moments and masks) are shared
            views[v] = copy.copy(machine)
            setattr(views[v], knob[0], float(v))
        return (lambda x, sigma, k, label: views[k](x, sigma, label=label)), _dtype_of(machine)
    if isinstance(machine, PatchComposite):
        views = {}
        for k in cands:  # one shallow copy per window size: the training set is shared
            views[k] = copy.copy(machine)
            views[k].patch_size = int(k)
        return (lambda x, sigma, k, label: views[k](x, sigma, label=label)), machine.train.images.dtype
    return (lambda x, sigma, k, label: machine(x, sigma, patch_size=k, label=label)), machine.images.dtype


def calibrate(
    network: Denoiser,
    machine: Calibrated,
    noise: torch.Tensor,
    *,
    candidates: Sequence[int],
    sigmas: torch.Tensor | None = None,
    steps: int = 20,
    metric: str = "cosine",
    label: int | torch.Tensor | None = None,
    seeds: Sequence[int] | None = None,
    progress: Callable[[int, float, int], None] | None = None,
    shared: bool = True,
) -> CalibrationResult:
    """Calibrate a locality schedule: the machine patch size that best matches the network per step.

    The network drives deterministic DDIM (:func:`~patchmosaic.samplers.sample_euler`)
    from ``noise``; at every grid point each candidate machine denoises the
    network's current ``x`` (one ``[B, C, H, W]`` batch per candidate: all seeds
    in one call).

    Args:
        network: ``D(x, sigma) -> x0_hat`` (a conditional network must be bound to
            ``label`` already, or offer ``bind(label=)``).
        machine: A ``"ls"`` or ``"els"`` :class:`ScoreMachine` on the network's training set, a
            :class:`~patchmosaic.denoisers.PatchComposite` (PSPC; its window side P is calibrated), a
            :class:`~patchmosaic.denoisers.DataLocality` (its mask threshold) or a
            :class:`~patchmosaic.denoisers.Smoothed` (its smoothing std; every candidate is perturbed with
            the same draws at a step, so they differ by the std alone).
        noise: ``[B, C, H, W]`` initial VP noise ``x_1``, one row per seed
            (:func:`~patchmosaic.samplers.initial_state` scales it to ``sigmas[0]``).
        candidates: Odd patch sizes, or knob values, to try (see :func:`check_candidates`).
        sigmas: Sampler grid (descending, last 0); default the paper's
            :func:`~patchmosaic.schedules.sigmas_cosine` with ``steps`` steps.
        steps: Steps of the default grid.
        metric: ``"cosine"`` or ``"l2"`` (see :func:`similarity`).
        label: ``None``, an int or a ``[B]`` tensor, for network and machine alike.
        seeds: Names of the ``B`` rows, recorded in the result (default ``0..B-1``).
        progress: Called as ``progress(i, sigma_i, k_best)`` after each step (i from 1).
        shared: ELS score machines: all candidates of a step in one
            :meth:`~patchmosaic.denoisers.ScoreMachine.denoise_sizes` call (the same
            estimates up to float rounding, faster); False: one timed call per candidate.
            Other machines always make one call per candidate.

    Returns:
        A :class:`CalibrationResult` whose schedule is keyed by the grid's sigmas.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    cands = check_candidates(machine, candidates)
    if noise.ndim != 4:
        raise ValueError(f"noise must have shape [B, C, H, W], got {tuple(noise.shape)}")
    sigmas = sigmas_cosine(steps) if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float64)
    if float(sigmas[-1]) != 0.0:
        raise ValueError("the calibration grid must end at sigma = 0")
    steps = len(sigmas) - 1
    B = noise.shape[0]
    seeds = list(range(B)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != B:
        raise ValueError(f"{len(seeds)} seeds for a batch of {B} noise images")
    if label is not None:
        bind = getattr(network, "bind", None)
        if bind is not None:
            network = bind(label=label)
        if isinstance(machine, ScoreMachine):
            machine._label_vector(label, B)  # validate before the first step
    K = len(cands)
    scores = np.full((steps, K, B), np.nan)
    knob = _value_knob(machine)
    choices = np.zeros((steps, B), dtype=np.float64 if knob is not None else np.int64)
    candidate_seconds = np.zeros((steps, K))
    network_seconds = np.zeros(steps)
    lower_is_better = metric == "l2"
    calls = [0]
    call_k, machine_dtype = _candidate_calls(machine, cands)
    shared = bool(shared) and isinstance(machine, ScoreMachine) and machine.kind == "els"
    machine_seconds = np.zeros(steps)

    def probe(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The network's estimate (it drives DDIM); records every candidate's match at this x."""
        row = steps - 1 - calls[0]  # lowest noise first
        calls[0] += 1
        start = time.perf_counter()
        x0_net = network(x, sigma)  # [B, C, H, W]
        network_seconds[row] = time.perf_counter() - start
        xm, sm = x.to(machine_dtype), sigma.to(machine_dtype)
        if shared:
            start = time.perf_counter()
            x0 = machine.denoise_sizes(xm, sm, cands, label=label)  # {k: [B, C, H, W]}
            machine_seconds[row] = time.perf_counter() - start
            candidate_seconds[row] = np.nan
        else:
            x0 = {}
            for j, k in enumerate(cands):
                start = time.perf_counter()
                x0[k] = call_k(xm, sm, k, label)  # [B, C, H, W]
                candidate_seconds[row, j] = time.perf_counter() - start
            machine_seconds[row] = candidate_seconds[row].sum()
        for j, k in enumerate(cands):
            sim = similarity(x0_net, x0[k], metric)  # [B], higher is better
            scores[row, j] = (-sim if lower_is_better else sim).numpy()
        best = np.argmax(-scores[row] if lower_is_better else scores[row], axis=0)  # [B], first max: smallest k
        choices[row] = np.asarray(cands)[best]
        if progress is not None:
            progress(calls[0], float(sigma[0]), median_patch_size(choices[row].tolist(), cands))
        return x0_net

    sample_euler(probe, initial_state(noise, sigmas), sigmas)
    chosen = tuple(median_patch_size(choices[r].tolist(), cands) for r in range(steps))
    keys = sigmas[:-1].flip(0).tolist()  # [steps] ascending
    if knob is not None:
        schedule: PatchSchedule | ValueSchedule = ValueSchedule(knob[0], chosen, tuple(keys), name="calibrated")
    else:
        schedule = PatchSchedule(tuple(int(k) for k in chosen), tuple(keys), name="calibrated")
    labels = None
    if label is not None:
        lab = torch.as_tensor(label).to(torch.long)
        labels = (lab.expand(B) if lab.ndim == 0 else lab).tolist()
    return CalibrationResult(
        schedule=schedule,
        candidates=cands,
        metric=metric,
        seeds=seeds,
        labels=labels,
        sigmas=keys,
        choices=choices,
        scores=scores,
        candidate_seconds=candidate_seconds,
        network_seconds=network_seconds,
        shared=shared,
        machine_seconds=machine_seconds,
    )
