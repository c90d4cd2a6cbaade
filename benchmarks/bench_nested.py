"""The one-pass ELS call (``ScoreMachine.denoise_sizes``, :mod:`patchmosaic.nested`) in detail.

Three measurements on bundled MNIST (held-out digits plus noise, one thread):

1. ``accuracy``: float32 error against float64 of the shared stream and of the
   single-size call, per size (the README's "no larger than the single-size path").
2. ``split``: sizes lo..21 in one stream against one call per size, for each
   lo (what ``patchmosaic.nested.NESTED_FROM`` is chosen from); ``NESTED_FROM``
   is lowered to 3 for this, so every size of the range is streamed.
3. ``profile``: the torch operators of one shared call of sizes 7..21 (where
   the time goes: ring products against clamp/exp/weighted sums).

    PYTHONPATH=src python benchmarks/bench_nested.py accuracy --n-train 300 --sigma 0.5
    PYTHONPATH=src python benchmarks/bench_nested.py split --padding zeros --n-train 300 --sigma 1
    PYTHONPATH=src python benchmarks/bench_nested.py profile --padding circular --n-train 100 --sigma 1
"""

from __future__ import annotations

import argparse
import time

import torch

from patchmosaic import ScoreMachine
from patchmosaic.data import load_dataset
from patchmosaic.denoisers import score_machines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("accuracy", "split", "profile"))
    parser.add_argument("--padding", default="zeros", choices=("zeros", "circular"))
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--sigma", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("mnist", n_train=args.n_train + args.queries).images
    train, held = data[: args.n_train], data[args.n_train :]
    x = held + args.sigma * torch.randn(held.shape, generator=torch.Generator().manual_seed(0))
    machine = ScoreMachine(train, kind="els", padding=args.padding)
    if args.what == "accuracy":
        exact = ScoreMachine(train.double(), kind="els", padding=args.padding)
        sizes = list(range(7, 23, 2))
        shared = machine.denoise_sizes(x, args.sigma, sizes)
        for k in sizes:
            want = exact(x.double(), args.sigma, patch_size=k)
            single = machine(x, args.sigma, patch_size=k)
            print(f"k={k:2d} max|float32 - float64|: shared {float((shared[k] - want).abs().max()):.1e}, "
                  f"single-size {float((single - want).abs().max()):.1e}", flush=True)
    elif args.what == "split":
        score_machines.NESTED_FROM = 3
        single = {}
        for k in range(3, 23, 2):
            start = time.perf_counter()
            machine(x, args.sigma, patch_size=k)
            single[k] = time.perf_counter() - start
        print("one call per size:", {k: round(v, 2) for k, v in single.items()})
        for lo in (3, 5, 7, 9, 11, 13):
            sizes = list(range(lo, 23, 2))
            start = time.perf_counter()
            machine.denoise_sizes(x, args.sigma, sizes)
            shared = time.perf_counter() - start
            separate = sum(single[k] for k in sizes)
            print(f"sizes {lo}..21: one stream {shared:.2f} s, one call per size {separate:.2f} s "
                  f"({shared / separate:.2f}x)", flush=True)
    else:
        sizes = list(range(7, 23, 2))
        machine.denoise_sizes(x, args.sigma, sizes[:2])  # warm-up
        start = time.perf_counter()
        machine(x, args.sigma, patch_size=21)
        print(f"one call at k = 21: {time.perf_counter() - start:.2f} s")
        from torch.profiler import profile

        with profile() as prof:
            machine.denoise_sizes(x, args.sigma, sizes)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
