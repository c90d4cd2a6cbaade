"""Where ELS and a network differ, by spatial scale and place: e.g. a UNet with self-attention against one without.

    python scripts/where_els_differs.py runs/table1/evaluate-150-mnist-unet-zeros \\
        runs/table1/evaluate-150-mnist-unet-attention --out docs/table1/attention

Each argument is an ``evaluate`` (or ``compare``) output directory holding
``samples_network.npz`` and ``samples_els.npz`` for the same seeds. Per seed,
with ``y`` the network's final image and ``y_hat`` ELS's:

* ``pearson_r``: r of the whole images (the paper's number);
* ``r_low`` / ``r_high``: r of their low-pass parts (Gaussian blur with std
  ``--blur`` pixels, zero padding outside the image) and of the rest (image
  minus its low-pass part): does ELS miss the layout (low) or the strokes (high)?
* ``low_share``: the low-pass part's share of the squared difference,
  ``|blur(y - y_hat)|^2 / |y - y_hat|^2``;
* ``border_share``: the share of the squared difference in the outer
  ``--border`` pixels, against that band's share of the pixels (``border_area``).

For each pair of directories it also reports, over the seeds both hold, the
median r between their networks' samples and between their ELS samples (do two
networks, e.g. with and without attention, make the same images?). A run is
named by its folder, or by ``PARENT/FOLDER`` where two runs' folders share a
name (e.g. ``ablation-n10k/evaluate-150-mnist-resnet-zeros``).

Medians over seeds go to ``where_els_differs.json`` (with the per-seed values),
and ``where_els_differs.png`` shows, per directory, the mean absolute
difference per pixel over seeds and the three r's medians.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from patchmosaic.evaluation import pearson_r
from patchmosaic.runs import load_samples


def gaussian_blur(images: np.ndarray, std: float) -> np.ndarray:
    """``[B, C, H, W]`` images blurred per channel with a separable Gaussian (radius 3 std, zero padding)."""
    radius = max(1, math.ceil(3 * std))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-offsets.square() / (2 * std * std))
    kernel = kernel / kernel.sum()  # [2r + 1]
    x = torch.as_tensor(images, dtype=torch.float64)
    B, C, H, W = x.shape
    x = x.reshape(B * C, 1, H, W)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1), padding=(0, radius))  # along W
    x = F.conv2d(x, kernel.view(1, 1, -1, 1), padding=(radius, 0))  # along H
    return x.reshape(B, C, H, W).numpy()


def border_mask(H: int, W: int, width: int) -> np.ndarray:
    """``[H, W]`` bool: pixels within ``width`` of an edge."""
    rows, cols = np.arange(H)[:, None], np.arange(W)[None, :]
    return (np.minimum(rows, H - 1 - rows) < width) | (np.minimum(cols, W - 1 - cols) < width)


def analyse(network: np.ndarray, els: np.ndarray, *, blur: float, border: int) -> dict:
    """The per-seed numbers of the module docstring for ``[S, C, H, W]`` network and ELS images."""
    if network.shape != els.shape:
        raise ValueError(f"network images {network.shape} and ELS images {els.shape} differ in shape")
    net_low, els_low = gaussian_blur(network, blur), gaussian_blur(els, blur)
    diff = network.astype(np.float64) - els.astype(np.float64)  # [S, C, H, W]
    sse = (diff**2).reshape(len(diff), -1).sum(1)  # [S]
    low_sse = (gaussian_blur(diff, blur) ** 2).reshape(len(diff), -1).sum(1)  # [S]
    band = border_mask(*network.shape[2:], border)  # [H, W]
    border_sse = (diff**2 * band).reshape(len(diff), -1).sum(1)  # [S]
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "pearson_r": pearson_r(network, els),
            "r_low": pearson_r(net_low, els_low),
            "r_high": pearson_r(network - net_low, els - els_low),
            "low_share": np.where(sse > 0, low_sse / sse, np.nan),
            "border_share": np.where(sse > 0, border_sse / sse, np.nan),
            "border_area": float(band.mean()),
            "mean_abs_diff": np.abs(diff).mean(axis=(0, 1)),  # [H, W]
        }


def between_runs(loaded: dict[str, tuple[np.ndarray, np.ndarray, list[int]]]) -> list[dict]:
    """Median r between two runs' network samples and between their ELS samples, over the seeds both runs hold
    (pairs without a shared seed are left out)."""
    names = list(loaded)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            (net_a, els_a, seeds_a), (net_b, els_b, seeds_b) = loaded[a], loaded[b]
            shared = sorted(set(seeds_a) & set(seeds_b))
            if not shared:
                continue
            ia, ib = [seeds_a.index(s) for s in shared], [seeds_b.index(s) for s in shared]
            rows.append({"a": a, "b": b, "n_seeds": len(shared),
                         "network_r": _median(pearson_r(net_a[ia], net_b[ib])),
                         "els_r": _median(pearson_r(els_a[ia], els_b[ib]))})
    return rows


def run_names(runs: list[Path]) -> list[str]:
    """Each run's folder name, or ``PARENT/FOLDER`` where folder names repeat."""
    counts = Counter(r.name for r in runs)
    names = [r.name if counts[r.name] == 1 else f"{r.parent.name}/{r.name}" for r in runs]
    repeated = [name for name, n in Counter(names).items() if n > 1]
    if repeated:
        raise SystemExit(f"two runs have the same name {repeated[0]!r}; give each its own folder")
    return names


def _median(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else None


def _load(run: Path) -> tuple[np.ndarray, np.ndarray, list[int]]:
    net, els = load_samples(run / "samples_network.npz"), load_samples(run / "samples_els.npz")
    if net["seeds"].tolist() != els["seeds"].tolist():
        raise SystemExit(f"{run}: the network's and ELS's samples are for different seeds")
    return net["images"], els["images"], net["seeds"].tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="evaluate/compare output directories")
    parser.add_argument("--blur", type=float, default=2.0, help="std in pixels of the low-pass Gaussian")
    parser.add_argument("--border", type=int, default=4, help="width in pixels of the border band")
    parser.add_argument("--out", type=Path, required=True, help="directory for where_els_differs.json/.png")
    args = parser.parse_args(argv)
    if args.blur <= 0 or args.border < 1:
        parser.error("--blur must be > 0 and --border >= 1")
    results, maps, loaded = {}, {}, {}
    for name, run in zip(run_names(args.runs), args.runs):
        network, els, seeds = loaded[name] = _load(run)
        a = analyse(network, els, blur=args.blur, border=args.border)
        maps[name] = a.pop("mean_abs_diff")
        area = a.pop("border_area")
        results[name] = {
            "run": str(run), "seeds": seeds, "border_area": area,
            "median": {k: _median(v) for k, v in a.items()},  # None where no seed has a finite value
            "per_seed": {k: [float(x) if np.isfinite(x) else None for x in v] for k, v in a.items()},
        }
        m = {k: "n/a" if v is None else f"{v:.3f}" for k, v in results[name]["median"].items()}
        print(f"{name}: median r {m['pearson_r']}, low-pass r {m['r_low']}, high-pass r {m['r_high']}; "
              f"low-pass share of the squared difference {m['low_share']}; border share {m['border_share']} "
              f"(area {area:.2f})")
    between = between_runs(loaded)
    for row in between:
        print(f"{row['a']} vs {row['b']} ({row['n_seeds']} shared seeds): networks' samples median r "
              f"{row['network_r']:.3f}, ELS samples {row['els_r']:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"blur_std_px": args.blur, "border_px": args.border, "runs": results, "between_runs": between}
    (args.out / "where_els_differs.json").write_text(json.dumps(payload, indent=2))
    _figure(args.out / "where_els_differs.png", results, maps)
    print(f"wrote {args.out}/where_els_differs.json and .png")
    return 0


def _figure(path: Path, results: dict, maps: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    fig, axes = plt.subplots(1, n + 1, figsize=(3.2 * (n + 1), 3.4), dpi=110, squeeze=False,
                             layout="constrained")
    vmax = max(float(m.max()) for m in maps.values())
    for ax, (name, m) in zip(axes[0], maps.items()):
        im = ax.imshow(m, cmap="magma", vmin=0, vmax=vmax)
        ax.set_title(f"{name}\nmean |network - ELS|", fontsize=8)
        ax.axis("off")
    fig.colorbar(im, ax=axes[0][n - 1], fraction=0.046, pad=0.04)
    ax = axes[0][n]
    keys = ("pearson_r", "r_low", "r_high")
    width = 0.8 / n
    for i, (name, r) in enumerate(results.items()):
        ax.bar(np.arange(3) + i * width, [np.nan if r["median"][k] is None else r["median"][k] for k in keys], width,
               label=name)
    ax.set_xticks(np.arange(3) + 0.4 - width / 2, ["whole", "low-pass", "high-pass"])
    ax.set_ylabel("median Pearson r, network vs ELS")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
