"""ELS denoiser speed: patchmosaic vs the released-code algorithm, in one run.

Times one float32 ELS call (one noisy query) at three points of the published
MNIST schedule, (t=0.9, k=15), (t=0.5, k=9), (t=0.1, k=3), for zero and
circular padding, on the first N bundled MNIST digits, and reports the
speed-up ratios and their geometric mean. The baseline
(``released_baseline.py``) has the released modules' cost structure and is
timed with both released training batch sizes (64 and 256); the faster one is
the reference. Circular padding uses the released dictionary (training patches
that do not wrap) on both sides. Both implementations are first checked to
agree on the benchmark inputs (and each float32 result's distance to our
machine in float64 is printed), and all timings are interleaved in one run.

    python benchmarks/bench_els.py                 # N=512, both paddings
    python benchmarks/bench_els.py --threads 1     # on a CPU shared with other jobs
    python benchmarks/bench_els.py --n-train 2000 --repeats 1
    python benchmarks/bench_els.py --memory        # peak RSS per call, fresh processes
    python benchmarks/bench_els.py --threads 1 --profile zeros,0.9,15   # where one of our calls spends its time
    python benchmarks/bench_els.py --threads 1 --baseline-src /tmp/base/src --repeats 5   # two trees of ours
"""

from __future__ import annotations

import argparse
import json
import math
import os
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

def make_inputs(n_train: int, t: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """First ``n_train`` MNIST digits and one noisy held-out digit at time t."""
    data = load_dataset("mnist", n_train=n_train + 1)
    train, held_out = data.images[:n_train], data.images[n_train:]
    ab = float(CosineSchedule().alpha_bar(t))
    x_t = ab**0.5 * held_out + (1 - ab) ** 0.5 * noise_for_seed(0, held_out.shape[1:])[None]
    return train, x_t, ab


POINTS = ((0.9, 15), (0.5, 9), (0.1, 3))
RELEASED_BATCHES = (64, 256)  # training images per batch in the released code
METHODS = ("patchmosaic",) + tuple(f"released-{b}" for b in RELEASED_BATCHES)


def machine_for(train: torch.Tensor, padding: str) -> ScoreMachine:
    """Our ELS machine with the released dictionary (circular: patches that do not wrap)."""
    return ScoreMachine(train, kind="els", padding=padding, wrap_training_patches=padding == "zeros")


def run_once(method: str, padding: str, t: float, k: int, n_train: int) -> float:
    """One call of ``method`` (``"patchmosaic"`` or ``"released-<batch>"``); returns seconds."""
    train, x_t, ab = make_inputs(n_train, t)
    if method == "patchmosaic":
        machine = machine_for(train, padding)
        start = time.perf_counter()
        machine.denoise(x_t, ab, patch_size=k)
    else:
        batch = int(method.split("-")[1])
        start = time.perf_counter()
        released_els(x_t, train, ab, k, padding, batch_images=batch)
    return time.perf_counter() - start


def peak_rss_mb(method: str, padding: str, t: float, k: int, n_train: int) -> float:
    """Peak resident memory of one call, in a fresh process (MB).

    The child reads its own high-water mark (``VmHWM``, reset by ``exec``), not
    ``ru_maxrss``: on Linux that also counts the pages of the parent it was
    forked from, so every child would report at least this process's size.
    """
    code = (
        "import sys, torch; sys.path.insert(0, %r); import bench_els as b; "
        "torch.set_num_threads(%d); b.run_once(%r, %r, %r, %r, %r); "
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))"
    ) % (str(Path(__file__).parent), torch.get_num_threads(), method, padding, t, k, n_train)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def warm_call(padding: str, t: float, k: int, n_train: int, calls: int = 3) -> float:
    """Best of ``calls`` patchmosaic calls after a warm-up call (one machine); returns seconds."""
    train, x_t, ab = make_inputs(n_train, t)
    machine = machine_for(train, padding)
    machine.denoise(x_t, ab, patch_size=k)
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        machine.denoise(x_t, ab, patch_size=k)
        best = min(best, time.perf_counter() - start)
    return best


def compare_trees(baseline_src: Path, paddings: list[str], n_train: int, rounds: int) -> list[dict]:
    """Our machine from another source tree against this one, point by point.

    Each round runs :func:`warm_call` once per tree in fresh processes (the order alternating
    between rounds), so both trees see the same load; the median over rounds is reported.
    """
    trees = {"baseline": baseline_src.resolve(), "current": (Path(__file__).parent.parent / "src").resolve()}
    code = ("import sys, torch, patchmosaic; sys.path.insert(0, %r); import bench_els as b; "
            "torch.set_num_threads(%d); print(patchmosaic.__file__); print(b.warm_call(%r, %r, %r, %r))")
    rows = []
    for padding in paddings:
        for t, k in POINTS:
            times = {name: [] for name in trees}
            for r in range(rounds):
                for name in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
                    env = {**os.environ, "PYTHONPATH": str(trees[name])}
                    out = subprocess.run(
                        [sys.executable, "-c", code % (str(Path(__file__).parent), torch.get_num_threads(),
                                                       padding, t, k, n_train)],
                        capture_output=True, text=True, check=True, env=env).stdout.split()
                    if not Path(out[0]).resolve().is_relative_to(trees[name]):
                        raise SystemExit(f"the {name} child imported {out[0]}, not the tree {trees[name]}")
                    times[name].append(float(out[1]))
            base, cur = statistics.median(times["baseline"]), statistics.median(times["current"])
            rows.append({"padding": padding, "t": t, "k": k, "baseline_s": base, "current_s": cur,
                         "speedup": base / cur, "rounds": times})
            print(f"{padding:9s} t={t:.1f} k={k:2d}  baseline tree {base:7.3f} s  this tree {cur:7.3f} s  "
                  f"speed-up {base / cur:5.2f}x  (medians of {rounds} rounds)", flush=True)
    return rows


def profile(point: str, n_train: int) -> None:
    """Print the operators one patchmosaic call at ``PADDING,T,K`` spends its time in (share of the call)."""
    padding, t, k = point.split(",")
    train, x_t, ab = make_inputs(n_train, float(t))
    machine = machine_for(train, padding)
    machine.denoise(x_t, ab, patch_size=int(k))  # warm-up
    with torch.profiler.profile() as prof:
        start = time.perf_counter()
        machine.denoise(x_t, ab, patch_size=int(k))
        seconds = time.perf_counter() - start
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"{padding} t={t} k={k}: one call {seconds:.3f} s; operators by self time:")
    for e in events[:10]:
        print(f"  {e.key:32s} {e.self_cpu_time_total / 1e6:7.3f} s  {100 * e.self_cpu_time_total / total:5.1f}%  "
              f"({e.count} calls)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=512, help="training images (default 512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per point; the median is reported")
    parser.add_argument("--paddings", default="zeros,circular", help="comma-separated paddings")
    parser.add_argument("--memory", action="store_true", help="also measure peak RSS per call in fresh processes")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice); "
                        "1 avoids threads spin-waiting for a descheduled partner on a shared CPU")
    parser.add_argument("--profile", metavar="PADDING,T,K", help="instead of timing: profile one patchmosaic call "
                        "at this point (torch.profiler, after a warm-up call) and print its top operators")
    parser.add_argument("--baseline-src", type=Path, metavar="DIR", help="instead of the released algorithm: "
                        "time our machine from the source tree DIR (a src folder) against this tree's, "
                        "alternating fresh processes for --repeats rounds")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, N={args.n_train}, float32, 1 query")
    if args.profile:
        profile(args.profile, args.n_train)
        return
    if args.baseline_src:
        rows = compare_trees(args.baseline_src, args.paddings.split(","), args.n_train, args.repeats)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
        return
    results = []
    for padding in args.paddings.split(","):
        ratios = []
        for t, k in POINTS:
            train, x_t, ab = make_inputs(args.n_train, t)
            ours = machine_for(train, padding).denoise(x_t, ab, patch_size=k)
            base = released_els(x_t, train, ab, k, padding)
            err = (ours - base).abs().max().item()
            rel = err / base.abs().max().item()
            # A different machine (dictionary, border rule) differs by O(0.1-1). The baseline's
            # float32 conv2d is less exact than our products (oneDNN may use Winograd for small
            # filters): up to 1.3e-3 at t=0.1, k=3 on one thread, where ours is 1.4e-6 from float64.
            if err > 1e-2:
                raise SystemExit(f"implementations disagree at {padding} t={t} k={k}: max |diff| = {err}")
            # each float32 result against our machine in float64 (tests/test_released_baseline.py holds
            # the two algorithms equal in float64)
            exact = machine_for(train.double(), padding).denoise(x_t.double(), ab, patch_size=k)
            err_ours, err_base = ((r.double() - exact).abs().max().item() for r in (ours, base))
            runs = {method: [] for method in METHODS}
            for _ in range(args.repeats):  # interleaved, so load from other processes hits all alike
                for method in METHODS:
                    runs[method].append(run_once(method, padding, t, k, args.n_train))
            timing = {method: statistics.median(v) for method, v in runs.items()}
            best = min(METHODS[1:], key=timing.__getitem__)
            ratio = timing[best] / timing["patchmosaic"]
            ratios.append(ratio)
            row = {"padding": padding, "t": t, "k": k, "released_s": timing[best], "released_best": best,
                   **{f"{m}_s": timing[m] for m in METHODS}, "speedup": ratio,
                   "max_abs_diff": err, "max_rel_diff": rel,
                   "patchmosaic_max_abs_err_f64": err_ours, "released_max_abs_err_f64": err_base}
            if args.memory:
                row["released_peak_mb"] = peak_rss_mb(best, padding, t, k, args.n_train)
                row["patchmosaic_peak_mb"] = peak_rss_mb("patchmosaic", padding, t, k, args.n_train)
            results.append(row)
            mem = (f"  peak {row['released_peak_mb']:.0f} MB vs {row['patchmosaic_peak_mb']:.0f} MB"
                   if args.memory else "")
            batches = ", ".join(f"{m.split('-')[1]}: {timing[m]:.3f} s" for m in METHODS[1:])
            print(f"{padding:9s} t={t:.1f} k={k:2d}  released {timing[best]:7.3f} s ({batches})  "
                  f"patchmosaic {timing['patchmosaic']:7.3f} s  speed-up {ratio:6.1f}x  "
                  f"(max |diff| {err:.1e}, {rel:.1e} of max |x0|; from float64: ours {err_ours:.1e}, "
                  f"released {err_base:.1e}){mem}", flush=True)
        gmean = math.exp(sum(map(math.log, ratios)) / len(ratios))
        print(f"{padding:9s} geometric-mean speed-up {gmean:.1f}x, minimum {min(ratios):.1f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
