"""Bounded pruning per noise level: fraction of (pixel, candidate) pairs skipped and the speedup.

ELS, zero padding, float32, N = 1000 bundled MNIST digits, the published
``mnist-resnet-zeros`` schedule on the 20-step cosine grid. Queries are
held-out digits plus noise at each sigma (``--seeds`` of them, batched). Each
level is timed pruned (``prune_rank=16``, ``--rank``) and unpruned (``prune_rank=0``)
back to back in one process, so the ratio is measured interleaved. ``--track``
records N_eff and entropy as ``sample --provenance`` does at every step
(exponent floor -40); without it the floor is -80. ``bounded``: the (pixel,
candidate) pairs of the chunks where the bound ran (``--always``: every chunk
after the first keys, instead of switching the bound off where its first chunk
skips under ``PRUNE_MIN_FRACTION``); ``skipped``: the pairs of the (tile of
``--tile`` query rows, block of ``--keys`` keys) pairs the bound skipped.

    python benchmarks/bench_prune.py --threads 1 --track
"""

from __future__ import annotations

import argparse
import time

import torch

import patchmosaic.engine as engine
from patchmosaic import ScoreMachine
from patchmosaic.data import load_dataset
from patchmosaic.schedules import PatchSchedule, sigmas_cosine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=1000, help="bundled MNIST digits (default 1000)")
    parser.add_argument("--seeds", type=int, default=2, help="queries per call (default 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--rank", type=int, default=16, help="prune_rank of the pruned machine (default 16)")
    parser.add_argument("--tile", type=int, default=engine.PRUNE_ROWS,
                        help=f"query rows per pruning tile (default {engine.PRUNE_ROWS})")
    parser.add_argument("--keys", type=int, default=engine.PRUNE_KEYS,
                        help=f"keys per pruning block (default {engine.PRUNE_KEYS})")
    parser.add_argument("--always", action="store_true",
                        help="never switch the bound off (measures what it can prove at every level)")
    parser.add_argument("--track", action="store_true", help="also record N_eff and entropy (provenance mode)")
    args = parser.parse_args()
    engine.PRUNE_ROWS, engine.PRUNE_KEYS = args.tile, args.keys
    if args.always:
        engine.PRUNE_MIN_FRACTION = 0.0
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset("mnist", n_train=args.n_train + args.seeds).images
    train, held = data[: args.n_train], data[args.n_train :]
    schedule = PatchSchedule.parse("mnist-resnet-zeros")
    machines = {rank: ScoreMachine(train, kind="els", padding="zeros", prune_rank=rank) for rank in (args.rank, 0)}
    gen = torch.Generator().manual_seed(0)
    total = {args.rank: 0.0, 0: 0.0}
    print("| sigma | k | bounded | skipped | unpruned | pruned | speedup | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for sigma in (float(s) for s in sigmas_cosine(20) if s > 0):
        k = schedule.size_at(sigma)
        x = held + sigma * torch.randn(held.shape, generator=gen)
        out, secs = {}, {}
        for rank, m in machines.items():
            bound = m.bind(patch_sizes=schedule)
            start = time.perf_counter()
            out[rank] = bound.with_provenance(x, sigma, top=0)[0] if args.track else bound(x, sigma)
            secs[rank] = time.perf_counter() - start
            total[rank] += secs[rank]
        skipped, pairs, bounded = machines[args.rank].prune_stats
        print(f"| {sigma:.3f} | {k} | {bounded / pairs:.1%} | {skipped / pairs:.1%} | {secs[0]:.2f} s | {secs[args.rank]:.2f} s | "
              f"{secs[0] / secs[args.rank]:.2f}x | {float((out[0] - out[args.rank]).abs().max()):.1e} |", flush=True)
    print(f"total: unpruned {total[0]:.1f} s, pruned {total[args.rank]:.1f} s ({total[0] / total[args.rank]:.2f}x); "
          f"threads {torch.get_num_threads()}, track={args.track}")


if __name__ == "__main__":
    main()
