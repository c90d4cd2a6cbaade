"""Training speed (steps/s) of the Table-1 recipes, memory formats and thread counts side by side.

Each variant is a real :func:`patchmosaic.training.train` run on bundled MNIST
(1,000 images, batch 64, the recipe of ``scripts/reproduce_table1.sh``) in a
temporary folder. The variants take turns: every round extends each run by
``--steps`` iterations with ``resume=True``, so load on a shared machine falls
on all of them alike. steps/s is iterations over the loop's own time
(``train_seconds`` of the summary: setup, checkpoint loading and the first
round's warm-up are outside it, the per-round checkpoint writes inside).

    PYTHONPATH=src python benchmarks/bench_train.py --archs resnet,unet,attention --threads 1 --rounds 3 --steps 25
    PYTHONPATH=src python benchmarks/bench_train.py --archs resnet,unet,attention --rounds 6 --steps 0 --forward 100
    PYTHONPATH=src python benchmarks/bench_train.py --archs resnet,unet,attention --threads 1,2

Ratios are against the same architecture in the contiguous (NCHW) format at
the first thread count listed. ``--forward N`` also times the networks'
inference at batch N in both formats (what sampling a network costs; the
loaders put checkpoints in channels-last format), interleaved, no training.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from patchmosaic.models import ResNetConfig, UNetConfig, build_model
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
    parser.add_argument("--steps", type=int, default=25, help="iterations per variant per round (0: no training)")
    parser.add_argument("--forward", type=int, default=0, metavar="N",
                        help="also time inference at batch N in both formats (0: skip)")
    args = parser.parse_args()
    archs = args.archs.split(",")
    unknown = sorted(set(archs) - set(ARCHS))
    if unknown:
        parser.error(f"unknown --archs {unknown}; choose from {sorted(ARCHS)}")
    threads = [int(t) for t in args.threads.split(",")]
    if args.steps > 0:
        time_training(archs, threads, args.rounds, args.steps)
    if args.forward:
        forward(archs, threads[0], args.forward, args.rounds)


def time_training(archs: list[str], threads: list[int], rounds: int, steps: int) -> None:
    """steps/s of each (arch, thread count, memory format), the variants taking turns round by round."""
    variants = [(a, cl, t) for a in archs for t in threads for cl in (False, True)]
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        last, measured = {}, {v: [0.0, 0] for v in variants}  # loop seconds so far; (seconds, its) measured
        for r in range(rounds + 1):  # round 0 is the warm-up, left out of steps/s
            for arch, cl, t in variants:
                out = Path(tmp) / f"{arch}-{'nhwc' if cl else 'nchw'}-{t}"
                config = TrainConfig(
                    dataset="mnist", n_train=1000, image_size=32, model=ARCHS[arch], steps=(r + 1) * steps,
                    batch_size=64, lr=5e-4, ema=0.999, seed=0, checkpoint_every=0, threads=t, channels_last=cl,
                )
                s = train(config, out, resume=r > 0, progress=False)
                if r > 0:
                    measured[arch, cl, t][0] += s["train_seconds"] - last[arch, cl, t]
                    measured[arch, cl, t][1] += s["iterations_this_call"]
                last[arch, cl, t] = s["train_seconds"]
            print(f"round {r} of {rounds} done", flush=True)

    print(f"\n{rounds} rounds x {steps} iterations per variant, batch 64, MNIST 32x32\n")
    print(f"| model | threads | memory format | steps/s | vs NCHW, {threads[0]} thread(s) |")
    print("|---|---|---|---|---|")
    for arch, cl, t in variants:
        sec, its = measured[arch, cl, t]
        ref_sec, ref_its = measured[arch, False, threads[0]]
        rate, ref = its / sec, ref_its / ref_sec
        fmt = "channels-last" if cl else "NCHW"
        print(f"| {arch} | {t} | {fmt} | {rate:.2f} | {rate / ref:.2f}x |")


@torch.no_grad()
def forward(archs: list[str], threads: int, batch: int, rounds: int) -> None:
    """Seconds of ``rounds`` forward passes at ``batch`` per format, alternating; the outputs' max difference."""
    torch.set_num_threads(threads)
    print(f"\nInference, batch {batch}, {rounds} passes per format, {threads} thread(s)\n")
    print("| model | NCHW | channels-last | speedup | max abs difference |")
    print("|---|---|---|---|---|")
    for arch in archs:
        torch.manual_seed(0)
        nchw = build_model(ARCHS[arch]).eval()
        nhwc = build_model(ARCHS[arch]).eval()
        nhwc.load_state_dict(nchw.state_dict())
        nhwc.to(memory_format=torch.channels_last)
        x, t = torch.randn(batch, 1, 32, 32), torch.rand(batch)
        diff = (nchw(x, t) - nhwc(x, t)).abs().max().item()  # also the warm-up
        seconds = [0.0, 0.0]
        for _ in range(rounds):
            for i, model in enumerate((nchw, nhwc)):
                start = time.perf_counter()
                model(x, t)
                seconds[i] += time.perf_counter() - start
        print(f"| {arch} | {seconds[0]:.2f} s | {seconds[1]:.2f} s | {seconds[0] / seconds[1]:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
