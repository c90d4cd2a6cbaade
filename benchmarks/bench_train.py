"""Training speed (steps/s) of the Table-1 recipes, memory formats and thread counts side by side.

Each variant is a real :func:`patchmosaic.training.train` run on bundled MNIST
(1,000 images, batch 64, the recipe of ``scripts/reproduce_table1.sh``) in a
temporary folder. The variants take turns: every round extends each run by
``--steps`` iterations with ``resume=True``, so load on a shared machine falls
on all of them alike. steps/s is iterations over the loop's own time
(``train_seconds`` of the summary: setup, checkpoint loading and the first
round's warm-up are outside it, the per-round checkpoint writes inside).

    PYTHONPATH=src python benchmarks/bench_train.py --archs resnet,unet --threads 1 --rounds 4 --steps 25
    PYTHONPATH=src python benchmarks/bench_train.py --archs resnet,unet,attention --threads 1,2

Ratios are against the same architecture in the contiguous (NCHW) format at
the first thread count listed.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from patchmosaic.models import ResNetConfig, UNetConfig
from patchmosaic.training import TrainConfig, train

ARCHS = {  # the models of scripts/reproduce_table1.sh
    "resnet": ResNetConfig(width=32, depth=4, norm_groups=0),
    "unet": UNetConfig(base_width=32),
    "attention": UNetConfig(base_width=32, attention=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="resnet,unet", help=f"comma list of {', '.join(ARCHS)}")
    parser.add_argument("--threads", default="1", help="comma list of torch thread counts")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25, help="iterations per variant per round")
    args = parser.parse_args()
    archs = args.archs.split(",")
    unknown = sorted(set(archs) - set(ARCHS))
    if unknown:
        parser.error(f"unknown --archs {unknown}; choose from {sorted(ARCHS)}")
    threads = [int(t) for t in args.threads.split(",")]
    variants = [(a, cl, t) for a in archs for t in threads for cl in (False, True)]

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        last, measured = {}, {v: [0.0, 0] for v in variants}  # loop seconds so far; (seconds, its) measured
        for r in range(args.rounds + 1):  # round 0 is the warm-up, left out of steps/s
            for arch, cl, t in variants:
                out = Path(tmp) / f"{arch}-{'nhwc' if cl else 'nchw'}-{t}"
                config = TrainConfig(
                    dataset="mnist", n_train=1000, image_size=32, model=ARCHS[arch], steps=(r + 1) * args.steps,
                    batch_size=64, lr=5e-4, ema=0.999, seed=0, checkpoint_every=0, threads=t, channels_last=cl,
                )
                s = train(config, out, resume=r > 0, progress=False)
                if r > 0:
                    measured[arch, cl, t][0] += s["train_seconds"] - last[arch, cl, t]
                    measured[arch, cl, t][1] += s["iterations_this_call"]
                last[arch, cl, t] = s["train_seconds"]
            print(f"round {r} of {args.rounds} done", flush=True)

    print(f"\n{args.rounds} rounds x {args.steps} iterations per variant, batch 64, MNIST 32x32\n")
    print(f"| model | threads | memory format | steps/s | vs NCHW, {threads[0]} thread(s) |")
    print("|---|---|---|---|---|")
    for arch, cl, t in variants:
        sec, its = measured[arch, cl, t]
        ref_sec, ref_its = measured[arch, False, threads[0]]
        rate, ref = its / sec, ref_its / ref_sec
        fmt = "channels-last" if cl else "NCHW"
        print(f"| {arch} | {t} | {fmt} | {rate:.2f} | {rate / ref:.2f}x |")


if __name__ == "__main__":
    main()
