"""Overhead of provenance: a plain ELS call vs the same call with provenance, in one run.

For each (padding, t, k) point it times, interleaved and on the same inputs,
``denoise`` (plain), ``denoise_provenance(top=0)`` (N_eff and entropy only: what
``sample --provenance`` computes at every step but the last) and
``denoise_provenance(top=8)`` (also the top-8 source patches per pixel: the
final step), and reports each as a ratio to the plain call (best of
``--repeats``). It also times whole 20-step samples with and without
``ProvenanceRecorder`` on the calibrated MNIST schedule.

    python benchmarks/bench_provenance.py                  # N=1000, 1 query, float32
    python benchmarks/bench_provenance.py --batch 8 --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from patchmosaic import CosineSchedule, ScoreMachine, noise_for_seeds, sample
from patchmosaic.data import load_dataset
from patchmosaic.denoisers import DEFAULT_CHUNK_ELEMENTS
from patchmosaic.pretrained import resolve_schedule_spec
from patchmosaic.provenance import ProvenanceRecorder
from patchmosaic.schedules import PatchSchedule

POINTS = (("zeros", 0.9, 15), ("zeros", 0.5, 9), ("zeros", 0.1, 3), ("circular", 0.5, 9), ("circular", 0.1, 3))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=1, help="queries per call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk-elements", type=int, default=DEFAULT_CHUNK_ELEMENTS,
                        help="engine memory bound (on a GPU, e.g. 2**26)")
    parser.add_argument("--points", default="all", help="'all' or a comma list of point numbers (0-4)")
    parser.add_argument("--no-sample", action="store_true", help="skip the whole-sample timing")
    args = parser.parse_args()

    data = load_dataset("mnist", n_train=args.n_train)
    train = data.images.to(args.device)  # [N, 1, 32, 32]
    C, H, W = train.shape[1:]
    noise = noise_for_seeds(range(args.batch), (C, H, W)).to(args.device)  # [B, C, H, W]
    rows = []
    points = POINTS if args.points == "all" else [POINTS[int(i)] for i in args.points.split(",")]
    for padding, t, k in points:
        machine = ScoreMachine(train, kind="els", padding=padding, chunk_elements=args.chunk_elements)
        ab = float(CosineSchedule().alpha_bar(t))
        x_t = ab**0.5 * train[: args.batch] + (1 - ab) ** 0.5 * noise
        calls = {
            "plain": lambda: machine.denoise(x_t, ab, patch_size=k),
            "stats": lambda: machine.denoise_provenance(x_t, ab, patch_size=k, top=0),
            "top8": lambda: machine.denoise_provenance(x_t, ab, patch_size=k, top=8),
        }
        best = {name: math.inf for name in calls}
        for _ in range(args.repeats):  # interleaved, so load changes hit all three alike
            for name, fn in calls.items():
                best[name] = min(best[name], _time(fn, args.device))
        row = {"padding": padding, "t": t, "k": k, "plain_s": round(best["plain"], 4),
               "stats_ratio": round(best["stats"] / best["plain"], 3),
               "top8_ratio": round(best["top8"] / best["plain"], 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not args.no_sample:
        schedule = PatchSchedule.load(resolve_schedule_spec("pretrained:mnist-resnet-zeros"))
        machine = ScoreMachine(train, kind="els", padding="zeros", chunk_elements=args.chunk_elements)
        bound = machine.bind(patch_sizes=schedule, steps=20)
        plain = _time(lambda: sample(bound, noise, steps=20), args.device)
        recorder = ProvenanceRecorder(bound, steps=20, top=8)
        recorded = _time(lambda: sample(recorder, noise, steps=20), args.device)
        print(json.dumps({"whole_sample": "20 steps, mnist-resnet-zeros schedule, zeros padding",
                          "plain_s": round(plain, 3), "provenance_s": round(recorded, 3),
                          "ratio": round(recorded / plain, 3)}), flush=True)
    geo = math.exp(sum(math.log(r["top8_ratio"]) for r in rows) / len(rows))
    print(json.dumps({"top8_ratio_geometric_mean": round(geo, 3), "device": args.device, "batch": args.batch,
                      "n_train": args.n_train, "chunk_elements": args.chunk_elements}))


if __name__ == "__main__":
    main()
