"""Any denoiser against a trained network, from the same seeds: a leaderboard and per-step agreement.

Every denoiser (score machines with their locality schedule, the closed-form
family, ...) and the network run a sampler from the same initial noise
(:func:`patchmosaic.noise_for_seed`). The final images are compared with the
network's by every metric of :mod:`patchmosaic.evaluation` (Pearson r, r^2,
R^2, ADS's per-image R^2, MSE, pooled R^2; medians with bootstrap intervals;
the fraction of seeds where ELS beats each denoiser on r).

Per-step agreement, for each denoiser step i at noise level sigma_i:

* ``trajectory``: the denoiser's output on its own trajectory against the
  network's output on *its* own trajectory at the matching step: the network
  step whose sigma is nearest to sigma_i in log sigma (with equal grids, the
  same step index, so an exact match);
* ``single_step``: the network evaluated at the denoiser's own state x_i and
  sigma_i against the denoiser's output there -- both denoisers at the same x.

Each is the median over seeds of the per-seed Pearson r (and R^2).
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

from patchmosaic.denoisers.base import bind_label
from patchmosaic.evaluation import (
    METRIC_NAMES,
    coefficient_of_determination,
    pearson_r,
    summarize,
)
from patchmosaic.samplers import initial_state, noise_for_seeds, sample_seeds

__all__ = [
    "ComparisonResult",
    "Trajectory",
    "compare_denoisers",
    "leaderboard",
    "leaderboard_markdown",
    "matching_steps",
    "per_step_agreement",
    "run_trajectory",
    "save_per_step",
]


@dataclass
class Trajectory:
    """One denoiser's sampler run over all seeds, step by step."""

    final: np.ndarray  # [S, C, H, W] final samples
    sigmas: np.ndarray  # [n + 1] the grid
    x: np.ndarray | None  # [n, S, C, H, W] the state the denoiser saw at step i (at sigmas[i]); None: not kept
    denoised: np.ndarray  # [n, S, C, H, W] its output D(x_i, sigmas[i])


def run_trajectory(
    denoiser: Any,
    seeds: Sequence[int],
    shape: Sequence[int],
    *,
    sigmas: torch.Tensor,
    sampler: str = "euler",
    labels: Sequence[int] | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    bar: tqdm | None = None,
    keep_x: bool = True,
) -> Trajectory:
    """:func:`~patchmosaic.samplers.sample_seeds`, keeping every step's state and denoiser output.

    Batches run one after another, so the callbacks arrive as batch 0 steps
    0..n-1, batch 1 steps 0..n-1, ...; step i's arrays are their concatenation.
    ``keep_x=False`` keeps only the outputs (the reference network's states are not needed).
    """
    n = len(sigmas) - 1
    states: list[list[torch.Tensor]] = [[] for _ in range(n + 1)]  # states[i]: x at sigmas[i], per batch
    outputs: list[list[torch.Tensor]] = [[] for _ in range(n)]

    def callback(info: dict) -> None:
        if keep_x:
            states[info["i"] + 1].append(info["x"].detach().float().cpu())  # [b, C, H, W] at sigma_next
        outputs[info["i"]].append(info["denoised"].detach().float().cpu())  # [b, C, H, W]
        if bar is not None:
            bar.update(1)

    final = sample_seeds(denoiser, seeds, shape, sigmas=sigmas, sampler=sampler, labels=labels,
                         batch_size=batch_size, device=device, callback=callback)  # [S, C, H, W]
    x = None
    if keep_x:
        x0 = initial_state(noise_for_seeds(list(seeds), shape), sigmas)  # [S, C, H, W]
        x = np.stack([x0.numpy(), *(torch.cat(s).numpy() for s in states[1:n])]).astype(np.float32)  # [n, S, C, H, W]
    denoised = np.stack([torch.cat(o).numpy() for o in outputs])  # [n, S, C, H, W]
    return Trajectory(final=final.float().numpy(), sigmas=sigmas.double().numpy(), x=x, denoised=denoised)


def matching_steps(sigmas: np.ndarray, reference_sigmas: np.ndarray) -> np.ndarray:
    """For each step i of ``sigmas`` (sigma_i > 0), the reference step with the nearest sigma in log sigma.

    Args:
        sigmas: ``[n + 1]`` grid (only its first n entries, the steps, are matched).
        reference_sigmas: ``[m + 1]`` grid of the reference.

    Returns:
        ``[n]`` int indices into the reference's steps (ties: the earlier, higher-noise step).
    """
    s = np.asarray(sigmas, dtype=np.float64)[:-1]  # [n]
    ref = np.asarray(reference_sigmas, dtype=np.float64)[:-1]  # [m]
    if (ref <= 0).any() or (s <= 0).any():
        raise ValueError("every step of both grids needs sigma > 0 (the last entry is the final one)")
    return np.abs(np.log(s)[:, None] - np.log(ref)[None, :]).argmin(axis=1)  # [n]


@torch.no_grad()
def _network_at(network: Any, x: np.ndarray, sigma: float, labels: Sequence[int] | None, batch_size: int,
                device: torch.device | str) -> np.ndarray:
    """``network(x, sigma)`` for ``[S, C, H, W]`` states, batch by batch with each batch's labels bound."""
    out = []
    for i in range(0, len(x), batch_size):
        xb = torch.as_tensor(x[i : i + batch_size]).to(device)  # [b, C, H, W]
        bound = network if labels is None else bind_label(network, torch.tensor(list(labels[i : i + batch_size])))
        out.append(bound(xb, sigma).float().cpu().numpy())  # [b, C, H, W]
    return np.concatenate(out)


def per_step_agreement(
    network: Trajectory,
    other: Trajectory,
    *,
    network_denoiser: Any | None = None,
    labels: Sequence[int] | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Median over seeds of Pearson r and R^2 at each step of ``other`` (see the module docstring).

    Args:
        network: The network's trajectory (the reference).
        other: A denoiser's trajectory.
        network_denoiser: The network ``D(x, sigma)``, for the ``single_step`` numbers (None: skip them).
        labels: The class of each seed (conditional networks).

    Returns:
        ``{"sigma": [n], "network_step": [n], "network_sigma": [n],
        "trajectory": {"pearson_r": [n], "R2": [n]}, "single_step": {...}}`` (lists; None for NaN).
    """
    match = matching_steps(other.sigmas, network.sigmas)  # [n]
    out: dict[str, Any] = {
        "sigma": [float(s) for s in other.sigmas[:-1]],
        "network_step": [int(j) for j in match],
        "network_sigma": [float(network.sigmas[j]) for j in match],
        "trajectory": {"pearson_r": [], "R2": []},
    }
    for i, j in enumerate(match):
        ref, est = network.denoised[j], other.denoised[i]  # [S, C, H, W] each
        out["trajectory"]["pearson_r"].append(_median(pearson_r(ref, est)))
        out["trajectory"]["R2"].append(_median(coefficient_of_determination(ref, est)))
    if network_denoiser is not None:
        if other.x is None:
            raise ValueError("single-step agreement needs the denoiser's states: run_trajectory(keep_x=True)")
        out["single_step"] = {"pearson_r": [], "R2": []}
        for i, sigma in enumerate(other.sigmas[:-1]):
            ref = _network_at(network_denoiser, other.x[i], float(sigma), labels, batch_size, device)  # [S, C, H, W]
            out["single_step"]["pearson_r"].append(_median(pearson_r(ref, other.denoised[i])))
            out["single_step"]["R2"].append(_median(coefficient_of_determination(ref, other.denoised[i])))
    return out


def _median(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else None


@dataclass
class ComparisonResult:
    """Final samples of the network and every denoiser, their comparison and per-step agreement."""

    images: dict[str, np.ndarray]  # "network" and each denoiser's name -> [S, C, H, W]
    summary: dict[str, Any]  # evaluation.summarize of the final images
    per_step: dict[str, dict[str, Any]]  # denoiser name -> per_step_agreement
    seconds_per_seed: dict[str, float] = field(default_factory=dict)


def compare_denoisers(
    network: Any,
    denoisers: Mapping[str, Any],
    seeds: Sequence[int],
    shape: Sequence[int],
    *,
    sigmas: torch.Tensor,
    network_sigmas: torch.Tensor,
    sampler: str = "euler",
    labels: Sequence[int] | None = None,
    train_images: torch.Tensor | np.ndarray | None = None,
    machine: str = "els",
    batch_size: int = 8,
    resamples: int = 10_000,
    bootstrap_seed: int = 0,
    single_step: bool = True,
    reuse: Mapping[str, np.ndarray] | None = None,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> ComparisonResult:
    """Run the network (on ``network_sigmas``) and every denoiser (on ``sigmas``) from the same seeds.

    Args:
        network: The trained network ``D(x, sigma)`` (labels bound per batch when ``labels``).
        denoisers: ``name -> D(x, sigma)``, locality schedules already bound.
        seeds, shape: Seeds and ``(C, H, W)``.
        sigmas, network_sigmas: The denoisers' and the network's grids.
        sampler: A :data:`~patchmosaic.samplers.SAMPLERS` name, for everyone.
        labels: The class of each seed (conditional models), for everyone.
        train_images: ``[N, C, H, W]`` for the nearest-training-image check.
        machine: The name whose wins over every other denoiser are counted (``els``).
        single_step: Also evaluate the network at each denoiser's states (one network call per step).
        reuse: ``name -> [S, C, H, W]`` final samples of a denoiser of ``denoisers`` from an earlier run (same
            seeds and protocol; the caller checks that), used instead of running it. Only its final images
            exist, so it has no per-step agreement and no timing.
    """
    if "network" in denoisers:
        raise ValueError("'network' is the reference's name; rename that denoiser")
    reuse = dict(reuse or {})
    unknown = sorted(set(reuse) - set(denoisers))
    if unknown:
        raise ValueError(f"reused samples of {unknown} name no denoiser of this comparison")
    for name, images in reuse.items():
        if tuple(images.shape) != (len(seeds), *shape):
            raise ValueError(f"reused {name} samples have shape {list(images.shape)}, expected "
                             f"{[len(seeds), *shape]} (seeds, C, H, W)")
    runs = {"network": network, **{n: d for n, d in denoisers.items() if n not in reuse}}
    trajectories: dict[str, Trajectory] = {}
    seconds: dict[str, float] = {}
    n_batches = -(-len(seeds) // batch_size)
    for name, denoiser in runs.items():
        grid = network_sigmas if name == "network" else sigmas
        with tqdm(total=(len(grid) - 1) * n_batches, desc=name, unit="step", file=sys.stderr, dynamic_ncols=True,
                  disable=not progress) as bar:
            start = time.perf_counter()
            trajectories[name] = run_trajectory(denoiser, seeds, shape, sigmas=grid, sampler=sampler, labels=labels,
                                                batch_size=batch_size, device=device, bar=bar,
                                                keep_x=name != "network")
            seconds[name] = (time.perf_counter() - start) / len(seeds)
    images = {name: trajectories[name].final if name in trajectories else np.asarray(reuse[name], dtype=np.float32)
              for name in ("network", *denoisers)}
    summary = summarize(images, seeds, machine=machine, baseline="ideal", labels=labels, train_images=train_images,
                        resamples=resamples, bootstrap_seed=bootstrap_seed)
    per_step = {name: per_step_agreement(trajectories["network"], t, network_denoiser=network if single_step else None,
                                         labels=labels, batch_size=batch_size, device=device)
                for name, t in trajectories.items() if name != "network"}
    return ComparisonResult(images=images, summary=summary, per_step=per_step, seconds_per_seed=seconds)


# ------------------------------------------------------------------ leaderboard


def leaderboard(summary: Mapping[str, Any], parameters: Mapping[str, Mapping[str, Any]],
                protocol: Mapping[str, Any], seconds_per_seed: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """One entry per denoiser, best median Pearson r first.

    Args:
        summary: :func:`~patchmosaic.evaluation.summarize` output.
        parameters: ``name -> the denoiser's parameters`` as recorded.
        protocol: Sampler, grids and step counts, copied into every entry.
        seconds_per_seed: ``name -> wall seconds per seed``.
    """
    beats = (summary.get("machine_beats") or {}).get("versus", {})
    machine = (summary.get("machine_beats") or {}).get("machine")
    entries = []
    for name in parameters:
        agg = summary["aggregates"][name]
        entry: dict[str, Any] = {
            "name": name,
            "parameters": dict(parameters[name]),
            "n_seeds": summary["n_seeds"],
            "metrics": {m: {k: agg[m][k] for k in ("median", "ci_low", "ci_high", "n")} for m in METRIC_NAMES},
            "R2_pooled": {k: summary["pooled"][name]["R2_pooled"][k] for k in ("value", "ci_low", "ci_high", "n")},
            "R2_ads_mean": summary["R2_ads_mean"][name],
            **dict(protocol),
        }
        if machine:
            entry[f"{machine}_beats_this"] = beats.get(name)  # None for the machine itself
        if seconds_per_seed is not None and name in seconds_per_seed:
            entry["seconds_per_seed"] = round(float(seconds_per_seed[name]), 4)
        entries.append(entry)
    key = lambda e: -e["metrics"]["pearson_r"]["median"] if np.isfinite(e["metrics"]["pearson_r"]["median"]) else 2.0
    return sorted(entries, key=key)


def _parameter_text(name: str, value: Any) -> str:
    """``name=value``; a value schedule's record as ``name(sigma)=v1,v2,... (source)``, lowest noise first."""
    if isinstance(value, Mapping) and "values" in value:
        values = ",".join(f"{v:g}" for v in value["values"])
        return f"{name}(sigma)={values} ({value.get('source', '?')})"
    return f"{name}={value}"


def format_interval(stats: Mapping[str, Any], central: str = "median", fmt: str = ".3f") -> str:
    """``central [ci_low, ci_high]`` in ``fmt`` (e.g. ``"+.3f"`` for differences); ``n/a`` when not finite."""
    v = stats.get(central)
    if v is None or not np.isfinite(v):
        return "n/a"
    return f"{v:{fmt}} [{stats['ci_low']:{fmt}}, {stats['ci_high']:{fmt}}]"


def leaderboard_markdown(entries: Sequence[Mapping[str, Any]], *, title: str, protocol_line: str,
                         machine: str = "els") -> str:
    """The leaderboard as a Markdown table (medians [95% bootstrap interval] over seeds)."""
    lines = [f"# {title}", "", protocol_line, "",
             f"| # | denoiser | Pearson r | r^2 | R^2 | R^2 (ADS, mean) | R^2 pooled | MSE | {machine.upper()} beats it | "
             "parameters |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for rank, e in enumerate(entries, 1):
        m = e["metrics"]
        win = e.get(f"{machine}_beats_this")
        win_text = "-" if not win else f"{win['wins']}/{win['n']}"
        params = ", ".join(_parameter_text(k, v) for k, v in e["parameters"].items()) or "-"
        ads = e.get("R2_ads_mean")
        lines.append(
            f"| {rank} | `{e['name']}` | {format_interval(m['pearson_r'])} | {format_interval(m['r_squared'])} | "
            f"{format_interval(m['R2'])} | "
            f"{'n/a' if ads is None else f'{ads:.3f}'} | {format_interval(e['R2_pooled'], 'value')} | "
            f"{format_interval(m['mse'], fmt='.4g')} | {win_text} | {params} |"
        )
    lines += ["", "Medians over seeds with percentile-bootstrap 95% intervals; R^2 pooled over all seeds' pixels "
              "(bootstrap over seeds); R^2 (ADS) = 1 - SSE / (n var_unbiased(network image)), mean over images.", ""]
    return "\n".join(lines)


def save_per_step(path: str | Path, per_step: Mapping[str, Mapping[str, Any]], *, title: str = "") -> None:
    """Median Pearson r with the network at each step against sigma: along trajectories and single step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("trajectory", "single_step") if any(m in v for v in per_step.values())]
    fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 3.8), dpi=110, squeeze=False)
    titles = {"trajectory": "each on its own trajectory", "single_step": "single step (network at the denoiser's x)"}
    for ax, mode in zip(axes[0], modes):
        for name, v in per_step.items():
            if mode not in v:
                continue
            r = np.array([np.nan if y is None else y for y in v[mode]["pearson_r"]], dtype=float)
            ax.plot(v["sigma"], r, "o-", ms=3, lw=1.2, label=name)
        ax.set_xscale("log")
        ax.invert_xaxis()  # sampling runs from high noise to low
        ax.set_xlabel("sigma (high noise left, sampling runs left to right)")
        ax.set_ylabel("median Pearson r with the network")
        ax.set_title(titles[mode], fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(Path(path))
    plt.close(fig)
