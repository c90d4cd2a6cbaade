"""Full 20-step ELS sample on the bundled MNIST digits: seconds per sample and peak memory.

Zero padding, the published mnist-resnet-zeros schedule, float32. Each
configuration runs in a fresh process so its peak resident memory (VmHWM,
which includes the ~0.3 GB of the Python + torch runtime) is its own; not
ru_maxrss, which on Linux also counts the pages of the parent it was forked from.

    python benchmarks/bench_sample.py                      # N=10000, 1 and 8 seeds
    python benchmarks/bench_sample.py --n-train 2000 --seeds 1
    python benchmarks/bench_sample.py --n-train 1000 --seeds 8 --workers 1,2   # the demo's batch, no provenance
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def peak_rss_kb() -> int:
    """This process's resident-memory high-water mark (``VmHWM``, reset by ``exec``), in kB."""
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("VmHWM:")))


def run(n_train: int, seeds: int, chunk_elements: int, workers: int) -> dict:
    """One 20-step batch of ``seeds`` samples in this process (the batch split over ``workers`` threads)."""
    import torch

    from patchmosaic import ScoreMachine, noise_for_seeds, sample
    from patchmosaic.data import load_dataset

    train = load_dataset("mnist", n_train=n_train).images
    machine = ScoreMachine(train, kind="els", padding="zeros", chunk_elements=chunk_elements, workers=workers)
    noise = noise_for_seeds(range(seeds), (1, 32, 32))
    start = time.perf_counter()
    out = sample(machine, noise, steps=20, patch_sizes="mnist-resnet-zeros")
    wall = time.perf_counter() - start
    assert torch.isfinite(out).all()
    return {"n_train": n_train, "seeds": seeds, "seconds": wall, "seconds_per_sample": wall / seeds,
            "peak_rss_mb": peak_rss_kb() / 1024,
            "threads": torch.get_num_threads(), "workers": workers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=10000, help="bundled MNIST digits (default 10000)")
    parser.add_argument("--seeds", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--chunk-elements", type=int, default=1 << 22, help="engine chunk bound")
    parser.add_argument("--workers", default="1", help="comma-separated ScoreMachine(workers=...) values "
                        "(default 1: one stream with torch's threads)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run(args.n_train, int(args.seeds), args.chunk_elements, int(args.workers))))
        return
    for seeds in args.seeds.split(","):
        for workers in args.workers.split(","):
            out = subprocess.run(
                [sys.executable, __file__, "--child", "--n-train", str(args.n_train), "--seeds", seeds,
                 "--chunk-elements", str(args.chunk_elements), "--workers", workers],
                capture_output=True, text=True, check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"N={r['n_train']} {r['seeds']} seed(s): {r['seconds']:.1f} s per 20-step batch, "
                  f"{r['seconds_per_sample']:.1f} s/sample, peak RSS {r['peak_rss_mb']:.0f} MB "
                  f"({r['threads']} threads, {r['workers']} workers)", flush=True)


if __name__ == "__main__":
    main()
