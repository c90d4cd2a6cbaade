"""ELS denoiser speed: patchmosaic vs the released-code algorithm, in one run.

Times one float32 ELS call (one noisy query) at three points of the published
MNIST schedule, (t=0.9, k=15), (t=0.5, k=9), (t=0.1, k=3), for zero and
circular padding, on the first N bundled MNIST digits, and reports the
speed-up ratios and their geometric mean. Both implementations are first
checked to agree on the benchmark inputs.

    python benchmarks/bench_els.py                 # N=500, both paddings
    python benchmarks/bench_els.py --n-train 2000 --repeats 1
    python benchmarks/bench_els.py --memory        # peak RSS per call, fresh processes
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from released_baseline import released_els  # noqa: E402

from patchmosaic import CosineSchedule, ScoreMachine, noise_for_seed  # noqa: E402
from patchmosaic.data import load_dataset  # noqa: E402

POINTS = ((0.9, 15), (0.5, 9), (0.1, 3))


def make_inputs(n_train: int, t: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """First ``n_train`` MNIST digits and one noisy held-out digit at time t."""
    data = load_dataset("mnist", n_train=n_train + 1)
    train, held_out = data.images[:n_train], data.images[n_train:]
    ab = float(CosineSchedule().alpha_bar(t))
    x_t = ab**0.5 * held_out + (1 - ab) ** 0.5 * noise_for_seed(0, held_out.shape[1:])[None]
    return train, x_t, ab


def run_once(method: str, padding: str, t: float, k: int, n_train: int) -> float:
    """One call of ``method``; returns seconds."""
    train, x_t, ab = make_inputs(n_train, t)
    if method == "patchmosaic":
        machine = ScoreMachine(train, kind="els", padding=padding)
        start = time.perf_counter()
        machine.denoise(x_t, ab, patch_size=k)
    else:
        start = time.perf_counter()
        released_els(x_t, train, ab, k, padding)
    return time.perf_counter() - start


def peak_rss_mb(method: str, padding: str, t: float, k: int, n_train: int) -> float:
    """Peak resident memory of one call, in a fresh process (MB)."""
    code = (
        "import sys, resource; sys.path.insert(0, %r); import bench_els as b; "
        "b.run_once(%r, %r, %r, %r, %r); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    ) % (str(Path(__file__).parent), method, padding, t, k, n_train)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=500, help="training images (default 500)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per point; the median is reported")
    parser.add_argument("--paddings", default="zeros,circular", help="comma-separated paddings")
    parser.add_argument("--memory", action="store_true", help="also measure peak RSS per call in fresh processes")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, N={args.n_train}, float32, 1 query")
    results = []
    for padding in args.paddings.split(","):
        ratios = []
        for t, k in POINTS:
            train, x_t, ab = make_inputs(args.n_train, t)
            ours = ScoreMachine(train, kind="els", padding=padding).denoise(x_t, ab, patch_size=k)
            base = released_els(x_t, train, ab, k, padding)
            err = (ours - base).abs().max().item()
            if err > 1e-3:
                raise SystemExit(f"implementations disagree at {padding} t={t} k={k}: max |diff| = {err}")
            timing = {}
            for method in ("released", "patchmosaic"):
                timing[method] = statistics.median(
                    run_once(method, padding, t, k, args.n_train) for _ in range(args.repeats)
                )
            ratio = timing["released"] / timing["patchmosaic"]
            ratios.append(ratio)
            row = {"padding": padding, "t": t, "k": k, "released_s": timing["released"],
                   "patchmosaic_s": timing["patchmosaic"], "speedup": ratio, "max_abs_diff": err}
            if args.memory:
                row["released_peak_mb"] = peak_rss_mb("released", padding, t, k, args.n_train)
                row["patchmosaic_peak_mb"] = peak_rss_mb("patchmosaic", padding, t, k, args.n_train)
            results.append(row)
            mem = (f"  peak {row['released_peak_mb']:.0f} MB vs {row['patchmosaic_peak_mb']:.0f} MB"
                   if args.memory else "")
            print(f"{padding:9s} t={t:.1f} k={k:2d}  released {timing['released']:7.3f} s  "
                  f"patchmosaic {timing['patchmosaic']:7.3f} s  speed-up {ratio:6.1f}x  "
                  f"(max |diff| {err:.1e}){mem}", flush=True)
        gmean = math.exp(sum(map(math.log, ratios)) / len(ratios))
        print(f"{padding:9s} geometric-mean speed-up {gmean:.1f}x, minimum {min(ratios):.1f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
