"""Peak memory of one ELS call at N = 60,000 (the size of the MNIST training set).

The bundled 10,000 digits and 5 translated copies stand in for the full set
(same shape and statistics; it cannot be downloaded here). Reports the peak
resident memory of the process (ru_maxrss: includes the Python + torch runtime
and the 60,000 float32 training images, 250 MB) and the engine's share above
the state before the call.

    python benchmarks/memory_60k.py --patch-size 9 --t 0.5
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from patchmosaic import CosineSchedule, ScoreMachine, noise_for_seeds
from patchmosaic.data import load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch-size", type=int, default=9)
    parser.add_argument("--t", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, default=1, help="queries per call")
    args = parser.parse_args()
    base = load_dataset("mnist").images  # [10000, 1, 32, 32]
    shifts = [(0, 0), (1, 0), (0, 1), (-1, 0), (0, -1), (1, 1)]
    train = torch.empty((len(shifts) * len(base), *base.shape[1:]))  # [60000, 1, 32, 32], filled in place
    for i, s in enumerate(shifts):
        train[i * len(base) : (i + 1) * len(base)] = torch.roll(base, s, dims=(2, 3))
    del base
    machine = ScoreMachine(train, kind="els", padding="zeros")
    x = noise_for_seeds(range(args.seeds), (1, 32, 32))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    machine.denoise(x, float(CosineSchedule().alpha_bar(args.t)), patch_size=args.patch_size)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"N={train.shape[0]} k={args.patch_size} t={args.t} {args.seeds} query: {wall:.1f} s, "
          f"peak RSS {peak:.0f} MB (before the call {before:.0f} MB, engine +{peak - before:.0f} MB)")


if __name__ == "__main__":
    main()
