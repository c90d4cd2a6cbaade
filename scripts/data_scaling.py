"""How ELS samples depend on the training-set size: n_train = 100 ... 10000 against the 10000 output.

    python scripts/data_scaling.py --seeds 0-7 --out docs/data_scaling   # then see data_scaling.json / .png

ELS on the bundled MNIST (first n_train images, resized to 32 x 32 as the
published mnist-resnet-zeros model), zero padding, the published
mnist-resnet-zeros schedule, deterministic DDIM (sample_euler) on the 20-step
cosine grid, the same seeds for every n_train. The largest n_train is run first
(it is the reference); each n_train's samples are saved as they finish
(samples_<n>.npz, reused by a rerun with the same seeds), so an interrupted run
keeps what it has. Reports, per
n_train, the Pearson r of each seed's final image with the largest n_train's
image, its median and range, and the seconds per sample.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from patchmosaic.data import load_dataset
from patchmosaic.denoisers import ScoreMachine
from patchmosaic.evaluation import pearson_r
from patchmosaic.runs import parse_seeds
from patchmosaic.samplers import sample_seeds
from patchmosaic.schedules import PatchSchedule, sigmas_cosine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", default="100,300,1000,3000,10000", help="Training-set sizes (comma-separated).")
    parser.add_argument("--seeds", default="0-7", help="Seeds.")
    parser.add_argument("--size", type=int, default=32, help="Image side (the published schedule's 32).")
    parser.add_argument("--schedule", default="mnist-resnet-zeros", help="Locality schedule (preset or list).")
    parser.add_argument("--batch-size", type=int, default=8, help="Seeds per sampler call.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    parser.add_argument("--out", type=Path, required=True, help="Directory for samples_<n>.npz, data_scaling.json/.png.")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = sorted({int(n) for n in args.n_train.split(",")}, reverse=True)  # the reference first
    seeds = parse_seeds(args.seeds)
    schedule = PatchSchedule.parse(args.schedule)
    sigmas = sigmas_cosine(len(schedule))
    args.out.mkdir(parents=True, exist_ok=True)
    seconds: dict[int, float] = {}
    for n in sizes:
        path = args.out / f"samples_{n}.npz"
        if path.is_file():  # finished earlier: only if for the same seeds
            have = np.load(path)["seeds"].tolist()
            if have != seeds:
                raise SystemExit(f"{path} holds seeds {have}, not {seeds}: use another --out or remove it")
            continue
        data = load_dataset("mnist", n_train=n, size=args.size)
        machine = ScoreMachine(data.images, kind="els", padding="zeros").bind(patch_sizes=schedule)
        start = time.perf_counter()
        images = sample_seeds(machine, seeds, tuple(data.images.shape[1:]), sigmas=sigmas,
                              batch_size=args.batch_size)  # [S, C, H, W]
        seconds[n] = (time.perf_counter() - start) / len(seeds)
        np.savez(path, images=images.numpy(), seeds=np.array(seeds), seconds_per_sample=seconds[n])
        print(f"n_train={n}: {seconds[n]:.1f} s/sample", flush=True)
    ref_n = sizes[0]
    ref = np.load(args.out / f"samples_{ref_n}.npz")["images"]
    rows = []
    for n in sorted(sizes):
        archive = np.load(args.out / f"samples_{n}.npz")
        r = pearson_r(ref, archive["images"])  # [S]
        rows.append({"n_train": n, "pearson_r_per_seed": [float(v) for v in r], "median_r": float(np.median(r)),
                     "min_r": float(r.min()), "max_r": float(r.max()),
                     "seconds_per_sample": float(archive["seconds_per_sample"])})
        print(f"n_train={n:>6}: median r with n_train={ref_n}: {np.median(r):.3f} "
              f"(range {r.min():.3f}..{r.max():.3f}), {float(archive['seconds_per_sample']):.1f} s/sample")
    result = {"reference_n_train": ref_n, "seeds": seeds, "size": args.size, "schedule": list(schedule.sizes),
              "steps": len(schedule), "sampler": "euler (DDIM)", "grid": "cosine", "threads": torch.get_num_threads(),
              "rows": rows}
    (args.out / "data_scaling.json").write_text(json.dumps(result, indent=2))
    _figure(args.out / "data_scaling.png", rows, ref_n)


def _figure(path: Path, rows: list[dict], ref_n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 3.4), dpi=120)
    for row in rows:
        ax.scatter([row["n_train"]] * len(row["pearson_r_per_seed"]), row["pearson_r_per_seed"], s=10, alpha=0.5,
                   color="#1f6feb")
    ax.plot([r["n_train"] for r in rows], [r["median_r"] for r in rows], "o-", color="#c33", label="median")
    ax.set_xscale("log")
    ax.set_xlabel("n_train (first images of bundled MNIST)")
    ax.set_ylabel(f"Pearson r with n_train = {ref_n}")
    ax.set_title("ELS (mnist-resnet-zeros schedule), same seeds", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
