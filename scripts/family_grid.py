"""Every denoiser of patchmosaic from the same seeds on bundled MNIST: one row per denoiser (README figure).

    python scripts/family_grid.py --n-train 1000 --seeds 0-7 --out docs/family_grid.png

Deterministic DDIM (sample_euler) on the paper's 20-step cosine grid from the
same initial noise for every row; LS/ELS use the published mnist-resnet-zeros
schedule (zero padding), ES circular padding, the family its published or
README-table parameters. Also prints seconds per sample of each row.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


from patchmosaic.data import load_dataset
from patchmosaic.denoisers import ScoreMachine, build_denoiser
from patchmosaic.runs import parse_seeds, to_uint8
from patchmosaic.samplers import sample_seeds
from patchmosaic.schedules import sigmas_cosine

ROWS = [
    ("IS (ideal)", lambda d: ScoreMachine(d.images, kind="ideal")),
    ("ES", lambda d: ScoreMachine(d.images, kind="es", padding="circular")),
    ("LS", lambda d: ScoreMachine(d.images, kind="ls").bind(patch_sizes="mnist-resnet-zeros")),
    ("ELS", lambda d: ScoreMachine(d.images, kind="els").bind(patch_sizes="mnist-resnet-zeros")),
    ("wiener", lambda d: build_denoiser("wiener", d.images)),
    ("data-locality", lambda d: build_denoiser("data-locality", d.images, threshold=0.005)),
    ("pspc", lambda d: build_denoiser("pspc", d.images)),
    ("smoothed (0.1)", lambda d: build_denoiser("smoothed", d.images, std=0.1)),
    ("topk (10)", lambda d: build_denoiser("topk", d.images, k=10)),
    ("knn (10, 100)", lambda d: build_denoiser("knn", d.images, k=10, samples=100)),
    ("nearest", lambda d: build_denoiser("nearest", d.images)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--seeds", default="0-7")
    parser.add_argument("--out", type=Path, default=Path("docs/family_grid.png"))
    args = parser.parse_args()
    data = load_dataset("mnist", n_train=args.n_train)
    seeds = parse_seeds(args.seeds)
    sigmas = sigmas_cosine(20)
    rows = []
    for name, build in ROWS:
        start = time.perf_counter()
        images = sample_seeds(build(data), seeds, tuple(data.images.shape[1:]), sigmas=sigmas, batch_size=len(seeds))
        print(f"{name:16s} {(time.perf_counter() - start) / len(seeds):7.2f} s/sample", flush=True)
        rows.append((name, to_uint8(images.numpy())[:, 0]))  # [S, H, W]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), len(seeds), figsize=(0.8 * len(seeds) + 1.4, 0.8 * len(rows)), squeeze=False)
    for r, (name, images) in enumerate(rows):
        for c in range(len(seeds)):
            ax = axes[r][c]
            ax.imshow(images[c], cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
            if r == 0:
                ax.set_title(f"seed {seeds[c]}", fontsize=7)
    fig.suptitle(f"Every denoiser from the same seeds: MNIST, N = {args.n_train}, DDIM 20 steps", fontsize=9)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
