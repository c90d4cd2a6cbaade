"""Creativity and consistency metrics of a sampling run (``patchmosaic explain``).

Kamb & Ganguli (2412.20292, Sec. 4-5) explain the creativity of convolutional
diffusion models as *locally consistent patch mosaics*: every output pixel is
the centre of a training patch that matches its neighbourhood, but the patches
come from many images and many places. Given a run recorded with
``patchmosaic sample --provenance``, this module measures that:

* **Mosaic map**: the dominant source of each pixel (top entry of its
  posterior at the final step), how many distinct training images the sample
  uses and how many are needed to cover 90% of its pixels, and the
  displacement ``q - p`` of each source patch (how far patches travel).
  A pixel has a dominant source when its top entry is one training patch with
  at least ``min_weight`` of the posterior. The others are counted apart:
  *constant* pixels, whose top entry is a group of identical constant patches
  (background), and *diffuse* ones, whose posterior is spread over many
  near-equal patches (e.g. the zero-padded border, where identical edge
  patches of every image tie).
* **Novelty**: the RMS distance of each sample to its nearest training image,
  also minimised over circular shifts, next to the same distance for the ideal
  (memorising) machine run from the same seeds.
* **Consistency condition** (t -> 0): the fraction of pixels equal, within a
  tolerance, to the centre of their l2-nearest admissible training patch at the
  final patch size.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from patchmosaic.data import ImageDataset, load_dataset
from patchmosaic.denoisers import ScoreMachine
from patchmosaic.evaluation import nearest_training_images
from patchmosaic.runs import (
    CONFIG_FILE,
    EXPLAIN_FIGURES,
    EXPLAIN_FILE,
    PROVENANCE_FILE,
    SamplingSetup,
    load_provenance,
    load_samples,
)
from patchmosaic.samplers import sample_seeds

__all__ = [
    "check_explain_out",
    "coverage_count",
    "explain_run",
    "load_run_config",
    "nearest_over_shifts",
    "run_training_set",
    "signed_displacement",
]

COVERAGE = 0.9  # fraction of (single-source) pixels the "images needed" count covers


def load_run_config(run_dir: str | Path) -> dict:
    """``config.json`` of a run directory, with a clear error when it is missing or unreadable."""
    path = Path(run_dir) / CONFIG_FILE
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {CONFIG_FILE}: not a patchmosaic run directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def run_training_set(config: dict, run_dir: str | Path = "run") -> ImageDataset:
    """The training set (images ``[N, C, H, W]``, labels, class names) a machine run used, from its config."""
    missing = [k for k in ("dataset", "n_train", "size", "image_shape") if k not in config]
    if missing:
        raise ValueError(f"{run_dir}: config.json lacks {missing}, needed to rebuild the run's training set")
    size = None if config["size"] == "native" else int(config["size"])
    try:
        data = load_dataset(config["dataset"], n_train=int(config["n_train"]), size=size)
    except (ValueError, OSError, ImportError) as err:
        raise ValueError(f"{run_dir}: cannot load its training set (dataset={config['dataset']!r}, "
                         f"n_train={config['n_train']!r}, size={config['size']!r}): {err}") from err
    if list(data.images.shape[1:]) != list(config["image_shape"]) or len(data) != int(config["n_train"]):
        raise ValueError(
            f"{run_dir}: the dataset {config['dataset']!r} now gives {len(data)} images of shape "
            f"{list(data.images.shape[1:])}, but the run used {config['n_train']} of {config['image_shape']}"
        )
    return data


def signed_displacement(source: np.ndarray, H: int, W: int, circular: bool) -> np.ndarray:
    """``q - p`` for each pixel p: ``source [B, H, W, 2]`` -> ``[B, H, W, 2]``.

    On the torus (circular padding) each component is the shortest signed
    offset, in ``[-L/2, L/2)``.
    """
    py = np.arange(H)[None, :, None]
    px = np.arange(W)[None, None, :]
    d = np.stack([source[..., 0] - py, source[..., 1] - px], axis=-1)  # [B, H, W, 2]
    if circular:
        d[..., 0] = (d[..., 0] + H // 2) % H - H // 2
        d[..., 1] = (d[..., 1] + W // 2) % W - W // 2
    return d


def coverage_count(sources: np.ndarray, fraction: float = COVERAGE) -> int:
    """Fewest distinct values of ``sources`` (image indices) that cover ``fraction`` of its entries."""
    if sources.size == 0:
        return 0
    counts = np.sort(np.unique(sources, return_counts=True)[1])[::-1]
    return int(np.searchsorted(np.cumsum(counts), math.ceil(fraction * sources.size - 1e-9)) + 1)


def nearest_over_shifts(images: torch.Tensor, train: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest training image of each sample over all circular shifts ``roll(X, (sy, sx))``.

    (The plain nearest image is :func:`patchmosaic.evaluation.nearest_training_images`.)

    Args:
        images: ``[B, C, H, W]`` samples; train ``[N, C, H, W]``.

    Returns:
        ``(index [B], rms [B], shift [B, 2])``: the image and shift minimising the
        RMS distance ``sqrt(mean (x - roll(X, s))^2)`` (cross-correlation by FFT).
    """
    x = images.double().flatten(1)  # [B, CHW]
    X = train.double().flatten(1)  # [N, CHW]
    D = x.shape[1]
    B, C, H, W = images.shape
    fx = torch.fft.rfft2(images.double())  # [B, C, H, W//2+1]
    fX = torch.fft.rfft2(train.double())  # [N, C, H, W//2+1]
    out = []
    for b in range(B):
        # corr[n, sy, sx] = sum_{c,y,x} x[c, y, x] * X[n, c, y - sy, x - sx] = <x, roll(X_n, (sy, sx))>
        corr = torch.fft.irfft2((fx[b : b + 1] * fX.conj()).sum(1), s=(H, W))  # [N, H, W]
        d2s = (x[b] @ x[b] + (X * X).sum(1))[:, None, None] - 2 * corr  # [N, H, W]
        flat = int(d2s.flatten().argmin())
        n, s = divmod(flat, H * W)
        out.append((n, float(d2s.flatten()[flat].clamp_min(0)), s // W, s % W))
    index = np.array([o[0] for o in out])
    rms = np.sqrt(np.array([o[1] for o in out]) / D)
    return index, rms, np.array([[o[2], o[3]] for o in out])


def _nearest(images: torch.Tensor, train: torch.Tensor) -> tuple[np.ndarray, ...]:
    """``(index, rms, shift_index, shift_rms, shift)``: nearest image as is and over circular shifts."""
    idx, dist = nearest_training_images(images, train)
    return (idx, dist / np.sqrt(images[0].numel()), *nearest_over_shifts(images, train))


@dataclass(frozen=True)
class _Run:
    """What :func:`explain_run` reads from a run directory."""

    config: dict
    images: torch.Tensor  # [B, C, H, W]
    seeds: np.ndarray  # [B]
    labels: np.ndarray | None  # [B]
    prov: dict[str, np.ndarray]


def _read_run(run_dir: Path) -> _Run:
    config = load_run_config(run_dir)
    if "machine" not in config:
        raise ValueError(f"{run_dir}: explain needs a machine run ('patchmosaic sample --provenance'), not a network run")
    if not (run_dir / PROVENANCE_FILE).is_file():
        raise FileNotFoundError(
            f"{run_dir} has no {PROVENANCE_FILE}: re-run 'patchmosaic sample' with --provenance to record it"
        )
    samples = load_samples(run_dir)
    prov = load_provenance(run_dir / PROVENANCE_FILE, n_train=int(config.get("n_train", 0)) or None)
    if not np.array_equal(prov["seeds"], samples["seeds"]):
        raise ValueError(f"{run_dir}: {PROVENANCE_FILE} and samples.npz hold different seeds")
    return _Run(config, torch.from_numpy(samples["images"]), samples["seeds"], samples.get("labels"), prov)


def _ideal_samples(
    run: _Run, train: torch.Tensor, labels: torch.Tensor | None, batch: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The ideal (memorising) machine's samples from the run's seeds, labels, sampler and grid."""
    setup = SamplingSetup.from_config(run.config)
    machine = ScoreMachine(train.to(setup.torch_dtype), kind="ideal", padding="zeros", labels=labels, device=device)
    return sample_seeds(
        machine, [int(s) for s in run.seeds], tuple(run.images.shape[1:]), sigmas=setup.sigmas,
        sampler=setup.sampler, labels=None if run.labels is None else run.labels.tolist(),
        batch_size=batch, dtype=setup.torch_dtype, device=device,
    ).float()


def _consistency(
    run: _Run, train: torch.Tensor, labels: torch.Tensor | None, tolerance: float
) -> tuple[np.ndarray, np.ndarray] | None:
    """Per sample: fraction of pixels within ``tolerance`` of their nearest patch's centre, and the median gap."""
    kind = run.config["machine"]
    if kind not in ("ls", "els"):
        return None
    k = int(run.prov["patch_size"])  # the final (lowest-noise) step's patch size
    machine = ScoreMachine(
        train, kind=kind, padding=run.config["padding"], labels=labels,
        wrap_training_patches=run.config.get("wrap_training_patches") is not False,
    )
    label = None if run.labels is None else torch.from_numpy(run.labels)
    nearest = machine.nearest_patches(run.images, patch_size=k, label=label, top=1)
    i, q = nearest.index[..., 0], nearest.source[..., 0, :]  # [B, H, W], [B, H, W, 2]
    centres = train[i, :, q[..., 0], q[..., 1]]  # [B, H, W, C]
    gap = (run.images.permute(0, 2, 3, 1) - centres).abs().amax(-1)  # [B, H, W], worst channel
    return (gap <= tolerance).double().mean((1, 2)).numpy(), gap.flatten(1).median(1).values.numpy()


def explain_run(
    run_dir: str | Path,
    *,
    tolerance: float = 0.02,
    min_weight: float = 0.01,
    compare_ideal: bool = True,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> dict:
    """Compute the mosaic, novelty and consistency metrics of a recorded run.

    Args:
        run_dir: A run directory with ``config.json``, ``samples.npz`` and ``provenance.npz``.
        tolerance: Consistency tolerance in image units (images live in [-1, 1]).
        min_weight: Posterior weight a pixel's top patch needs to count as its dominant source.
        compare_ideal: Also sample the ideal machine from the same seeds (novelty baseline).
        batch_size: Seeds per call of that ideal sampler.
        device: Where that ideal sampler runs.

    Returns:
        The ``explain.json`` payload (also holds the arrays the figures need
        under the private key ``"_arrays"``).
    """
    run_dir = Path(run_dir)
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be non-negative, got {tolerance}")
    if not 0 <= min_weight <= 1:
        raise ValueError(f"min_weight must lie in [0, 1], got {min_weight}")
    run = _read_run(run_dir)
    data = run_training_set(run.config, run_dir)
    train, labels = data.images, data.labels
    B, C, H, W = run.images.shape
    prov = run.prov
    if prov["index"].shape[:3] != (B, H, W):
        raise ValueError(f"{run_dir}: {PROVENANCE_FILE} is for images of another shape than samples.npz")
    if prov["top"] < 1:
        raise ValueError(f"{run_dir}: {PROVENANCE_FILE} holds no source patches (top = 0)")
    dominant = prov["index"][..., 0]  # [B, H, W]
    constant = prov["count"][..., 0] > 1  # [B, H, W]: top entry is a group of identical constant patches
    single = ~constant & (prov["weight"][..., 0] >= min_weight)  # a dominant single source patch
    disp = signed_displacement(prov["source"][..., 0, :], H, W, run.config["padding"] == "circular")
    dist = np.hypot(disp[..., 0], disp[..., 1])  # [B, H, W]
    nn = _nearest(run.images, train)
    ideal_nn = _nearest(_ideal_samples(run, train, labels, batch_size, device), train) if compare_ideal else None
    consistency = _consistency(run, train, labels, tolerance)
    per_seed = []
    for b in range(B):
        src = dominant[b][single[b]]
        moved = dist[b][single[b]]
        row = {
            "seed": int(run.seeds[b]),
            "label": None if run.labels is None else int(run.labels[b]),
            "single_source_fraction": float(single[b].mean()),
            "constant_fraction": float(constant[b].mean()),
            "diffuse_fraction": float((~single[b] & ~constant[b]).mean()),
            "distinct_images": int(np.unique(src).size),
            "images_for_90pct": coverage_count(src),
            "mean_displacement_px": float(moved.mean()) if moved.size else None,
            "median_displacement_px": float(np.median(moved)) if moved.size else None,
            "stay_fraction": float((moved == 0).mean()) if moved.size else None,
            "dominant_weight_mean": float(prov["weight"][b, ..., 0].mean()),
            "final_n_eff_median": float(np.median(prov["n_eff"][-1, b])),
            "final_entropy_median": float(np.median(prov["entropy"][-1, b])),
            "nn_index": int(nn[0][b]),
            "nn_rms": float(nn[1][b]),
            "nn_shift_index": int(nn[2][b]),
            "nn_shift_rms": float(nn[3][b]),
            "nn_shift": [int(v) for v in nn[4][b]],
        }
        if ideal_nn is not None:
            row["ideal_nn_rms"] = float(ideal_nn[1][b])
            row["ideal_nn_shift_rms"] = float(ideal_nn[3][b])
        if consistency is not None:
            row["consistent_fraction"] = float(consistency[0][b])
            row["consistency_median_gap"] = float(consistency[1][b])
        per_seed.append(row)

    def median(key: str) -> float | None:
        vals = [r[key] for r in per_seed if r.get(key) is not None]
        return float(np.median(vals)) if vals else None

    keys = ["images_for_90pct", "distinct_images", "single_source_fraction", "constant_fraction",
            "diffuse_fraction", "mean_displacement_px",
            "stay_fraction", "dominant_weight_mean", "final_n_eff_median", "nn_rms", "nn_shift_rms",
            "ideal_nn_rms", "ideal_nn_shift_rms", "consistent_fraction"]
    summary = {f"median_{k}": median(k) for k in keys if any(k in r for r in per_seed)}
    # Medians over each sample's pixels that are not constant background at the end (all if none is).
    fg = np.where(constant.reshape(B, -1).all(1, keepdims=True), True, ~constant.reshape(B, -1))  # [B, HW]
    S = len(prov["sigma"])
    n_eff_t = np.array([[np.median(prov["n_eff"][s, b].reshape(-1)[fg[b]]) for b in range(B)] for s in range(S)])
    ent_t = np.array([[np.median(prov["entropy"][s, b].reshape(-1)[fg[b]]) for b in range(B)] for s in range(S)])
    return {
        "run": str(run_dir),
        "machine": run.config["machine"],
        "padding": run.config["padding"],
        "n_train": int(run.config["n_train"]),
        "final_patch_size": int(prov["patch_size"]),
        "provenance_top": int(prov["top"]),
        "tolerance": tolerance,
        "min_weight": min_weight,
        "definitions": {
            "dominant source": "top entry of the pixel's posterior at the final step",
            "single_source_fraction": f"pixels whose top entry is one training patch with weight >= {min_weight}; "
            "the mosaic counts and displacements use these pixels",
            "constant_fraction": "pixels whose top entry is a group of identical constant patches (background)",
            "diffuse_fraction": f"the other pixels: top patch weight < {min_weight}, the posterior spread over "
            "many near-equal patches",
            "images_for_90pct": f"fewest training images whose dominant pixels cover {COVERAGE:.0%} of them",
            "displacement": "q - p of the dominant patch, in pixels (shortest on the torus for circular padding)",
            "nn_rms": "RMS distance sqrt(mean (x - X)^2) to the nearest training image; nn_shift_rms also over "
            "circular shifts; ideal_* for the ideal machine from the same seeds",
            "consistent_fraction": f"pixels within {tolerance} (max over channels) of the centre of their "
            "l2-nearest admissible training patch at the final patch size",
        },
        "summary": summary,
        "per_seed": per_seed,
        "n_eff_over_time": {
            "pixels": "median over each sample's pixels that are not constant background at the final step",
            "sigma": [float(s) for s in prov["sigma"]],
            "patch_size": [int(k) for k in prov["step_patch_sizes"]],
            "median_n_eff": n_eff_t.T.tolist(),
            "median_entropy": ent_t.T.tolist(),
        },
        "figures": dict(EXPLAIN_FIGURES),
        "_arrays": {"images": run.images.numpy(), "dominant": dominant, "single": single, "constant": constant,
                    "disp": disp,
                    "weight": prov["weight"][..., 0], "n_eff_t": n_eff_t, "sigma": prov["sigma"]},
    }


def _mosaic_colours(
    dominant: np.ndarray, single: np.ndarray, constant: np.ndarray
) -> tuple[np.ndarray, list[tuple[int, float]]]:
    """RGB map of one sample's dominant sources: the 19 most used images get distinct colours,
    other images dark grey, constant-patch pixels light grey, diffuse pixels black.
    Returns the map and the legend."""
    import matplotlib

    palette = matplotlib.colormaps["tab20"].colors
    src = dominant[single]
    ids, counts = np.unique(src, return_counts=True)
    order = ids[np.argsort(-counts, kind="stable")][:19]
    rgb = np.zeros(dominant.shape + (3,))
    rgb[constant] = 0.85
    rgb[single] = 0.4
    for c, i in enumerate(order):
        rgb[single & (dominant == i)] = palette[c if c < 14 else c + 1][:3]  # skip tab20's greys (14, 15)
    legend = [(int(i), float((src == i).mean())) for i in order[:5]]
    return rgb, legend


def _show(ax, image: np.ndarray) -> None:
    C = image.shape[0]
    pix = np.clip((image + 1) / 2, 0, 1)
    ax.imshow(pix[0] if C == 1 else pix.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def write_figures(result: dict, out_dir: Path) -> None:
    """``explain_mosaic.png``, ``explain_displacement.png`` and ``explain_neff.png`` from :func:`explain_run`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = result["_arrays"]
    images, dominant, single, disp = a["images"], a["dominant"], a["single"], a["disp"]
    B = images.shape[0]
    seeds = [r["seed"] for r in result["per_seed"]]

    fig, axes = plt.subplots(B, 3, figsize=(7.5, 2.4 * B), squeeze=False, layout="constrained")
    for b in range(B):
        _show(axes[b, 0], images[b])
        axes[b, 0].set_title(f"seed {seeds[b]}", fontsize=8)
        rgb, legend = _mosaic_colours(dominant[b], single[b], a["constant"][b])
        axes[b, 1].imshow(rgb, interpolation="nearest")
        axes[b, 1].set_xticks([])
        axes[b, 1].set_yticks([])
        axes[b, 1].set_title(
            f"{result['per_seed'][b]['images_for_90pct']} images cover 90%\n"
            + ", ".join(f"#{i} {f:.0%}" for i, f in legend[:3]), fontsize=7)
        im = axes[b, 2].imshow(a["weight"][b], cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        axes[b, 2].set_xticks([])
        axes[b, 2].set_yticks([])
        axes[b, 2].set_title("dominant weight", fontsize=8)
    fig.colorbar(im, ax=axes[:, 2].tolist(), shrink=0.6)
    fig.suptitle("Mosaic map: dominant source image per pixel\n(light grey: constant-patch background; "
                 "black: diffuse, no patch with weight >= min_weight)", fontsize=9)
    fig.savefig(out_dir / EXPLAIN_FIGURES["mosaic"], dpi=110)
    plt.close(fig)

    cols = min(B, 4)
    rows_ = math.ceil(B / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(2.8 * cols, 2.9 * rows_), squeeze=False, layout="constrained")
    for ax in axes.flat[B:]:
        ax.axis("off")
    H, W = dominant.shape[1:]
    step = max(1, min(H, W) // 16)
    yy, xx = np.mgrid[0:H:step, 0:W:step]
    for b in range(B):
        ax = axes.flat[b]
        mag = np.where(single[b], np.hypot(disp[b, ..., 0], disp[b, ..., 1]), np.nan)
        im = ax.imshow(mag, cmap="magma", interpolation="nearest", vmin=0)
        d = np.where(single[b][..., None], disp[b], 0)[::step, ::step]
        ax.quiver(xx, yy, d[..., 1], d[..., 0], angles="xy", scale_units="xy", scale=1, color="cyan", width=0.006)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"seed {seeds[b]}: mean |q-p| {result['per_seed'][b]['mean_displacement_px'] or 0:.1f}px",
                     fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.7)
    fig.suptitle("Displacement q - p of each pixel's dominant source patch (arrows: to the source)", fontsize=9)
    fig.savefig(out_dir / EXPLAIN_FIGURES["displacement"], dpi=110)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    sig = a["sigma"]
    for b in range(B):
        ax1.plot(sig, a["n_eff_t"][:, b], marker=".", lw=1, label=f"seed {seeds[b]}")
        ax2.plot(sig, result["n_eff_over_time"]["median_entropy"][b], marker=".", lw=1)
    ax1.set_yscale("log")
    ax1.set_xscale("log")
    ax2.set_xscale("log")
    ax1.set_xlabel("sigma (noise level)")
    ax1.set_ylabel("median N_eff (non-background pixels)")
    ax1.invert_xaxis()
    ax2.set_xlabel("sigma (noise level)")
    ax2.set_ylabel("median entropy, nats (non-background)")
    ax2.invert_xaxis()
    if B <= 10:
        ax1.legend(fontsize=6)
    fig.suptitle("Effective number of contributing patches along the reverse process", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / EXPLAIN_FIGURES["n_eff"], dpi=110)
    plt.close(fig)


def check_explain_out(out_dir: str | Path, *, overwrite: bool) -> list[Path]:
    """The files :func:`write_explain` writes into ``out_dir``; refuses existing ones unless ``overwrite``."""
    out_dir = Path(out_dir)
    targets = [out_dir / EXPLAIN_FILE] + [out_dir / f for f in EXPLAIN_FIGURES.values()]
    existing = [p.name for p in targets if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir} already holds {existing}; pass --overwrite to replace them")
    return targets


def write_explain(result: dict, out_dir: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Write ``explain.json`` and the figures into ``out_dir``; refuses to replace them unless ``overwrite``."""
    out_dir = Path(out_dir)
    targets = check_explain_out(out_dir, overwrite=overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {k: v for k, v in result.items() if not k.startswith("_")}
    (out_dir / EXPLAIN_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    write_figures(result, out_dir)
    return targets


def summary_lines(result: dict) -> Sequence[str]:
    """A few human-readable lines for the terminal."""
    s = result["summary"]
    lines = [
        f"{len(result['per_seed'])} samples, {result['machine']} / {result['padding']}, "
        f"final k = {result['final_patch_size']}, N = {result['n_train']}",
        f"mosaic: median {s.get('median_images_for_90pct'):.0f} training images cover 90% of the single-source "
        f"pixels ({s.get('median_distinct_images'):.0f} distinct); median |q - p| "
        f"{s.get('median_mean_displacement_px') or 0:.1f} px",
        f"pixels (median): {s['median_single_source_fraction']:.0%} single-source, "
        f"{s['median_constant_fraction']:.0%} constant background, {s['median_diffuse_fraction']:.0%} diffuse",
        f"novelty: nearest-image RMS {s.get('median_nn_rms'):.3f} (over shifts {s.get('median_nn_shift_rms'):.3f})"
        + (f" vs ideal machine {s['median_ideal_nn_rms']:.3f}" if s.get("median_ideal_nn_rms") is not None else ""),
    ]
    if s.get("median_consistent_fraction") is not None:
        lines.append(f"consistency: {s['median_consistent_fraction']:.1%} of pixels within {result['tolerance']} "
                     "of their nearest patch's centre (median over samples)")
    return lines
