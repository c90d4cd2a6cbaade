"""How much does ``--label`` change a machine's samples? Conditional vs unconditional, per seed.

For each machine (ELS and LS with a locality schedule, the ideal machine IS) and
each seed, sample once unconditionally and once conditioned on class
``seed % 10`` from the same noise, and report the Pearson r of the two final
images (r = 1: the label changed nothing). A low r means the class restriction
changed the sample.

Usage (N = 1,000 bundled digits, 8 seeds, one CPU thread, ~4 minutes; ~11 with --large-k 15)::

    python benchmarks/label_effect.py --large-k 15
    python benchmarks/label_effect.py --dataset fashion-mnist --schedule fashion-resnet-zeros
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from patchmosaic import ScoreMachine, noise_for_seeds, sample
from patchmosaic.data import load_dataset


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson r of two flattened images."""
    a, b = a.flatten().double(), b.flatten().double()  # [D]
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=8, help="seeds 0..S-1; seed s is conditioned on s % 10")
    parser.add_argument("--schedule", default="mnist-resnet-zeros", help="locality schedule of ELS and LS")
    parser.add_argument("--large-k", type=int, default=0,
                        help="also run ELS with this patch size at every step, e.g. 15 (0: skip; ~7 more minutes)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = load_dataset(args.dataset, n_train=args.n_train)
    seeds = list(range(args.seeds))
    labels = torch.tensor([s % 10 for s in seeds])  # [S]
    noise = noise_for_seeds(seeds, data.images.shape[1:])  # [S, C, H, W]
    runs = [("ELS", "els", args.schedule), ("LS", "ls", args.schedule), ("IS", "ideal", None)]
    if args.large_k:
        runs.insert(1, (f"ELS k={args.large_k}", "els", [args.large_k] * 20))
    print(f"{args.dataset}, N = {len(data)}, seeds 0-{args.seeds - 1} (label = seed % 10), "
          f"schedule {args.schedule}, {args.threads} thread(s)")
    print("Pearson r between the conditional and the unconditional sample of each seed:")
    for name, kind, sizes in runs:
        machine = ScoreMachine(data.images, kind=kind, padding="zeros", labels=data.labels)
        start = time.perf_counter()
        uncond = sample(machine, noise, steps=20, patch_sizes=sizes)  # [S, C, H, W]
        cond = sample(machine, noise, steps=20, patch_sizes=sizes, label=labels)  # [S, C, H, W]
        r = np.array([pearson(u, c) for u, c in zip(uncond, cond)])
        print(f"  {name:>10}: median r = {np.median(r):.3f} (min {r.min():.3f}, max {r.max():.3f}); "
              f"per seed {' '.join(f'{v:.2f}' for v in r)}  [{time.perf_counter() - start:.0f} s]")


if __name__ == "__main__":
    main()
